"""Tests of regression (config.data.task='regression'): real-valued labels (N,) or (N, K) from arrays and
tables, a linear head with a squared-error (or absolute-error) loss, the metrics MSE, MAE, Pearson's r and sign
accuracy against references, the MS loss refused before any work, selection by the lowest validation MAE, and a
generated regression table reaching the MAE of a least-squares fit on the same features."""

import csv
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
from helpers import stored_records

from refnet_jax import config_lib
from refnet_jax.data import contract, input_pipeline
from refnet_jax.train import metrics, objective, selection, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def regression_table(path: pathlib.Path, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CSV of 6 features x_0..x_5 and a score y = x @ w + 1 + noise (std 0.5); returns (x, y)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    y = x @ np.array([1.5, -2.0, 0.5, 0.0, 1.0, -0.7]) + 1.0 + rng.normal(0, 0.5, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([*(f'x_{j}' for j in range(6)), 'score'])
        writer.writerows([*xi, yi] for xi, yi in zip(x.tolist(), y.tolist(), strict=True))
    return x, y


def regression_config(manual_dir, data_dir, arg='kinds=x:features,variant=refiner', **data):
    config = config_lib.load_file(f'{ROOT / "configs" / "custom.py"}:{arg}')
    config.data.manual_dir, config.data.data_dir = str(manual_dir), str(data_dir)
    config.data.table, config.data.label, config.data.task = 'scores.csv', 'score', 'regression'
    for k, v in data.items():
        config.data[k] = v
    return config


def test_regression_metrics_agree_with_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    where = rng.random(50) < 0.8
    assert metrics.mean_squared_error(pred, true, where) == pytest.approx(
        sklearn.metrics.mean_squared_error(true[where], pred[where])
    )
    assert metrics.mean_absolute_error(pred, true, where) == pytest.approx(
        sklearn.metrics.mean_absolute_error(true[where], pred[where])
    )
    expected = np.mean([scipy.stats.pearsonr(pred[where, k], true[where, k])[0] for k in range(3)])
    assert metrics.pearson_r(pred, true, where) == pytest.approx(expected)
    # Sign accuracy: MultiBench's binary accuracy, examples with target 0 left out.
    p, t = pred[:, 0], np.where(np.abs(true[:, 0]) < 0.3, 0.0, true[:, 0])
    nonzero = t != 0
    assert metrics.sign_accuracy(p, t) == pytest.approx(
        sklearn.metrics.accuracy_score(t[nonzero] > 0, p[nonzero] > 0)
    )


def test_regression_table_is_prepared_as_float_targets(tmp_path):
    x, y = regression_table(tmp_path / 'data' / 'scores.csv')
    config = regression_config(tmp_path / 'data', tmp_path / 'tfds', standardize=False)
    info = input_pipeline.get_dataset_info(config.data)
    assert info.task == 'regression' and info.num_classes == 1 and info.class_names == ('score',)
    assert not info.multi_label
    # Splits are drawn at random (no classes to stratify on), sizes as for one class.
    assert info.num_examples == {'train': 320, 'validation': 40, 'test': 40}
    stored = stored_records(config.data)
    for split in stored.values():
        np.testing.assert_allclose(split['label'], y[split['row']][:, None].astype(np.float32))
        np.testing.assert_allclose(split['x'], x[split['row']], rtol=1e-6)
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    contract.check_batch(batch, info)
    assert batch['label'].dtype == np.float32 and batch['label'].shape == (64, 1)


def test_arrays_with_several_targets(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / 'data').mkdir()
    np.savez(tmp_path / 'data' / 'train.npz', x=rng.normal(size=(50, 4)), label=rng.normal(size=(50, 2)))
    config = config_lib.load_file(f'{ROOT / "configs" / "custom.py"}:kinds=x:features,variant=refiner')
    config.data.manual_dir, config.data.data_dir, config.data.task = (
        str(tmp_path / 'data'),
        str(tmp_path / 'tfds'),
        'regression',
    )
    info = input_pipeline.get_dataset_info(config.data)
    assert info.num_classes == 2 and info.class_names == ('label_0', 'label_1')
    labels = np.load(tmp_path / 'data' / 'train.npz')['label']
    labels[3, 1] = np.nan
    np.savez(tmp_path / 'data' / 'train.npz', x=rng.normal(size=(50, 4)), label=labels)
    with pytest.raises(
        ValueError, match=r"train.npz row 3: label 'label' at \[1\] is nan; expected a finite number"
    ):
        input_pipeline.get_dataset_info(config.data)


def test_a_label_that_is_not_a_number(tmp_path):
    regression_table(tmp_path / 'data' / 'scores.csv')
    path = tmp_path / 'data' / 'scores.csv'
    lines = path.read_text().splitlines()
    lines[6] = lines[6].rsplit(',', 1)[0] + ',high'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError) as e:
        input_pipeline.get_dataset_info(regression_config(tmp_path / 'data', tmp_path / 'tfds').data)
    assert str(e.value) == (
        f"{path} row 5 (line 7): column 'score' (the label) is 'high'; config.data.task='regression' expects a "
        'finite number'
    )
    assert not (tmp_path / 'tfds' / 'custom').exists() or not any(
        (tmp_path / 'tfds' / 'custom').rglob('dataset_info.json')
    )


def test_ms_loss_and_class_losses_are_refused_before_any_work(tmp_path, monkeypatch):
    config = regression_config(tmp_path / 'nowhere', tmp_path / 'tfds', arg='kinds=x:features')
    assert config.loss.ms_weight > 0  # the default refnet variant

    def read(*args, **kwargs):
        raise AssertionError('the data were read')

    monkeypatch.setattr(input_pipeline, 'get_dataset_info', read)
    with pytest.raises(
        ValueError,
        match=r"config.loss.ms_weight is 0.1 with config.data.task='regression'; the Multi-Similarity loss needs "
        'classes',
    ):
        trainer.build(config, init=False)
    classes = config_lib.load_file(f'{ROOT / "configs" / "custom.py"}:kinds=x:features')
    classes.loss.task = 'l1'
    with pytest.raises(
        ValueError,
        match=r"config.loss.task is 'l1', a regression loss, but config.data.task is 'classification'",
    ):
        trainer.build(classes, init=False)


def test_regression_objective():
    config = regression_config('.', '.')
    config.loss.task = 'l1'
    config.eval.sign_accuracy = True
    obj = objective.Supervised(config)
    assert obj.regression and obj.metric_names(1) == ('mae', 'mse', 'pearson_r', 'loss', 'sign_accuracy')
    with pytest.raises(ValueError, match='the data have 2 regression targets'):
        obj.metric_names(2)
    pred, y = jnp.array([[1.0], [2.0], [0.0]]), jnp.array([[2.0], [-1.0], [5.0]])
    np.testing.assert_allclose(obj.task_loss(pred, y, jnp.array([True, True, False])), [1.0, 3.0, 0.0])
    config.loss.task = 'auto'
    np.testing.assert_allclose(objective.Supervised(config).task_loss(pred, y, None), [1.0, 9.0, 25.0])
    out = obj.split_metrics({'logits': np.asarray(pred), 'label': np.asarray(y), 'loss': np.zeros(3)})
    assert (
        out['mae'] == pytest.approx(3.0)
        and out['mse'] == pytest.approx(35 / 3)
        and out['sign_accuracy'] == pytest.approx(1 / 3)
    )
    # Selection by the validation MAE picks its minimum ('auto').
    config.train.select = 'val/mae'
    assert selection.Selection.from_config(config).mode == 'min'


@pytest.mark.slow(seconds=60)
def test_a_regression_table_reaches_the_mae_of_least_squares(tmp_path):
    x, y = regression_table(tmp_path / 'data' / 'scores.csv', n=5000)  # enough rows not to learn the noise
    config = regression_config(tmp_path / 'data', tmp_path / 'tfds')
    config.mesh.data = 1
    config.train.num_steps = 600
    config.train.eval_every_steps = 200
    config.train.select = 'val/mae'
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    stored = stored_records(config.data)
    train, test = stored['train']['row'], stored['test']['row']
    design = np.c_[x, np.ones(len(x))]
    w, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
    least_squares = np.mean(np.abs(design[test] @ w - y[test]))  # about 0.4: the noise's
    assert results['test']['mae'] <= least_squares * 1.05, (results['test'], least_squares)
    assert results['test']['pearson_r'] > 0.98
    assert results['selected']['step'] in (200, 400, 600) and results['selected']['mode'] == 'min'
