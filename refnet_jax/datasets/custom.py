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
`config.data.standardize`, 'features' are standardised per feature and 'series' per channel with the mean and
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

`DATASET` implements `refnet_jax.contract.DatasetModule` with the per-record defaults and its own
`make_builder`: one example per record, so batches are `{modality: (B, *shape), 'label': (B,) or (B, C)}`, plus
`mask` in evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import functools
import hashlib
import json
import os
import pathlib
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from refnet_jax import contract, input_pipeline

SPLITS = ('train', 'validation', 'test')
ARRAY_FILES = {split: f'{split}.npz' for split in SPLITS}
DTYPES = {'image': np.uint8, 'tokens': np.int32, 'series': np.float32, 'features': np.float32}
EXPECTED = {
    'image': '(H, W, C) uint8 pixels',
    'tokens': '(T,) integer token ids',
    'series': '(T, C) numbers: T time steps of C channels',
    'features': '(D,) numbers',
}
TABLE_KINDS = ('image', 'tokens', 'features')
NAN_POLICIES = ('error', 'zero')
# The config.data fields that shape the prepared data (all set by configs/custom.py).
FIELDS = (
    'kinds',
    'table',
    'columns',
    'label',
    'split_column',
    'split',
    'split_seed',
    'num_classes',
    'class_names',
    'standardize',
    'nan',
    'image_size',
)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v != ''


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


FIELD_CHECKS = {  # config.data field -> (test of its value, what is expected); kinds, split, class_names apart
    'table': (lambda v: v is None or _is_name(v), 'None or a CSV file name'),
    'label': (_is_name, 'an array or column name'),
    'split_column': (lambda v: v is None or _is_name(v), 'None or a column name'),
    'split_seed': (_is_int, 'an int'),
    'num_classes': (lambda v: v is None or (_is_int(v) and v >= 1), 'None or an int >= 1'),
    'standardize': (lambda v: isinstance(v, bool), 'True or False'),
    'nan': (lambda v: v in NAN_POLICIES, f'one of {NAN_POLICIES}'),
    'image_size': (lambda v: _is_int(v) and v >= 1, 'an int >= 1'),
}
LAYOUT = (
    'train.npz (and optionally validation.npz, test.npz) with an array per modality and the labels, or the CSV '
    'file named by config.data.table; see refnet_jax/datasets/custom.py'
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The data that `config.data` describes, checked against the files' headers (no values read yet).

    Attributes:
      root: the manual directory.
      kinds: modality -> kind.
      files: the source files: split -> .npz file given, or {'table': the CSV file}.
      shapes: modality -> item shape, as stored.
      label_width: C for multi-hot labels, None for class ids.
      columns: modality -> its column names (tables only).
      images: modality -> one image file per table row (image modalities of tables only).
      The other attributes are the `config.data` fields of the same names.
    """

    root: pathlib.Path
    kinds: dict[str, str]
    files: dict[str, pathlib.Path]
    shapes: dict[str, tuple[int, ...]]
    label_width: int | None
    columns: dict[str, tuple[str, ...]]
    images: dict[str, tuple[pathlib.Path, ...]]
    label: str
    split_column: str | None
    split: tuple[float, float, float]
    split_seed: int
    num_classes: int | None
    class_names: tuple[str, ...]
    standardize: bool
    nan: str
    image_size: int


@dataclasses.dataclass
class Part:
    """Examples from one source file: their inputs and labels, and where each came from.

    Attributes:
      path: the file.
      inputs: modality -> (N, *shape) values; a table's image modality holds (N,) file paths.
      labels: (N,) class ids, (N, C) multi-hot, or for a table before `_class_ids`, (N,) strings.
      rows: (N,) each example's row in the file, from 0.
      lines: (N,) each example's line in the CSV file (tables only).
      columns: modality -> its column names (tables only), to name the field of a bad value.
    """

    path: pathlib.Path
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    rows: np.ndarray
    lines: np.ndarray | None = None
    columns: dict[str, tuple[str, ...]] | None = None

    def where(self, i: int) -> str:
        """'<file> row <r>' for the i-th example (with its CSV line)."""
        line = f' (line {self.lines[i]})' if self.lines is not None else ''
        return f'{self.path} row {self.rows[i]}{line}'

    def field(self, m: str, index: tuple[int, ...]) -> str:
        """The column, or the array and item index, holding `index` of modality `m`'s item."""
        if self.columns is not None:
            return f'column {self.columns[m][index[0]]!r}'
        return f'array {m!r} at {list(index)}'

    def take(self, idx: np.ndarray) -> Part:
        """The examples `idx` of this part."""
        return Part(
            self.path,
            {m: x[idx] for m, x in self.inputs.items()},
            self.labels[idx],
            self.rows[idx],
            None if self.lines is None else self.lines[idx],
            self.columns,
        )


# --- Reading the config and the files' headers ---


def read_spec(data_config: ml_collections.ConfigDict) -> Spec:
    """Checks the `config.data` fields and the source files' layout (files, arrays, columns, shapes, kinds).

    Raises ValueError or FileNotFoundError naming the field or file and what was expected.
    """
    missing = [f for f in FIELDS if f not in data_config]
    if missing:
        raise ValueError(f'config.data lacks {missing}; start from configs/custom.py, which sets every field')
    manual_dir = data_config.get('manual_dir')
    if not manual_dir:
        raise ValueError(f'config.data.manual_dir is not set; pass the directory of your data: {LAYOUT}')
    root = pathlib.Path(os.path.abspath(os.path.expanduser(manual_dir)))
    if not root.is_dir():
        raise FileNotFoundError(
            f'config.data.manual_dir={manual_dir!r}: no directory {root}; expected {LAYOUT}'
        )
    d = data_config
    for field, (ok, expected) in FIELD_CHECKS.items():
        if not ok(d[field]):
            raise ValueError(f'config.data.{field}={d[field]!r}, expected {expected}')
    kinds = _check_kinds(d.kinds)
    fields = {field: d[field] for field in FIELD_CHECKS if field != 'table'}
    fields.update(split=_check_split(d.split), class_names=_check_class_names(d.class_names, d.num_classes))
    table = d.table
    if table is None:
        if fields['split_column'] is not None:
            raise ValueError(
                f'config.data.split_column={fields["split_column"]!r} is for a table (config.data.table), but '
                'config.data.table is None: arrays give their own splits as validation.npz and test.npz'
            )
        files, shapes, label_width = _peek_arrays(root, kinds, fields['label'])
        columns, images = {}, {}
    else:
        files, shapes, columns, images = _peek_table(root / table, kinds, d.columns, fields)
        label_width = None
    return Spec(root, kinds, files, shapes, label_width, columns, images, **fields)


def _plain(value: Any) -> Any:
    """A config field's value with ConfigDicts as dicts."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _check_kinds(kinds: Any) -> dict[str, str]:
    kinds = _plain(kinds)
    if not isinstance(kinds, dict) or not kinds:
        raise ValueError(
            f'config.data.kinds={kinds!r}, expected {{modality: kind}} for at least one modality'
        )
    for m, kind in kinds.items():
        if kind not in tuple(contract.KINDS):
            raise ValueError(f'config.data.kinds.{m}={kind!r}, expected one of {tuple(contract.KINDS)}')
    return kinds


def _check_split(split: Any) -> tuple[float, float, float]:
    ok = (
        isinstance(split, Sequence)
        and len(split) == 3
        and all(isinstance(f, int | float) and not isinstance(f, bool) and f >= 0 for f in split)
        and abs(sum(split) - 1) < 1e-6
        and split[0] > 0
    )
    if not ok:
        raise ValueError(
            f'config.data.split={split!r}, expected (train, validation, test) fractions >= 0 that sum to 1, '
            'train > 0'
        )
    return tuple(float(f) for f in split)


def _check_class_names(names: Any, num_classes: Any) -> tuple[str, ...]:
    ok = isinstance(names, Sequence) and not isinstance(names, str) and all(isinstance(n, str) for n in names)
    if not ok or len(set(names)) != len(names):
        raise ValueError(
            f'config.data.class_names={names!r}, expected a tuple of distinct str (or () for none)'
        )
    if names and _is_int(num_classes) and len(names) != num_classes:
        raise ValueError(
            f'config.data.class_names has {len(names)} names but config.data.num_classes={num_classes}; '
            'expected one name per class'
        )
    return tuple(names)


def npz_headers(path: pathlib.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an .npz file, read from the arrays' headers without reading their data."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith('.npy'):
                    continue
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
                out[member.removesuffix('.npy')] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path} cannot be read as a NumPy .npz file ({e}); write it with np.savez') from e
    return out


def _check_item(where: str, m: str, kind: str, item: tuple[int, ...], dtype: np.dtype) -> None:
    """Raises ValueError unless items of `item` shape and `dtype` fit `kind`."""
    ndim = {'image': 3, 'tokens': 1, 'series': 2, 'features': 1}[kind]
    dtype_kinds = {'image': 'u', 'tokens': 'iu', 'series': 'biuf', 'features': 'biuf'}[kind]
    ok = len(item) == ndim and all(n > 0 for n in item) and dtype.kind in dtype_kinds
    if kind == 'image':
        ok = ok and dtype == np.uint8
    if not ok:
        hint = ''
        if kind == 'series' and len(item) == 1:
            hint = ' (one channel still needs its axis: x[..., None])'
        elif kind == 'image' and dtype.kind == 'f' and len(item) == 3:
            hint = ' (convert with (x * 255).round().astype(np.uint8))'
        raise ValueError(
            f'{where} holds {dtype} items of shape {item}; config.data.kinds.{m}={kind!r} expects '
            f'{EXPECTED[kind]}{hint}'
        )


def _peek_arrays(
    root: pathlib.Path, kinds: dict[str, str], label: str
) -> tuple[dict[str, pathlib.Path], dict[str, tuple[int, ...]], int | None]:
    """(files, item shapes, multi-hot width or None) of the arrays layout, checked from the .npz headers."""
    files = {split: root / name for split, name in ARRAY_FILES.items() if (root / name).is_file()}
    if 'train' not in files:
        raise FileNotFoundError(
            f'{root} holds no {ARRAY_FILES["train"]} (config.data.table is None, so arrays are read); '
            f'expected {LAYOUT}'
        )
    shapes: dict[str, tuple[int, ...]] = {}
    widths: dict[str, int | None] = {}
    for split, path in files.items():
        headers = npz_headers(path)
        absent = [name for name in (*kinds, label) if name not in headers]
        if absent:
            raise ValueError(
                f'{path} lacks array {", ".join(map(repr, absent))} (it has {sorted(headers)}); expected an array '
                f'per modality of config.data.kinds {list(kinds)} and the labels {label!r} (config.data.label)'
            )
        label_shape, label_dtype = headers[label]
        if len(label_shape) not in (1, 2) or label_dtype.kind not in 'biu':
            raise ValueError(
                f'{path}: array {label!r} holds {label_dtype} of shape {label_shape}; expected the labels: (N,) '
                'integer class ids, or (N, C) multi-hot 0/1'
            )
        n = label_shape[0]
        if n == 0:
            raise ValueError(f'{path}: array {label!r} has no rows; expected at least one example')
        widths[split] = label_shape[1] if len(label_shape) == 2 else None
        if widths[split] != widths['train']:
            raise ValueError(
                f'{path}: array {label!r} has shape {label_shape}, but the labels of {files["train"]} are '
                f'{_label_text(widths["train"])}; expected the same kind of labels in every file'
            )
        for m, kind in kinds.items():
            shape, dtype = headers[m]
            if not shape or shape[0] != n:
                raise ValueError(
                    f'{path}: array {m!r} has shape {shape}, {shape[0] if shape else 0} rows, but {label!r} has '
                    f'{n}; expected one row per example in every array'
                )
            _check_item(f'{path}: array {m!r}', m, kind, shape[1:], dtype)
            if m in shapes and shape[1:] != shapes[m]:
                raise ValueError(
                    f'{path}: array {m!r} has items of shape {shape[1:]}, but those of {files["train"]} have '
                    f'{shapes[m]}; expected the same item shape in every file'
                )
            shapes[m] = shape[1:]
    return files, shapes, widths['train']


def _label_text(width: int | None) -> str:
    return 'class ids (N,)' if width is None else f'multi-hot (N, {width})'


def read_table(path: pathlib.Path) -> tuple[tuple[str, ...], list[list[str]], list[int]]:
    """(header, rows, line numbers) of a CSV file with a header row; blank lines are skipped.

    Cached per file version (size, modification time): `make_builder` runs more than once per run.
    """
    stat = path.stat()
    return _read_table(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_table(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, ...], list[list[str]], list[int]]:
    del size, mtime_ns  # the cache key
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.reader(f)
            header = tuple(name.strip() for name in next(reader, ()))
            rows, lines = [], []
            for row in reader:
                if not any(value.strip() for value in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f'{path} line {reader.line_num}: {len(row)} fields, but the header has {len(header)}'
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'{path} cannot be read as a UTF-8 CSV file: {e}') from e
    repeated = sorted({name for name in header if header.count(name) > 1})
    if not header or repeated or '' in header:
        raise ValueError(
            f'{path}: header {list(header)} has repeated or empty column names {repeated}; expected a header row '
            'naming every column once'
        )
    if not rows:
        raise ValueError(f'{path} holds a header but no rows; expected one example per row')
    return header, rows, lines


def _resolve_columns(path: pathlib.Path, header: Sequence[str], m: str, spec: Any) -> tuple[str, ...]:
    """The column names that `config.data.columns.<m>` (a name, a tuple of names, or a pattern) selects."""
    if isinstance(spec, str) and any(c in spec for c in '*?['):
        names = tuple(name for name in header if fnmatch.fnmatchcase(name, spec))
    elif isinstance(spec, str):
        names = (spec,)
    elif isinstance(spec, Sequence) and spec and all(isinstance(name, str) for name in spec):
        names = tuple(spec)
    else:
        raise ValueError(
            f'config.data.columns.{m}={spec!r}, expected a column name, a tuple of names, or a pattern such as '
            f"'{m}_*'"
        )
    absent = [name for name in names if name not in header]
    if not names or absent:
        raise ValueError(
            f'{path}: no column {absent or spec!r} (config.data.columns.{m}={spec!r}); the header has {list(header)}'
        )
    return names


def _peek_table(
    path: pathlib.Path, kinds: dict[str, str], columns_field: Any, fields: dict[str, Any]
) -> tuple[dict[str, pathlib.Path], dict[str, tuple[int, ...]], dict, dict]:
    """(files, item shapes, columns, image files) of the table layout, checked against the table's header."""
    if not path.is_file():
        raise FileNotFoundError(
            f'config.data.table: no file {path}; expected a CSV file with a header row in config.data.manual_dir'
        )
    header, rows, lines = read_table(path)
    columns_field = _plain(columns_field)
    if not isinstance(columns_field, dict):
        raise ValueError(f'config.data.columns={columns_field!r}, expected {{modality: column(s)}}')
    columns, shapes, images = {}, {}, {}
    for m, kind in kinds.items():
        if kind not in TABLE_KINDS:
            raise ValueError(
                f'config.data.kinds.{m}={kind!r}: a table holds kinds {TABLE_KINDS}; give {kind} data as arrays '
                f'({ARRAY_FILES["train"]}, config.data.table = None)'
            )
        if m not in columns_field:
            raise ValueError(
                f'config.data.columns has no entry for modality {m!r}; expected its column(s) in {path}'
            )
        columns[m] = _resolve_columns(path, header, m, columns_field[m])
        if kind == 'image':
            if len(columns[m]) != 1:
                raise ValueError(
                    f'config.data.columns.{m} selects columns {list(columns[m])} of {path}; an image modality '
                    'takes one column of image file paths'
                )
            shapes[m] = (fields['image_size'], fields['image_size'], 3)
            j = header.index(columns[m][0])
            images[m] = tuple(
                _image_path(path, columns[m][0], row[j], r, lines[r]) for r, row in enumerate(rows)
            )
        else:
            shapes[m] = (len(columns[m]),)
    owners: dict[str, list[str]] = {}
    for m, names in columns.items():
        for name in names:
            owners.setdefault(name, []).append(f'modality {m!r}')
    for name, owner in (
        (fields['label'], 'the labels (config.data.label)'),
        (fields['split_column'], 'the split (config.data.split_column)'),
    ):
        if name is not None and name not in header:
            raise ValueError(f'{path}: no column {name!r} for {owner}; the header has {list(header)}')
        if name is not None:
            owners.setdefault(name, []).append(owner)
    for name, users in owners.items():
        if len(users) > 1:
            raise ValueError(
                f'{path}: column {name!r} is used by {" and ".join(users)}; expected one use each'
            )
    return {'table': path}, shapes, columns, images


def _image_path(table: pathlib.Path, column: str, value: str, row: int, line: int) -> pathlib.Path:
    where = f'{table} row {row} (line {line}): column {column!r}'
    if not value.strip():
        raise ValueError(f'{where} is empty; expected an image file path')
    path = table.parent / value.strip()
    if not path.is_file():
        raise FileNotFoundError(f'{where}: image file {path} not found')
    return path


# --- Reading and checking the values ---


def _read_arrays(spec: Spec) -> dict[str, Part]:
    """The given splits of the arrays layout, read whole."""
    parts = {}
    for split, path in spec.files.items():
        try:
            with np.load(path, allow_pickle=False) as npz:
                inputs = {m: npz[m] for m in spec.kinds}
                labels = npz[spec.label]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f'{path} cannot be read as a NumPy .npz file: {e}') from e
        parts[split] = Part(path, inputs, labels, np.arange(len(labels)))
    return parts


def _read_table_parts(spec: Spec) -> dict[str, Part]:
    """The given splits of the table layout; labels stay strings until `_class_ids`."""
    path = spec.files['table']
    header, rows, lines = read_table(path)
    n = len(rows)

    def column(name):
        j = header.index(name)
        return [row[j].strip() for row in rows]

    whole = Part(path, {}, np.asarray(column(spec.label)), np.arange(n), np.asarray(lines), spec.columns)
    for m, kind in spec.kinds.items():
        if kind == 'image':
            whole.inputs[m] = np.asarray([str(p) for p in spec.images[m]])
        else:
            whole.inputs[m] = np.stack(
                [_numbers(whole, m, column(c), kind, j) for j, c in enumerate(spec.columns[m])], 1
            )
    if spec.split_column is None:
        return {'train': whole}
    splits = np.asarray(column(spec.split_column))
    bad = ~np.isin(splits, SPLITS)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f'{whole.where(i)}: column {spec.split_column!r} (config.data.split_column) is {str(splits[i])!r}; '
            f'expected one of {SPLITS}'
        )
    parts = {s: whole.take(np.flatnonzero(splits == s)) for s in SPLITS if (splits == s).any()}
    if 'train' not in parts:
        raise ValueError(f'{path}: no row has split train in column {spec.split_column!r}; expected some')
    return parts


def _numbers(part: Part, m: str, values: list[str], kind: str, j: int) -> np.ndarray:
    """A table column as float64 (empty cells NaN) or, for tokens, int64; a bad cell is an error naming it."""
    convert, dtype = (int, np.int64) if kind == 'tokens' else (float, np.float64)
    if kind != 'tokens':
        values = [v or 'nan' for v in values]
    try:
        return np.asarray(values, dtype)
    except ValueError:  # find the bad cell
        pass
    numbers = []
    for i, v in enumerate(values):
        try:
            numbers.append(convert(v))
        except ValueError:
            raise ValueError(
                f'{part.where(i)}: {part.field(m, (j,))} is {v!r}; modality {m!r} of kind {kind!r} expects '
                f'{"integer token ids" if kind == "tokens" else "numbers"}'
            ) from None
    return np.asarray(numbers, dtype)


def _class_ids(parts: dict[str, Part], spec: Spec) -> tuple[str, ...]:
    """Turns a table's label strings into class ids in place; returns the class names they were looked up in."""
    values = np.concatenate([p.labels for p in parts.values()])
    names = spec.class_names
    as_names = bool(names) and np.isin(values, names).all()
    if not as_names and all(re.fullmatch(r'[+-]?\d+', v) for v in values):
        for p in parts.values():
            p.labels = p.labels.astype(np.int64)
        return names
    names = names or tuple(sorted(set(values.tolist())))
    index = {name: c for c, name in enumerate(names)}
    for p in parts.values():
        ids = np.asarray([index.get(v, -1) for v in p.labels.tolist()], np.int64)
        if (ids < 0).any():
            i = int(np.argmax(ids < 0))
            raise ValueError(
                f'{p.where(i)}: column {spec.label!r} (the label) is {str(p.labels[i])!r}; expected a class id or one '
                f'of config.data.class_names {list(names)}'
            )
        p.labels = ids
    return names


def _check_labels(parts: dict[str, Part], spec: Spec, class_names: tuple[str, ...]) -> int:
    """Checks the labels of every part against the declared classes; returns the number of classes."""
    if spec.label_width is not None:
        num_classes = spec.label_width
        if spec.num_classes is not None and spec.num_classes != num_classes:
            raise ValueError(
                f'config.data.num_classes={spec.num_classes}, but the multi-hot labels {spec.label!r} of '
                f'{spec.files["train"]} have {num_classes} columns; expected them to agree'
            )
        for p in parts.values():
            bad = ~np.isin(p.labels, (0, 1))
            if bad.any():
                i, c = np.argwhere(bad)[0].tolist()
                raise ValueError(
                    f'{p.where(i)}: array {spec.label!r} at [{c}] is {p.labels[i, c]}; expected multi-hot 0 or 1'
                )
    else:
        declared = spec.num_classes or len(class_names)
        num_classes = declared or int(max(p.labels.max() for p in parts.values())) + 1
        for p in parts.values():
            bad = (p.labels < 0) | (p.labels >= num_classes)
            if bad.any():
                i = int(np.argmax(bad))
                if spec.num_classes:
                    source = f'config.data.num_classes={spec.num_classes}'
                else:
                    source = f'{len(class_names)} class names' if class_names else 'class ids count from 0'
                raise ValueError(
                    f'{p.where(i)}: label {spec.label!r} is {p.labels[i]}; expected a class id in '
                    f'[0, {num_classes}) ({source})'
                )
    if class_names and len(class_names) != num_classes:
        raise ValueError(
            f'config.data.class_names has {len(class_names)} names, but the labels have {num_classes} classes'
        )
    for p in parts.values():
        p.labels = p.labels.astype(np.int32)
    return num_classes


def _check_values(parts: dict[str, Part], spec: Spec) -> dict[str, int]:
    """Checks tokens (>= 0) and numbers (finite, or zeroed per config.data.nan) in place; returns the zeroed
    count per modality."""
    zeroed = {}
    for m, kind in spec.kinds.items():
        for p in parts.values():
            x = p.inputs[m]
            if kind == 'tokens':
                bad = (x < 0) | (x > np.iinfo(np.int32).max)
                if bad.any():
                    i, *index = np.argwhere(bad)[0].tolist()
                    raise ValueError(
                        f'{p.where(i)}: {p.field(m, tuple(index))} is {x[(i, *index)]}; modality {m!r} of kind '
                        "'tokens' expects ids >= 0 (0 is padding)"
                    )
                p.inputs[m] = x.astype(np.int32)
            elif kind in ('series', 'features'):
                x = x.astype(np.float64)
                bad = ~np.isfinite(x)
                if bad.any() and spec.nan == 'error':
                    i, *index = np.argwhere(bad)[0].tolist()
                    raise ValueError(
                        f'{p.where(i)}: {p.field(m, tuple(index))} is {x[(i, *index)]}; expected a finite number '
                        "(config.data.nan='zero' replaces non-finite values with 0)"
                    )
                x[bad] = 0.0
                zeroed[m] = zeroed.get(m, 0) + int(bad.sum())
                p.inputs[m] = x
    for m, count in zeroed.items():
        if count:
            logging.warning(
                'Modality %s: replaced %d non-finite values with 0 (config.data.nan=zero).', m, count
            )
    return zeroed


def split_rows(labels: np.ndarray, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of `labels` (N,) or multi-hot (N, C) for train and each split of `fractions`.

    Stratified by class (multi-hot: unstratified): per class in increasing order, a permutation of its rows by
    one `np.random.default_rng(seed)` gives round(n * fraction) rows to each split of `fractions` in order; train
    keeps the rest. Each returned array is sorted.
    """
    strata = labels if labels.ndim == 1 else np.zeros(len(labels), np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in ('train', *fractions)}
    for c in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == c))
        start = 0
        for split, fraction in fractions.items():
            n = int(len(rows) * fraction + 0.5)
            parts[split].append(rows[start : start + n])
            start += n
        parts['train'].append(rows[start:])
    return {split: np.sort(np.concatenate(p)) for split, p in parts.items()}


def _fill_splits(parts: dict[str, Part], spec: Spec) -> dict[str, str]:
    """Draws the splits not given from train (in place); returns each split's origin, for the metadata."""
    origins = {split: str(p.path.name) for split, p in parts.items()}
    fractions = {split: spec.split[k] for k, split in enumerate(SPLITS) if split not in parts}
    if not fractions:
        return origins
    train = parts['train']
    rows = split_rows(train.labels, fractions, spec.split_seed)
    for split, idx in rows.items():
        if not len(idx):
            raise ValueError(
                f'config.data.split={spec.split} leaves split {split!r} empty: {train.path} gives '
                f'{len(train.labels)} train rows to draw {sorted(fractions)} from; give more rows, larger '
                'fractions, or the split itself'
            )
        parts[split] = train.take(idx)
        if split != 'train':
            origins[split] = f'{fractions[split]:g} of the train rows of {train.path.name}'
    return origins


def _standardize(parts: dict[str, Part], spec: Spec) -> dict[str, dict[str, list[float]]]:
    """Standardises 'features' per feature and 'series' per channel with train statistics (in place)."""
    stats = {}
    for m, kind in spec.kinds.items():
        if kind not in ('series', 'features'):
            continue
        if spec.standardize:
            x = parts['train'].inputs[m].reshape(-1, spec.shapes[m][-1])
            mean, std = x.mean(0), x.std(0)
            std = np.where(std > 0, std, 1.0)
            stats[m] = {'mean': mean.tolist(), 'std': std.tolist()}
            for p in parts.values():
                p.inputs[m] = (p.inputs[m] - mean) / std
        for p in parts.values():
            p.inputs[m] = p.inputs[m].astype(np.float32)
    return stats


def load_image(path: pathlib.Path, size: int) -> np.ndarray:
    """The image at `path` as (size, size, 3) uint8 RGB: alpha dropped, resized (bilinear, aspect not kept)."""
    with Image.open(path) as image:
        if image.mode in ('P', 'PA'):  # a palette's transparency needs RGBA to be read without a warning
            image = image.convert('RGBA')
        resized = image.convert('RGB').resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


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
        parts = _read_table_parts(spec) if 'table' in spec.files else _read_arrays(spec)
        class_names = _class_ids(parts, spec) if 'table' in spec.files else spec.class_names
        num_classes = _check_labels(parts, spec, class_names)
        zeroed = _check_values(parts, spec)
        origins = _fill_splits(parts, spec)
        stats = _standardize(parts, spec)
        vocab = {
            m: int(max(p.inputs[m].max(initial=0) for p in parts.values())) + 1
            for m, kind in spec.kinds.items()
            if kind == 'tokens'
        }
        self.info.metadata.update(
            {
                'modalities': {
                    m: {'kind': kind, 'vocab_size': vocab.get(m)}  # shapes and dtypes: the features
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

    def _generate_examples(self, part: Part) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(len(part.labels)):
            example = {'label': part.labels[i], 'row': int(part.rows[i])}
            for m, kind in self.spec.kinds.items():
                x = part.inputs[m][i]
                if kind == 'image' and isinstance(x, str):  # a table's image file
                    x = _decode(part, i, m, x, self.spec.image_size)
                example[m] = x
            yield int(part.rows[i]), example


def _decode(part: Part, i: int, m: str, path: str, size: int) -> np.ndarray:
    try:
        return load_image(pathlib.Path(path), size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(
            f'{part.where(i)}: {part.field(m, (0,))}: image {path} cannot be decoded: {e}'
        ) from e


# --- The dataset for the input pipeline ---


def fingerprint(spec: Spec) -> str:
    """A hash of the data fields of `spec` and of each source file's size and modification time."""
    skip = ('root', 'files', 'images')  # the files count by their stats, relative to the root
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in skip}
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
            m: input_pipeline.modality_info(builder, m, d['kind'], vocab_size=d['vocab_size'])
            for m, d in metadata['modalities'].items()
        }
        return input_pipeline.per_record_info(builder, modalities, multi_label=bool(metadata['multi_label']))


DATASET = Custom()
