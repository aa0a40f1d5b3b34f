"""Your own data: arrays or a table in a directory of yours, described by one config file (configs/custom.py).

`config.data.manual_dir` is that directory. It holds either

  arrays    `train.npz`, and optionally `validation.npz` and `test.npz` (written with `np.savez` or
            `np.savez_compressed`): one array per modality of `config.data.kinds`, a row per example
            (N, *item shape), and the labels `config.data.label` ('label'): (N,) integer class ids, or (N, C)
            multi-hot 0/1 for multi-label data. Other arrays in the files are ignored.
  a table   `config.data.table`, by extension a CSV file (.csv, a header row), JSON Lines (.jsonl, one object
            per line) or Parquet (.parquet), or a directory of shards of one of them (read in name order), one
            example per row: each modality's columns `config.data.columns.<modality>` (a column name, a tuple of
            names, or a pattern such as 'meta_*': the matching columns in header order), the label column
            `config.data.label` (class ids 0, 1, ..., or class names), and optionally the split column
            `config.data.split_column` (train, validation or test).

Each modality has a kind, declared in `config.data.kinds` (it picks the encoder, whose fields the config sets),
and the data are checked against it:
  image     (H, W, C) uint8 pixels. In a table: one column of image file paths, relative to the table's
            directory (or absolute), each decoded with Pillow, converted to RGB and resized to `image_size` x
            `image_size` (bilinear), by `IMAGE_WORKERS` processes when a split has many.
  text      raw UTF-8 strings: a str (or UTF-8 bytes) array, or one table column of strings. Tokenized when the
            data are prepared by `config.data.tokenizer.<m>`: 'train' (a sentencepiece tokenizer trained on the
            train split's text, at most `config.data.vocab_size` pieces, byte for byte the same for the same
            text), a tokenizer.json / sentencepiece .model file, or 'hf:DIR', a Hugging Face model directory
            whose text tower's own tokenizer it runs as that tower's processor does (tokenizers.Pretrained), to
            `config.data.max_tokens.<m>` ids (None: the train split's 99th percentile length, at most 256 or
            the tower's model_max_length; SigLIP's: exactly its model_max_length).
            Stored as ids and a mask `<m>_mask` (True on real tokens); the ids pad with the tokenizer's padding
            id (`ModalityInfo.pad_id`, not assumed 0), and the tokenizer file is saved beside the prepared data
            (`tokenizer_<m>.model` or `.json`, named with its SHA-256 in the metadata).
  tokens    (T,) integer ids >= 0, id 0 meaning padding; the vocabulary size is the largest id (any split) + 1.
  series    (T, C) numbers: T time steps of C channels (arrays only).
  features  (D,) numbers.
Each stored example keeps `row`, its row in its file (from 0; the header is not a row; in a directory of
shards, its row in the whole table).

Labels: `config.data.task` 'classification' (above), or 'regression': real-valued targets, (N,) or (N, K)
numbers in the arrays, or a table's column of numbers (a tuple of columns or a pattern: K targets), stored as
(K,) float32; `DatasetInfo.num_classes` is then K and the class names are the targets' names.

Splits: those given (validation.npz, test.npz; the split column's values) are used as they are. Each split not
given is drawn from the train rows: with `config.data.split` = (train, validation, test) fractions, per class
(multi-label data and regression: over all rows) a permutation of its rows by one
`np.random.default_rng(split_seed)`, drawn for the classes in increasing order, gives round(n * fraction) rows
to each missing split in the order validation, test; train keeps the rest. The same data and seed give the same
split.

Values: non-finite numbers (NaN, inf, an empty table cell, null) in 'features' and 'series' are an error naming
the file, the row and the field, unless `config.data.nan` = 'zero' replaces them with 0 (and logs how many).
With `config.data.standardize`, 'features' are standardized per feature and 'series' per channel with the mean
and standard deviation of the train split (a constant one gets std 1); the statistics are in the prepared
`metadata.json` (`standardization`), so raw = stored * std + mean. Classes: `config.data.num_classes` when set
(a label outside [0, num_classes) is then an error naming file, row and value), else the number of
`config.data.class_names`, else the largest label + 1 (for multi-hot labels: their width). A table's labels are
class names when they are not all integers: looked up in `class_names`, or, when that is empty, the sorted
distinct names. A cell of the wrong type (a number or null where text is expected, text that is not UTF-8, a
word in a number column, a Parquet column of another type) is an error naming the file, the row and the column.

Preparation streams (refnet_jax/data/custom_values.py): the source is read in chunks, every value checked
before anything is written, then each split's examples are written to its array_record shards as they come,
so memory does not grow with the table; a long preparation logs rows done and rows/s. The prepared copy (TFDS
array_record, under `config.data.data_dir`) is named after the directory and a hash of the data fields of the
config (a tokenizer file by its SHA-256) and of every source file's size and modification time (a table's
shards; not the image files it names): a second run with the same data and config reuses it, and editing
either prepares a fresh copy. So the source files must stay where they are. TFDS writes into a temporary
directory that it renames when done, so an interrupted or refused preparation leaves no copy that is taken as
complete.

`DATASET` implements `refnet_jax.data.contract.DatasetModule` with the per-record defaults and its own
`make_builder`: one example per record, so batches are `{modality: (B, *shape), 'label': (B,) or (B, C)}`, plus
`mask` in evaluation.

The code: `custom_spec` checks the config fields and the files' layout (headers only), `tables` reads tables in
chunks, `custom_values` reads, checks, splits, standardizes and tokenizes the values, and this module holds the
builder and `DATASET`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging as std_logging
import multiprocessing
import os
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from refnet_jax.data import common, contract, custom_values, input_pipeline, tables, tokenizers
from refnet_jax.data.custom_spec import DTYPES, SPLITS, Spec, read_spec

# --- The builder ---

IMAGE_WORKERS = min(8, os.cpu_count() or 1)  # processes that decode a table's images
PARALLEL_IMAGES = 1024  # a split with fewer images decodes them in this process (a pool costs its start-up)
SHARD_BYTES = 256 << 20  # an array_record shard ends once it holds this many bytes of examples


class Builder(tfds.core.GeneratorBasedBuilder):
    """The user's own data, one example per row; see the module docstring. Built by `make_builder`."""

    name = 'custom'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        '1.0.0': 'Arrays (.npz) or a table (CSV, JSON Lines, Parquet, shards), per config.data.'
    }

    def __init__(self, *, spec: Spec, **kwargs):
        self.spec = spec
        self._pool = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.spec
        inputs = {
            m: tfds.features.Tensor(shape=spec.shapes[m], dtype=DTYPES[kind], encoding='bytes')
            for m, kind in spec.kinds.items()
        }
        for m, kind in spec.kinds.items():
            if kind == 'text':  # True on real tokens (the ids pad with the tokenizer's padding id elsewhere)
                inputs[mask_feature(m)] = tfds.features.Tensor(
                    shape=(None,), dtype=np.bool_, encoding='bytes'
                )
        dtype = np.float32 if spec.task == 'regression' else np.int32
        if spec.label_width is None:
            label = tfds.features.Scalar(dtype=dtype)
        else:
            label = tfds.features.Tensor(shape=(spec.label_width,), dtype=dtype, encoding='bytes')
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # rows stay in file order; the input pipeline shuffles
            features=tfds.features.FeaturesDict(
                {**inputs, 'label': label, 'row': tfds.features.Scalar(dtype=np.int64)}
            ),
            metadata=tfds.core.MetadataDict(),  # filled in `_split_generators`
        )

    def download_and_prepare(self, *args, **kwargs) -> None:
        """TFDS's preparation; the pool of `IMAGE_WORKERS` processes, started when a split has many images, is
        closed after."""
        try:
            with _quiet_tfds():
                super().download_and_prepare(*args, **kwargs)
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None

    def _generate_splits(self, dl_manager, download_config) -> list[tfds.core.SplitInfo]:
        """Writes each split's examples to its array_record shards as they come, in order. (TFDS's own writer
        keeps up to 1 GB of examples in memory, then needs TensorFlow to spill them to disk.)"""
        del download_config
        return [
            self._write_split(split, examples, self._get_filename_template(split_name=split))
            for split, examples in self._split_generators(dl_manager).items()
        ]

    def _write_split(self, split: str, examples, template) -> tfds.core.SplitInfo:
        from array_record.python import array_record_module
        from tensorflow_datasets.core import example_serializer

        features = self.info.features
        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        lengths, sizes, paths, writer = [], [], [], None
        try:
            for _, example in examples:
                data = serializer.serialize_example(features.encode_example(example))
                if writer is None or sizes[-1] >= SHARD_BYTES:
                    if writer is not None:
                        writer.close()
                    paths.append(template.data_dir / f'{template.split}.shard{len(paths)}.tmp')
                    writer = array_record_module.ArrayRecordWriter(os.fspath(paths[-1]), 'group_size:1')
                    lengths.append(0)
                    sizes.append(0)
                writer.write(data)
                lengths[-1] += 1
                sizes[-1] += len(data)
        finally:
            if writer is not None:
                writer.close()
        if not lengths:
            raise ValueError(f'split {split!r} has no examples; expected at least one')
        for path, final in zip(paths, template.sharded_filepaths(len(paths)), strict=True):
            path.rename(final)
        return tfds.core.SplitInfo(
            name=split, shard_lengths=lengths, num_bytes=sum(sizes), filename_template=template
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the files are the spec's, in config.data.manual_dir
        spec = self.spec
        plan = custom_values.plan(spec)
        self.data_path.mkdir(parents=True, exist_ok=True)
        for m, (tokenizer, _) in plan.texts.items():  # saved with the prepared data, named in its metadata
            (self.data_path / tokenizer_file(m, tokenizer.suffix)).write_bytes(tokenizer.data)
        self.info.metadata.update(
            {
                'modalities': {
                    m: {'kind': kind, 'vocab_size': plan.vocab.get(m)}  # shapes and dtypes: the features
                    | (_text_metadata(m, *plan.texts[m], spec) if m in plan.texts else {})
                    for m, kind in spec.kinds.items()
                },
                'task': spec.task,
                'num_classes': plan.num_classes,
                'multi_label': spec.task == 'classification' and spec.label_width is not None,
                'class_names': list(plan.class_names),
                'splits': plan.origins,
                'standardization': plan.stats,
                'non_finite_zeroed': plan.zeroed,
                'source': str(spec.root),
            }
        )
        logging.info(
            'Preparing %s from %s: %s examples, %s.',
            self.builder_config.name,
            spec.root,
            plan.counts(),
            f'{plan.num_classes} targets' if spec.task == 'regression' else f'{plan.num_classes} classes',
        )
        return {split: self._generate_examples(plan, split) for split in SPLITS}

    def _generate_examples(
        self, plan: custom_values.Plan, split: str
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row, example) of the split, in file order."""
        decode = self._decoder(plan.counts()[split])
        for out in plan.examples(split, decode):
            for i, row in enumerate(out['row'].tolist()):
                yield row, {name: x[i] for name, x in out.items()}

    def _decoder(self, num_images: int):
        """jobs [(path, size, where)] -> the decoded images, in a pool for a split with many images."""
        if not num_images or num_images < PARALLEL_IMAGES or IMAGE_WORKERS < 2 or not self._has_images():
            return lambda jobs: [common.decode_image(job) for job in jobs]
        if self._pool is None:
            # Not fork: this process runs jax's threads. The fork server imports the main module once, and the
            # workers it forks share those pages.
            context = multiprocessing.get_context('forkserver')
            self._pool = concurrent.futures.ProcessPoolExecutor(IMAGE_WORKERS, mp_context=context)
        return lambda jobs: list(self._pool.map(common.decode_image, jobs, chunksize=32))

    def _has_images(self) -> bool:
        return 'table' in self.spec.files and 'image' in self.spec.kinds.values()


def mask_feature(m: str) -> str:
    """The stored feature of a text modality's mask (max_tokens,) bool, True on real tokens."""
    return f'{m}_mask'


def tokenizer_file(m: str, suffix: str) -> str:
    """The file name of text modality m's tokenizer in the prepared data's directory."""
    return f'tokenizer_{m}{suffix}'


def _text_metadata(m: str, tokenizer: tokenizers.Tokenizer, max_tokens: int, spec: Spec) -> dict[str, Any]:
    return {
        'vocab_size': tokenizer.vocab_size,
        'pad_id': tokenizer.pad_id,
        'max_tokens': max_tokens,
        'tokenizer': {
            'file': tokenizer_file(m, tokenizer.suffix),
            'sha256': tokenizer.sha256,
            'source': spec.tokenizer[m],  # 'train', or the file it was read from
        },
    }


def _library_versions(spec: Spec) -> dict[str, str]:
    """The tokenizer libraries' versions, for the text modalities (another version may tokenize otherwise)."""
    import sentencepiece
    import tokenizers as hf_tokenizers

    versions = {}
    for m, source in spec.tokenizer.items():
        library = hf_tokenizers if tokenizers.library(source) == 'tokenizers' else sentencepiece
        versions[m] = f'{library.__name__} {library.__version__}'
    return versions


# --- The dataset for the input pipeline ---


def fingerprint(spec: Spec) -> str:
    """A hash of the data fields of `spec` (tokenizer files by their SHA-256, with their library's version)
    and of each source file's size and modification time (a table's shards; not the image files a table
    names, which would take reading the whole table at every start)."""
    skip = ('root', 'files')  # the files count by their stats, relative to the root
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in skip}
    if spec.tokenizer:
        fields['libraries'] = _library_versions(spec)
    files = []
    for path in spec.files.values():
        files += sorted(p for p in path.iterdir() if p.suffix in tables.SUFFIXES) if path.is_dir() else [path]
    stats = []
    for path in files:
        stat = path.stat()
        stats.append((os.path.relpath(path, spec.root), stat.st_size, stat.st_mtime_ns))
    text = json.dumps([fields, stats], default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Drops TFDS's warnings about what this module does on purpose: a config per version of the data
    (`Using custom data configuration`), a directory not prepared yet (`Variant folder ... has no ...`)."""

    def keep(record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith(('Using custom data configuration', 'Variant folder'))

    logger = std_logging.getLogger('absl')
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class Custom(input_pipeline.PerRecordDataset):
    """The user's data for the input pipeline: one example per row."""

    def make_builder(
        self, data_config: ml_collections.ConfigDict, *, data_dir: str | None, file_format: str
    ) -> tfds.core.DatasetBuilder:
        """The `Builder` of the data `config.data` describes, named after its directory and `fingerprint`."""
        spec = read_spec(data_config)
        slug = re.sub(r'[^a-z0-9]+', '_', spec.root.name.lower()).strip('_') or 'data'
        config = tfds.core.BuilderConfig(
            name=f'{slug}_{fingerprint(spec)}', description=f'{spec.root} as config.data describes it'
        )
        with _quiet_tfds():
            return Builder(spec=spec, config=config, data_dir=data_dir, file_format=file_format)

    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        metadata = builder.info.metadata
        modalities = {
            m: input_pipeline.modality_info(
                builder,
                m,
                d['kind'],
                vocab_size=d['vocab_size'],
                pad_id=d.get('pad_id', 0),
                shape=(d['max_tokens'],) if d['kind'] == 'text' else None,
            )
            for m, d in metadata['modalities'].items()
        }
        return input_pipeline.per_record_info(
            builder,
            modalities,
            multi_label=bool(metadata['multi_label']),
            task=metadata.get('task', 'classification'),
        )


DATASET = Custom()
