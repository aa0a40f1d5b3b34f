r"""ReFNet on your own data: copy this file, name your modalities and their kinds, and point it at your directory.

Run (from the repository root), for the worked example of docs/how-to/own-data.md, whose `my_data/train.npz`
holds `signal` (N, 32, 2) float, `profile` (N, 8) float and `label` (N,) in 4 classes:

  python train.py --config configs/custom.py --workdir runs/my_data --config.data.manual_dir my_data \
      --config.train.num_steps 300

Expected on that example: test accuracy 1.0 (60 examples; measured for seeds 0, 1 and 2), where either modality
alone reaches about 0.5 (`:only=signal`, `:only=profile`); under 30 s on 2 CPU cores.

Your directory holds `train.npz` (optionally `validation.npz`, `test.npz`) with an array per modality and the
labels, or a table (`config.data.table`: CSV, JSON Lines, Parquet, or a directory of shards); text comes raw and
is tokenized when the data are prepared; labels are classes or, with `config.data.task='regression'`, real
values. What each field below does is in refnet_jax/data/datasets/custom.py; docs/how-to/own-data.md has an
image + text, a text + text + numbers and a regression example.
The first run prepares the data into `config.data.data_dir`; a later run with the same files and data fields
reuses that copy, and editing either prepares a new one.

The argument picks a variant (refnet_jax/config_lib.py), e.g.
`--config configs/custom.py:fusion=transformer,variant=baseline`:
  fusion=KIND (a name in refnet_jax.models.fusions.FUSIONS: config_lib.ARG_HELP lists them),
  variant=baseline|refiner|refnet|pretrain, only=M[+M...], tiny,
  kinds=NAME:KIND[+NAME:KIND...] (your modalities without editing MODALITIES, e.g. as tools/features.py prints them).
"""

import ml_collections

from refnet_jax import config_lib
from refnet_jax.data import contract

# Your modalities: name (an array of the .npz files) -> kind: 'image' (H, W, C) uint8, 'text' raw strings
# (tokenized when the data are prepared), 'tokens' (T,) integer ids with 0 as padding, 'series' (T, C) numbers,
# or 'features' (D,) numbers. The kind picks the encoder.
MODALITIES = {'signal': 'series', 'profile': 'features'}

ENCODERS = {  # per kind, its encoder (`module`, a name in refnet_jax/models/encoders.py) and that encoder's fields
    'image': dict(module='cnn', features=(16, 32, 32), embed_dim=64, pooling='max'),  # ImageCNN
    'tokens': dict(module='bow', embed_dim=64, use_positions=False),  # TokenEncoder: a bag of words
    'text': dict(module='bow', embed_dim=64, use_positions=False),  # the same, over subword ids
    'series': dict(module='conv1d', features=(32, 64), embed_dim=64),  # SeriesEncoder: 1-D convolutions
    'features': dict(module='mlp', hidden=(128,), embed_dim=64),  # FeatureMLP
}
TOKEN_ENCODERS = {  # the same with a token-level fusion (a token-level fusion): tokens out where the kind has them
    'image': dict(module='cnn', features=(16, 32, 32), embed_dim=64, pooling='tokens'),  # grid tokens
    'tokens': dict(module='text_transformer', width=64, depth=1, num_heads=4),  # a transformer over word ids
    'text': dict(module='text_transformer', width=64, depth=1, num_heads=4),  # over subword ids
    'series': dict(module='conv1d', features=(32, 64), embed_dim=64, pooling='tokens'),  # time-step tokens
    'features': dict(module='mlp', hidden=(128,), embed_dim=64),  # one token
}
TINY_ENCODERS = {
    'image': dict(module='cnn', features=(8, 8), embed_dim=16, pooling='max'),
    'tokens': dict(module='bow', embed_dim=16, use_positions=False),
    'text': dict(module='bow', embed_dim=16, use_positions=False),
    'series': dict(module='conv1d', features=(8, 8), embed_dim=16),
    'features': dict(module='mlp', hidden=(16,), embed_dim=16),
}
TINY_TOKEN_ENCODERS = {
    'image': dict(module='cnn', features=(8, 8), embed_dim=16, pooling='tokens'),
    'tokens': dict(module='text_transformer', width=16, depth=1, num_heads=2),
    'text': dict(module='text_transformer', width=16, depth=1, num_heads=2),
    'series': dict(module='conv1d', features=(8, 8), embed_dim=16, pooling='tokens'),
    'features': dict(module='mlp', hidden=(16,), embed_dim=16),
}


def _kinds(arg: str | None) -> tuple[dict[str, str], str]:
    """The `kinds=name:kind+name:kind` token of the argument (the modalities without editing this file, as
    tools/features.py prints them) and the rest of the argument."""
    kinds, rest = dict(MODALITIES), []
    for token in filter(None, (arg or '').split(',')):
        if not token.startswith('kinds='):
            rest.append(token)
            continue
        kinds = {}
        for pair in token.removeprefix('kinds=').split('+'):
            name, sep, kind = pair.partition(':')
            if not (sep and name and kind):
                raise ValueError(f'config argument {token!r}: expected kinds=NAME:KIND[+NAME:KIND...]')
            kinds[name] = kind
    for name, kind in kinds.items():
        if kind not in contract.KINDS:
            source = (
                'config argument kinds=' if arg and 'kinds=' in arg else 'MODALITIES of configs/custom.py: '
            )
            raise ValueError(
                f'{source}{name}:{kind}: unknown kind {kind!r} for modality {name!r}; expected one of '
                f'{", ".join(contract.KINDS)}'
            )
    return kinds, ','.join(rest)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    modalities, arg = _kinds(arg)
    opts = config_lib.parse_arg(arg, default_fusion='concat')
    config = config_lib.base_config(opts, dataset='custom', modalities=tuple(modalities))
    data = config.data  # manual_dir (your directory) and data_dir come from base_config
    data.kinds = dict(modalities)  # modality -> kind, checked against the data
    # None: arrays (train.npz, validation.npz, test.npz); or a table in manual_dir, by extension a CSV (.csv),
    # JSON Lines (.jsonl) or Parquet (.parquet) file, or a directory of such shards, one example per row, which
    # holds 'features', 'tokens' (integer columns), 'text' (a column of strings) and 'image' (a column of file
    # paths, relative to the table).
    data.table = ml_collections.config_dict.placeholder(str)
    # Tables only: each modality's columns: a name, a tuple of names, or a pattern ('signal_*': those columns in
    # header order).
    data.columns = {m: m if kind in ('image', 'text') else f'{m}_*' for m, kind in modalities.items()}
    # 'classification' (class labels) or 'regression' (real-valued targets: a linear head and a squared-error
    # loss, config.loss.task; metrics mse, mae, pearson_r).
    data.task = 'classification'
    # The labels' array or column: class ids, (N, C) multi-hot 0/1 (arrays), or class names (tables); for
    # regression, (N,) or (N, K) numbers (arrays) or a column of numbers (tables; a tuple or pattern: K targets).
    data.label = 'label'
    data.split_column = ml_collections.config_dict.placeholder(str)  # tables: a column of each row's split
    # (train, validation, test) fractions for the splits not given: drawn from the train rows, per class, seeded.
    data.split = (0.8, 0.1, 0.1)
    data.split_seed = 0  # the seed of that draw (not config.seed: the split stays put across training seeds)
    # None: the number of class_names, else the largest label + 1; set, a label outside is an error.
    data.num_classes = ml_collections.config_dict.placeholder(int)
    data.class_names = ()  # in class-id order; (): '0', '1', ... (or a table's sorted label names)
    data.standardize = True  # 'features' per feature, 'series' per channel, with train mean and std
    data.nan = 'error'  # non-finite 'features'/'series' values: 'error' (naming file, row, field) or 'zero'
    data.image_size = 64  # a table's images are resized to image_size x image_size RGB
    texts = [m for m, kind in modalities.items() if kind == 'text']
    # Per text modality: 'train' (a sentencepiece tokenizer trained on its training text, reproducibly), the
    # path of a tokenizer file (a Hugging Face tokenizer.json or a sentencepiece .model), or 'hf:DIR', a Hugging
    # Face model directory: its text tower's own tokenizer, exactly as that tower was trained to read.
    data.tokenizer = dict.fromkeys(texts, 'train')
    data.vocab_size = 8000  # the most pieces a trained tokenizer has (fewer when the text has fewer)
    # Per text modality: ids per example (longer texts are cut); None: the training text's 99th percentile
    # length, at most 256.
    data.max_tokens = {m: ml_collections.config_dict.placeholder(int) for m in texts}

    # The task loss: 'auto' (cross-entropy for classes, squared error for regression), or for regression 'mse'
    # or 'l1' (absolute error). Regression takes no Multi-Similarity loss (config.loss.ms_weight=0).
    config.loss.task = 'auto'
    # Regression with one target: also report the accuracy of its sign (examples whose target is not 0).
    config.eval.sign_accuracy = False

    tokens = config_lib.token_level(opts)
    encoders = TOKEN_ENCODERS if tokens else ENCODERS
    config_lib.set_encoders(config, {m: dict(encoders[kind]) for m, kind in modalities.items()})
    if tokens:
        config.model.fusion.fused_dim = 64
    config.train.num_steps = 1000
    config.train.batch_size = 64
    config.train.warmup_steps = 50
    config.train.weight_decay = 1e-2
    config.train.log_every_steps = 100
    config.eval.batch_size = 256

    if opts['tiny']:
        encoders = TINY_TOKEN_ENCODERS if tokens else TINY_ENCODERS
        tiny = {m: dict(encoders[kind]) for m, kind in modalities.items()}
        config_lib.make_tiny(config, encoders=tiny)
        config.train.batch_size = 16
        config.eval.batch_size = 32
    return config
