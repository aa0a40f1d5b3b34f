"""The own-data path's values: the user's files read into `Part`s, checked (labels, tokens, non-finite numbers),
split and standardized, in place, as refnet_jax/data/datasets/custom.py describes."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import zipfile

import numpy as np
from absl import logging

from refnet_jax.data import common, splits, tokenizers
from refnet_jax.data.custom_spec import MAX_TOKENS_CAP, SPLITS, TRAIN, Spec, read_table


@dataclasses.dataclass
class Part:
    """Examples from one source file: their inputs and labels, and where each came from.

    Attributes:
      path: the file.
      inputs: modality -> (N, *shape) values; a table's image modality holds (N,) file paths, a text modality
        (N,) strings until `tokenize_parts` turns them into (N, max_tokens) ids.
      labels: (N,) class ids, (N, C) multi-hot, or for a table before `class_ids`, (N,) strings.
      rows: (N,) each example's row in the file, from 0.
      lines: (N,) each example's line in the CSV file (tables only).
      columns: modality -> its column names (tables only), to name the field of a bad value.
      masks: text modality -> (N, max_tokens) bool, True on real tokens (from `tokenize_parts`).
    """

    path: pathlib.Path
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    rows: np.ndarray
    lines: np.ndarray | None = None
    columns: dict[str, tuple[str, ...]] | None = None
    masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def where(self, i: int) -> str:
        """'<file> row <r>' for the i-th example (with its CSV line)."""
        line = f' (line {self.lines[i]})' if self.lines is not None else ''
        return f'{self.path} row {self.rows[i]}{line}'

    def field(self, m: str, index: tuple[int, ...]) -> str:
        """The column, or the array and item index, holding `index` of modality `m`'s item."""
        if self.columns is not None:
            return f'column {self.columns[m][index[0] if index else 0]!r}'
        return f'array {m!r} at {list(index)}' if index else f'array {m!r}'

    def take(self, idx: np.ndarray) -> Part:
        """The examples `idx` of this part."""
        return Part(
            self.path,
            {m: x[idx] for m, x in self.inputs.items()},
            self.labels[idx],
            self.rows[idx],
            None if self.lines is None else self.lines[idx],
            self.columns,
            {m: x[idx] for m, x in self.masks.items()},
        )


# --- Reading and checking the values ---


def read_arrays(spec: Spec) -> dict[str, Part]:
    """The given splits of the arrays layout, read whole."""
    parts = {}
    for split, path in spec.files.items():
        try:
            with np.load(path, allow_pickle=False) as npz:
                inputs = {m: npz[m] for m in spec.kinds}
                labels = npz[spec.label]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f'{path} cannot be read as a NumPy .npz file: {e}') from e
        part = parts[split] = Part(path, inputs, labels, np.arange(len(labels)))
        for m, kind in spec.kinds.items():
            if kind == 'text':
                part.inputs[m] = _strings(part, m, inputs[m])
    return parts


def _strings(part: Part, m: str, x: np.ndarray) -> np.ndarray:
    """A text array as (N,) Python strings (an object array); bytes must be UTF-8."""
    if x.dtype.kind == 'U':
        return x.astype(object)
    out = np.empty(len(x), object)
    for i, value in enumerate(x.tolist()):
        try:
            out[i] = value.decode('utf-8')
        except UnicodeDecodeError as e:
            raise ValueError(
                f'{part.where(i)}: {part.field(m, ())} is not valid UTF-8 ({e.reason} at byte {e.start}); '
                f"modality {m!r} of kind 'text' expects UTF-8 text"
            ) from None
    return out


def read_table_parts(spec: Spec) -> dict[str, Part]:
    """The given splits of the table layout; labels stay strings until `class_ids`."""
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
        elif kind == 'text':
            j = header.index(spec.columns[m][0])
            whole.inputs[m] = np.asarray([row[j] for row in rows], object)
        else:
            whole.inputs[m] = np.stack(
                [_numbers(whole, m, column(c), kind, j) for j, c in enumerate(spec.columns[m])], 1
            )
    if spec.split_column is None:
        return {'train': whole}
    row_split = np.asarray(column(spec.split_column))
    bad = ~np.isin(row_split, SPLITS)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f'{whole.where(i)}: column {spec.split_column!r} (config.data.split_column) is {str(row_split[i])!r}; '
            f'expected one of {SPLITS}'
        )
    parts = {s: whole.take(np.flatnonzero(row_split == s)) for s in SPLITS if (row_split == s).any()}
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


def class_ids(parts: dict[str, Part], spec: Spec) -> tuple[str, ...]:
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


def check_labels(parts: dict[str, Part], spec: Spec, class_names: tuple[str, ...]) -> int:
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


def check_values(parts: dict[str, Part], spec: Spec) -> dict[str, int]:
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


def fill_splits(parts: dict[str, Part], spec: Spec) -> dict[str, str]:
    """Draws the splits not given from train (in place); returns each split's origin, for the metadata."""
    origins = {split: str(p.path.name) for split, p in parts.items()}
    fractions = {split: spec.split[k] for k, split in enumerate(SPLITS) if split not in parts}
    if not fractions:
        return origins
    train = parts['train']
    # Per class, round(n * fraction) rows half up, by permuting the class's rows (see the custom.py docstring).
    rows = splits.stratified_split(train.labels, spec.split_seed, fractions=fractions, rest='train')
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


def standardize_parts(parts: dict[str, Part], spec: Spec) -> dict[str, dict[str, list[float]]]:
    """Standardizes 'features' per feature and 'series' per channel with train statistics (in place); returns
    the statistics, for the metadata. Every 'features' and 'series' value ends as float32."""
    stats = {}
    for m, kind in spec.kinds.items():
        if kind not in ('series', 'features'):
            continue
        if spec.standardize:
            mean, std = common.standardization(parts['train'].inputs[m])
            stats[m] = {'mean': mean.tolist(), 'std': std.tolist()}
            for p in parts.values():
                p.inputs[m] = common.standardize(p.inputs[m], mean, std)
        for p in parts.values():
            p.inputs[m] = p.inputs[m].astype(np.float32)
    return stats


def default_max_tokens(lengths: np.ndarray) -> int:
    """The 99th percentile of the training text's lengths in ids (at least 1, at most `MAX_TOKENS_CAP`)."""
    if not len(lengths):
        return 1
    return int(np.clip(np.percentile(lengths, 99, method='higher'), 1, MAX_TOKENS_CAP))


def tokenize_parts(parts: dict[str, Part], spec: Spec) -> dict[str, tuple[tokenizers.Tokenizer, int]]:
    """Tokenizes each text modality in place (ids into `inputs`, the mask into `masks`); returns its tokenizer
    and max_tokens. A tokenizer to train learns from the train split's text alone."""
    out = {}
    for m, kind in spec.kinds.items():
        if kind != 'text':
            continue
        texts = parts['train'].inputs[m].tolist()
        if spec.tokenizer[m] == TRAIN:
            where = f'modality {m!r} (config.data.tokenizer.{m}={TRAIN!r})'
            tokenizer = tokenizers.train(texts, spec.vocab_size, where=where)
        else:
            tokenizer = tokenizers.load(spec.tokenizer[m], where=f'config.data.tokenizer.{m}')
            if tokenizer.sha256 != spec.tokenizer_sha256[m]:
                raise ValueError(
                    f'config.data.tokenizer.{m}: {spec.tokenizer[m]} changed while it was being read'
                )
        max_tokens = spec.max_tokens[m] or default_max_tokens(tokenizer.lengths(texts))
        for p in parts.values():
            ids, mask = tokenizer.encode(p.inputs[m].tolist(), max_tokens)
            bad = mask & (ids == tokenizer.pad_id)
            if bad.any():
                i = int(np.argwhere(bad)[0, 0])
                raise ValueError(
                    f"{p.where(i)}: {p.field(m, ())} holds the tokenizer's padding token (id {tokenizer.pad_id}) "
                    'as text; expected text without it, as the model tells padding by that id'
                )
            p.inputs[m], p.masks[m] = ids, mask
        out[m] = (tokenizer, max_tokens)
    return out
