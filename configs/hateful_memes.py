r"""ReFNet on Hateful Memes (a meme's image + its text -> hateful or not); the metric is AUROC.

Data: gated, so no package carries them. Accept the licence of Meta AI's Hateful Memes Challenge (Kiela et
al. 2020, https://arxiv.org/abs/2005.04790), download the release and unpack it into one directory holding
`train.jsonl`, `dev_seen.jsonl`, `test_seen.jsonl` (optionally `dev_unseen.jsonl`, `test_unseen.jsonl`) and
the `img/` folder of PNG images, as published. Run (from the repository root):

  python train.py --config configs/hateful_memes.py --workdir runs/hateful_memes \
      --config.data.manual_dir /path/to/hateful_memes

The first run prepares the data (images decoded and resized to 64x64, text tokenized with a vocabulary of the
train split; refnet_jax/data/datasets/hateful_memes.py) into `config.data.data_dir`; later runs reuse it and need
the manual files no longer. Splits: train.jsonl trains, dev_seen.jsonl is `validation`, test_seen.jsonl
`test`. The results report `auroc` (the challenge's metric) and `accuracy` for both.

Expected: not measured here (the data are gated). For scale, the dataset paper reports test AUROC between
about 0.53 (image alone) and 0.71 (the best multimodal models), all starting from pretrained encoders; a small
network trained from scratch on 8,500 memes should expect the lower end.

The argument picks a variant (refnet_jax/config_lib.py), e.g.
`--config configs/hateful_memes.py:fusion=transformer,variant=baseline`:
  fusion=KIND (a name in refnet_jax.models.fusions.FUSIONS: config_lib.ARG_HELP lists them),
  variant=baseline|refiner|refnet|pretrain, only=image|text, tiny,
  and, for this dataset, `features`: the `hateful_memes/features` data, vectors of a frozen pretrained encoder
  that the manual directory holds as `features.npz` (arrays id (N,), image (N, Di), text (N, Dt)), each
  encoded by an MLP instead of the CNN and the word embeddings.
"""

import ml_collections

from refnet_jax import config_lib

MODALITIES = ('image', 'text')  # the dataset's modalities
FEATURES = 'features'  # the config argument that picks the hateful_memes/features data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = config_lib.parse_arg(arg, default_fusion='concat', extra_flags=(FEATURES,))
    features = opts[FEATURES]
    config = config_lib.base_config(opts, dataset='hateful_memes', modalities=MODALITIES)
    # 'raw': 64x64 images and word ids; 'features': the user's encoder's vectors (features.npz).
    config.data.builder_config = FEATURES if features else 'raw'
    if features:
        encoders = {m: dict(hidden=(256,), embed_dim=128) for m in MODALITIES}
    else:
        encoders = {
            'image': dict(features=(32, 64, 64, 64), embed_dim=128, pooling='max'),
            # Bag of words: 8,500 training texts are few to learn position embeddings from.
            'text': dict(embed_dim=128, use_positions=False),
        }
    config_lib.set_encoders(config, encoders)
    config.train.num_steps = 2000  # ~30 epochs of the 8,500 training memes
    config.train.batch_size = 128
    config.train.weight_decay = 1e-2
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 250  # validation AUROC along the way: small data overfit early

    if opts['tiny']:
        if features:
            tiny = {m: dict(hidden=(16,), embed_dim=16) for m in MODALITIES}
        else:
            tiny = {
                'image': dict(features=(8, 8), embed_dim=16, pooling='max'),
                'text': dict(embed_dim=16, use_positions=False),
            }
        config_lib.make_tiny(config, encoders=tiny)
        config.train.eval_every_steps = 0
        config.eval.batch_size = 64
    return config
