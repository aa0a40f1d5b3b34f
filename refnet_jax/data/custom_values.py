"""The own-data path's values: the user's files read in bounded chunks, checked, split, standardized and
tokenized, as refnet_jax/data/datasets/custom.py describes.

Preparation reads the source in passes, each in chunks of `tables.CHUNK_ROWS` rows, so that memory does not
grow with the table (what is kept of every row is its label and its split):
  1. `plan` reads the labels (and a split column) and draws the splits not given;
  2. it then reads every modality's values once to check them all (before anything is written), gathers the
     train split's statistics (standardization) and text (a tokenizer to train, the default max_tokens);
  3. `Plan.examples(split)` reads the values again, one split at a time, as examples to store.
"""

from __future__ import annotations

import dataclasses
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from refnet_jax.data import splits, tables, tokenizers
from refnet_jax.data.custom_spec import MAX_TOKENS_CAP, SPLITS, TRAIN, Spec
from refnet_jax.data.tables import Chunk

TOKENIZER_TEXTS = (
    50_000  # a tokenizer to train, and the default max_tokens, see at most this many train texts
)
PROGRESS_SECONDS = 10.0  # a progress line this often on long preparations
KIND_WORDS = {'tokens': 'integer token ids', 'features': 'numbers', 'series': 'numbers'}


# --- Where the examples come from ---


class Source:
    """The examples of the spec: the .npz files of the splits given (read whole, one file at a time) or the
    table (read in chunks). `chunks(names)` yields every example once, in order; `given(chunk)` says the split
    each example's file or split column gives it (-1: none)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.table = tables.Table(spec.files['table']) if 'table' in spec.files else None
        self.name = spec.files['table'].name if self.table else spec.files['train'].name

    def names(self, m: str) -> tuple[str, ...]:
        """The columns (or the array) holding modality m."""
        return self.spec.columns[m] if self.table else (m,)

    def chunks(self, names: tuple[str, ...]) -> Iterator[Chunk]:
        if self.table is not None:
            yield from self.table.chunks(names)
            return
        start = 0
        for split, path in self.spec.files.items():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in names}
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f'{path} cannot be read as a NumPy .npz file: {e}') from e
            n = (
                len(arrays[self.spec.label])
                if self.spec.label in arrays
                else len(next(iter(arrays.values())))
            )
            for i in range(0, n, tables.CHUNK_ROWS):
                rows = np.arange(i, min(n, i + tables.CHUNK_ROWS))
                cells = {name: x[i : i + tables.CHUNK_ROWS] for name, x in arrays.items()}
                chunk = Chunk(path, start + rows, rows, None, cells)
                chunk.split = split
                yield chunk
            start += n

    def given(self, chunk: Chunk) -> np.ndarray:
        """(n,) int8 the split index (in `SPLITS`) each example's source gives, -1 for none."""
        if self.table is None:
            return np.full(len(chunk), SPLITS.index(chunk.split), np.int8)
        column = self.spec.split_column
        if column is None:
            return np.full(len(chunk), SPLITS.index('train'), np.int8)
        out = np.empty(len(chunk), np.int8)
        for i, value in enumerate(chunk.cells[column]):
            value = value.strip() if isinstance(value, str) else value
            if value not in SPLITS:
                raise ValueError(
                    f'{chunk.where(i)}: column {column!r} (config.data.split_column) is {value!r}; '
                    f'expected one of {SPLITS}'
                )
            out[i] = SPLITS.index(value)
        return out


def field(source: Source, chunk: Chunk, m: str, index: tuple[int, ...] = ()) -> str:
    """The column, or the array and item index, holding `index` of modality m's item."""
    if source.table is not None:
        return f'column {source.names(m)[index[0] if index else 0]!r}'
    return f'array {m!r} at {list(index)}' if index else f'array {m!r}'


def _what(chunk: Chunk, column: str, value: Any) -> str:
    """A bad cell's value as the user's file holds it (with its Parquet type)."""
    if value is None:
        shown = 'null' if chunk.file.suffix in ('.jsonl', '.parquet') else 'empty'
    else:
        shown = repr(value)
    if chunk.types and column in chunk.types:
        shown += f' (a Parquet {chunk.types[column]} column)'
    return shown


# --- One chunk's values, checked ---


def _number(value: Any, integer: bool) -> float | int | None:
    """A cell as a number: a JSON/Parquet number or a string of one (an empty cell or null is NaN unless
    `integer`); None when it is not one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None if integer else float('nan')
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if integer and not value.is_integer() else (int(value) if integer else value)
    if isinstance(value, str):
        try:
            return int(value) if integer else float(value)
        except ValueError:
            return None
    return None


def _numbers(source: Source, chunk: Chunk, m: str, kind: str) -> np.ndarray:
    """(n, columns) float64 (int64 for tokens) of a table's number columns; a bad cell is an error naming it."""
    integer = kind == 'tokens'
    out = np.empty((len(chunk), len(source.names(m))), np.int64 if integer else np.float64)
    for j, column in enumerate(source.names(m)):
        values = chunk.cells[column]
        try:  # the common case, at C speed: CSV strings (empty cells NaN) or numbers
            if integer:
                raise ValueError  # ints need the exactness check below
            out[:, j] = np.asarray([v if v not in ('', None) else 'nan' for v in values], np.float64)
            if not any(isinstance(v, bool) for v in values):
                continue
        except (ValueError, TypeError):
            pass
        for i, v in enumerate(values):
            number = _number(v, integer)
            if number is None:
                raise ValueError(
                    f'{chunk.where(i)}: {field(source, chunk, m, (j,))} is {_what(chunk, column, v)}; modality '
                    f'{m!r} of kind {kind!r} expects {KIND_WORDS[kind]}'
                )
            out[i, j] = number
    return out


def _texts(source: Source, chunk: Chunk, m: str) -> np.ndarray:
    """(n,) object array of a text modality's strings; a cell that is not a string of UTF-8 is an error."""
    (name,) = source.names(m)
    values = chunk.cells[name]
    if isinstance(values, np.ndarray) and values.dtype.kind == 'U':
        return values.astype(object)
    out = np.empty(len(values), object)
    for i, v in enumerate(values.tolist() if isinstance(values, np.ndarray) else values):
        bad = None
        if isinstance(v, bytes):  # an .npz bytes array
            try:
                v = v.decode('utf-8')
            except UnicodeDecodeError as e:
                bad = e.start
        elif not isinstance(v, str):
            raise ValueError(
                f'{chunk.where(i)}: {field(source, chunk, m)} is {_what(chunk, name, v)}; modality {m!r} of kind '
                "'text' expects a string"
            )
        else:
            bad = tables.invalid_utf8(v)
        if bad is not None:
            raise ValueError(
                f'{chunk.where(i)}: {field(source, chunk, m)} is not valid UTF-8 (at character {bad}); '
                f"modality {m!r} of kind 'text' expects UTF-8 text"
            )
        out[i] = v
    return out


def _image_paths(source: Source, chunk: Chunk, m: str) -> np.ndarray:
    """(n,) the image files of a table's image column (relative to the table), each checked to exist."""
    (name,) = source.names(m)
    out = np.empty(len(chunk), object)
    root = source.spec.files['table']
    root = root if root.is_dir() else root.parent
    for i, value in enumerate(chunk.cells[name]):
        where = f'{chunk.where(i)}: column {name!r}'
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{where} is {_what(chunk, name, value)}; expected an image file path')
        path = root / value.strip()
        if not path.is_file():
            raise FileNotFoundError(f'{where}: image file {path} not found')
        out[i] = str(path)
    return out


def values(source: Source, chunk: Chunk, m: str) -> np.ndarray:
    """Modality m's values in a chunk, checked against its kind: (n, *shape) numbers (float64 for 'features'
    and 'series', non-finite values kept), int32 token ids, uint8 pixels, or (n,) strings (text; a table's
    image file paths)."""
    kind = source.spec.kinds[m]
    if kind == 'text':
        return _texts(source, chunk, m)
    if source.table is not None:
        if kind == 'image':
            return _image_paths(source, chunk, m)
        x = _numbers(source, chunk, m, kind)
    else:
        x = chunk.cells[m]
    if kind == 'tokens':
        bad = (x < 0) | (x > np.iinfo(np.int32).max)
        if bad.any():
            i, *index = np.argwhere(bad)[0].tolist()
            raise ValueError(
                f'{chunk.where(i)}: {field(source, chunk, m, tuple(index))} is {x[(i, *index)]}; modality {m!r} '
                "of kind 'tokens' expects ids >= 0 (0 is padding)"
            )
        return x.astype(np.int32)
    if kind in ('series', 'features'):
        return np.asarray(x, np.float64)
    return x


# --- Labels and splits ---


class _Classes:
    """Class ids from a table's label cells (class names, or integers), decided once every row is read."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.codes: list[np.ndarray] = []
        self.seen: dict[str, int] = {}
        self.first: dict[str, str] = {}  # value -> where it first occurs

    def add(self, chunk: Chunk, cells: list[Any]) -> None:
        codes = np.empty(len(cells), np.int32)
        for i, v in enumerate(cells):
            text = v.strip() if isinstance(v, str) else v
            if isinstance(text, bool) or not isinstance(text, (str, int)) or text == '':
                raise ValueError(
                    f'{chunk.where(i)}: column {self.spec.label!r} (the label) is {_what(chunk, self.spec.label, v)}; '
                    'expected a class id or a class name'
                )
            text = str(text)
            if tables.invalid_utf8(text) is not None:
                raise ValueError(
                    f'{chunk.where(i)}: column {self.spec.label!r} (the label) is not valid UTF-8; expected a class '
                    'id or a class name'
                )
            if text not in self.seen:
                self.seen[text] = len(self.seen)
                self.first[text] = chunk.where(i)
            codes[i] = self.seen[text]
        self.codes.append(codes)

    def ids(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """(N,) int64 class ids and the class names they were looked up in (() for integer labels)."""
        values = list(self.seen)
        codes = np.concatenate(self.codes)
        names = self.spec.class_names
        as_names = bool(names) and all(v in names for v in values)
        if not as_names and all(re.fullmatch(r'[+-]?\d+', v) for v in values):
            return np.asarray([int(v) for v in values], np.int64)[codes], names
        names = names or tuple(sorted(values))
        index = {name: c for c, name in enumerate(names)}
        for v in values:
            if v not in index:
                raise ValueError(
                    f'{self.first[v]}: column {self.spec.label!r} (the label) is {v!r}; expected a class id or one '
                    f'of config.data.class_names {list(names)}'
                )
        return np.asarray([index[v] for v in values], np.int64)[codes], names


def _check_classes(labels: np.ndarray, spec: Spec, class_names: tuple[str, ...], where: Callable) -> int:
    """Checks class ids (N,) or multi-hot (N, C) against the declared classes; returns the number of classes."""
    if labels.ndim == 2:
        num_classes = labels.shape[1]
        if spec.num_classes is not None and spec.num_classes != num_classes:
            raise ValueError(
                f'config.data.num_classes={spec.num_classes}, but the multi-hot labels {spec.label!r} of '
                f'{spec.files["train"]} have {num_classes} columns; expected them to agree'
            )
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            i, c = np.argwhere(bad)[0].tolist()
            raise ValueError(
                f'{where(i)}: array {spec.label!r} at [{c}] is {labels[i, c]}; expected multi-hot 0 or 1'
            )
    else:
        declared = spec.num_classes or len(class_names)
        num_classes = declared or int(labels.max()) + 1
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            if spec.num_classes:
                source = f'config.data.num_classes={spec.num_classes}'
            else:
                source = f'{len(class_names)} class names' if class_names else 'class ids count from 0'
            raise ValueError(
                f'{where(i)}: label {spec.label!r} is {labels[i]}; expected a class id in [0, {num_classes}) ({source})'
            )
    if class_names and len(class_names) != num_classes:
        raise ValueError(
            f'config.data.class_names has {len(class_names)} names, but the labels have {num_classes} classes'
        )
    return num_classes


def _draw_splits(
    given: np.ndarray, labels: np.ndarray, spec: Spec, source: Source
) -> tuple[np.ndarray, dict]:
    """Each example's split: as given, the splits not given drawn from the train rows (see custom.py)."""
    present = {SPLITS[s] for s in np.unique(given).tolist()}
    if 'train' not in present:
        raise ValueError(
            f'{spec.files["table"]}: no row has split train in column {spec.split_column!r}; expected some'
        )
    origins = {
        split: spec.files.get(split, spec.files.get('table')).name for split in SPLITS if split in present
    }
    fractions = {split: spec.split[k] for k, split in enumerate(SPLITS) if split not in present}
    split_of = given.copy()
    if not fractions:
        return split_of, origins
    train = np.flatnonzero(given == 0)
    strata = labels[train] if labels.dtype.kind in 'iu' else np.zeros(len(train), np.int64)
    # Per class, round(n * fraction) rows half up, by permuting the class's rows (see the custom.py docstring).
    rows = splits.stratified_split(strata, spec.split_seed, fractions=fractions, rest='train')
    for split, idx in rows.items():
        if not len(idx):
            raise ValueError(
                f'config.data.split={spec.split} leaves split {split!r} empty: '
                f'{spec.files.get("train") or spec.files["table"]} gives {len(train)} train rows to draw '
                f'{sorted(fractions)} from; give more rows, larger fractions, or the split itself'
            )
        split_of[train[idx]] = SPLITS.index(split)
        if split != 'train':
            origins[split] = f'{fractions[split]:g} of the train rows of {source.name}'
    return split_of, origins


def _regression_targets(source: Source, chunk: Chunk) -> np.ndarray:
    """(n, K) float64 real-valued labels of a chunk; one that is not a finite number is an error."""
    spec = source.spec
    if source.table is None:
        y = np.asarray(chunk.cells[spec.label], np.float64).reshape(len(chunk), -1)
        bad = ~np.isfinite(y)
        if bad.any():
            i, k = np.argwhere(bad)[0].tolist()
            at = f' at [{k}]' if y.shape[1] > 1 or np.ndim(chunk.cells[spec.label]) == 2 else ''
            raise ValueError(
                f'{chunk.where(i)}: label {spec.label!r}{at} is {y[i, k]}; expected a finite number'
            )
        return y
    out = np.empty((len(chunk), len(spec.label_columns)), np.float64)
    for j, column in enumerate(spec.label_columns):
        for i, v in enumerate(chunk.cells[column]):
            number = _number(v, False)
            if number is None or not np.isfinite(number):
                raise ValueError(
                    f'{chunk.where(i)}: column {column!r} (the label) is {_what(chunk, column, v)}; '
                    "config.data.task='regression' expects a finite number"
                )
            out[i, j] = number
    return out


# --- Statistics of the train split ---


class Moments:
    """Running mean and variance per feature (the last axis) over chunks of rows (Chan et al.'s merge), equal
    to `common.standardization` of all the rows at once."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        if not len(x):
            return
        n, mean = len(x), x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (F,); a constant feature gets std 1."""
        std = np.sqrt(self.m2 / self.count)
        return self.mean, np.where(std > 0, std, 1.0)


def default_max_tokens(lengths: np.ndarray) -> int:
    """The 99th percentile of the training text's lengths in ids (at least 1, at most `MAX_TOKENS_CAP`)."""
    if not len(lengths):
        return 1
    return int(np.clip(np.percentile(lengths, 99, method='higher'), 1, MAX_TOKENS_CAP))


class Progress:
    """Log lines of a long pass: rows done of the total and rows/s, every `PROGRESS_SECONDS`."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            logging.info(
                '%s: %s of %s rows (%.0f rows/s).',
                self.what,
                f'{self.done:,}',
                f'{self.total:,}',
                self.done / (now - self.start),
            )


# --- The plan: passes 1 and 2 ---


@dataclasses.dataclass
class Plan:
    """What preparing the spec's data takes, from reading it twice: every example's label and split, and what
    the train split gives (statistics, tokenizers).

    Attributes:
      source: the examples.
      labels: (N,) int32 class ids, (N, C) int32 multi-hot, or float32 targets (N,) / (N, K) (regression).
      split_of: (N,) int8 each example's split (an index into `SPLITS`).
      num_classes: classes (the task head's outputs; regression: the targets).
      class_names: the classes' (regression: the targets') names.
      origins: split -> where its examples come from (metadata).
      stats: 'features'/'series' modality -> {'mean', 'std'} of the train split (metadata).
      zeroed: modality -> non-finite values replaced with 0 (config.data.nan='zero').
      vocab: 'tokens' modality -> the largest id + 1.
      texts: text modality -> (tokenizer, max_tokens).
    """

    source: Source
    labels: np.ndarray
    split_of: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    origins: dict[str, str]
    stats: dict[str, dict[str, list[float]]]
    zeroed: dict[str, int]
    vocab: dict[str, int]
    texts: dict[str, tuple[tokenizers.Tokenizer, int]]

    def counts(self) -> dict[str, int]:
        return {split: int((self.split_of == k).sum()) for k, split in enumerate(SPLITS)}

    def examples(
        self, split: str, decode: Callable[[list[tuple[str, int, str]]], list[np.ndarray]]
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Pass 3: the examples of `split`, a chunk at a time: (rows, {feature: (n, ...) values}) with
        `row` (the example's row: in its file, or in the whole table of shards), the label, each modality
        (standardized, tokenized with its mask `<m>_mask`, images decoded by `decode`)."""
        source, spec = self.source, self.source.spec
        k = SPLITS.index(split)
        progress = Progress(f'{spec.root.name}: writing {split}', int((self.split_of == k).sum()))
        names = tuple(dict.fromkeys(name for m in spec.kinds for name in source.names(m)))
        for chunk in source.chunks(names):
            keep = np.flatnonzero(self.split_of[chunk.index] == k)
            if not len(keep):
                continue
            out = {'label': self.labels[chunk.index[keep]]}
            out['row'] = (
                chunk.rows if source.table is None or len(source.table.files) == 1 else chunk.index
            )[keep]
            for m, kind in spec.kinds.items():
                x = values(source, chunk, m)[keep]
                if kind in ('series', 'features'):
                    x = np.where(np.isfinite(x), x, 0.0)
                    if m in self.stats:
                        x = (x - np.asarray(self.stats[m]['mean'])) / np.asarray(self.stats[m]['std'])
                    x = x.astype(np.float32)
                elif kind == 'text':
                    tokenizer, max_tokens = self.texts[m]
                    x, mask = tokenizer.encode(x.tolist(), max_tokens)
                    bad = mask & (x == tokenizer.pad_id)
                    # The EOS that ends each text is the padding token too (CLIP, SigLIP): the last real one.
                    if tokenizer.eos_id == tokenizer.pad_id:
                        bad &= np.arange(max_tokens) != mask.sum(axis=1, keepdims=True) - 1
                    if bad.any():
                        i = int(keep[np.argwhere(bad)[0, 0]])
                        raise ValueError(
                            f"{chunk.where(i)}: {field(source, chunk, m)} holds the tokenizer's padding token "
                            f'(id {tokenizer.pad_id}) as text; expected text without it, as the model tells '
                            'padding by that id'
                        )
                    out[f'{m}_mask'] = mask
                elif kind == 'image' and source.table is not None:
                    column = source.names(m)[0]
                    jobs = [
                        (p, spec.image_size, f'{chunk.where(i)}: column {column!r}')
                        for i, p in zip(keep, x, strict=True)
                    ]
                    x = np.stack(decode(jobs))
                out[m] = x
            progress.update(len(keep))
            yield out


def plan(spec: Spec) -> Plan:
    """Passes 1 and 2 over the spec's data (see the module docstring); every value is checked before any
    example is written."""
    source = Source(spec)
    regression = spec.task == 'regression'
    # Pass 1: labels and splits.
    names = (*(spec.label_columns if source.table is not None else (spec.label,)),)
    if source.table is not None and spec.split_column is not None:
        names += (spec.split_column,)
    labels, given, classes = [], [], _Classes(spec)
    for chunk in source.chunks(names):
        given.append(source.given(chunk))
        if regression:
            labels.append(_regression_targets(source, chunk))
        elif source.table is not None:
            classes.add(chunk, chunk.cells[spec.label])
        else:
            labels.append(np.asarray(chunk.cells[spec.label]))
    given = np.concatenate(given)

    def where(i: int) -> str:  # the i-th example (read again: only a bad label asks)
        chunk = next(c for c in source.chunks(names) if c.index[-1] >= i)
        return chunk.where(i - int(chunk.index[0]))

    if regression:
        labels = np.concatenate(labels).astype(np.float32)  # (N, K)
        num_classes = labels.shape[1]
        if source.table is not None:
            class_names = spec.label_columns
        else:
            class_names = (
                (spec.label,) if num_classes == 1 else tuple(f'{spec.label}_{k}' for k in range(num_classes))
            )
    else:
        if source.table is not None:
            labels, class_names = classes.ids()
        else:
            labels, class_names = np.concatenate(labels), spec.class_names
        num_classes = _check_classes(labels, spec, class_names, where)
        labels = labels.astype(np.int32)
        class_names = class_names or tuple(str(c) for c in range(num_classes))
    split_of, origins = _draw_splits(given, labels, spec, source)

    # Pass 2: every value checked; train statistics, text and vocabularies.
    moments = {
        m: Moments() for m, kind in spec.kinds.items() if kind in ('series', 'features') and spec.standardize
    }
    zeroed = {m: 0 for m, kind in spec.kinds.items() if kind in ('series', 'features')}
    vocab = {m: 1 for m, kind in spec.kinds.items() if kind == 'tokens'}
    text_modalities = [m for m, kind in spec.kinds.items() if kind == 'text']
    n_train = int((split_of == 0).sum())
    every = max(1, -(-n_train // TOKENIZER_TEXTS))  # every k-th train text trains and measures the tokenizer
    sample = {m: [] for m in text_modalities}
    train_seen = 0  # train rows before the chunk
    progress = Progress(f'{spec.root.name}: checking', len(split_of))
    all_names = tuple(dict.fromkeys(name for m in spec.kinds for name in source.names(m)))
    for chunk in source.chunks(all_names):
        train = split_of[chunk.index] == 0
        for m, kind in spec.kinds.items():
            x = values(source, chunk, m)
            if kind in ('series', 'features'):
                bad = ~np.isfinite(x)
                if bad.any() and spec.nan == 'error':
                    i, *index = np.argwhere(bad)[0].tolist()
                    raise ValueError(
                        f'{chunk.where(i)}: {field(source, chunk, m, tuple(index))} is {x[(i, *index)]}; expected a '
                        "finite number (config.data.nan='zero' replaces non-finite values with 0)"
                    )
                zeroed[m] += int(bad.sum())
                if m in moments:
                    moments[m].add(np.where(bad, 0.0, x)[train])
            elif kind == 'tokens':
                vocab[m] = max(vocab[m], int(x.max(initial=0)) + 1)
            elif kind == 'text':
                rank = train_seen + np.cumsum(train) - 1  # each train row's rank among the train rows
                sample[m].extend(x[train & (rank % every == 0)].tolist())
        train_seen += int(train.sum())
        progress.update(len(chunk))
    for m, count in zeroed.items():
        if count:
            logging.warning(
                'Modality %s: replaced %d non-finite values with 0 (config.data.nan=zero).', m, count
            )
    stats = {}
    for m, moment in moments.items():
        mean, std = moment.result()
        stats[m] = {'mean': mean.tolist(), 'std': std.tolist()}
    texts = {m: _tokenizer(spec, m, sample[m]) for m in text_modalities}
    return Plan(
        source, labels, split_of, num_classes, tuple(class_names), origins, stats, zeroed, vocab, texts
    )


def _tokenizer(spec: Spec, m: str, texts: list[str]) -> tuple[tokenizers.Tokenizer, int]:
    """Text modality m's tokenizer (trained on `texts`, or its file) and max_tokens."""
    if spec.tokenizer[m] == TRAIN:
        where = f'modality {m!r} (config.data.tokenizer.{m}={TRAIN!r})'
        tokenizer = tokenizers.train(texts, spec.vocab_size, where=where)
    else:
        tokenizer = tokenizers.load(spec.tokenizer[m], where=f'config.data.tokenizer.{m}')
        if tokenizer.sha256 != spec.tokenizer_sha256[m]:
            raise ValueError(
                f'config.data.tokenizer.{m}: {spec.tokenizer[m]} changed while it was being read'
            )
    if spec.max_tokens[m]:
        return tokenizer, spec.max_tokens[m]
    if tokenizer.pad_to_max:  # every text padded to the tower's length (SigLIP)
        return tokenizer, tokenizer.max_length
    return tokenizer, min(
        default_max_tokens(tokenizer.lengths(texts)), tokenizer.max_length or MAX_TOKENS_CAP
    )
