"""The data contract: what a dataset declares, what a batch is, and what a dataset module provides.

Imports neither TFDS nor grain, so the model, the losses and the tests can speak about data without them.

A batch is a dict of NumPy (or jax) arrays keyed by modality name, plus
- `label`: class ids (B,) int32, or multi-hot (B, C) int32 for multi-label data, or real-valued targets (B, K)
  float32 for regression (`DatasetInfo.task`); absent in pre-training;
- `<m>_index` (`index_key(m)`): for a modality stored once for several examples (`ModalityInfo.shared`,
  easy-VQA's image shared by the questions about it), `batch[m]` has fewer rows than the batch and this
  (B,) int32 array gives each example's row in it;
- `<m>_present` (`present_key(m)`), optional: (B,) bool, False where modality m is absent from an example
  (a sensor off, an image that did not load; or dropped by `config.train.modality_dropout`). When the key is
  omitted, m is present in every example. The model never reads an absent modality's values (they may hold
  anything, NaN included): it gives the fusion a learned stand-in instead, and m's refiner loss skips them;
- `mask` (B,) bool, in evaluation: False on padding rows.

Each modality has a kind (`KINDS`): what its arrays hold, which built-in encoder it gets by default, and
how it becomes the `input` refiner target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


def _pixels(x: jax.Array, info: ModalityInfo) -> jax.Array:
    del info
    x = x.reshape(x.shape[0], -1)
    return x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)


def _bag_of_words(x: jax.Array, info: ModalityInfo) -> jax.Array:
    bag = jax.nn.one_hot(x, info.vocab_size, dtype=jnp.float32).sum(-2)  # (B, V)
    return bag.at[:, info.pad_id].set(0.0)  # padding is not a word


def _flat(x: jax.Array, info: ModalityInfo) -> jax.Array:
    del info
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Kind:
    """What one kind of modality means to the library.

    Attributes:
      encoder: the built-in encoder (a name in `encoders.ENCODERS`) that a modality of this kind gets when
        `config.model.encoders.<m>.module` is None.
      input_target: (batch (B, *shape), info) -> (B, F) float32, the `input` refiner target.
      needs_vocab: the modality is token ids and `ModalityInfo.vocab_size` is required.
    """

    encoder: str
    input_target: Callable[[jax.Array, ModalityInfo], jax.Array]
    needs_vocab: bool = False


KINDS: dict[str, Kind] = {
    'image': Kind(encoder='cnn', input_target=_pixels),  # (H, W, C) uint8 pixels or floats
    'tokens': Kind(encoder='bow', input_target=_bag_of_words, needs_vocab=True),  # (L,) int ids, 0 = padding
    # Raw UTF-8 text, tokenized when the data are prepared: (L,) int ids, `ModalityInfo.pad_id` = padding.
    'text': Kind(encoder='bow', input_target=_bag_of_words, needs_vocab=True),
    'series': Kind(encoder='conv1d', input_target=_flat),  # (T, C) floats
    'features': Kind(encoder='mlp', input_target=_flat),  # (F,) floats
}
"""Every kind of modality; a new kind is one line here (and a built-in encoder for it)."""


@dataclasses.dataclass(frozen=True)
class ModalityInfo:
    """One input modality.

    Attributes:
      kind: a key of `KINDS`.
      shape: shape of one item, e.g. (64, 64, 3) or (12,).
      dtype: NumPy dtype of the batch array.
      vocab_size: number of token ids (kinds that need one only), padding and unknown-word ids included.
      pad_id: the id of padding positions (kinds with a vocabulary): 0 for `tokens`, the tokenizer's for `text`,
        which pads with it exactly where the prepared mask is False (a real token never has this id, but for
        an EOS that is also the padding token, CLIP's and SigLIP's: the last real token of a row).
      shared: True when one item serves several examples: the batch then has `index_key(name)` (B,) int32.
    """

    kind: str
    shape: tuple[int, ...]
    dtype: Any
    vocab_size: int | None = None
    shared: bool = False
    pad_id: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'ModalityInfo.kind={self.kind!r}, expected one of {tuple(KINDS)}')
        needs = [k for k, v in KINDS.items() if v.needs_vocab]
        if KINDS[self.kind].needs_vocab != (self.vocab_size is not None):
            raise ValueError(
                f'ModalityInfo.vocab_size={self.vocab_size!r} with kind={self.kind!r}: '
                f'expected a vocab_size for kind {" or ".join(map(repr, needs))} only'
            )
        if self.vocab_size is not None and not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f'ModalityInfo.pad_id={self.pad_id!r}, expected an id in [0, {self.vocab_size})')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the train loop need to know about a dataset.

    Attributes:
      name: dataset name (`config.data.name`).
      modalities: modality name (a batch key) -> its description.
      num_classes: number of classes (output width of the task head); for regression, the K targets.
      multi_label: True when `label` is multi-hot (B, num_classes), else class ids (B,).
      class_names: the classes' names, in label-id order (regression: the targets').
      num_examples: examples per split (for easy-VQA: questions, not images).
      task: 'classification', or 'regression': `label` is (B, num_classes) float32 targets.
    """

    name: str
    modalities: dict[str, ModalityInfo]
    num_classes: int
    multi_label: bool
    class_names: tuple[str, ...]
    num_examples: dict[str, int]
    task: str = 'classification'

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f'DatasetInfo.task={self.task!r}, expected one of {TASKS}')
        if self.task == 'regression' and self.multi_label:
            raise ValueError('DatasetInfo.multi_label=True with task=regression; expected one of them')


TASKS = ('classification', 'regression')
"""What the labels are: class ids (or multi-hot), or real-valued targets."""


def index_key(modality: str) -> str:
    """The batch key of a shared modality's per-example row index."""
    return f'{modality}_index'


def present_key(modality: str) -> str:
    """The batch key of a modality's per-example presence, (B,) bool."""
    return f'{modality}_present'


def drop_modalities(
    batch: Mapping[str, jax.Array], rates: Mapping[str, float], rng: jax.Array
) -> dict[str, jax.Array]:
    """`batch` with each modality m marked absent in each example with probability `rates[m]` (modality
    dropout), never all the modalities an example has: where every one would be gone, one of those it had
    is kept, chosen uniformly.

    Pure jax, drawn in the jitted train step over the global batch, so the draws depend on the rng and the
    example's place in the global batch alone, not on the device count. A modality whose rate is 0 keeps its
    presence (it is never dropped, only ever the one kept); with every rate 0 the batch comes back unchanged.

    Args:
      batch: a batch with every modality of `rates` (and `present_key(m)` where m is absent somewhere).
      rates: {m: drop probability in [0, 1)}, one per modality of the batch.
      rng: a key for this batch.
    """
    rates = {m: float(r) for m, r in rates.items()}
    if not any(rates.values()):
        return dict(batch)
    names = sorted(rates)
    n = _num_examples(batch, names)
    had = jnp.stack([_presence(batch, m, n) for m in names], 1)  # (B, M)
    keys = jax.random.split(rng, 2)
    drop = jax.random.uniform(keys[0], (n, len(names))) < jnp.asarray([rates[m] for m in names])
    kept = had & ~drop
    # Where nothing is left, keep one modality that the example had: the one with the largest random score.
    score = jnp.where(had, jax.random.uniform(keys[1], (n, len(names))), -1.0)
    rescue = (~kept.any(1) & had.any(1))[:, None] & (jnp.arange(len(names)) == score.argmax(1)[:, None])
    kept = kept | rescue
    out = dict(batch)
    for i, m in enumerate(names):
        if rates[m] > 0 or present_key(m) in batch:  # a rate-0 modality is kept wherever it was
            out[present_key(m)] = kept[:, i]
    return out


def _num_examples(batch: Mapping[str, Any], names) -> int:
    """B: the rows of the first per-example key (a shared modality counts through its index)."""
    keys = ('label', 'mask', *(present_key(m) for m in names), *(index_key(m) for m in names), *names)
    key = next((k for k in keys if k in batch and not (k in names and index_key(k) in batch)), None)
    if key is None:
        raise ValueError('batch has no modality')
    return batch[key].shape[0]


def _presence(batch: Mapping[str, Any], m: str, n: int) -> jax.Array:
    """(B,) bool presence of modality m: `batch[present_key(m)]`, or all True."""
    p = batch.get(present_key(m))
    return jnp.ones((n,), bool) if p is None else jnp.asarray(p, bool)


def dummy_batch(info: DatasetInfo, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of zeros with the dataset's shapes (shared modalities get one row per example)."""
    batch = {}
    for m, mi in info.modalities.items():
        batch[m] = np.zeros((batch_size, *mi.shape), mi.dtype)
        if mi.shared:
            batch[index_key(m)] = np.arange(batch_size, dtype=np.int32)
    shape = (batch_size, info.num_classes) if info.multi_label or info.task == 'regression' else (batch_size,)
    batch['label'] = np.zeros(shape, np.float32 if info.task == 'regression' else np.int32)
    return batch


def check_batch(batch: Mapping[str, np.ndarray], info: DatasetInfo, labeled: bool = True) -> None:
    """Raises ValueError naming the key, what it holds and what was expected, for a batch that does not fit.

    Checks every modality (present, per-item shape, dtype kind), index keys (present, in range), presence
    keys ((B,) bool, of a known modality), and, when `labeled`, the labels (shape, in range of the declared classes).
    """

    def fail(key, msg):
        raise ValueError(f'batch[{key!r}] {msg}')

    missing = [m for m in info.modalities if m not in batch]
    if missing:
        raise ValueError(
            f'batch lacks modality {missing}; dataset {info.name!r} has {sorted(info.modalities)}, '
            f'the batch has {sorted(batch)}'
        )
    if labeled and 'label' not in batch:
        raise ValueError(f'batch lacks "label"; it has {sorted(batch)}')
    # Examples: one per label; without labels, one per row of an unshared modality or of an index.
    rows = {k: np.shape(batch[k])[0] for k in ('label', 'mask') if k in batch}
    for m, mi in info.modalities.items():
        key = index_key(m) if mi.shared else m
        rows.setdefault(key, np.shape(batch.get(index_key(m), batch[m]))[0])
    n = next(iter(rows.values()))
    for m, mi in info.modalities.items():
        x = np.asarray(batch[m])
        if x.shape[1:] != tuple(mi.shape):
            fail(m, f'has items of shape {x.shape[1:]} (batch shape {x.shape}); expected {tuple(mi.shape)}')
        if np.dtype(x.dtype).kind != np.dtype(mi.dtype).kind:
            fail(m, f'has dtype {x.dtype}; expected {np.dtype(mi.dtype)}')
        if mi.shared:
            key = index_key(m)
            if key not in batch:
                fail(key, f'is missing: modality {m!r} is shared and needs an index into its rows')
            idx = np.asarray(batch[key])
            if idx.shape != (n,) or (n and (idx.min() < 0 or idx.max() >= x.shape[0])):
                fail(
                    key,
                    f'must be ({n},) ints in [0, {x.shape[0]}); got shape {idx.shape}, '
                    f'range [{idx.min() if idx.size else None}, {idx.max() if idx.size else None}]',
                )
        elif x.shape[0] != n:
            fail(m, f'has {x.shape[0]} rows but the batch has {n} examples')
    if 'mask' in batch and np.asarray(batch['mask']).shape != (n,):
        fail('mask', f'has shape {np.asarray(batch["mask"]).shape}; expected ({n},)')
    for m in info.modalities:
        key = present_key(m)
        if key in batch:
            p = np.asarray(batch[key])
            if p.shape != (n,) or p.dtype != bool:
                fail(key, f'must be ({n},) bool (False where {m!r} is absent); got {p.dtype} {p.shape}')
    unknown = sorted(
        k for k in batch if k.endswith('_present') and k.removesuffix('_present') not in info.modalities
    )
    if unknown:
        fail(unknown[0], f'names no modality; dataset {info.name!r} has {sorted(info.modalities)}')
    if not labeled:
        return
    labels = np.asarray(batch['label'])
    valid = np.asarray(batch['mask'], bool) if 'mask' in batch else np.ones((n,), bool)
    if info.task == 'regression':
        if labels.shape != (n, info.num_classes) or labels.dtype.kind != 'f':
            fail(
                'label',
                f'must be real-valued targets of shape ({n}, {info.num_classes}); got {labels.dtype} {labels.shape}',
            )
    elif info.multi_label:
        if labels.shape != (n, info.num_classes) or not np.isin(labels, (0, 1)).all():
            fail(
                'label',
                f'must be multi-hot of shape ({n}, {info.num_classes}) with 0/1 values; got {labels.shape}',
            )
    else:
        if labels.shape != (n,) or labels.dtype.kind not in 'iu':
            fail('label', f'must be integer class ids of shape ({n},); got {labels.dtype} {labels.shape}')
        bad = valid & ((labels < 0) | (labels >= info.num_classes))
        if bad.any():
            i = int(np.argmax(bad))
            fail('label', f'row {i} is {labels[i]}; expected a class id in [0, {info.num_classes})')


@runtime_checkable
class DatasetModule(Protocol):
    """What a dataset module provides: `refnet_jax/data/datasets/<name>.py` (`config.data.name`) sets `DATASET` to
    an object with these methods, which the input pipeline calls.

    `input_pipeline.PerRecordDataset` implements them for datasets with one example per record and a `label`
    field (class id, or multi-hot); a dataset module subclasses it and overrides what differs (easy-VQA, one
    image and its questions per record, overrides nearly everything).

    Each dataset is a TFDS `GeneratorBasedBuilder`, prepared offline into array_record files and read by
    random access. Records are what a split's data source returns: a dict of NumPy arrays (and Python
    scalars) per stored example. The modalities' shapes and dtypes are declared once, in the builder's
    features, and `dataset_info` reads them from there (`input_pipeline.modality_info`). `info`, given to the
    data methods, is `dataset_info(builder)` with every modality, whatever `config.data.modalities` selects:
    the pipeline drops the others from the batches.
    """

    def make_builder(self, data_config, *, data_dir: str | None, file_format: str) -> Any:
        """The dataset's builder in `data_dir`, preparable offline (from `config.data.manual_dir` for a manual
        download); it may depend on other `config.data` fields (the user's own files)."""
        ...

    def dataset_info(self, builder) -> DatasetInfo:
        """What the model and train loop need to know, from the prepared builder's info and metadata."""
        ...

    def train_examples(self, records, config, *, info: DatasetInfo) -> Any:
        """The training examples, one per element, of `records`: the whole `train` split as a grain
        MapDataset, shuffled anew each epoch, repeated forever and seeded.

        Random transforms draw from grain's per-index rngs (`random_map`). Every process builds the same
        global stream and keeps every `process_count`-th element, so what a global batch holds, and every
        random draw, is the same on any number of processes and devices.
        """
        ...

    def train_batches(self, examples, config, *, info: DatasetInfo, batch_size: int) -> Any:
        """This process's share of the examples -> batches of `batch_size` examples (its share of
        `config.train.batch_size`)."""
        ...

    def eval_dataset(self, records, config, *, info: DatasetInfo, batch_size: int) -> Any:
        """This process's shard of a split, in stored order -> finite, fixed-shape batches of `batch_size`
        example rows, padding included, holding every example exactly once, with a bool `mask` (B,) that is
        False on padding rows."""
        ...

    def labeled_subset(self, source, fraction: float, seed: int) -> Any:
        """The training records (`source`, a random-access data source) restricted to a seeded `fraction`
        of the labeled examples (`config.data.label_fraction`), as a random-access sequence of records."""
        ...


DATASET_METHODS: tuple[str, ...] = tuple(
    name for name, value in vars(DatasetModule).items() if callable(value) and not name.startswith('_')
)
"""The methods of `DatasetModule`, in declaration order."""


def missing_methods(obj: Any) -> tuple[str, ...]:
    """The methods of `DatasetModule` that `obj` lacks (or has as something not callable)."""
    return tuple(name for name in DATASET_METHODS if not callable(getattr(obj, name, None)))
