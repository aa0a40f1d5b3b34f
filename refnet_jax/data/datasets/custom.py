"""Your own data: arrays or a CSV table in a directory of yours, described by one config file (configs/custom.py).

`config.data.manual_dir` is that directory. It holds either

  arrays    `train.npz`, and optionally `validation.npz` and `test.npz` (written with `np.savez` or
            `np.savez_compressed`): one array per modality of `config.data.kinds`, a row per example
            (N, *item shape), and the labels `config.data.label` ('label'): (N,) integer class ids, or (N, C)
            multi-hot 0/1 for multi-label data. Other arrays in the files are ignored.
  a table   the CSV file `config.data.table` (a header row, then one example per row): each modality's columns
            `config.data.columns.<modality>` (a column name, a tuple of names, or a pattern such as 'meta_*':
            the matching columns in header order), the label column `config.data.label` (class ids 0, 1, ...,
            or class names), and optionally the split column `config.data.split_column` (train, validation or
            test).

Each modality has a kind, declared in `config.data.kinds` (it picks the encoder, whose fields the config sets),
and the data are checked against it:
  image     (H, W, C) uint8 pixels. In a table: one column of image file paths, relative to the table's
            directory, each decoded with Pillow, converted to RGB and resized to `image_size` x `image_size` (bilinear).
  tokens    (T,) integer ids >= 0, id 0 meaning padding; the vocabulary size is the largest id (any split) + 1.
  series    (T, C) numbers: T time steps of C channels (arrays only).
  features  (D,) numbers.
Each stored example keeps `row`, its row in its file (from 0; the header is not a row).

Splits: those given (validation.npz, test.npz; the split column's values) are used as they are. Each split not
given is drawn from the train rows: with `config.data.split` = (train, validation, test) fractions, per class
(multi-label data: over all rows) a permutation of its rows by one `np.random.default_rng(split_seed)`, drawn for
the classes in increasing order, gives round(n * fraction) rows to each missing split in the order validation,
test; train keeps the rest. The same data and seed give the same split.

Values: non-finite numbers (NaN, inf, an empty table cell) in 'features' and 'series' are an error naming the
file, the row and the field, unless `config.data.nan` = 'zero' replaces them with 0 (and logs how many). With
`config.data.standardize`, 'features' are standardized per feature and 'series' per channel with the mean and
standard deviation of the train split (a constant one gets std 1); the statistics are in the prepared
`metadata.json` (`standardization`), so raw = stored * std + mean. Classes: `config.data.num_classes` when set
(a label outside [0, num_classes) is then an error naming file, row and value), else the number of
`config.data.class_names`, else the largest label + 1 (for multi-hot labels: their width). A table's labels are
class names when they are not all integers: looked up in `class_names`, or, when that is empty, the sorted
distinct names.

The prepared copy (TFDS array_record, under `config.data.data_dir`) is named after the directory and a hash of
the data fields of the config and of every source file's size and modification time (image files included): a
second run with the same data and config reuses it, and editing either prepares a fresh copy. So the source
files must stay where they are. TFDS writes into a temporary directory that it renames when done, so an
interrupted preparation is never taken as complete. Preparation holds the arrays in memory (images are decoded
one at a time).

`DATASET` implements `refnet_jax.data.contract.DatasetModule` with the per-record defaults and its own
`make_builder`: one example per record, so batches are `{modality: (B, *shape), 'label': (B,) or (B, C)}`, plus
`mask` in evaluation.

The code: `custom_spec` checks the config fields and the files' layout (headers only), `custom_values` reads,
checks, splits and standardizes the values, and this module holds the builder and `DATASET`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from refnet_jax.data import common, contract, custom_values, input_pipeline, tokenizers
from refnet_jax.data.custom_spec import DTYPES, SPLITS, Spec, read_spec

# --- The builder ---


class Builder(tfds.core.GeneratorBasedBuilder):
    """The user's own data, one example per row; see the module docstring. Built by `make_builder`."""

    name = 'custom'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Arrays (.npz) or a CSV table, per config.data.'}

    def __init__(self, *, spec: Spec, **kwargs):
        self.spec = spec
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
        if spec.label_width is None:
            label = tfds.features.Scalar(dtype=np.int32)
        else:
            label = tfds.features.Tensor(shape=(spec.label_width,), dtype=np.int32, encoding='bytes')
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # rows stay in file order; the input pipeline shuffles
            features=tfds.features.FeaturesDict(
                {**inputs, 'label': label, 'row': tfds.features.Scalar(dtype=np.int64)}
            ),
            metadata=tfds.core.MetadataDict(),  # filled in `_split_generators`
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the files are the spec's, in config.data.manual_dir
        spec = self.spec
        table = 'table' in spec.files
        parts = custom_values.read_table_parts(spec) if table else custom_values.read_arrays(spec)
        class_names = custom_values.class_ids(parts, spec) if table else spec.class_names
        num_classes = custom_values.check_labels(parts, spec, class_names)
        zeroed = custom_values.check_values(parts, spec)
        origins = custom_values.fill_splits(parts, spec)
        stats = custom_values.standardize_parts(parts, spec)
        texts = custom_values.tokenize_parts(parts, spec)
        self.data_path.mkdir(parents=True, exist_ok=True)
        for m, (tokenizer, _) in texts.items():  # saved with the prepared data, named in its metadata
            (self.data_path / tokenizer_file(m, tokenizer.suffix)).write_bytes(tokenizer.data)
        vocab = {
            m: int(max(p.inputs[m].max(initial=0) for p in parts.values())) + 1
            for m, kind in spec.kinds.items()
            if kind == 'tokens'
        }
        self.info.metadata.update(
            {
                'modalities': {
                    m: {'kind': kind, 'vocab_size': vocab.get(m)}  # shapes and dtypes: the features
                    | (_text_metadata(m, *texts[m], spec) if m in texts else {})
                    for m, kind in spec.kinds.items()
                },
                'num_classes': num_classes,
                'multi_label': spec.label_width is not None,
                'class_names': list(class_names or [str(c) for c in range(num_classes)]),
                'splits': origins,
                'standardization': stats,
                'non_finite_zeroed': zeroed,
                'source': str(spec.root),
            }
        )
        logging.info(
            'Preparing %s from %s: %s examples, %d classes.',
            self.builder_config.name,
            spec.root,
            {split: len(p.labels) for split, p in parts.items()},
            num_classes,
        )
        return {split: self._generate_examples(parts[split]) for split in SPLITS}

    def _generate_examples(self, part: custom_values.Part) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(len(part.labels)):
            example = {'label': part.labels[i], 'row': int(part.rows[i])}
            for m, kind in self.spec.kinds.items():
                x = part.inputs[m][i]
                if kind == 'image' and isinstance(x, str):  # a table's image file
                    where = f'{part.where(i)}: {part.field(m, (0,))}'
                    x = common.load_image(x, self.spec.image_size, where=where)
                example[m] = x
            for m, mask in part.masks.items():
                example[mask_feature(m)] = mask[i]
            yield int(part.rows[i]), example


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
        library = hf_tokenizers if source.endswith('.json') else sentencepiece
        versions[m] = f'{library.__name__} {library.__version__}'
    return versions


# --- The dataset for the input pipeline ---


def fingerprint(spec: Spec) -> str:
    """A hash of the data fields of `spec` (tokenizer files by their SHA-256, with their library's version)
    and of each source file's size and modification time."""
    skip = ('root', 'files', 'images')  # the files count by their stats, relative to the root
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in skip}
    if spec.tokenizer:
        fields['libraries'] = _library_versions(spec)
    files = [*spec.files.values(), *(p for paths in spec.images.values() for p in paths)]
    stats = []
    for path in files:
        stat = path.stat()
        stats.append((os.path.relpath(path, spec.root), stat.st_size, stat.st_mtime_ns))
    text = json.dumps([fields, stats], default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        return input_pipeline.per_record_info(builder, modalities, multi_label=bool(metadata['multi_label']))


DATASET = Custom()
