"""Input pipeline: prepared TFDS array_record data -> grain -> dicts of NumPy arrays.

TensorFlow-free: each dataset is a TFDS `GeneratorBasedBuilder`, prepared with
`download_and_prepare(file_format='array_record')` and read by random access through
`as_data_source` (what `tfds.data_source` calls; the builder class is used directly, so
no name look-up in TFDS's registries, which needs TensorFlow or the network, happens).

Batches are dicts keyed by modality name plus `label` (and `mask` in evaluation). A
modality `m` stored once for several examples (`ModalityInfo.shared`, e.g. easy-VQA's
image, shared by the questions about it) has fewer rows than the batch, and comes with
an int32 `f'{m}_index'` (B,) giving each example's row in `batch[m]`. These indices are
local to the batch of this process: a train loop that assembles a global batch from
per-process batches must add the process's offset in rows of `m`.

Per-dataset contract: `config.data.name` names a module `refnet_jax.datasets.<name>`
that provides
  `Builder`: a `tfds.core.GeneratorBasedBuilder` subclass, preparable offline (from
      `config.data.manual_dir` for a manual download), or `make_builder(data_config, *,
      data_dir, file_format) -> builder` when the builder depends on other `config.data` fields.
  `dataset_info(builder) -> DatasetInfo`: from the prepared builder's info and metadata.
  `train_examples(records, config) -> grain.MapDataset`: `records` is the whole `train`
      split, shuffled anew each epoch, repeated forever and seeded; returns its training
      examples one per element (random transforms drawing from grain's per-index rngs:
      `random_map`). Every process builds the same global stream and then keeps every
      `process_count`-th element, so what a global batch holds, and every random draw, is
      the same on any number of processes and devices.
  `train_batches(examples, config, *, batch_size) -> grain.MapDataset`: this process's
      share of the examples -> batches of `batch_size` examples (this process's share of
      `config.train.batch_size`).
  `eval_dataset(records, config, *, batch_size) -> grain.MapDataset`: `records` is this
      process's shard of a split, in stored order. Returns finite, fixed-shape batches of
      `batch_size` example rows, padding included, holding every example exactly once,
      with a bool `mask` (B,) that is False on padding rows.
  `labeled_subset(source, fraction, seed) -> sequence of records` (optional): the training
      records restricted to a `fraction` of the labeled examples (`config.data.label_fraction`),
      for datasets whose records hold several examples; the default keeps whole records
      (`stratified_subset` of their labels).
  A dataset with one example per record and a `label` field (class id or multi-hot) may leave
  these out: the records' modality fields and label are then batched as they are
  (`ToExample`, `per_record_eval_dataset`).
Records are what a split's data source returns: a dict of NumPy arrays (and Python
scalars) per TFDS example. A new dataset is that one module; nothing here changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from refnet_jax import contract

# Threads that read and transform records. Parsing holds the GIL: one thread already
# gives ~38k easy-VQA questions/s on one core, and more threads add nothing.
NUM_THREADS = 2
PREFETCH_BATCHES = 4


class ToExample(grain.transforms.Map):
    """A stored record -> its modalities and an int32 label (a class id, or multi-hot), for datasets with one
    example per record."""

    def __init__(self, modalities: tuple[str, ...]):
        self.modalities = tuple(modalities)

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return {**{m: record[m] for m in self.modalities}, 'label': np.asarray(record['label'], np.int32)}


class PadBatch(grain.transforms.Map):
    """A batch of up to `batch_size` examples -> exactly `batch_size` rows (zeros) and a `mask`."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        real = batch['label'].shape[0]
        out = {
            k: np.concatenate([v, np.zeros((self.batch_size - real, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()
        }
        out['mask'] = np.arange(self.batch_size) < real
        return out


def per_record_eval_dataset(
    records: grain.MapDataset, modalities: tuple[str, ...], batch_size: int
) -> grain.MapDataset:
    """`eval_dataset` for one example per record: every example once, the last batch padded and masked."""
    return (
        records.map(ToExample(modalities)).batch(batch_size, drop_remainder=False).map(PadBatch(batch_size))
    )


def _dataset_module(data_config: ml_collections.ConfigDict) -> types.ModuleType:
    name = data_config.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f'config.data.name={name!r}, expected a module name under refnet_jax.datasets')
    try:
        return importlib.import_module(f'refnet_jax.datasets.{name}')
    except ModuleNotFoundError as e:
        if e.name != f'refnet_jax.datasets.{name}':
            raise
        raise ValueError(
            f'config.data.name={name!r}, expected a module refnet_jax/datasets/{name}.py'
        ) from None


def _make_builder(module: types.ModuleType, data_config: ml_collections.ConfigDict):
    data_dir = data_config.data_dir
    if data_dir is not None and not isinstance(data_dir, str):
        raise ValueError(f'config.data.data_dir={data_dir!r}, expected a str path or None (TFDS default)')
    make_builder = getattr(module, 'make_builder', None)
    if make_builder is not None:  # a builder that depends on the config (e.g. the user's own files)
        return make_builder(data_config, data_dir=data_dir, file_format='array_record')
    return module.Builder(data_dir=data_dir, file_format='array_record')


def _prepared_builder(
    data_config: ml_collections.ConfigDict,
) -> tuple[types.ModuleType, Any]:
    """The dataset's module and builder, preparing the data if no complete copy exists.

    TFDS writes into a sibling `incomplete.*` directory and renames it when done, so an
    interrupted preparation is never taken as complete; `is_prepared` also requires the
    info files, which are written last.
    """
    module = _dataset_module(data_config)
    builder = _make_builder(module, data_config)
    if builder.is_prepared():
        return module, builder
    manual_dir = data_config.get('manual_dir')
    if manual_dir is not None and not isinstance(manual_dir, str):
        raise ValueError(f'config.data.manual_dir={manual_dir!r}, expected a str path or None')
    try:
        builder.download_and_prepare(
            file_format='array_record',
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else None
            ),
        )
    except OSError:
        # Another process prepared the same (deterministic) data first: its rename won.
        if not _make_builder(module, data_config).is_prepared():
            raise
    # Reopen from disk, so that a first call reads the same files as every later one.
    builder = _make_builder(module, data_config)
    if not builder.is_prepared():
        raise RuntimeError(
            f'{builder.data_path} exists but holds no complete TFDS dataset '
            '(dataset_info.json, features.json); delete it to prepare the data again'
        )
    return module, builder


def get_dataset_info(data_config: ml_collections.ConfigDict) -> contract.DatasetInfo:
    """Describes the dataset of `config.data`, preparing it if needed (idempotent).

    `modalities` holds those that `config.data.modalities` selects (all of them when the field is absent
    or None).
    """
    module, builder = _prepared_builder(data_config)
    info = module.dataset_info(builder)
    selected = _selected_modalities(data_config, info)
    return dataclasses.replace(info, modalities={m: info.modalities[m] for m in selected})


def _selected_modalities(
    data_config: ml_collections.ConfigDict, info: contract.DatasetInfo
) -> tuple[str, ...]:
    selected = data_config.get('modalities')
    if selected is None:
        return tuple(info.modalities)
    if isinstance(selected, str) or not selected or any(m not in info.modalities for m in selected):
        raise ValueError(
            f'config.data.modalities={selected!r}; expected a non-empty tuple of modalities of dataset '
            f'{info.name!r}: {tuple(info.modalities)}'
        )
    return tuple(selected)


class DropModalities(grain.transforms.Map):
    """Removes the modalities (and their `_index` keys) that the config does not select from a batch."""

    def __init__(self, dropped: tuple[str, ...]):
        self.dropped = {k for m in dropped for k in (m, f'{m}_index')}

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in batch.items() if k not in self.dropped}


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f'process_index={index} with process_count={count}, expected 0 <= index < count')
    return index, count


def _per_process(batch_size: Any, field: str, count: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f'{field}={batch_size!r}, expected a positive int')
    if batch_size % count:
        raise ValueError(f'{field}={batch_size}, expected a multiple of the process count {count}')
    return batch_size // count


def _records(builder, split: str, index: int, count: int) -> grain.MapDataset:
    if split not in builder.info.splits:
        raise ValueError(f'split={split!r}, expected one of {sorted(builder.info.splits)}')
    source = builder.as_data_source(split=split)
    return grain.MapDataset.source(source)[index::count]


def _read_options() -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=NUM_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of the examples whose `labels` are given.

    Class ids (N,): stratified, round(fraction * n_c) examples of each class c (at least one), drawn without
    replacement. Multi-hot labels (N, C): a plain random round(fraction * N) (at least one), since label
    combinations are too many to stratify on.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        n = max(1, round(fraction * len(labels)))
        return np.sort(rng.choice(len(labels), n, replace=False))
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(keep))


class SubsetSource:
    """The records `indices` of `source` (a random-access data source), optionally transformed by `fn(i, r)`
    (i: the position in `indices`)."""

    def __init__(self, source, indices: np.ndarray, fn=None):
        self.source, self.indices, self.fn = source, np.asarray(indices), fn

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        record = self.source[int(self.indices[i])]
        return record if self.fn is None else self.fn(i, record)


def label_fraction(config: ml_collections.ConfigDict) -> float:
    """`config.data.label_fraction` (1.0 when absent), checked to be in (0, 1]."""
    fraction = config.data.get('label_fraction', 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f'config.data.label_fraction={fraction!r}, expected a number in (0, 1]')
    return float(fraction)


def _train_source(module: types.ModuleType, builder, config: ml_collections.ConfigDict, labeled: bool):
    """The `train` split's records; with `labeled` and a label fraction below 1, only the labeled subset."""
    source = builder.as_data_source(split='train')
    fraction = label_fraction(config)
    if not labeled or fraction == 1.0:
        return source
    subset = getattr(module, 'labeled_subset', None)
    if subset is None:
        labels = np.stack([np.asarray(source[i]['label']) for i in range(len(source))])
        subset = SubsetSource(source, stratified_subset(labels, fraction, config.seed))
    else:
        subset = subset(source, fraction, config.seed)
    logging.info('Label fraction %g: %d of %d training records.', fraction, len(subset), len(source))
    return subset


def _dataset_fns(module: types.ModuleType, builder, data_config: ml_collections.ConfigDict):
    """The module's (`train_examples`, `train_batches`, `eval_dataset`), or the per-record defaults; the
    batches of the last two leave out the modalities that `config.data.modalities` does not select."""
    info = module.dataset_info(builder)
    modalities = tuple(info.modalities)
    selected = _selected_modalities(data_config, info)
    dropped = tuple(m for m in modalities if m not in selected)

    def train_examples(records, config):
        del config
        return records.map(ToExample(modalities))

    def train_batches(examples, config, *, batch_size):
        del config
        return examples.batch(batch_size)

    def eval_dataset(records, config, *, batch_size):
        del config
        return per_record_eval_dataset(records, modalities, batch_size)

    def selecting(make_batches):
        if not dropped:
            return make_batches
        return lambda *args, **kwargs: make_batches(*args, **kwargs).map(DropModalities(dropped))

    return (
        getattr(module, 'train_examples', train_examples),
        selecting(getattr(module, 'train_batches', train_batches)),
        selecting(getattr(module, 'eval_dataset', eval_dataset)),
    )


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    labeled: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite iterator over this process's training batches, reshuffled each epoch.

    Deterministic given `seed`; checkpointable with the iterator's `get_state()`/`set_state()`,
    or `grain.checkpoint.CheckpointSave`/`CheckpointRestore` in orbax. All processes build
    one global stream of training examples and process i keeps elements i, i + count,
    i + 2 count, ...; its k-th batch holds `config.train.batch_size // process_count` of
    them, and the k-th batches of all processes together hold the same examples (the same
    random draws included) as the k-th batch of a single process. So losses do not depend
    on the topology, and an iterator state (k batches read) restores under another process
    count. Only this process's elements are read and transformed. With `labeled` (training
    on labels), a `config.data.label_fraction` below 1 restricts the stream to a seeded,
    stratified subset of the labeled examples (`stratified_subset`, seeded by `config.seed`);
    `labeled=False` (pre-training) always reads every input. `process_index` and
    `process_count` default to JAX's.
    """
    index, count = _process(process_index, process_count)
    batch_size = _per_process(config.train.batch_size, 'config.train.batch_size', count)
    module, builder = _prepared_builder(config.data)
    train_examples, train_batches, _ = _dataset_fns(module, builder, config.data)
    source = _train_source(module, builder, config, labeled)
    records = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    examples = train_examples(records, config)[index::count]
    dataset = train_batches(examples, config, batch_size=batch_size)
    return iter(dataset.to_iter_dataset(_read_options()))


def eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    batch_size: int | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of this process's shard of `split` once, in fixed-shape batches.

    `batch_size` (default `config.eval.batch_size`) counts example rows over all
    processes, padding rows included; each process gets `batch_size // process_count`
    rows per batch. Batches have a bool `mask` (B,), False on padding rows. Every process
    yields the same number of batches (those with less data end with all-masked batches),
    so that processes can step in lockstep.
    """
    index, count = _process(process_index, process_count)
    field = 'batch_size' if batch_size is not None else 'config.eval.batch_size'
    if batch_size is None:
        batch_size = config.eval.batch_size
    local_batch_size = _per_process(batch_size, field, count)
    module, builder = _prepared_builder(config.data)
    _, _, eval_dataset = _dataset_fns(module, builder, config.data)
    shards = [
        eval_dataset(_records(builder, split, i, count), config, batch_size=local_batch_size)
        for i in range(count)
    ]
    num_batches = max(len(shard) for shard in shards)
    batches = shards[index].to_iter_dataset(_read_options())
    return _padded(batches, num_batches, template=lambda: shards[0][0])


def _padded(batches, num_batches: int, template) -> Iterator[dict[str, np.ndarray]]:
    """`batches`, then all-masked batches shaped like `template()` up to `num_batches`."""
    count = 0
    for batch in batches:
        count += 1
        yield batch
    if count < num_batches:
        blank = {key: np.zeros_like(value) for key, value in template().items()}
        for _ in range(num_batches - count):
            yield dict(blank)
