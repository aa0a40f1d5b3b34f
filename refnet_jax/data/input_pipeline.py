"""Input pipeline: prepared TFDS array_record data -> grain -> dicts of NumPy arrays.

TensorFlow-free: each dataset is a TFDS `GeneratorBasedBuilder`, prepared with
`download_and_prepare(file_format='array_record')` and read by random access through
`as_data_source` (what `tfds.data_source` calls; the builder class is used directly, so
no name look-up in TFDS's registries, which needs TensorFlow or the network, happens).

Batches are as `contract` describes them. The `<m>_index` of a shared modality is local to the batch of this
process: a train loop that assembles a global batch from per-process batches must add the process's offset
in rows of `m`.

`config.data.name` names a module `refnet_jax.data.datasets.<name>` whose `DATASET` implements
`contract.DatasetModule`; `PerRecordDataset` implements it for one example per record, and `modality_info`
reads a modality's shape and dtype from the builder's features. A new dataset is that one module; nothing
here changes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from refnet_jax.data import contract, splits

# Threads that read and transform records. Parsing holds the GIL: one thread already
# gives ~38k easy-VQA questions/s on one core, and more threads add nothing.
NUM_THREADS = 2
PREFETCH_BATCHES = 4
DATASET_ATTRIBUTE = 'DATASET'  # the object of a dataset module that implements contract.DatasetModule


class ToExample(grain.transforms.Map):
    """A stored record -> its modalities and its label: int32 (a class id, or multi-hot), or float32 targets
    (regression), for datasets with one example per record."""

    def __init__(self, modalities: tuple[str, ...]):
        self.modalities = tuple(modalities)

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        label = np.asarray(record['label'])
        label = label.astype(np.float32 if label.dtype.kind == 'f' else np.int32)
        return {**{m: record[m] for m in self.modalities}, 'label': label}


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


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of the examples whose `labels` are given: the labeled subset of
    `config.data.label_fraction`.

    Class ids (N,): stratified, round(fraction * n_c) examples of each class c (at least one), drawn without
    replacement. Multi-hot labels (N, C): a plain random round(fraction * N) (at least one), since label
    combinations are too many to stratify on. (`splits.stratified_split` with Python's rounding and
    `rng.choice`, the draw since the first label-efficiency results.)
    """
    return splits.stratified_split(
        labels, seed, fractions={'subset': fraction}, rounding='half_even', at_least=1, draw='choice'
    )['subset']


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


def modality_info(
    builder: tfds.core.DatasetBuilder,
    feature: str,
    kind: str,
    *,
    vocab_size: int | None = None,
    pad_id: int = 0,
    shared: bool = False,
    stacked: bool = False,
    shape: tuple[int, ...] | None = None,
) -> contract.ModalityInfo:
    """A modality whose item shape and dtype are those the builder declares for `feature`.

    So a dataset declares its schema once, in its TFDS features, and `dataset_info` adds only what TFDS does
    not hold (the kind, the vocabulary size, sharing).

    Args:
      builder: the dataset's builder.
      feature: the name of the feature in `builder.info.features` that holds the modality.
      kind: a key of `contract.KINDS`.
      vocab_size: see `contract.ModalityInfo`.
      pad_id: see `contract.ModalityInfo`.
      shared: see `contract.ModalityInfo`.
      stacked: the feature holds a record's items stacked along its first axis (easy-VQA's questions), so an
        item's shape is the feature's without that axis.
      shape: the item shape where the feature leaves sizes unknown (None), known only once the data are
        prepared (e.g. from the builder's metadata); it must agree with the feature's known sizes.
    """
    declared = builder.info.features[feature]
    item = tuple(declared.shape)[1:] if stacked else tuple(declared.shape)
    if shape is None:
        shape = item
    shape = tuple(shape)
    fits = len(shape) == len(item) and all(d is None or d == n for d, n in zip(item, shape, strict=True))
    if not fits or not all(isinstance(n, int) for n in shape):
        raise ValueError(
            f'feature {feature!r} of {builder.name} has items of shape {item}; shape={shape} must fill its '
            'unknown (None) sizes with ints and keep the others'
        )
    return contract.ModalityInfo(
        kind=kind, shape=shape, dtype=declared.np_dtype, vocab_size=vocab_size, shared=shared, pad_id=pad_id
    )


def per_record_info(
    builder: tfds.core.DatasetBuilder,
    modalities: dict[str, contract.ModalityInfo],
    *,
    multi_label: bool = False,
    task: str = 'classification',
) -> contract.DatasetInfo:
    """The `DatasetInfo` of a prepared builder with one example per record, whose metadata holds the
    `class_names` (in label-id order; regression: the targets' names)."""
    class_names = tuple(builder.info.metadata['class_names'])
    return contract.DatasetInfo(
        name=builder.name,
        modalities=modalities,
        num_classes=len(class_names),
        multi_label=multi_label,
        class_names=class_names,
        num_examples={split: info.num_examples for split, info in builder.info.splits.items()},
        task=task,
    )


class PerRecordDataset(abc.ABC):
    """`contract.DatasetModule` for datasets with one example per record and a `label` field.

    The label is a class id, or a multi-hot vector for multi-label data. Records' modality fields (named by
    `dataset_info`) and labels are batched as they are. A dataset module subclasses this class, sets `Builder`
    (or overrides `make_builder`), writes `dataset_info`, overrides what else differs, and sets
    `DATASET = TheSubclass()`.

    Attributes:
      Builder: the dataset's `tfds.core.GeneratorBasedBuilder` subclass, which `make_builder` instantiates.
    """

    Builder: ClassVar[type[tfds.core.GeneratorBasedBuilder] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.Builder is None and cls.make_builder is PerRecordDataset.make_builder:
            raise TypeError(f'{cls.__qualname__} sets neither Builder nor make_builder; expected one of them')

    def make_builder(
        self, data_config: ml_collections.ConfigDict, *, data_dir: str | None, file_format: str
    ) -> tfds.core.DatasetBuilder:
        """`Builder` in `data_dir`; override when the builder depends on other `config.data` fields."""
        del data_config
        return self.Builder(data_dir=data_dir, file_format=file_format)

    @abc.abstractmethod
    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        """What the model and train loop need to know, from the prepared `builder`."""

    def train_examples(
        self, records: grain.MapDataset, config: ml_collections.ConfigDict, *, info: contract.DatasetInfo
    ) -> grain.MapDataset:
        """Each record -> its modalities and int32 label."""
        del config
        return records.map(ToExample(tuple(info.modalities)))

    def train_batches(
        self,
        examples: grain.MapDataset,
        config: ml_collections.ConfigDict,
        *,
        info: contract.DatasetInfo,
        batch_size: int,
    ) -> grain.MapDataset:
        """The examples stacked `batch_size` at a time."""
        del config, info
        return examples.batch(batch_size)

    def eval_dataset(
        self,
        records: grain.MapDataset,
        config: ml_collections.ConfigDict,
        *,
        info: contract.DatasetInfo,
        batch_size: int,
    ) -> grain.MapDataset:
        """Every example once, the last batch padded and masked."""
        del config
        examples = records.map(ToExample(tuple(info.modalities)))
        return examples.batch(batch_size, drop_remainder=False).map(PadBatch(batch_size))

    def labeled_subset(self, source, fraction: float, seed: int) -> SubsetSource:
        """The records of a `stratified_subset` of their labels."""
        labels = np.stack([np.asarray(source[i]['label']) for i in range(len(source))])
        return SubsetSource(source, stratified_subset(labels, fraction, seed))


def _dataset(data_config: ml_collections.ConfigDict) -> contract.DatasetModule:
    """The `DATASET` of the module `config.data.name` names, checked to implement `contract.DatasetModule`."""
    name = data_config.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f'config.data.name={name!r}, expected a module name under refnet_jax.data.datasets')
    module_name = f'refnet_jax.data.datasets.{name}'
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ValueError(
            f'config.data.name={name!r}, expected a module refnet_jax/data/datasets/{name}.py'
        ) from None
    expected = (
        f'expected {DATASET_ATTRIBUTE} = an object with the methods of refnet_jax.data.contract.DatasetModule '
        f'({", ".join(contract.DATASET_METHODS)}), e.g. an instance of a subclass of '
        'refnet_jax.data.input_pipeline.PerRecordDataset'
    )
    if DATASET_ATTRIBUTE not in vars(module):
        raise ValueError(
            f'config.data.name={name!r}: module {module_name} has no {DATASET_ATTRIBUTE}; {expected}'
        )
    dataset = vars(module)[DATASET_ATTRIBUTE]
    if not isinstance(dataset, contract.DatasetModule):
        raise ValueError(
            f'config.data.name={name!r}: {module_name}.{DATASET_ATTRIBUTE} ({type(dataset).__name__}) lacks '
            f'{", ".join(contract.missing_methods(dataset))}; {expected}'
        )
    return dataset


def _make_builder(dataset: contract.DatasetModule, data_config: ml_collections.ConfigDict):
    data_dir = data_config.data_dir
    if data_dir is not None and not isinstance(data_dir, str):
        raise ValueError(f'config.data.data_dir={data_dir!r}, expected a str path or None (TFDS default)')
    return dataset.make_builder(data_config, data_dir=data_dir, file_format='array_record')


def _prepared_builder(
    data_config: ml_collections.ConfigDict,
) -> tuple[contract.DatasetModule, Any]:
    """The dataset's `DATASET` and builder, preparing the data if no complete copy exists.

    TFDS writes into a sibling `incomplete.*` directory and renames it when done, so an
    interrupted preparation is never taken as complete; `is_prepared` also requires the
    info files, which are written last.
    """
    dataset = _dataset(data_config)
    builder = _make_builder(dataset, data_config)
    if builder.is_prepared():
        return dataset, builder
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
        if not _make_builder(dataset, data_config).is_prepared():
            raise
    # Reopen from disk, so that a first call reads the same files as every later one.
    builder = _make_builder(dataset, data_config)
    if not builder.is_prepared():
        raise RuntimeError(
            f'{builder.data_path} exists but holds no complete TFDS dataset '
            '(dataset_info.json, features.json); delete it to prepare the data again'
        )
    return dataset, builder


def get_dataset_info(data_config: ml_collections.ConfigDict) -> contract.DatasetInfo:
    """Describes the dataset of `config.data`, preparing it if needed (idempotent).

    `modalities` holds those that `config.data.modalities` selects (all of them when the field is absent
    or None).
    """
    dataset, builder = _prepared_builder(data_config)
    info = dataset.dataset_info(builder)
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
        self.dropped = {k for m in dropped for k in (m, contract.index_key(m))}

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


def label_fraction(config: ml_collections.ConfigDict) -> float:
    """`config.data.label_fraction` (1.0 when absent), checked to be in (0, 1]."""
    fraction = config.data.get('label_fraction', 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f'config.data.label_fraction={fraction!r}, expected a number in (0, 1]')
    return float(fraction)


def _train_source(dataset: contract.DatasetModule, builder, config: ml_collections.ConfigDict, labeled: bool):
    """The `train` split's records; with `labeled` and a label fraction below 1, only the labeled subset."""
    source = builder.as_data_source(split='train')
    fraction = label_fraction(config)
    if not labeled or fraction == 1.0:
        return source
    subset = dataset.labeled_subset(source, fraction, config.seed)
    logging.info('Label fraction %g: %d of %d training records.', fraction, len(subset), len(source))
    return subset


def _dropped(data_config: ml_collections.ConfigDict, info: contract.DatasetInfo) -> tuple[str, ...]:
    """The modalities of the dataset that `config.data.modalities` leaves out."""
    selected = _selected_modalities(data_config, info)
    return tuple(m for m in info.modalities if m not in selected)


def _without(batches: grain.MapDataset, dropped: tuple[str, ...]) -> grain.MapDataset:
    return batches.map(DropModalities(dropped)) if dropped else batches


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
    dataset, builder = _prepared_builder(config.data)
    info = dataset.dataset_info(builder)
    dropped = _dropped(config.data, info)
    source = _train_source(dataset, builder, config, labeled)
    records = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    examples = dataset.train_examples(records, config, info=info)[index::count]
    batches = dataset.train_batches(examples, config, info=info, batch_size=batch_size)
    return iter(_without(batches, dropped).to_iter_dataset(_read_options()))


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
    dataset, builder = _prepared_builder(config.data)
    info = dataset.dataset_info(builder)
    dropped = _dropped(config.data, info)
    shards = [
        _without(
            dataset.eval_dataset(
                _records(builder, split, i, count), config, info=info, batch_size=local_batch_size
            ),
            dropped,
        )
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
