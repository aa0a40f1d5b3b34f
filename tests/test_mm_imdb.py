"""Tests of the MM-IMDB builder on small fixture files in the layout of the published `multimodal_imdb.hdf5`.

The fixture has the published file's datasets, dtypes and per-row shapes (`features` (N, 300) float32,
`vgg_features` (N, 4096) float32, `genres` (N, 23) int32 with its `target_names`, `images` (N, 3, 256, 160)
int32, `imdb_ids`, `sequences`) and its Fuel split table (the root attribute `split`), but 60 rows: train
0-35, dev 36-47, test 48-59. `images` is declared but never written, so it takes no space.
"""

import json
import os

import h5py
import ml_collections
import numpy as np
import pytest
from helpers import stored_records
from sklearn.metrics import f1_score

from configs import mm_imdb as mm_imdb_config
from refnet_jax.data import contract, input_pipeline
from refnet_jax.data.datasets import mm_imdb
from refnet_jax.models import model as model_lib
from refnet_jax.train import checkpointing, trainer

NUM_ROWS = 60
ROWS = {'train': (0, 36), 'validation': (36, 48), 'test': (48, 60)}
FUEL_NAMES = {'train': 'train', 'validation': 'dev', 'test': 'test'}
F1_AVERAGES = ('micro', 'macro', 'weighted', 'samples')


def fixture_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """The read datasets of a fixture: text and image features, multi-hot genres (>= 1 per movie)."""
    rng = np.random.default_rng(seed)
    genres = (rng.random((NUM_ROWS, 23)) < 0.2).astype(np.int32)
    genres[np.arange(NUM_ROWS), rng.integers(0, 23, NUM_ROWS)] = 1
    return {
        'features': rng.normal(0.0, 0.1, (NUM_ROWS, 300)).astype(np.float32),
        'vgg_features': np.maximum(rng.normal(0.0, 1.0, (NUM_ROWS, 4096)), 0.0).astype(np.float32),
        'genres': genres,
    }


def fuel_split_table(rows: dict[str, tuple[int, int]], sources: list[str]) -> np.ndarray:
    """The root `split` attribute as Fuel's H5PYDataset.create_split_array writes it."""
    dtype = np.dtype(
        [
            ('split', 'S5'),
            ('source', 'S12'),
            ('start', np.int64),
            ('stop', np.int64),
            ('indices', h5py.ref_dtype),
            ('available', bool),
            ('comment', 'S1'),
        ]
    )
    table = np.empty(len(rows) * len(sources), dtype)
    for i, (split, source) in enumerate((s, src) for s in rows for src in sources):
        start, stop = rows[split]
        table[i] = (FUEL_NAMES[split].encode(), source.encode(), start, stop, h5py.Reference(), True, b'.')
    return table


def write_hdf5(directory, arrays, *, rows=ROWS, target_names=mm_imdb.GENRES):
    """Writes `multimodal_imdb.hdf5` into `directory` (created) and returns the directory, as a str."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(arrays['genres'])
    with h5py.File(directory / mm_imdb.FILE_NAME, 'w') as f:
        for name, x in arrays.items():
            f.create_dataset(name, data=x)
        f.create_dataset('images', (n, 3, 256, 160), dtype='int32', chunks=(1, 3, 256, 160))
        f.create_dataset('imdb_ids', data=np.array([b'%07d' % (i + 1) for i in range(n)], dtype='S7'))
        sequences = f.create_dataset('sequences', (n,), dtype=h5py.vlen_dtype(np.int32))
        for i in range(n):
            sequences[i] = np.arange(1 + i % 7, dtype=np.int32)
        if target_names is not None and 'genres' in f:
            f['genres'].attrs['target_names'] = json.dumps(list(target_names))
        if rows is not None:
            f.attrs['split'] = fuel_split_table(rows, sorted(f))
    return str(directory)


def data_config(data_dir, manual_dir) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            'name': 'mm_imdb',
            'data_dir': str(data_dir),
            'manual_dir': None if manual_dir is None else str(manual_dir),
        }
    )


def tiny_config(data_dir, manual_dir, arg: str = 'tiny') -> ml_collections.ConfigDict:
    config = mm_imdb_config.get_config(arg)
    config.data.data_dir = str(data_dir)
    config.data.manual_dir = str(manual_dir)
    config.mesh.data = 1
    return config


@pytest.fixture(scope='module')
def arrays():
    return fixture_arrays()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, arrays):
    """(data_dir, manual_dir) of the fixture, prepared once."""
    root = tmp_path_factory.mktemp('mm_imdb')
    manual_dir = write_hdf5(root / 'manual', arrays)
    input_pipeline.get_dataset_info(data_config(root / 'tfds', manual_dir))
    return root / 'tfds', manual_dir


def split_records(data_dir, manual_dir, split) -> dict[str, np.ndarray]:
    return stored_records(data_config(data_dir, manual_dir))[split]


def test_dataset_info(prepared):
    info = input_pipeline.get_dataset_info(data_config(*prepared))
    assert info.name == 'mm_imdb'
    assert info.num_examples == {'train': 36, 'validation': 12, 'test': 12}
    assert info.multi_label and info.num_classes == 23
    assert info.class_names == mm_imdb.GENRES
    assert info.class_names[:3] == ('Drama', 'Comedy', 'Romance') and info.class_names[-1] == 'Film-Noir'
    assert info.modalities == {
        'text': contract.ModalityInfo(kind='features', shape=(300,), dtype=np.float32),
        'image': contract.ModalityInfo(kind='features', shape=(4096,), dtype=np.float32),
    }


@pytest.mark.parametrize('split', ROWS)
def test_records_are_the_file_rows_of_their_split(prepared, arrays, split):
    records = split_records(*prepared, split)
    start, stop = ROWS[split]
    np.testing.assert_array_equal(records['index'], np.arange(start, stop))
    np.testing.assert_array_equal(records['text'], arrays['features'][start:stop])  # raw, not standardized
    np.testing.assert_array_equal(records['image'], arrays['vgg_features'][start:stop])
    np.testing.assert_array_equal(records['label'], arrays['genres'][start:stop])
    assert records['text'].dtype == records['image'].dtype == np.float32
    assert records['label'].dtype == np.int32


def test_batches_hold_multi_hot_labels(prepared, arrays):
    config = tiny_config(*prepared)
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    assert batch['text'].shape == (64, 300) and batch['image'].shape == (64, 4096)
    assert batch['label'].shape == (64, 23) and batch['label'].dtype == np.int32
    # The 36 training movies, repeated: every row of the batch is one of them, with its own label.
    train_text = arrays['features'][:36]
    rows = [int(np.flatnonzero((train_text == t).all(1))[0]) for t in batch['text']]
    np.testing.assert_array_equal(batch['label'], arrays['genres'][rows])
    np.testing.assert_array_equal(batch['image'], arrays['vgg_features'][rows])

    batches = list(input_pipeline.eval_batches(config, 'validation', batch_size=8))
    assert [b['mask'].tolist() for b in batches] == [[True] * 8, [True] * 4 + [False] * 4]
    labels = np.concatenate([b['label'] for b in batches])
    assert labels.shape == (16, 23) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels[:12], arrays['genres'][36:48])
    assert not labels[12:].any()


def test_only_one_modality_drops_the_other(prepared):
    config = tiny_config(*prepared, arg='tiny,only=text')
    batch = next(iter(input_pipeline.eval_batches(config, 'test')))
    assert sorted(batch) == ['label', 'mask', 'text']


def test_preparing_twice_reuses_the_prepared_copy(tmp_path, arrays):
    manual_dir = write_hdf5(tmp_path / 'manual', arrays)
    config = data_config(tmp_path / 'tfds', manual_dir)
    first = input_pipeline.get_dataset_info(config)
    _, builder = input_pipeline._prepared_builder(config)
    written = {p.name: os.stat(p).st_mtime_ns for p in builder.data_path.iterdir()}
    (tmp_path / 'manual' / mm_imdb.FILE_NAME).unlink()  # preparing again would fail
    assert input_pipeline.get_dataset_info(config) == first
    _, builder = input_pipeline._prepared_builder(config)
    assert {p.name: os.stat(p).st_mtime_ns for p in builder.data_path.iterdir()} == written


def test_missing_file_says_where_to_put_it(tmp_path, arrays):
    manual_dir = tmp_path / 'manual'
    config = data_config(tmp_path / 'tfds', manual_dir)
    with pytest.raises(
        FileNotFoundError, match=r'(?s)manual.*multimodal_imdb\.hdf5.*--config\.data\.manual_dir'
    ):
        input_pipeline.get_dataset_info(config)  # no manual directory at all
    manual_dir.mkdir()
    (manual_dir / 'other.txt').write_text('')
    with pytest.raises(FileNotFoundError) as e:
        input_pipeline.get_dataset_info(config)
    message = str(e.value)
    assert f'missing in the manual directory {manual_dir}: {mm_imdb.FILE_NAME}' in message
    assert "['other.txt']" in message and '--config.data.manual_dir' in message and mm_imdb.URL in message
    # Once the file is there, the failed attempts leave nothing in the way.
    write_hdf5(manual_dir, arrays)
    assert input_pipeline.get_dataset_info(config).num_examples['test'] == 12


def _drop(name):
    def edit(a):
        del a[name]

    return edit


def _set(name, value, *index):
    def edit(a):
        a[name][index] = value

    return edit


def _replace(name, fn):
    def edit(a):
        a[name] = fn(a[name])

    return edit


BAD_FILES = {
    'missing dataset': (
        _drop('vgg_features'),
        r"holds no dataset 'vgg_features'; it holds "
        r"\['features', 'genres', 'images', 'imdb_ids', 'sequences'\]",
    ),
    'wrong width': (
        _replace('features', lambda x: x[:, :299]),
        r"dataset 'features' has shape \(60, 299\); expected \(N, 300\)",
    ),
    'wrong rank': (
        _replace('genres', lambda x: x.reshape(60, 23, 1)),
        r"dataset 'genres' has shape \(60, 23, 1\); expected \(N, 23\)",
    ),
    'row counts differ': (
        _replace('vgg_features', lambda x: x[:59]),
        r"different numbers of rows: \{'features': 60, 'vgg_features': 59, 'genres': 60\}",
    ),
    'non-binary genre': (
        _set('genres', 2, 41, 5),
        r"row 41 of dataset 'genres' holds 2 in column 5 \(Action\); expected a 0/1 multi-hot",
    ),
    'negative genre': (_set('genres', -1, 0, 0), r"row 0 of dataset 'genres' holds -1 in column 0 \(Drama\)"),
    'nan text': (
        _set('features', np.nan, 7, 3),
        r"row 7 of dataset 'features' \(modality 'text'\) holds nan in column 3; expected finite",
    ),
    'inf image': (
        _set('vgg_features', np.inf, 55, 100),
        r"row 55 of dataset 'vgg_features' \(modality 'image'\) holds inf in column 100",
    ),
}


@pytest.mark.parametrize('case', BAD_FILES)
def test_bad_file_is_refused_naming_file_row_and_field(tmp_path, arrays, case):
    edit, message = BAD_FILES[case]
    bad = {k: v.copy() for k, v in arrays.items()}
    edit(bad)
    manual_dir = write_hdf5(tmp_path / 'manual', bad)
    config = data_config(tmp_path / 'tfds', manual_dir)
    with pytest.raises(ValueError) as e:
        input_pipeline.get_dataset_info(config)
    assert str(e.value).startswith(f'{tmp_path / "manual" / mm_imdb.FILE_NAME}')
    assert e.match(message)
    assert not mm_imdb.Builder(data_dir=str(tmp_path / 'tfds'), file_format='array_record').is_prepared()


@pytest.mark.parametrize(
    'rows, message',
    [
        (None, r'holds 60 rows and no Fuel split table .*expected the 25,959 rows'),
        ({'train': (0, 36), 'validation': (36, 48), 'test': (48, 59)}, r'covering all 60 rows'),
        ({'train': (0, 36), 'validation': (40, 48), 'test': (48, 60)}, r'contiguous'),
        ({'train': (0, 0), 'validation': (0, 48), 'test': (48, 60)}, r'non-empty'),
    ],
)
def test_split_table_must_place_every_row(tmp_path, arrays, rows, message):
    manual_dir = write_hdf5(tmp_path / 'manual', arrays, rows=rows)
    with pytest.raises(ValueError, match=message):
        input_pipeline.get_dataset_info(data_config(tmp_path / 'tfds', manual_dir))


def test_split_rows_of_the_published_file():
    assert mm_imdb.split_rows(25959) == {
        'train': (0, 15552),
        'validation': (15552, 18160),
        'test': (18160, 25959),
    }
    sources = ['features', 'genres', 'images', 'vgg_features']
    assert mm_imdb.split_rows(25959, fuel_split_table(mm_imdb.SPLITS, sources)) == mm_imdb.SPLITS
    other = {'train': (0, 15000), 'validation': (15000, 18160), 'test': (18160, 25959)}
    with pytest.raises(ValueError, match=r'expected those of the published MM-IMDB file'):
        mm_imdb.split_rows(25959, fuel_split_table(other, sources))
    table = fuel_split_table(mm_imdb.SPLITS, sources)
    table[1]['stop'] = 15000  # the 'genres' row of 'train' disagrees with 'features'
    with pytest.raises(ValueError, match=r"split 'train' rows \(0, 15552\) of 'features' but \(0, 15000\)"):
        mm_imdb.split_rows(25959, table)


def test_class_names_come_from_the_file(tmp_path, arrays):
    names = tuple(reversed(mm_imdb.GENRES))
    write_hdf5(tmp_path / 'a', arrays, target_names=names)
    assert mm_imdb.load(tmp_path / 'a' / mm_imdb.FILE_NAME).class_names == names
    write_hdf5(tmp_path / 'b', arrays, target_names=None)
    assert mm_imdb.load(tmp_path / 'b' / mm_imdb.FILE_NAME).class_names == mm_imdb.GENRES
    write_hdf5(tmp_path / 'c', arrays, target_names=mm_imdb.GENRES[:22])
    with pytest.raises(ValueError, match=r"attribute 'target_names' of 'genres' is .*expected 23 distinct"):
        mm_imdb.load(tmp_path / 'c' / mm_imdb.FILE_NAME)


@pytest.mark.parametrize(
    'arg',
    [
        '',
        'tiny',
        'variant=baseline',
        'variant=refiner',
        'fusion=transformer',
        'only=image',
        'variant=pretrain',
    ],
)
def test_config_variants(arg):
    config = mm_imdb_config.get_config(arg)
    assert config.data.name == 'mm_imdb'
    assert set(config.model.encoders) == set(config.data.modalities)
    assert set(config.loss.refiner_weights) == set(config.data.modalities)
    if arg == '':
        assert config.model.fusion.kind == 'concat' and config.data.modalities == ('text', 'image')
        assert (
            dict(config.loss.refiner_weights) == {'text': 0.1, 'image': 0.1} and config.loss.ms_weight == 0.1
        )
        assert config.model.encoders.image.to_dict() == {
            'module': None,
            'hidden': (512,),
            'embed_dim': 128,
            'init_from': None,
        }
    if arg == 'variant=baseline':
        assert set(config.loss.refiner_weights.values()) == {0.0} and config.loss.ms_weight == 0.0


@pytest.mark.slow
def test_tiny_config_trains_and_reports_sklearn_f1(prepared, tmp_path):
    config = tiny_config(*prepared)
    config.train.num_steps = 2
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 2 and np.isfinite(results['train']['loss'])

    # The same predictions again, from the final checkpoint, scored by scikit-learn.
    info = input_pipeline.get_dataset_info(config.data)
    params = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints').restore_params()
    model = model_lib.create_model(config, info)
    for key, split in (('val', 'validation'), ('test', 'test')):
        assert results[key]['num_examples'] == 12
        logits, labels, mask = [], [], []
        for batch in input_pipeline.eval_batches(config, split):
            out, _ = model.apply({'params': params}, batch, train=False, with_refiner=False)
            logits.append(np.asarray(out, np.float64))
            labels.append(batch['label'])
            mask.append(batch['mask'])
        mask = np.concatenate(mask)
        logits, labels = np.concatenate(logits)[mask], np.concatenate(labels)[mask]
        preds = (1.0 / (1.0 + np.exp(-logits)) > 0.5).astype(np.int32)
        assert 0 < preds.sum() < preds.size  # neither all positive nor all negative: a real test of F1
        for average in F1_AVERAGES:
            expected = f1_score(labels, preds, average=average, zero_division=0)
            assert results[key][f'{average}_f1'] == pytest.approx(expected, abs=1e-9), (key, average)
