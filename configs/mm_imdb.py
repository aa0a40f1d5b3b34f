r"""ReFNet on MM-IMDB (frozen plot and poster features -> 23 movie genres, multi-label).

Needs the MM-IMDB file `multimodal_imdb.hdf5`: the ready-made file of
https://github.com/johnarevalo/gmu-mmimdb that MultiBench uses, mirrored at
https://archive.org/download/mmimdb/multimodal_imdb.hdf5. Download it by hand into a directory and give that
directory as `config.data.manual_dir` (default: <data_dir>/downloads/manual). The first run prepares it
(refnet_jax/data/datasets/mm_imdb.py: only the text and image features and the genres are read); later runs reuse
the prepared copy. Run (from the repository root):

  python train.py --config configs/mm_imdb.py --workdir runs/mm_imdb \
      --config.data.manual_dir=/path/to/the/directory/holding/the/hdf5

The published frozen-feature setup: text (word2vec mean, 300) and image (VGG-16, 4096) features, concat
fusion, refiner weight 0.1 per modality and the Multi-Similarity loss. Results are micro, macro, weighted
and samples F1 (threshold 0.5 on the sigmoid) on validation (2,608 movies) and test (7,799). The reported
ReFNet result to compare with, from a re-implementation: micro-F1 59.45, macro-F1 51.51 (in percent). This
config has not yet been run on the real file, so it is not known to reach them.

The argument picks a variant (refnet_jax/config_lib.py), e.g. `--config configs/mm_imdb.py:variant=baseline`:
  fusion=KIND (a name in refnet_jax.models.fusions.FUSIONS: config_lib.ARG_HELP lists them),
  variant=baseline|refiner|refnet|pretrain, only=text|image, tiny.
"""

import ml_collections

from refnet_jax import config_lib

MODALITIES = ('text', 'image')  # the dataset's modalities


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = config_lib.parse_arg(arg, default_fusion='concat')
    config = config_lib.base_config(opts, dataset='mm_imdb', modalities=MODALITIES)
    config_lib.set_encoders(config, {m: dict(hidden=(512,), embed_dim=128) for m in MODALITIES})  # FeatureMLP
    if opts['fusion'] == 'concat':
        config.model.fusion.dropout = 0.5  # 15,552 training movies and 4,096-d poster features: overfit fast
    config.train.num_steps = 3000  # ~25 epochs of the 15,552 training movies
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 100
    config.train.weight_decay = 1e-2
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 1000
    config.train.eval_every_steps = 500  # validation F1 during training
    config.eval.batch_size = 1024

    if opts['tiny']:
        config_lib.make_tiny(config, encoders={m: dict(hidden=(16,), embed_dim=8) for m in MODALITIES})
        config.train.eval_every_steps = 0
        config.eval.batch_size = 64
    return config
