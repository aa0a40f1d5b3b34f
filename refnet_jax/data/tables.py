"""Tables of the own-data path, read in bounded chunks: CSV (`.csv`), JSON Lines (`.jsonl`) and Parquet
(`.parquet`, read with pyarrow), by extension, or a directory of shards of one of them, read in name order.

`Table(path)` reads the header (the column names) of every file and checks that the table has rows; its
`chunks(columns)` yields the values of some columns, `CHUNK_ROWS` rows at a time, so that a table far larger
than memory is read in constant memory. A value is what the format holds: a string in a CSV file (bytes that
are not UTF-8 kept as lone surrogates, which `invalid_utf8` finds, so that the cell can be named), any JSON
value in a JSON Lines file (a missing key is None), and the Python value of a Parquet cell.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

SUFFIXES = ('.csv', '.jsonl', '.parquet')
CHUNK_ROWS = 2048
_SURROGATE = re.compile('[\udc80-\udcff]')


@dataclasses.dataclass
class Chunk:
    """Consecutive rows of one file of a table (or of one .npz file).

    Attributes:
      file: the file.
      index: (n,) each row's position in the whole source (over every file), from 0.
      rows: (n,) each row's position in its file, from 0 (the header is not a row).
      lines: (n,) each row's line in its file (CSV, JSON Lines), else None.
      cells: column (or array) name -> its n values (a list, or an array for .npz files).
      types: column -> its Parquet type (Parquet only), to say what a cell of the wrong type is.
    """

    file: pathlib.Path
    index: np.ndarray
    rows: np.ndarray
    lines: np.ndarray | None
    cells: dict[str, Any]
    types: dict[str, str] | None = None

    def where(self, i: int) -> str:
        """'<file> row <r> (line <l>)' of the i-th row of the chunk."""
        line = f' (line {self.lines[i]})' if self.lines is not None else ''
        return f'{self.file} row {self.rows[i]}{line}'

    def __len__(self) -> int:
        return len(self.rows)


def invalid_utf8(value: str) -> int | None:
    """The position of the first byte of `value` that was not UTF-8 (read as a lone surrogate), or None."""
    found = _SURROGATE.search(value)
    return None if found is None else found.start()


def _lines(f, path: pathlib.Path) -> Iterator[str]:
    """The lines of a binary file as str: UTF-8, a leading byte-order mark dropped, other bytes kept as lone
    surrogates (`invalid_utf8` finds them)."""
    first = True
    for raw in f:
        if first:
            raw, first = raw.removeprefix(b'\xef\xbb\xbf'), False
        yield raw.decode('utf-8', 'surrogateescape')


class Table:
    """A table file, or a directory of shards; see the module docstring.

    Attributes:
      path: the file or directory.
      files: the files, in reading order.
      header: the column names (every shard has the same).

    Raises (on construction): FileNotFoundError for no file, ValueError for a format not read, shards of mixed
    formats or headers, a header with repeated or empty names, or a table without rows; each names the file.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
            suffixes = sorted({p.suffix for p in files})
            if not files or len(suffixes) > 1:
                found = f'shards of several formats {suffixes}' if files else 'no shard'
                raise ValueError(
                    f'{path}: a directory table holds {found}; expected files of one format: '
                    f'{", ".join("*" + s for s in SUFFIXES)}'
                )
            self.files = tuple(files)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(
                    f'{path}: a table is a {", ".join(SUFFIXES)} file or a directory of them, not {path.suffix!r}'
                )
            self.files = (path,)
        else:
            raise FileNotFoundError(f'no file or directory {path}')
        self.format = self.files[0].suffix
        self.header = ()
        rows = 0
        for file in self.files:
            header, has_rows = _HEADERS[self.format](file)
            repeated = sorted({name for name in header if header.count(name) > 1})
            if not header or repeated or '' in header:
                raise ValueError(
                    f'{file}: header {list(header)} has repeated or empty column names {repeated}; expected a '
                    'header naming every column once'
                )
            if self.header and set(header) != set(self.header):
                raise ValueError(
                    f'{file}: columns {list(header)}, but {self.files[0]} has {list(self.header)}; expected the '
                    'same columns in every shard'
                )
            self.header = self.header or header
            rows += has_rows
        if not rows:
            what = 'a header but no rows' if self.format == '.csv' else 'no rows'
            raise ValueError(f'{path} holds {what}; expected one example per row')

    def chunks(self, columns: Sequence[str], chunk_rows: int | None = None) -> Iterator[Chunk]:
        """The values of `columns` (names of the header), every row once, in order, `chunk_rows` (default
        `CHUNK_ROWS`) at a time."""
        chunk_rows = chunk_rows or CHUNK_ROWS
        start = 0
        for file in self.files:
            for chunk in _READERS[self.format](file, tuple(columns), chunk_rows):
                chunk.index = start + np.arange(len(chunk))
                start += len(chunk)
                yield chunk


# --- CSV ---


def _csv_header(path: pathlib.Path) -> tuple[tuple[str, ...], bool]:
    with open(path, 'rb') as f:
        reader = csv.reader(_lines(f, path))
        header = tuple(name.strip() for name in next(reader, ()))
        return header, any(any(v.strip() for v in row) for row in reader)


def _csv_chunks(path: pathlib.Path, columns: tuple[str, ...], chunk_rows: int) -> Iterator[Chunk]:
    with open(path, 'rb') as f:
        reader = csv.reader(_lines(f, path))
        header = tuple(name.strip() for name in next(reader, ()))
        where = [header.index(c) for c in columns]
        cells: list[list[str]] = [[] for _ in columns]
        rows, lines, row = [], [], 0
        try:
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise ValueError(
                        f'{path} line {reader.line_num}: {len(values)} fields, but the header has {len(header)}'
                    )
                for out, j in zip(cells, where, strict=True):
                    out.append(values[j])
                rows.append(row)
                lines.append(reader.line_num)
                row += 1
                if len(rows) == chunk_rows:
                    yield _chunk(path, rows, lines, columns, cells)
                    cells, rows, lines = [[] for _ in columns], [], []
        except csv.Error as e:
            raise ValueError(f'{path} line {reader.line_num}: cannot be read as CSV: {e}') from None
        if rows:
            yield _chunk(path, rows, lines, columns, cells)


def _chunk(path, rows, lines, columns, cells, types=None) -> Chunk:
    return Chunk(
        path,
        np.zeros(0, np.int64),
        np.asarray(rows, np.int64),
        None if lines is None else np.asarray(lines, np.int64),
        dict(zip(columns, cells, strict=True)),
        types,
    )


# --- JSON Lines ---


def _json_rows(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) of each non-blank line of a JSON Lines file."""
    with open(path, 'rb') as f:
        for line, text in enumerate(_lines(f, path), 1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path} line {line}: not valid JSON ({e.msg}, column {e.colno})') from None
            if not isinstance(value, dict):
                raise ValueError(
                    f'{path} line {line}: a JSON {type(value).__name__}; expected one JSON object per line'
                )
            yield line, value


def _jsonl_header(path: pathlib.Path) -> tuple[tuple[str, ...], bool]:
    first = next(_json_rows(path), None)
    return (tuple(first[1]), True) if first is not None else ((), False)


def _jsonl_chunks(path: pathlib.Path, columns: tuple[str, ...], chunk_rows: int) -> Iterator[Chunk]:
    cells: list[list[Any]] = [[] for _ in columns]
    rows, lines = [], []
    for row, (line, value) in enumerate(_json_rows(path)):
        for out, c in zip(cells, columns, strict=True):
            out.append(value.get(c))
        rows.append(row)
        lines.append(line)
        if len(rows) == chunk_rows:
            yield _chunk(path, rows, lines, columns, cells)
            cells, rows, lines = [[] for _ in columns], [], []
    if rows:
        yield _chunk(path, rows, lines, columns, cells)


# --- Parquet ---


def _parquet_file(path: pathlib.Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f'{path} cannot be read as a Parquet file: {e}') from None


def _parquet_header(path: pathlib.Path) -> tuple[tuple[str, ...], bool]:
    file = _parquet_file(path)
    return tuple(file.schema_arrow.names), file.metadata.num_rows > 0


def _parquet_chunks(path: pathlib.Path, columns: tuple[str, ...], chunk_rows: int) -> Iterator[Chunk]:
    file = _parquet_file(path)
    types = {c: str(file.schema_arrow.field(c).type) for c in columns}
    start = 0
    for batch in file.iter_batches(batch_size=chunk_rows, columns=list(columns)):
        cells = [_values(path, batch.column(c), c, start) for c in columns]
        rows = list(range(start, start + batch.num_rows))
        start += batch.num_rows
        yield _chunk(path, rows, None, columns, cells, types)


def _values(path: pathlib.Path, array, column: str, start: int) -> list[Any]:
    """A Parquet column's values as Python objects; a string that is not UTF-8 is an error naming its row."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        pass
    for i in range(len(array)):
        try:
            array[i].as_py()
        except UnicodeDecodeError as e:
            raise ValueError(
                f'{path} row {start + i}: column {column!r} is not valid UTF-8 ({e.reason} at byte {e.start})'
            ) from None
    raise AssertionError('a value that did not decode was not found')


_HEADERS = {'.csv': _csv_header, '.jsonl': _jsonl_header, '.parquet': _parquet_header}
_READERS = {'.csv': _csv_chunks, '.jsonl': _jsonl_chunks, '.parquet': _parquet_chunks}
