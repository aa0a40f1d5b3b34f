"""MM-IMDB: movie plots and posters -> their genres (23, multi-label), as frozen features.

Built offline from `multimodal_imdb.hdf5`, the ready-made MM-IMDB file of Arevalo et al. (Gated Multimodal
Units for Information Fusion, 2017; https://github.com/johnarevalo/gmu-mmimdb, written by its
`make_dataset.py` in the Fuel HDF5 format) that MultiBench (`datasets/imdb/get_data.py`) reads. Download it
(`MANUAL_DOWNLOAD_INSTRUCTIONS`) into the TFDS manual directory: `--config.data.manual_dir=DIR`, by default
`<data_dir>/downloads/manual`.

Datasets of the file read here (each has one row per movie, N rows; the file's other datasets, among them
`images`, the posters as (N, 3, 256, 160) pixel arrays that make up most of its size, are never read):
  features      (N, 300) float32  the mean word2vec (GoogleNews) vector of the plot's words -> modality `text`
  vgg_features  (N, 4096) float32 VGG-16 features of the poster                            -> modality `image`
  genres        (N, 23) int32     multi-hot genres, 1 where the movie has the genre         -> `label`
Both modalities are 'features' kept raw, as MultiBench's loader returns them: without the file at hand
nothing was measured that would favour standardizing them.

Classes: the 23 genres in the file's column order, read from the `target_names` attribute of `genres`
(a JSON list, which make_dataset.py writes: genres by decreasing frequency over all movies). A file
without that attribute gets `GENRES`: Drama, Comedy, Romance, ..., Short, Film-Noir, the order in which
code built on MultiBench lists the columns (checked against such code, not against the file itself).

Splits: rows [0, 15552) train (15,552 movies), [15552, 18160) validation (2,608), [18160, 25959) test
(7,799) -- `SPLITS`, the rows MultiBench uses for this 25,959-row file (make_dataset.py writes them as
the file's `train`, `dev` and `test` splits). How `split_rows` decides, for a file of N rows:
  * The file carries a Fuel split table (the root attribute `split`, which make_dataset.py writes): its
    `train`, `dev` and `test` row ranges of `genres` (and of `features` and `vgg_features`, which must
    agree) are used; they must be contiguous, non-empty and cover all N rows, and equal `SPLITS` when
    N = 25,959.
  * It carries none: N must be 25,959, and `SPLITS` is used; any other N is an error, since nothing
    says where its splits lie.
So a smaller file (such as the test fixtures) is accepted only when it states its own splits, as
make_dataset.py does, and nothing test-only lives in this module. (That the distributed file carries the
table is inferred from make_dataset.py, not checked on the file; either way it is read correctly.)

Each example keeps `index`, its row in the file. Every value is checked before anything is written: a
missing file, a missing dataset, a wrong shape, differing row counts, a non-finite feature or a genre
other than 0/1 is an error naming the file, the dataset (field) and, for values, the row.

`DATASET` implements `refnet_jax.data.contract.DatasetModule` with the per-record defaults (one movie is one
record): batches `{'text': (B, 300), 'image': (B, 4096), 'label': (B, 23) int32 multi-hot}`, plus `mask`
(B,) in evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, ClassVar

import h5py
import numpy as np
import tensorflow_datasets as tfds

from refnet_jax.data import common, contract, input_pipeline

FILE_NAME = 'multimodal_imdb.hdf5'
URL = 'https://archive.org/download/mmimdb/multimodal_imdb.hdf5'  # the GMU authors' file, mirrored
# modality -> (dataset in the file, features per row)
MODALITIES = {'text': ('features', 300), 'image': ('vgg_features', 4096)}
LABELS = 'genres'  # the dataset of the multi-hot labels
GENRES = (
    'Drama', 'Comedy', 'Romance', 'Thriller', 'Crime', 'Action', 'Adventure', 'Horror', 'Documentary',
    'Mystery', 'Sci-Fi', 'Fantasy', 'Family', 'Biography', 'War', 'History', 'Music', 'Animation',
    'Musical', 'Western', 'Sport', 'Short', 'Film-Noir',
)  # fmt: skip
NUM_CLASSES = len(GENRES)
NUM_ROWS = 25959  # movies in the published file
SPLITS = {'train': (0, 15552), 'validation': (15552, 18160), 'test': (18160, 25959)}  # rows [start, stop)
FUEL_SPLITS = {'train': 'train', 'validation': 'dev', 'test': 'test'}  # our split -> the file's
MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f'Download {FILE_NAME} (the MM-IMDB file of https://github.com/johnarevalo/gmu-mmimdb, which MultiBench '
    f'uses), e.g. from {URL}, into a directory DIR and pass --config.data.manual_dir=DIR (default: '
    '<data_dir>/downloads/manual).'
)


@dataclasses.dataclass(frozen=True)
class Contents:
    """What the builder takes from the file, checked.

    Attributes:
      modalities: modality name -> (N, F) float32 features.
      labels: (N, 23) int32 multi-hot genres.
      class_names: the genres in column order.
      splits: split name -> its rows [start, stop).
    """

    modalities: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    splits: dict[str, tuple[int, int]]


def _decode(value: Any) -> str:
    return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _fuel_rows(table: np.ndarray, path: str) -> dict[str, tuple[int, int]]:
    """Our splits' rows [start, stop) from a Fuel split table (the file's root attribute `split`)."""
    sources = (LABELS, *(dataset for dataset, _ in MODALITIES.values()))
    try:
        ranges = {
            (_decode(row['split']), _decode(row['source'])): (int(row['start']), int(row['stop']))
            for row in np.asarray(table).reshape(-1)
        }
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"{path}: the root attribute 'split' is not a Fuel split table with fields split, source, start "
            f'and stop ({e})'
        ) from None
    rows = {}
    for split, fuel_split in FUEL_SPLITS.items():
        if (fuel_split, LABELS) not in ranges:
            raise ValueError(
                f"{path}: the Fuel split table (root attribute 'split') has no {fuel_split!r} rows of "
                f'{LABELS!r}; it has {sorted(ranges)}'
            )
        rows[split] = ranges[fuel_split, LABELS]
        for source in sources:
            if ranges.get((fuel_split, source), rows[split]) != rows[split]:
                raise ValueError(
                    f"{path}: the Fuel split table (root attribute 'split') gives split {fuel_split!r} rows "
                    f'{ranges[fuel_split, source]} of {source!r} but {rows[split]} of {LABELS!r}'
                )
    return rows


def split_rows(num_rows: int, fuel_split: np.ndarray | None = None, *, path: str = FILE_NAME) -> dict:
    """Each split's rows [start, stop) in a file of `num_rows` rows (the module docstring says how).

    Args:
      num_rows: rows of every dataset of the file.
      fuel_split: the file's Fuel split table (its root attribute `split`), if it has one.
      path: the file, for error messages.

    Returns:
      {'train': (start, stop), 'validation': ..., 'test': ...}: contiguous, in that order, covering every row.
    """
    if fuel_split is None:
        if num_rows != NUM_ROWS:
            raise ValueError(
                f"{path} holds {num_rows:,} rows and no Fuel split table (root attribute 'split'); expected "
                f'the {NUM_ROWS:,} rows of the published MM-IMDB file, whose splits are {SPLITS}'
            )
        return dict(SPLITS)
    rows = _fuel_rows(fuel_split, path)
    bounds = [rows['train'][0], *(rows[s][1] for s in ('train', 'validation', 'test'))]
    contiguous = rows['validation'][0] == bounds[1] and rows['test'][0] == bounds[2]
    if not contiguous or bounds[0] != 0 or bounds[3] != num_rows or not np.all(np.diff(bounds) > 0):
        raise ValueError(
            f"{path}: the Fuel split table (root attribute 'split') gives rows {rows}; expected non-empty, "
            f'contiguous train, dev and test rows covering all {num_rows:,} rows'
        )
    if num_rows == NUM_ROWS and rows != SPLITS:
        raise ValueError(
            f"{path}: the Fuel split table (root attribute 'split') gives rows {rows}; expected those of the "
            f'published MM-IMDB file, {SPLITS}'
        )
    return rows


def _dataset(file: h5py.File, name: str, path: str) -> h5py.Dataset:
    if not isinstance(file.get(name), h5py.Dataset):
        raise ValueError(f'{path} holds no dataset {name!r}; it holds {sorted(file)}')
    return file[name]


def _class_names(labels: h5py.Dataset, path: str) -> tuple[str, ...]:
    if 'target_names' not in labels.attrs:
        return GENRES
    try:
        names = json.loads(_decode(labels.attrs['target_names']))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: attribute 'target_names' of {LABELS!r} is not a JSON list ({e})") from None
    if (
        not isinstance(names, list)
        or len(names) != NUM_CLASSES
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != NUM_CLASSES
    ):
        raise ValueError(
            f"{path}: attribute 'target_names' of {LABELS!r} is {names!r}; expected {NUM_CLASSES} distinct "
            'genre names'
        )
    return tuple(names)


def _first_bad(bad: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first True of a 2-D mask."""
    return tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))


def load(path: pathlib.Path | str) -> Contents:
    """Reads and checks the datasets this builder uses; errors name the file, dataset and row."""
    path = str(path)
    try:
        file = h5py.File(path, 'r')
    except OSError as e:
        raise ValueError(f'{path} is not a readable HDF5 file ({e})') from None
    with file:
        datasets = {
            name: _dataset(file, name, path) for name in (*(d for d, _ in MODALITIES.values()), LABELS)
        }
        widths = {**dict(MODALITIES.values()), LABELS: NUM_CLASSES}
        for name, ds in datasets.items():
            if ds.ndim != 2 or ds.shape[1] != widths[name]:
                raise ValueError(
                    f'{path}: dataset {name!r} has shape {ds.shape}; expected (N, {widths[name]}), '
                    'one row per movie'
                )
            if ds.dtype.kind not in 'fiub':
                raise ValueError(f'{path}: dataset {name!r} has dtype {ds.dtype}; expected numbers')
        counts = {name: ds.shape[0] for name, ds in datasets.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(
                f'{path}: datasets hold different numbers of rows: {counts}; expected one per movie'
            )
        num_rows = counts[LABELS]
        splits = split_rows(num_rows, file.attrs.get('split'), path=path)
        class_names = _class_names(datasets[LABELS], path)

        modalities = {}
        for modality, (name, _) in MODALITIES.items():
            x = datasets[name][...]
            bad = ~np.isfinite(x)
            if bad.any():
                row, col = _first_bad(bad)
                raise ValueError(
                    f'{path}: row {row} of dataset {name!r} (modality {modality!r}) holds {x[row, col]} in '
                    f'column {col}; expected finite features'
                )
            modalities[modality] = np.asarray(x, np.float32)
        labels = datasets[LABELS][...]
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            row, col = _first_bad(bad)
            raise ValueError(
                f'{path}: row {row} of dataset {LABELS!r} holds {labels[row, col]} in column {col} '
                f'({class_names[col]}); expected a 0/1 multi-hot'
            )
    return Contents(modalities, np.asarray(labels, np.int32), class_names, splits)


class Builder(tfds.core.GeneratorBasedBuilder):
    """MM-IMDB from the manual file, one example per movie; see the module docstring."""

    name = 'mm_imdb'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        '1.0.0': 'Text (word2vec mean) and poster (VGG-16) features, 23 genres, the MultiBench split.'
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            # Examples stay in file order; the input pipeline shuffles. TFDS reads this DatasetInfo field.
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    **{
                        m: tfds.features.Tensor(shape=(width,), dtype=np.float32, encoding='bytes')
                        for m, (_, width) in MODALITIES.items()
                    },
                    'label': tfds.features.Tensor(shape=(NUM_CLASSES,), dtype=np.int32, encoding='bytes'),
                    'index': tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage='https://github.com/johnarevalo/gmu-mmimdb',
            metadata=tfds.core.MetadataDict(),  # filled in `_split_generators`
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        contents = load(
            common.manual_dir(dl_manager, 'MM-IMDB', [FILE_NAME], MANUAL_DOWNLOAD_INSTRUCTIONS) / FILE_NAME
        )
        self.info.metadata.update(
            {
                'class_names': list(contents.class_names),
                'rows': {split: list(rows) for split, rows in contents.splits.items()},
            }
        )
        return {split: self._generate_examples(contents, *rows) for split, rows in contents.splits.items()}

    def _generate_examples(self, contents: Contents, start: int, stop: int):
        for i in range(start, stop):
            yield (
                i,
                {
                    **{m: x[i] for m, x in contents.modalities.items()},
                    'label': contents.labels[i],
                    'index': i,
                },
            )


class MmImdb(input_pipeline.PerRecordDataset):
    """MM-IMDB for the input pipeline: one example per movie."""

    Builder = Builder

    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        modalities = {m: input_pipeline.modality_info(builder, m, 'features') for m in MODALITIES}
        return input_pipeline.per_record_info(builder, modalities, multi_label=True)


DATASET = MmImdb()
