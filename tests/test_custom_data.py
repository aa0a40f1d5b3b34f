"""Tests of the own-data path (refnet_jax/data/datasets/custom.py, configs/custom.py, the README's "Your own data").

Fixtures are small directories written here: arrays (`train.npz`, ...) with a modality of every kind, and a CSV
table with feature and token columns, image files, class names and a split column. A test that changes the
modalities patches `MODALITIES` of configs/custom.py, which is the edit a user makes in their copy.
"""

import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from helpers import doc_blocks, run_readme_bash, stored_records
from PIL import Image

from configs import custom as custom_config
from refnet_jax.data import contract, input_pipeline, splits
from refnet_jax.data.datasets import custom
from refnet_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = {'image': 'image', 'tokens': 'tokens', 'series': 'series', 'features': 'features'}
SHAPES = {'image': (8, 8, 3), 'tokens': (6,), 'series': (10, 2), 'features': (5,)}
NUM_CLASSES = 3


def make_config(manual_dir, data_dir, kinds=None, arg='tiny', **data):
    """configs/custom.py:<arg> with `MODALITIES` = `kinds` (default: the fixture's), reading `manual_dir`."""
    with mock.patch.object(custom_config, 'MODALITIES', dict(kinds or KINDS)):
        config = custom_config.get_config(arg)
    config.data.manual_dir = str(manual_dir)
    config.data.data_dir = str(data_dir)
    for k, v in data.items():
        config.data[k] = v
    return config


def arrays(n, seed=0, num_classes=NUM_CLASSES) -> dict[str, np.ndarray]:
    """A modality of every kind with `n` rows, and labels 0..num_classes-1 in turn."""
    rng = np.random.default_rng(seed)
    return {
        'image': rng.integers(0, 256, (n, *SHAPES['image']), dtype=np.uint8),
        'tokens': rng.integers(0, 9, (n, *SHAPES['tokens'])),
        'series': rng.normal(3.0, 2.0, (n, *SHAPES['series'])),
        'features': rng.normal(-1.0, 5.0, (n, *SHAPES['features'])).astype(np.float32),
        'label': np.arange(n) % num_classes,
    }


def write_arrays(root, sizes=None, seed=0) -> dict[str, dict[str, np.ndarray]]:
    """Writes `<split>.npz` per entry of `sizes` (default: train alone, 90 rows) into `root`."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, (split, n) in enumerate((sizes or {'train': 90}).items()):
        written[split] = arrays(n, seed=seed + k)
        np.savez(root / f'{split}.npz', **written[split])
    return written


def records(config) -> dict[str, dict[str, np.ndarray]]:
    return stored_records(config.data)


def prepared(config):
    return input_pipeline._prepared_builder(config.data)[1]


@pytest.fixture(scope='module')
def arrays_dir(tmp_path_factory):
    """Train alone (90 rows), prepared once: (manual_dir, data_dir, written)."""
    manual_dir = tmp_path_factory.mktemp('arrays') / 'my data'
    written = write_arrays(manual_dir)
    data_dir = tmp_path_factory.mktemp('arrays_tfds')
    input_pipeline.get_dataset_info(make_config(manual_dir, data_dir).data)
    return manual_dir, data_dir, written


# --- The README's worked example ---


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks between the own-data markers of docs/how-to/own-data.md."""
    return doc_blocks('how-to/own-data.md', 'own-data')


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ['python', 'bash']
    # The commands run from the repository root: give them its train.py and configs/ in a scratch directory.
    for name in ('train.py', 'configs'):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(
        os.environ,
        PATH=f'{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}',  # `python` is this one
        JAX_PLATFORMS='cpu',
        XLA_FLAGS='',  # one device, for speed
        TFDS_DATA_DIR=str(tmp_path / 'tensorflow_datasets'),
    )
    for lang, code in blocks:
        cmd = [sys.executable, '-c', code] if lang == 'python' else ['bash', '-eo', 'pipefail', '-c', code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (
            f'{lang} block failed:\n{code}\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}'
        )
    results = json.loads((tmp_path / 'runs' / 'my_data' / 'results.json').read_text())
    assert results['test']['num_examples'] == 60 and results['val']['num_examples'] == 60
    # 4 classes: chance is 0.25, and either modality alone tells apart 2 of them (0.5).
    assert results['test']['accuracy'] >= 0.9, results
    assert [name.startswith('my_data_') for name in prepared_copies(tmp_path / 'tensorflow_datasets')] == [
        True
    ]


# --- Arrays ---


def test_arrays_dataset_info(arrays_dir):
    manual_dir, data_dir, written = arrays_dir
    config = make_config(manual_dir, data_dir)
    info = input_pipeline.get_dataset_info(config.data)
    assert info.name == 'custom'
    assert info.modalities == {
        'image': contract.ModalityInfo(kind='image', shape=(8, 8, 3), dtype=np.uint8),
        'tokens': contract.ModalityInfo(
            kind='tokens', shape=(6,), dtype=np.int32, vocab_size=int(written['train']['tokens'].max()) + 1
        ),
        'series': contract.ModalityInfo(kind='series', shape=(10, 2), dtype=np.float32),
        'features': contract.ModalityInfo(kind='features', shape=(5,), dtype=np.float32),
    }
    assert info.num_classes == NUM_CLASSES and not info.multi_label
    assert info.class_names == ('0', '1', '2')
    # 30 rows per class: 3 validation and 3 test rows each (0.1 of 30).
    assert info.num_examples == {'train': 72, 'validation': 9, 'test': 9}
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    contract.check_batch(batch, info)
    assert batch['label'].shape == (16,) and batch['series'].shape == (16, 10, 2)


def test_records_keep_their_rows_and_are_standardized_with_train_statistics(arrays_dir):
    manual_dir, data_dir, written = arrays_dir
    config = make_config(manual_dir, data_dir)
    stored = records(config)
    source = written['train']
    train_rows = stored['train']['row']
    assert sorted(np.concatenate([s['row'] for s in stored.values()]).tolist()) == list(range(90))
    for split in stored.values():
        rows = split['row']
        assert (np.diff(rows) > 0).all()  # file order
        np.testing.assert_array_equal(split['label'], source['label'][rows])
        np.testing.assert_array_equal(split['image'], source['image'][rows])
        np.testing.assert_array_equal(split['tokens'], source['tokens'][rows])
        # An independent reference: statistics of the train rows, per feature and per channel.
        features = source['features'][train_rows].astype(np.float64)
        expected = (source['features'][rows] - features.mean(0)) / features.std(0)
        np.testing.assert_allclose(split['features'], expected, rtol=1e-5, atol=1e-5)
        series = source['series'][train_rows].reshape(-1, 2)
        expected = (source['series'][rows] - series.mean(0)) / series.std(0)
        np.testing.assert_allclose(split['series'], expected, rtol=1e-5, atol=1e-5)
    assert abs(stored['train']['series'].mean()) < 1e-5 and abs(stored['train']['series'].std() - 1) < 1e-4
    stats = prepared(config).info.metadata['standardization']
    np.testing.assert_allclose(stats['features']['mean'], source['features'][train_rows].mean(0), rtol=1e-5)


def test_without_standardization_values_are_stored_as_given(arrays_dir, tmp_path):
    manual_dir, _, written = arrays_dir
    stored = records(make_config(manual_dir, tmp_path, standardize=False))
    rows = stored['test']['row']
    np.testing.assert_allclose(stored['test']['series'], written['train']['series'][rows], rtol=1e-6)


def test_drawn_split_is_stratified_seeded_and_deterministic():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    fractions = {'validation': 0.2, 'test': 0.1}
    # The draw of config.data.split for the splits not given (custom_values.fill_splits).
    a = splits.stratified_split(labels, 0, fractions=fractions, rest='train')
    assert {k: np.bincount(labels[v], minlength=3).tolist() for k, v in a.items()} == {
        'train': [35, 21, 14],
        'validation': [10, 6, 4],
        'test': [5, 3, 2],
    }
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))  # disjoint, all rows
    b = splits.stratified_split(labels, 0, fractions=fractions, rest='train')
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = splits.stratified_split(labels, 1, fractions=fractions, rest='train')
    assert not np.array_equal(a['test'], c['test'])
    # Multi-hot labels: unstratified, the same sizes.
    d = splits.stratified_split(np.zeros((100, 4), np.int32), 0, fractions=fractions, rest='train')
    assert {k: len(v) for k, v in d.items()} == {'train': 70, 'validation': 20, 'test': 10}


def test_split_seed_and_fractions_come_from_the_config(arrays_dir, tmp_path):
    manual_dir, data_dir, _ = arrays_dir
    default = records(make_config(manual_dir, data_dir))
    other = make_config(manual_dir, tmp_path, split=(0.6, 0.2, 0.2), split_seed=5)
    info = input_pipeline.get_dataset_info(other.data)
    assert info.num_examples == {'train': 54, 'validation': 18, 'test': 18}
    assert not np.array_equal(records(other)['test']['row'], default['test']['row'])


def test_given_splits_are_used_as_they_are(tmp_path):
    written = write_arrays(tmp_path / 'data', {'train': 40, 'validation': 7, 'test': 11})
    config = make_config(tmp_path / 'data', tmp_path / 'tfds')
    info = input_pipeline.get_dataset_info(config.data)
    assert info.num_examples == {'train': 40, 'validation': 7, 'test': 11}
    stored = records(config)
    for split, n in info.num_examples.items():
        assert stored[split]['row'].tolist() == list(range(n))
        np.testing.assert_array_equal(stored[split]['tokens'], written[split]['tokens'])
    # Only test given: validation is drawn from train (0.1 of each class's 14, 13, 13 rows), test is the file.
    (tmp_path / 'data' / 'validation.npz').unlink()
    info = input_pipeline.get_dataset_info(make_config(tmp_path / 'data', tmp_path / 'tfds').data)
    assert info.num_examples == {'train': 37, 'validation': 3, 'test': 11}


def test_multi_hot_labels(tmp_path):
    data = arrays(30)
    data['label'] = (np.random.default_rng(0).random((30, 4)) < 0.5).astype(np.int8)
    (tmp_path / 'data').mkdir()
    np.savez(tmp_path / 'data' / 'train.npz', **data)
    config = make_config(tmp_path / 'data', tmp_path / 'tfds')
    info = input_pipeline.get_dataset_info(config.data)
    assert info.multi_label and info.num_classes == 4
    stored = records(config)
    np.testing.assert_array_equal(stored['test']['label'], data['label'][stored['test']['row']])


# --- A table ---

TABLE_KINDS = {'photo': 'image', 'words': 'tokens', 'meta': 'features'}
CLASS_NAMES = ('cat', 'dog')


def write_table(root, n=24, image_size=(12, 20)) -> dict:
    """`data.csv`: meta_0..meta_2, w0..w3 (tokens), photo (paths under img/), kind (class names), part (split)."""
    rng = np.random.default_rng(0)
    (root / 'img').mkdir(parents=True)
    colours = rng.integers(0, 256, (n, 3))
    meta = rng.normal(size=(n, 3))
    words = rng.integers(0, 7, (n, 4))
    labels = [CLASS_NAMES[i % 2] for i in range(n)]
    parts = ['validation' if i % 6 == 5 else 'train' for i in range(n)]
    lines = ['id,meta_0,meta_1,meta_2,w0,w1,w2,w3,photo,kind,part']
    for i in range(n):
        Image.fromarray(np.broadcast_to(colours[i], (*image_size, 3)).astype(np.uint8)).save(
            root / 'img' / f'{i}.png'
        )
        fields = [
            f'{i}',
            *(f'{v:.17g}' for v in meta[i]),
            *map(str, words[i]),
            f'img/{i}.png',
            labels[i],
            parts[i],
        ]
        lines.append(','.join(fields))
    (root / 'data.csv').write_text('\n'.join(lines) + '\n')
    return {'colours': colours, 'meta': meta, 'words': words, 'labels': labels, 'parts': parts}


def table_config(root, data_dir, **data):
    fields = dict(
        table='data.csv',
        columns={'photo': 'photo', 'words': ('w0', 'w1', 'w2', 'w3'), 'meta': 'meta_*'},
        label='kind',
        split_column='part',
        image_size=16,
        standardize=False,
    )
    return make_config(root, data_dir, TABLE_KINDS, **{**fields, **data})


def test_table(tmp_path):
    written = write_table(tmp_path / 'table')
    config = table_config(tmp_path / 'table', tmp_path / 'tfds')
    info = input_pipeline.get_dataset_info(config.data)
    assert info.modalities == {
        'photo': contract.ModalityInfo(kind='image', shape=(16, 16, 3), dtype=np.uint8),
        'words': contract.ModalityInfo(
            kind='tokens', shape=(4,), dtype=np.int32, vocab_size=int(written['words'].max()) + 1
        ),
        'meta': contract.ModalityInfo(kind='features', shape=(3,), dtype=np.float32),
    }
    assert info.class_names == CLASS_NAMES and info.num_classes == 2
    # The split column gives train (20 rows) and validation (4); test, absent, is drawn from train.
    assert info.num_examples == {'train': 18, 'validation': 4, 'test': 2}
    stored = records(config)
    assert stored['validation']['row'].tolist() == [5, 11, 17, 23]
    for split in stored.values():
        rows = split['row']
        np.testing.assert_allclose(split['meta'], written['meta'][rows], rtol=1e-6)
        np.testing.assert_array_equal(split['words'], written['words'][rows])
        assert split['label'].tolist() == [CLASS_NAMES.index(written['labels'][r]) for r in rows]
        # A solid colour stays that colour when resized to 16 x 16.
        np.testing.assert_array_equal(
            split['photo'], np.broadcast_to(written['colours'][rows][:, None, None], (len(rows), 16, 16, 3))
        )
    batch = next(iter(input_pipeline.eval_batches(config, 'validation')))
    contract.check_batch(batch, info)


def test_table_labels_are_class_names_or_ids(tmp_path):
    write_table(tmp_path / 'table')
    config = table_config(tmp_path / 'table', tmp_path / 'tfds', class_names=('dog', 'cat'))
    assert input_pipeline.get_dataset_info(config.data).class_names == ('dog', 'cat')
    stored = records(config)['validation']  # rows 5, 11, 17, 23: all 'dog'
    assert stored['label'].tolist() == [0, 0, 0, 0]
    path = tmp_path / 'table' / 'data.csv'
    path.write_text(path.read_text().replace(',cat,', ',0,').replace(',dog,', ',1,'))
    config = table_config(tmp_path / 'table', tmp_path / 'tfds')
    assert input_pipeline.get_dataset_info(config.data).class_names == ('0', '1')
    assert records(config)['validation']['label'].tolist() == [1, 1, 1, 1]


# --- Bad data: each error names the file, the example (row) and the field ---


def prepare_error(config, error=ValueError) -> str:
    with pytest.raises(error) as e:
        input_pipeline.get_dataset_info(config.data)
    return str(e.value)


def test_missing_directory_and_files(tmp_path):
    config = make_config(tmp_path / 'nowhere', tmp_path / 'tfds')
    message = prepare_error(config, FileNotFoundError)
    assert (
        'config.data.manual_dir' in message
        and str(tmp_path / 'nowhere') in message
        and 'train.npz' in message
    )
    config.data.manual_dir = None
    assert 'config.data.manual_dir is not set' in prepare_error(config)
    (tmp_path / 'empty').mkdir()
    message = prepare_error(make_config(tmp_path / 'empty', tmp_path / 'tfds'), FileNotFoundError)
    assert f'{tmp_path / "empty"} holds no train.npz' in message
    message = prepare_error(
        make_config(tmp_path / 'empty', tmp_path / 'tfds', table='data.csv'), FileNotFoundError
    )
    assert f'no file {tmp_path / "empty" / "data.csv"}' in message


def test_missing_array(tmp_path):
    (tmp_path / 'data').mkdir()
    np.savez(tmp_path / 'data' / 'train.npz', **{k: v for k, v in arrays(9).items() if k != 'series'})
    message = prepare_error(make_config(tmp_path / 'data', tmp_path / 'tfds'))
    assert f"{tmp_path / 'data' / 'train.npz'} lacks array 'series'" in message


def test_rows_that_disagree(tmp_path):
    (tmp_path / 'data').mkdir()
    data = arrays(9)
    data['series'] = data['series'][:8]
    np.savez(tmp_path / 'data' / 'train.npz', **data)
    message = prepare_error(make_config(tmp_path / 'data', tmp_path / 'tfds'))
    assert (
        f"{tmp_path / 'data' / 'train.npz'}: array 'series' has shape (8, 10, 2), 8 rows, but 'label' has 9"
        in message
    )


def test_item_shapes_that_disagree_across_files(tmp_path):
    write_arrays(tmp_path / 'data', {'train': 9, 'test': 6})
    data = arrays(6)
    data['features'] = data['features'][:, :4]
    np.savez(tmp_path / 'data' / 'test.npz', **data)
    message = prepare_error(make_config(tmp_path / 'data', tmp_path / 'tfds'))
    assert (
        f"{tmp_path / 'data' / 'test.npz'}: array 'features' has items of shape (4,), but those of" in message
    )


def test_items_that_do_not_fit_their_kind(tmp_path):
    (tmp_path / 'data').mkdir()
    data = arrays(9)
    data['series'] = data['series'][..., 0]  # (N, T): the channel axis is missing
    np.savez(tmp_path / 'data' / 'train.npz', **data)
    message = prepare_error(make_config(tmp_path / 'data', tmp_path / 'tfds'))
    assert (
        "array 'series' holds float64 items of shape (10,); config.data.kinds.series='series' expects"
        in message
    )
    assert 'x[..., None]' in message


def test_labels_outside_the_declared_classes(tmp_path):
    (tmp_path / 'data').mkdir()
    data = arrays(9)
    data['label'][7] = 3
    np.savez(tmp_path / 'data' / 'train.npz', **data)
    message = prepare_error(make_config(tmp_path / 'data', tmp_path / 'tfds', num_classes=3))
    assert (
        f"{tmp_path / 'data' / 'train.npz'} row 7: label 'label' is 3; expected a class id in [0, 3)"
        in message
    )
    data['label'][7] = -1
    np.savez(tmp_path / 'data' / 'train.npz', **data)
    message = prepare_error(make_config(tmp_path / 'data', tmp_path / 'tfds'))
    assert 'train.npz row 7: label' in message and 'is -1' in message


def test_table_label_that_is_not_a_class_name(tmp_path):
    write_table(tmp_path / 'table')
    text = (tmp_path / 'table' / 'data.csv').read_text().replace(',cat,train', ',cta,train', 1)
    (tmp_path / 'table' / 'data.csv').write_text(text)
    config = table_config(tmp_path / 'table', tmp_path / 'tfds', class_names=CLASS_NAMES)
    message = prepare_error(config)
    assert f"{tmp_path / 'table' / 'data.csv'} row 0 (line 2): column 'kind' (the label) is 'cta'" in message


def test_a_split_too_small_to_draw(arrays_dir, tmp_path):
    manual_dir, _, _ = arrays_dir
    message = prepare_error(make_config(manual_dir, tmp_path, split=(0.98, 0.01, 0.01)))
    assert "config.data.split=(0.98, 0.01, 0.01) leaves split 'validation' empty" in message
    assert f'{manual_dir / "train.npz"} gives 90 train rows' in message


def test_nan_is_refused_naming_file_row_and_field(tmp_path):
    (tmp_path / 'my_data').mkdir()
    data = arrays(30)
    data['features'][17, 3] = np.nan
    np.savez(tmp_path / 'my_data' / 'train.npz', **data)
    message = prepare_error(make_config(tmp_path / 'my_data', tmp_path / 'tfds'))
    # What the README shows.
    assert message.endswith(
        "my_data/train.npz row 17: array 'features' at [3] is nan; expected a finite number "
        "(config.data.nan='zero' replaces non-finite values with 0)"
    )


def test_nan_is_zeroed_when_configured(tmp_path):
    (tmp_path / 'data').mkdir()
    data = arrays(30)
    data['series'][4, 2, 1] = np.inf
    data['series'][5, 0, 0] = np.nan
    np.savez(tmp_path / 'data' / 'train.npz', **data)
    config = make_config(tmp_path / 'data', tmp_path / 'tfds', nan='zero', standardize=False)
    stored = records(config)
    every = {k: np.concatenate([s[k] for s in stored.values()]) for k in ('row', 'series')}
    series = every['series'][np.argsort(every['row'])]
    assert series[4, 2, 1] == 0 and series[5, 0, 0] == 0 and np.isfinite(series).all()
    assert prepared(config).info.metadata['non_finite_zeroed'] == {'series': 2, 'features': 0}


def test_table_bad_cells(tmp_path):
    write_table(tmp_path / 'table')
    path = tmp_path / 'table' / 'data.csv'
    lines = path.read_text().splitlines()
    good = list(lines)
    cells = lines[4].split(',')
    cells[2] = ''  # meta_1 of row 2: empty
    lines[4] = ','.join(cells)
    path.write_text('\n'.join(lines) + '\n')
    message = prepare_error(table_config(tmp_path / 'table', tmp_path / 'tfds'))
    assert f"{path} row 3 (line 5): column 'meta_1' is nan; expected a finite number" in message
    cells[2], cells[5] = '0.5', 'x'  # w1 of row 3: not an id
    lines[4] = ','.join(cells)
    path.write_text('\n'.join(lines) + '\n')
    message = prepare_error(table_config(tmp_path / 'table', tmp_path / 'tfds'))
    assert f"{path} row 3 (line 5): column 'w1' is 'x'; modality 'words' of kind 'tokens' expects" in message
    path.write_text('\n'.join([*good, '1,2,3']) + '\n')
    message = prepare_error(table_config(tmp_path / 'table', tmp_path / 'tfds'))
    assert f'{path} line 26: 3 fields, but the header has 11' in message
    path.write_text('\n'.join(good) + '\n')
    columns = {'photo': 'photo', 'words': 'w*', 'meta': 'meta_*'}
    message = prepare_error(table_config(tmp_path / 'table', tmp_path / 'tfds', columns=columns, label='w3'))
    assert f"{path}: column 'w3' is used by modality 'words' and the labels (config.data.label)" in message


def test_missing_and_corrupt_images(tmp_path):
    write_table(tmp_path / 'table')
    config = table_config(tmp_path / 'table', tmp_path / 'tfds')
    (tmp_path / 'table' / 'img' / '7.png').unlink()
    message = prepare_error(config, FileNotFoundError)
    table = tmp_path / 'table' / 'data.csv'
    assert (
        f"{table} row 7 (line 9): column 'photo': image file {tmp_path / 'table' / 'img' / '7.png'} not found"
        in message
    )
    (tmp_path / 'table' / 'img' / '7.png').write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
    message = prepare_error(config)
    assert (
        f"{table} row 7 (line 9): column 'photo': image {tmp_path / 'table' / 'img' / '7.png'} cannot be decoded"
        in message
    )
    assert not prepared_copies(tmp_path / 'tfds')


# --- Preparing once ---


def prepared_copies(data_dir) -> list[str]:
    """The complete prepared copies under `data_dir` (an interrupted one would be an `incomplete.*` folder)."""
    root = pathlib.Path(data_dir) / 'custom'
    return (
        sorted(p.name for p in root.iterdir() if (p / '1.0.0' / 'dataset_info.json').exists())
        if root.exists()
        else []
    )


def test_preparing_twice_reuses_the_prepared_copy_and_edits_prepare_a_new_one(tmp_path, monkeypatch):
    write_arrays(tmp_path / 'data', {'train': 30})
    config = make_config(tmp_path / 'data', tmp_path / 'tfds')
    first = prepared(config)
    assert prepared_copies(tmp_path / 'tfds') == [first.builder_config.name]
    info_file = first.data_path / 'dataset_info.json'
    mtime = os.stat(info_file).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError('prepared again')

    with monkeypatch.context() as m:
        m.setattr(custom.Builder, '_split_generators', fail)
        again = prepared(make_config(tmp_path / 'data', tmp_path / 'tfds'))
    assert again.data_path == first.data_path and os.stat(info_file).st_mtime_ns == mtime

    # Editing the data prepares a new copy with the new values; the config's data fields count too.
    written = write_arrays(tmp_path / 'data', {'train': 30}, seed=7)
    edited = prepared(config)
    assert edited.data_path != first.data_path
    stored = records(config)['train']
    np.testing.assert_array_equal(stored['tokens'], written['train']['tokens'][stored['row']])
    other = prepared(make_config(tmp_path / 'data', tmp_path / 'tfds', split_seed=1))
    assert len(prepared_copies(tmp_path / 'tfds')) == 3 and other.data_path not in (
        first.data_path,
        edited.data_path,
    )


def test_an_interrupted_preparation_is_never_used(tmp_path, monkeypatch):
    write_arrays(tmp_path / 'data', {'train': 30})
    config = make_config(tmp_path / 'data', tmp_path / 'tfds')
    generate = custom.Builder._generate_examples

    def interrupted(self, *args):
        for k, example in enumerate(generate(self, *args)):
            if k == 3:
                raise KeyboardInterrupt
            yield example

    with monkeypatch.context() as m:
        m.setattr(custom.Builder, '_generate_examples', interrupted)
        with pytest.raises(KeyboardInterrupt):
            input_pipeline.get_dataset_info(config.data)
    assert prepared_copies(tmp_path / 'tfds') == []
    info = input_pipeline.get_dataset_info(config.data)
    assert sum(info.num_examples.values()) == 30


# --- Training ---


@pytest.mark.slow
def test_train_and_evaluate_on_own_data(arrays_dir, tmp_path):
    # Two of the four modalities (the README's run covers series and features): image and tokens.
    manual_dir, data_dir, _ = arrays_dir
    config = make_config(manual_dir, data_dir, arg='tiny,only=image+tokens')
    config.mesh.data = 1
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == config.train.num_steps
    assert results['test']['num_examples'] == 9 and results['val']['num_examples'] == 9
    assert np.isfinite(results['train']['loss'])
    assert {'refiner_loss/image', 'refiner_loss/tokens'} <= set(results['train'])
    assert json.loads((tmp_path / 'run' / 'results.json').read_text())['step'] == config.train.num_steps


# --- The own-data page's examples: image + text, text + text + numbers, regression; each run as written ---

DOC_EXAMPLES = {  # marker -> (workdir, the test metric and the least it reaches, or the most for an error)
    'own-data-image-text': ('runs/my_catalogue', 'accuracy', 0.95, None),
    'own-data-text-numbers': ('runs/my_reviews', 'accuracy', 0.9, None),
    'own-data-regression': ('runs/my_scores', 'mae', None, 0.2),
}


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize('marker', sorted(DOC_EXAMPLES))
def test_own_data_page_examples_run_as_written(marker, tmp_path):
    blocks = doc_blocks('how-to/own-data.md', marker)
    assert [lang for lang, _ in blocks] == ['python', 'bash']
    proc = subprocess.run(
        [sys.executable, '-c', blocks[0][1]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    run_readme_bash(blocks[1][1], tmp_path, tfds_dir=tmp_path / 'tensorflow_datasets', timeout=600)
    workdir, metric, least, most = DOC_EXAMPLES[marker]
    results = json.loads((tmp_path / workdir / 'results.json').read_text())
    value = results['test'][metric]
    assert (least is None or value >= least) and (most is None or value <= most), results['test']
    if marker == 'own-data-regression':  # selected by the lowest validation MAE
        assert results['selected']['metric'] == 'val/mae' and results['selected']['mode'] == 'min'
        assert results['test']['pearson_r'] > 0.95
