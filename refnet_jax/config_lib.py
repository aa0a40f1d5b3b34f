"""What every experiment config shares: the variant argument, and the fields common to all datasets.

A config file under `configs/` calls `parse_arg` and `base_config`, then sets what is its own (the data
fields, one encoder per modality, training length); `tiny` shrinks any config for tests. Every field is
commented here once.
"""

import dataclasses
import fnmatch
import importlib.util
import json
import math
import numbers
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from refnet_jax.models import fusions, modules

VARIANTS = ('baseline', 'refiner', 'refnet', 'pretrain')


def _fusion_help() -> str:
    """The `fusion=KIND` lines of `ARG_HELP`: the names of `fusions.FUSIONS`, token-level ones apart."""
    by_inputs = {
        kind: ', '.join(k for k, v in fusions.FUSIONS.items() if fusions.input_kind(v) == kind)
        for kind in fusions.INPUTS
    }
    text = f'the fusion module: {by_inputs["pooled"]}; token-level: {by_inputs["tokens"]}'
    return textwrap.fill(text, 110, initial_indent=f'  {"fusion=KIND":<42}', subsequent_indent=' ' * 44)


ARG_HELP = f"""The argument picks a variant, as comma-separated tokens:
{_fusion_help()}
  variant=baseline                          the plain fusion network: no refiner, no MS loss
  variant=refiner                           + the refiner loss
  variant=refnet                            + the refiner loss + the Multi-Similarity loss (default)
  variant=pretrain                          for pretrain.py: the refiner loss alone, `input` targets
  only=M[+M...]                             these modalities alone (a unimodal baseline: only=acc)
  tiny                                      a few steps of a small network, for tests"""


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `path/to/config.py[:arg]`, as train.py's --config reads it (a relative path from
    the current directory)."""
    path, _, arg = spec.partition(':')
    if not path.endswith('.py') or not os.path.isfile(path):
        raise ValueError(f'config {spec!r}: expected an existing configs/<name>.py[:arg] file')
    module_spec = importlib.util.spec_from_file_location('refnet_config_file', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_arg(arg: str | None, *, default_fusion: str, extra_flags: tuple[str, ...] = ()) -> dict:
    """'fusion=transformer,variant=baseline,tiny' -> {'fusion': ..., 'variant': ..., 'tiny': bool, ...}.

    `extra_flags` are a dataset's own bare tokens (e.g. 'features'): each becomes a bool in the result.
    """
    opts = {'fusion': default_fusion, 'variant': 'refnet', 'tiny': False, 'only': None}
    opts.update({flag: False for flag in extra_flags})
    for token in filter(None, (arg or '').split(',')):
        key, sep, value = token.partition('=')
        if token == 'tiny' or token in extra_flags:
            opts[token] = True
        elif sep and key == 'fusion' and value in fusions.FUSIONS:
            opts['fusion'] = value
        elif sep and key == 'variant' and value in VARIANTS:
            opts['variant'] = value
        elif sep and key == 'only' and value:
            opts['only'] = tuple(value.split('+'))
        else:
            raise ValueError(
                f'config argument {token!r} not understood; expected {", ".join(("tiny", *extra_flags))}, '
                f'fusion={"|".join(fusions.FUSIONS)}, variant={"|".join(VARIANTS)} or only=MODALITY[+MODALITY]'
            )
    return opts


def token_level(opts: dict) -> bool:
    """Whether the fusion that `opts` picks takes tokens (then the config gives its encoders token outputs)."""
    return fusions.input_kind(fusions.FUSIONS[opts['fusion']]) == 'tokens'


def base_config(opts: dict, *, dataset: str, modalities: Sequence[str]) -> ml_collections.ConfigDict:
    """Every field but the encoders, with the variant of `opts` applied and generic training defaults.

    `modalities` are the dataset's; `opts['only']` narrows `config.data.modalities` to some of them. The
    config file then gives an encoder to each of `config.data.modalities`.
    """
    variant = opts['variant']
    if opts.get('only'):
        unknown = [m for m in opts['only'] if m not in modalities]
        if unknown:
            raise ValueError(
                f'config argument only={"+".join(opts["only"])}: {unknown} not among {list(modalities)}'
            )
        modalities = tuple(m for m in modalities if m in opts['only'])
    refine = variant in ('refiner', 'refnet', 'pretrain')

    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameters, dropout and the data order
    # Where compiled programs are kept between runs (None: JAX_COMPILATION_CACHE_DIR, else
    # ~/.cache/refnet_jax/jax; '': no cache). A second run of the same config then skips compilation.
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    # A pre-training workdir (pretrain.py) whose encoders, fusion and refiner start this run; None: from scratch.
    config.init_from = ml_collections.config_dict.placeholder(str)

    config.data = ml_collections.ConfigDict()
    config.data.name = dataset  # the module refnet_jax/data/datasets/<name>.py
    # Where TFDS keeps prepared data (None: TFDS's default, ~/tensorflow_datasets).
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    # Where a dataset that needs a manual download finds the downloaded files (None: TFDS's default,
    # <data_dir>/downloads/manual).
    config.data.manual_dir = ml_collections.config_dict.placeholder(str)
    # The share of the training examples whose labels train.py uses: a stratified subset drawn with
    # config.seed (input_pipeline.stratified_subset). pretrain.py always reads every input.
    config.data.label_fraction = 1.0
    # The modalities the model sees, a subset of the dataset's; the others are dropped from every batch.
    config.data.modalities = tuple(modalities)

    config.model = ml_collections.ConfigDict()
    # Mixed precision: the computation dtype of every built-in module ('bfloat16' on TPUs and recent GPUs),
    # and the dtype its parameters are kept in; losses, gradients and optimizer state follow the parameters.
    config.model.dtype = 'float32'
    config.model.param_dtype = 'float32'
    # Rematerialize the transformer blocks of encoders and fusions: less activation memory, more compute.
    config.model.remat = False
    # One entry per modality: `module` (a name in encoders.ENCODERS, FILE.py:Class, package.module:Class, or
    # None for the modality kind's default) and that module's fields.
    config.model.encoders = ml_collections.ConfigDict()
    # kind (a name in fusions.FUSIONS, FILE.py:Class or package.module:Class) + that module's fields
    config.model.fusion = dict(kind=opts['fusion'], **modules.module_fields(fusions.FUSIONS[opts['fusion']]))
    # Pretrained weights for the fusion module; each encoder entry has its own `init_from` (pretrained.py).
    config.model.fusion.init_from = ml_collections.config_dict.placeholder(str)
    # (regex, replacement) pairs renaming the parameters of an init_from source to this library's names.
    config.model.init_rename = ()
    config.model.refiner = ml_collections.ConfigDict()
    config.model.refiner.hidden = (256,)  # hidden widths of each modality's decoder
    # 'embedding' (e_m), 'input' (the modality's raw input; what pre-training needs, as it cannot collapse) or
    # 'tokens' (the mean of m's own tokens at a token-level fusion's read-out layer: its readouts)
    if variant == 'pretrain':
        config.model.refiner.target = 'input'
    else:
        config.model.refiner.target = 'tokens' if token_level(opts) else 'embedding'
    config.model.refiner.stop_gradient_target = True  # embedding targets are constants for the refiner loss

    config.loss = ml_collections.ConfigDict()
    # w_m per modality; 0 everywhere removes the refiner (and its parameters) altogether.
    config.loss.refiner_weights = {m: 0.1 if refine else 0.0 for m in modalities}
    config.loss.refiner_kind = 'cosine'  # 'cosine' (1 - cos) or 'mse'
    config.loss.ms_weight = 0.1 if variant == 'refnet' else 0.0  # gamma: 0 switches the MS loss off
    config.loss.ms = ml_collections.ConfigDict(dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, mining=True))
    # Anchor rows per block of the MS loss: None picks (dense up to B = 4,096, row blocks above), 0 is dense.
    config.loss.ms.block_size = ml_collections.config_dict.placeholder(int)

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 2000  # optimizer steps
    config.train.batch_size = 256  # examples per step, global over all devices and processes
    # Micro-batches per step: the gradient of the whole batch (every MS pair included, GradCache) at the
    # activation memory of batch_size / accumulation_steps examples.
    config.train.accumulation_steps = 1
    config.train.learning_rate = 2e-3  # peak learning rate
    config.train.warmup_steps = 100  # linear warm-up, then cosine decay to 0 at num_steps
    config.train.weight_decay = 1e-4  # AdamW decoupled weight decay
    config.train.grad_clip_norm = 1.0  # clip by global norm; 0 disables
    # Regexes over parameter paths (refnet_jax/train/optim.py): parameters kept as they are (no gradient, no
    # optimizer state), e.g. ('encoders/image/.*',); learning-rate factors as (regex, factor) pairs, e.g.
    # (('encoders/.*', 0.1),) (pairs, since a ConfigDict key cannot hold a regex's dots); and the
    # parameters that get weight decay (default: kernels; not biases, norm scales or embeddings).
    config.train.frozen = ()
    config.train.lr_multipliers = ()
    config.train.decay_mask = ('.*/kernel',)
    config.train.log_every_steps = 50  # scalars to metrics.jsonl / TensorBoard
    config.train.checkpoint_every_steps = 500  # orbax checkpoint (always one at the end)
    config.train.eval_every_steps = 0  # validation during training; 0: only at the end
    # (first_step, num_steps): a jax.profiler trace of those steps in <workdir>/profile; (): none.
    config.train.profile = ()
    # Modality dropout: per modality, the probability that a training example loses it (never all of them).
    config.train.modality_dropout = {m: 0.0 for m in modalities}
    # Keep the checkpoint with the best value of this validation metric ('val/accuracy', 'val/loss', ...) in
    # <workdir>/best and report test metrics there too (needs eval_every_steps); None: the last step only.
    config.train.select = ml_collections.config_dict.placeholder(str)
    config.train.select_mode = 'auto'  # 'max', 'min', or 'auto': 'min' for a loss, mae or mse, else 'max'
    config.train.early_stop = 0  # stop after this many validations without improvement; 0: never

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 1024  # examples per evaluation batch (padding included)
    # Modalities to also evaluate without: results.json gains val_without_<m> and test_without_<m>.
    config.eval.without = ()

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the data axis; -1: all devices of all processes (over fsdp)
    # Devices on the fsdp axis: parameters and optimizer state sharded over them (FSDP); 1: replicated.
    config.mesh.fsdp = 1
    # Regexes over parameter paths ('encoders/image/.*'): those sharded over fsdp (on their largest dimension
    # that the axis divides); the others are replicated.
    config.mesh.shard_params = ('.*',)
    # Multi-process start-up: jax.distributed.initialize(), auto-detected on Cloud TPU pods and SLURM; several
    # processes on one machine (or a cluster without auto-detection) also set the three fields below.
    config.mesh.distributed = False
    config.mesh.coordinator_address = ml_collections.config_dict.placeholder(str)  # e.g. '127.0.0.1:12355'
    config.mesh.num_processes = ml_collections.config_dict.placeholder(int)
    config.mesh.process_id = ml_collections.config_dict.placeholder(int)
    return config


def set_encoders(config: ml_collections.ConfigDict, encoders: dict[str, dict]) -> None:
    """Sets `config.model.encoders` to the entries of `encoders` (one per dataset modality) that
    `config.data.modalities` selects. An entry without `module` gets None: its modality kind's default."""
    entries = {}
    for m in config.data.modalities:
        entry = ml_collections.ConfigDict(encoders[m])
        if 'module' not in entry:
            entry.module = ml_collections.config_dict.placeholder(str)
        if 'init_from' not in entry:  # pretrained weights for this encoder (refnet_jax/train/pretrained.py)
            entry.init_from = ml_collections.config_dict.placeholder(str)
        entries[m] = entry
    config.model.encoders = ml_collections.ConfigDict(entries)


def make_tiny(config: ml_collections.ConfigDict, encoders: dict[str, dict]) -> ml_collections.ConfigDict:
    """Shrinks `config` in place to a few steps of a 16-wide network (for tests); `encoders` replaces its
    encoders."""
    set_encoders(config, encoders)
    config.model.fusion.fused_dim = 16
    if 'hidden' in config.model.fusion:
        config.model.fusion.hidden = (16,)
    # Token-level fusions: one block. (MBT's one block is then late fusion, its modalities meeting only in z:
    # the tests that need the bottleneck exchange build MBT with two.)
    if 'depth' in config.model.fusion:
        config.model.fusion.depth = 1
        for field, value in (('num_heads', 2), ('fusion_layer', 0), ('state_size', 4)):
            if field in config.model.fusion:
                config.model.fusion[field] = value
    config.model.refiner.hidden = (16,)
    config.train.num_steps = 4
    config.train.batch_size = 64
    config.train.warmup_steps = 1
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 2
    return config


# ----------------------------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field takes: a finite number (an int with `integer`) in the interval from
    `low` to `high` (open at an end with `low_open` / `high_open`; None: unbounded), or one of `also`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: tuple = ()

    def holds(self, value: Any) -> bool:
        if any(value is v or (value == v and type(value) is type(v)) for v in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        what = 'an int' if self.integer else 'a number'
        if self.low is not None and self.high is not None:
            left, right = '(' if self.low_open else '[', ')' if self.high_open else ']'
            what += f' in {left}{self.low}, {self.high}{right}'
        elif self.low is not None:
            what += f' {">" if self.low_open else ">="} {self.low}'
        elif self.high is not None:
            what += f' {"<" if self.high_open else "<="} {self.high}'
        elif not self.integer:
            what = 'a finite number'
        return ' or '.join([what, *map(repr, self.also)])


POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE = Range(0)
# Every numeric field `train.py` reads, by dotted path (fnmatch patterns: `*` also crosses dots), checked by
# `check_ranges` before any work; a tuple's elements are checked one by one.
RANGES: dict[str, Range] = {
    'seed': Range(integer=True),
    'data.label_fraction': Range(0, 1, low_open=True),
    'model.refiner.hidden': POSITIVE_INT,
    'model.*dropout': Range(0, 1, high_open=True),
    'loss.refiner_weights.*': NON_NEGATIVE,
    'loss.ms_weight': NON_NEGATIVE,
    'loss.ms.alpha': Range(0, low_open=True),
    'loss.ms.beta': Range(0, low_open=True),
    'loss.ms.base': Range(),
    'loss.ms.epsilon': NON_NEGATIVE,
    'loss.ms.block_size': Range(0, integer=True, also=(None,)),
    'train.num_steps': POSITIVE_INT,
    'train.batch_size': POSITIVE_INT,
    'train.accumulation_steps': POSITIVE_INT,
    'train.learning_rate': NON_NEGATIVE,
    'train.warmup_steps': Range(0, integer=True),
    'train.weight_decay': NON_NEGATIVE,
    'train.grad_clip_norm': NON_NEGATIVE,
    'train.log_every_steps': POSITIVE_INT,
    'train.checkpoint_every_steps': POSITIVE_INT,
    'train.eval_every_steps': Range(0, integer=True),
    'train.modality_dropout.*': Range(0, 1, high_open=True),
    'train.early_stop': Range(0, integer=True),
    'eval.batch_size': POSITIVE_INT,
    'mesh.data': Range(1, integer=True, also=(-1,)),
    'mesh.fsdp': Range(1, integer=True),
}


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Refuses a numeric field of `config` outside its `RANGES` entry, naming the field, the value and the
    range: a negative learning rate or an MS alpha of 0 is a mistake to say before any work, not a run that
    diverges later. Fields a config lacks are not checked (their readers give the defaults)."""
    problems = []
    for field, value in _flatten(config.to_dict()).items():
        for pattern, allowed in RANGES.items():
            if not fnmatch.fnmatchcase(field, pattern):
                continue
            for v in value if isinstance(value, list) else [value]:
                if not allowed.holds(v):
                    shown = tuple(value) if isinstance(value, list) else value
                    problems.append(f'config.{field} is {shown!r}; expected {allowed}')
                    break
    if problems:
        raise ValueError('\n'.join(problems))


# ----------------------------------------------------------------------------------------------- workdirs

# Config fields that may change between a run and its resumption: training longer, logging differently, or
# resuming on another topology (the global batch, and so the computation, stays the same).
RESUMABLE_FIELDS = (
    'train.num_steps',
    'train.log_every_steps',
    'train.checkpoint_every_steps',
    'train.eval_every_steps',
    'eval.without',
    'compilation_cache_dir',
    'train.profile',
    'mesh.data',
    'mesh.fsdp',
    'mesh.shard_params',
    'mesh.distributed',
    'mesh.coordinator_address',
    'mesh.num_processes',
    'mesh.process_id',
)


def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out


def load_workdir_config(workdir) -> ml_collections.ConfigDict:
    """The config a run saved in `workdir/config.json` (for export and analysis of a finished run)."""
    path = epath.Path(workdir) / 'config.json'
    if not path.exists():
        raise FileNotFoundError(f'{path} not found: expected the workdir of a training run')
    return ml_collections.ConfigDict(_read_json(path))


def _read_json(path: epath.Path) -> dict:
    """A workdir's `config.json`; a damaged one is an error naming the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not a config.json this library wrote ({e})') from None


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Writes `config.json` into a new workdir; refuses to resume a workdir made with another config.

    Only the fields in RESUMABLE_FIELDS may differ (e.g. training longer); anything else would mix two
    experiments in one workdir.
    """
    path = workdir / 'config.json'
    current = json.loads(config.to_json_best_effort())
    if not path.exists():
        path.write_text(json.dumps(current, indent=2, sort_keys=True))
        return
    before, now = _flatten(_read_json(path)), _flatten(current)
    changed = sorted(
        k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_FIELDS
    )
    if changed:
        details = '\n'.join(f'  {k}: workdir {before.get(k)!r}, now {now.get(k)!r}' for k in changed)
        raise ValueError(
            f'{workdir} holds a run with another config; use a new --workdir, or the same config. '
            f'Differences:\n{details}'
        )
