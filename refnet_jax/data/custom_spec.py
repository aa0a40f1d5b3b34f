"""The own-data path's spec: the `config.data` fields of configs/custom.py and the layout of the user's files,
checked from their headers before any value is read (refnet_jax/data/datasets/custom.py describes both)."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import pathlib
import zipfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from refnet_jax.data import contract, tables, tokenizers

SPLITS = ('train', 'validation', 'test')
ARRAY_FILES = {split: f'{split}.npz' for split in SPLITS}
DTYPES = {
    'image': np.uint8,
    'tokens': np.int32,
    'text': np.int32,
    'series': np.float32,
    'features': np.float32,
}
EXPECTED = {
    'image': '(H, W, C) uint8 pixels',
    'tokens': '(T,) integer token ids',
    'text': 'one string per example (a str array: np.array(texts, dtype=str))',
    'series': '(T, C) numbers: T time steps of C channels',
    'features': '(D,) numbers',
}
TABLE_KINDS = ('image', 'tokens', 'text', 'features')
TRAIN = 'train'  # config.data.tokenizer.<m>: a tokenizer trained on m's training text
MAX_TOKENS_CAP = 256  # the default config.data.max_tokens.<m> (the 99th percentile length) is at most this
NAN_POLICIES = ('error', 'zero')
TASKS = ('classification', 'regression')
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
    'task',
    'tokenizer',
    'vocab_size',
    'max_tokens',
)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v != ''


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


FIELD_CHECKS = {  # config.data field -> (test of its value, what is expected); kinds, split, class_names apart
    'table': (
        lambda v: v is None or _is_name(v),
        f'None or a table in config.data.manual_dir: a {", ".join(tables.SUFFIXES)} file or a directory of them',
    ),
    'label': (
        lambda v: _is_name(v) or (isinstance(v, Sequence) and v and all(_is_name(c) for c in v)),
        'an array or column name (regression tables: a tuple of column names or a pattern too)',
    ),
    'task': (lambda v: v in TASKS, f'one of {TASKS}'),
    'split_column': (lambda v: v is None or _is_name(v), 'None or a column name'),
    'split_seed': (_is_int, 'an int'),
    'num_classes': (lambda v: v is None or (_is_int(v) and v >= 1), 'None or an int >= 1'),
    'standardize': (lambda v: isinstance(v, bool), 'True or False'),
    'nan': (lambda v: v in NAN_POLICIES, f'one of {NAN_POLICIES}'),
    'image_size': (lambda v: _is_int(v) and v >= 1, 'an int >= 1'),
    'vocab_size': (lambda v: _is_int(v) and v >= 3, 'an int >= 3'),
}
LAYOUT = (
    'train.npz (and optionally validation.npz, test.npz) with an array per modality and the labels, or the table '
    '(CSV, JSON Lines, Parquet, or a directory of shards) named by config.data.table; see '
    'refnet_jax/data/datasets/custom.py'
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The data that `config.data` describes, checked against the files' headers (no values read yet).

    Attributes:
      root: the manual directory.
      kinds: modality -> kind.
      files: the source files: split -> .npz file given, or {'table': the table file or directory}.
      shapes: modality -> item shape, as stored (None where the data decide: a text modality's max_tokens).
      label_width: C for multi-hot labels, K for regression (targets (N, K), or (N,) as K = 1), None for
        class ids (N,).
      columns: modality -> its column names (tables only).
      label_columns: the label's columns (tables; regression may have several), or (label,) for arrays.
      tokenizer: text modality -> 'train' or the absolute path of its tokenizer file.
      tokenizer_sha256: text modality with a tokenizer file -> the file's SHA-256 (part of the data's identity).
      max_tokens: text modality -> its ids per example, or None for the training text's 99th percentile length.
      The other attributes are the `config.data` fields of the same names.
    """

    root: pathlib.Path
    kinds: dict[str, str]
    files: dict[str, pathlib.Path]
    shapes: dict[str, tuple[int, ...]]
    label_width: int | None
    columns: dict[str, tuple[str, ...]]
    label_columns: tuple[str, ...]
    label: Any
    split_column: str | None
    split: tuple[float, float, float]
    split_seed: int
    num_classes: int | None
    class_names: tuple[str, ...]
    standardize: bool
    nan: str
    image_size: int
    task: str
    tokenizer: dict[str, str]
    tokenizer_sha256: dict[str, str]
    vocab_size: int
    max_tokens: dict[str, int | None]


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
    fields.update(_check_text_fields(d, kinds))
    table = d.table
    if table is None:
        if fields['split_column'] is not None:
            raise ValueError(
                f'config.data.split_column={fields["split_column"]!r} is for a table (config.data.table), but '
                'config.data.table is None: arrays give their own splits as validation.npz and test.npz'
            )
        if not _is_name(fields['label']):
            raise ValueError(f'config.data.label={fields["label"]!r}, expected the name of the labels array')
        files, shapes, label_width = _peek_arrays(root, kinds, fields['label'], fields['task'])
        columns, label_columns = {}, (fields['label'],)
    else:
        files, shapes, columns, label_columns = _peek_table(root / table, kinds, d.columns, fields)
        label_width = None
        if fields['task'] != 'regression' and len(label_columns) != 1:
            raise ValueError(
                f'config.data.label={fields["label"]!r} selects columns {list(label_columns)}; classification takes '
                "one label column (several real-valued targets need config.data.task='regression')"
            )
    if fields['task'] == 'regression':  # K targets, stored as (K,) even for K = 1
        label_width = len(label_columns) if table is not None else label_width or 1
    if isinstance(fields['label'], list):
        fields['label'] = tuple(fields['label'])
    return Spec(root, kinds, files, shapes, label_width, columns, label_columns, **fields)


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


def _per_text_modality(d: ml_collections.ConfigDict, field: str, kinds: dict[str, str]) -> dict[str, Any]:
    """`config.data.<field>` as {text modality: value}: one entry per text modality, or one value for all."""
    value = _plain(d[field])
    texts = [m for m, kind in kinds.items() if kind == 'text']
    if not isinstance(value, dict):
        return dict.fromkeys(texts, value)
    if sorted(value) != sorted(texts):
        raise ValueError(
            f'config.data.{field} names modalities {sorted(value)}; expected one entry per text modality '
            f'of config.data.kinds: {sorted(texts)}'
        )
    return value


def _check_text_fields(d: ml_collections.ConfigDict, kinds: dict[str, str]) -> dict[str, Any]:
    """The text fields of `Spec`: each text modality's tokenizer (its file read now, so that a missing or
    broken one is refused before any work) and max_tokens."""
    tokenizer, digests, loaded = {}, {}, {}
    for m, value in _per_text_modality(d, 'tokenizer', kinds).items():
        field = f'config.data.tokenizer.{m}={value!r}'
        if value == TRAIN:
            tokenizer[m] = TRAIN
            continue
        if not _is_name(value):
            raise ValueError(
                f"{field}, expected 'train', the path of a tokenizer.json or sentencepiece .model, or "
                "'hf:DIR', a Hugging Face model directory whose text tower's tokenizer to use"
            )
        pretrained = value.startswith(tokenizers.PRETRAINED)
        path = os.path.abspath(
            os.path.expanduser(value[len(tokenizers.PRETRAINED) :] if pretrained else value)
        )
        tokenizer[m] = tokenizers.PRETRAINED + path if pretrained else path
        loaded[m] = tokenizers.load(tokenizer[m], where=field)
        digests[m] = loaded[m].sha256
    max_tokens = _per_text_modality(d, 'max_tokens', kinds)
    for m, value in max_tokens.items():
        if value is not None and not (_is_int(value) and value >= 1):
            raise ValueError(f'config.data.max_tokens.{m}={value!r}, expected None or an int >= 1')
        _check_max_tokens(f'config.data.max_tokens.{m}={value!r}', value, loaded.get(m))
    return dict(tokenizer=tokenizer, tokenizer_sha256=digests, max_tokens=max_tokens)


def _check_max_tokens(field: str, value: int | None, tokenizer: tokenizers.Tokenizer | None) -> None:
    """A max_tokens that a pretrained tower's tokenizer allows: at most its `max_length` (the tower's positions),
    and exactly that where it pads every text to it (SigLIP)."""
    if value is None or tokenizer is None or tokenizer.max_length is None:
        return
    if tokenizer.pad_to_max and value != tokenizer.max_length:
        raise ValueError(
            f'{field}: this tokenizer pads every text to its model_max_length {tokenizer.max_length}, as its '
            f'tower was trained (it pools the last position); expected None or {tokenizer.max_length}'
        )
    if value > tokenizer.max_length:
        raise ValueError(
            f"{field}: more than the tower's {tokenizer.max_length} positions (model_max_length); expected None "
            f'or at most {tokenizer.max_length}'
        )


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
    ndim = {'image': 3, 'tokens': 1, 'text': 0, 'series': 2, 'features': 1}[kind]
    dtype_kinds = {'image': 'u', 'tokens': 'iu', 'text': 'US', 'series': 'biuf', 'features': 'biuf'}[kind]
    ok = len(item) == ndim and all(n > 0 for n in item) and dtype.kind in dtype_kinds
    if kind == 'image':
        ok = ok and dtype == np.uint8
    if not ok:
        hint = ''
        if kind == 'series' and len(item) == 1:
            hint = ' (one channel still needs its axis: x[..., None])'
        elif kind == 'image' and dtype.kind == 'f' and len(item) == 3:
            hint = ' (convert with (x * 255).round().astype(np.uint8))'
        elif kind == 'text' and dtype.kind == 'O':
            hint = ' (an object array needs pickle, which is not read)'
        raise ValueError(
            f'{where} holds {dtype} items of shape {item}; config.data.kinds.{m}={kind!r} expects '
            f'{EXPECTED[kind]}{hint}'
        )


def _peek_arrays(
    root: pathlib.Path, kinds: dict[str, str], label: str, task: str
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
        if task == 'regression' and (len(label_shape) not in (1, 2) or label_dtype.kind not in 'biuf'):
            raise ValueError(
                f'{path}: array {label!r} holds {label_dtype} of shape {label_shape}; '
                "config.data.task='regression' expects real-valued labels: (N,) or (N, K) numbers"
            )
        if task != 'regression' and (len(label_shape) not in (1, 2) or label_dtype.kind not in 'biu'):
            raise ValueError(
                f'{path}: array {label!r} holds {label_dtype} of shape {label_shape}; expected the labels: (N,) '
                "integer class ids, or (N, C) multi-hot 0/1 (real-valued labels: config.data.task='regression')"
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
            if kind == 'text':
                shapes[m] = (None,)  # max_tokens ids, known once the text is tokenized
                continue
            if m in shapes and shape[1:] != shapes[m]:
                raise ValueError(
                    f'{path}: array {m!r} has items of shape {shape[1:]}, but those of {files["train"]} have '
                    f'{shapes[m]}; expected the same item shape in every file'
                )
            shapes[m] = shape[1:]
    return files, shapes, widths['train']


def _label_text(width: int | None) -> str:
    return 'class ids (N,)' if width is None else f'multi-hot (N, {width})'


def _resolve_columns(
    path: pathlib.Path, header: Sequence[str], m: str, spec: Any, field: str | None = None
) -> tuple[str, ...]:
    """The column names that `config.data.columns.<m>` (a name, a tuple of names, or a pattern) selects."""
    field = field or f'config.data.columns.{m}'
    if isinstance(spec, str) and any(c in spec for c in '*?['):
        names = tuple(name for name in header if fnmatch.fnmatchcase(name, spec))
    elif isinstance(spec, str):
        names = (spec,)
    elif isinstance(spec, Sequence) and spec and all(isinstance(name, str) for name in spec):
        names = tuple(spec)
    else:
        raise ValueError(
            f"{field}={spec!r}, expected a column name, a tuple of names, or a pattern such as '{m}_*'"
        )
    absent = [name for name in names if name not in header]
    if not names or absent:
        raise ValueError(
            f'{path}: no column {absent or spec!r} ({field}={spec!r}); the header has {list(header)}'
        )
    return names


def _peek_table(
    path: pathlib.Path, kinds: dict[str, str], columns_field: Any, fields: dict[str, Any]
) -> tuple[dict[str, pathlib.Path], dict[str, tuple[int, ...]], dict, tuple[str, ...]]:
    """(files, item shapes, columns, label columns) of the table layout, checked against the table's header
    (no value is read here; `custom_values.plan` reads and checks them)."""
    if not path.exists():
        raise FileNotFoundError(
            f'config.data.table: no file {path}; expected a table in config.data.manual_dir: a '
            f'{", ".join(tables.SUFFIXES)} file with a header (column names), or a directory of them'
        )
    header = tables.Table(path).header
    columns_field = _plain(columns_field)
    if not isinstance(columns_field, dict):
        raise ValueError(f'config.data.columns={columns_field!r}, expected {{modality: column(s)}}')
    columns, shapes = {}, {}
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
        if kind in ('image', 'text') and len(columns[m]) != 1:
            what = 'image file paths' if kind == 'image' else 'text'
            raise ValueError(
                f'config.data.columns.{m} selects columns {list(columns[m])} of {path}; a modality of kind '
                f'{kind!r} takes one column of {what}'
            )
        if kind == 'text':
            shapes[m] = (None,)
        elif kind == 'image':
            shapes[m] = (fields['image_size'], fields['image_size'], 3)
        else:
            shapes[m] = (len(columns[m]),)
    label = fields['label']
    if _is_name(label) and not any(c in label for c in '*?['):
        if label not in header:
            raise ValueError(
                f'{path}: no column {label!r} for the labels (config.data.label); the header has {list(header)}'
            )
        label_columns = (label,)
    else:
        label_columns = _resolve_columns(path, header, 'label', label, field='config.data.label')
    owners: dict[str, list[str]] = {}
    for m, names in columns.items():
        for name in names:
            owners.setdefault(name, []).append(f'modality {m!r}')
    for name in label_columns:
        owners.setdefault(name, []).append('the labels (config.data.label)')
    split_column = fields['split_column']
    if split_column is not None:
        if split_column not in header:
            raise ValueError(
                f'{path}: no column {split_column!r} for the split (config.data.split_column); the header has '
                f'{list(header)}'
            )
        owners.setdefault(split_column, []).append('the split (config.data.split_column)')
    for name, users in owners.items():
        if len(users) > 1:
            raise ValueError(
                f'{path}: column {name!r} is used by {" and ".join(users)}; expected one use each'
            )
    return {'table': path}, shapes, columns, label_columns
