"""Latent-graph analysis: each metric against an independent reference, the pictures, then `inference.collect`
and tools/analyze.py on a tiny trained easy-VQA run."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import one_cpu_env, tiny_config
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score, silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from refnet_jax import config_lib
from refnet_jax.analysis import graph
from refnet_jax.train import inference, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_CPU = one_cpu_env()  # Subprocesses: one device, compiled quickly.


def blobs(n=240, dim=8, num_classes=4, separation=2.0, seed=0):
    """(z, y): Gaussian points, each class shifted along its own axis."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    z = rng.normal(size=(n, dim))
    z[:, :num_classes] += separation * np.eye(num_classes)[y]
    return z, y


def brute_knn(z, k):
    """Neighbours by a loop over pairs: decreasing cosine similarity, then increasing index; self excluded."""
    x = [row / np.linalg.norm(row) if np.linalg.norm(row) > 0 else row for row in np.asarray(z, float)]
    out = []
    for i in range(len(x)):
        ranked = sorted((-float(np.dot(x[i], x[j])), j) for j in range(len(x)) if j != i)
        out.append([j for _, j in ranked[:k]])
    return np.array(out)


def brute_knn_accuracy(neighbours, labels):
    """Majority label of the neighbours; a tie goes to the tied label met first in the neighbour list."""
    correct = 0
    for i, row in enumerate(neighbours):
        votes = collections.Counter(labels[j] for j in row)
        best = max(votes.values())
        predicted = next(labels[j] for j in row if votes[labels[j]] == best)
        correct += predicted == labels[i]
    return correct / len(labels)


# ----------------------------------------------------------------------------------------------- k-NN graph


def test_knn_graph_matches_sklearn_and_a_loop():
    z, _ = blobs(n=150)
    nb = graph.knn_graph(z, 7, block_size=16)
    _, idx = NearestNeighbors(n_neighbors=8, metric='cosine', algorithm='brute').fit(z).kneighbors(z)
    assert (idx[:, 0] == np.arange(150)).all()  # sklearn lists the point itself first
    np.testing.assert_array_equal(nb, idx[:, 1:])
    np.testing.assert_array_equal(nb, brute_knn(z, 7))
    np.testing.assert_array_equal(nb, graph.knn_graph(z, 7))  # one block or many: the same graph


def test_knn_graph_breaks_ties_by_index():
    # Rows of ±e_i have similarities exactly 0, 1 or -1: ties everywhere, also at the k-th place.
    rng = np.random.default_rng(1)
    eye = np.concatenate([np.eye(4), -np.eye(4)])
    z = eye[rng.integers(0, 8, 60)]
    z[5] = 0.0  # a zero row: similarity 0 with everything
    for k in (1, 3, 10):
        np.testing.assert_array_equal(graph.knn_graph(z, k, block_size=7), brute_knn(z, k))


def test_knn_graph_refuses_k_that_leaves_no_choice():
    z, _ = blobs(n=6)
    assert graph.knn_graph(z, 4).shape == (6, 4)
    for k in (5, 6, 0, 2.0, True):
        with pytest.raises(
            ValueError, match=rf'k={k!r} with N=6 examples; expected an int with 1 <= k < N - 1'
        ):
            graph.knn_graph(z, k)
    with pytest.raises(ValueError, match='non-finite'):
        graph.knn_graph(np.full((6, 2), np.nan), 2)


# ----------------------------------------------------------------------------------------------- label metrics


def test_homophily_and_knn_accuracy_match_loops():
    z, y = blobs(n=200, num_classes=5, separation=1.5, seed=2)
    y = np.array([-3, 0, 7, 11, 40])[y]  # any integer ids
    for k in (1, 4, 9):
        nb = graph.knn_graph(z, k)
        expected = np.mean([np.mean([y[j] == y[i] for j in nb[i]]) for i in range(len(y))])
        assert graph.homophily(nb, y) == pytest.approx(expected, abs=1e-12)
        assert graph.knn_accuracy(nb, y) == pytest.approx(brute_knn_accuracy(nb, y), abs=1e-12)
    counts = np.array(list(collections.Counter(y.tolist()).values()))
    assert graph.chance_homophily(y) == pytest.approx(np.sum((counts / len(y)) ** 2))


def test_knn_accuracy_ties_go_to_the_nearest_tied_label():
    labels = np.array([0, 0, 1, 1, 2])
    # Every row a tie but the last: 1 (wrong), 0 (right), 1 (right), 2 (wrong); then 0 (wrong). Breaking ties
    # by the smaller label instead would give 4 / 5.
    neighbours = np.array([[2, 1], [0, 2], [3, 4], [4, 2], [0, 1]])
    assert graph.knn_accuracy(neighbours, labels) == pytest.approx(2 / 5)
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, 500)
    neighbours = (np.arange(500)[:, None] + rng.integers(1, 500, (500, 6))) % 500  # never self; many ties
    assert graph.knn_accuracy(neighbours, labels) == pytest.approx(brute_knn_accuracy(neighbours, labels))


def test_a_single_class():
    z, _ = blobs(n=30)
    y = np.full(30, 4)
    nb = graph.knn_graph(z, 5)
    assert graph.homophily(nb, y) == 1.0 and graph.knn_accuracy(nb, y) == 1.0
    assert graph.chance_homophily(y) == 1.0
    with pytest.raises(
        ValueError, match=r'silhouette needs 2 <= number of classes <= N - 1 = 29; labels hold 1'
    ):
        graph.silhouette(z, y)
    with pytest.raises(ValueError, match='at least 2 classes'):
        graph.linear_probe(z, y, z, y)


def test_label_metrics_refuse_multi_hot_labels():
    z, _ = blobs(n=20)
    with pytest.raises(ValueError, match=r'labels must be \(20,\) integer class ids.*multi-label'):
        graph.homophily(graph.knn_graph(z, 3), np.zeros((20, 3), np.int32))


@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
def test_silhouette_matches_sklearn(metric):
    z, y = blobs(n=211, num_classes=5, separation=1.0, seed=3)
    y = np.array([-1, 5, 9, 12, 30])[y]
    y[17] = 99  # a class of one example: s = 0 there
    expected = silhouette_score(z, y, metric=metric)
    assert graph.silhouette(z, y, metric) == pytest.approx(expected, abs=1e-10)
    assert graph.silhouette(z, y, metric, block_size=13) == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ValueError, match="metric='manhattan'"):
        graph.silhouette(z, y, 'manhattan')


# ----------------------------------------------------------------------------------------------- linear maps


def test_modality_responsibility_matches_sklearn_ridge_and_r2():
    rng = np.random.default_rng(4)
    fused = rng.normal(size=(301, 12)) * 3.0 + 1.0
    unimodal = {
        'linear': fused @ rng.normal(size=(12, 5)) + 2.0,
        'noisy': fused[:, :3] @ rng.normal(size=(3, 6)) + 6.0 * rng.normal(size=(301, 6)),
        'unrelated': rng.normal(size=(301, 4)),
    }
    ridge, seed = 1e-2, 7
    got = graph.modality_responsibility(fused, unimodal, ridge=ridge, seed=seed)
    perm = np.random.default_rng(seed).permutation(301)
    fit, score = perm[:150], perm[150:]
    centred = fused[fit] - fused[fit].mean(0)
    alpha = ridge * np.trace(centred.T @ centred) / 12
    for m, e in unimodal.items():
        predicted = Ridge(alpha=alpha).fit(fused[fit], e[fit]).predict(fused[score])
        assert got[m] == pytest.approx(
            r2_score(e[score], predicted, multioutput='variance_weighted'), abs=1e-10
        )
    assert got['linear'] > 0.999 and 0.3 < got['noisy'] < 0.95 and got['unrelated'] < 0.05
    constant = graph.modality_responsibility(fused, {'c': np.ones((301, 2))})
    assert np.isnan(constant['c'])
    with pytest.raises(ValueError, match="unimodal\\['x'\\] has 300 rows; fused has 301"):
        graph.modality_responsibility(fused, {'x': np.ones((300, 2))})


def test_fit_logistic_matches_sklearn():
    z, y = blobs(n=300, dim=6, num_classes=3, separation=1.5, seed=5)
    train_x, test_x = graph.standardize(z[:200], z[200:])
    l2 = 1e-2
    w, b = graph.fit_logistic(train_x, y[:200], 3, l2=l2)
    assert w.dtype == b.dtype == np.float64 and not jax.config.jax_enable_x64  # x64 only inside the fit
    # The same objective (L2 on W, b free): C = 1 / (l2 N). sklearn's lbfgs to a tighter tolerance.
    reference = LogisticRegression(C=1 / (l2 * 200), tol=1e-12, max_iter=10_000).fit(train_x, y[:200])
    np.testing.assert_allclose(w, reference.coef_.T, atol=1e-6)
    np.testing.assert_allclose(b, reference.intercept_, atol=1e-6)
    logits = test_x @ w + b
    probs = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
    np.testing.assert_allclose(probs, reference.predict_proba(test_x), atol=1e-6)
    w2, b2 = graph.fit_logistic(train_x, y[:200], 3, l2=l2)  # deterministic
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(b, b2)
    with pytest.raises(RuntimeError, match=r'did not converge in max_iter=2 iterations'):
        graph.fit_logistic(train_x, y[:200], 3, l2=l2, max_iter=2)
    with pytest.raises(ValueError, match=r'y must be \(200,\) class ids in \[0, 2\)'):
        graph.fit_logistic(train_x, y[:200], 2)


@pytest.mark.parametrize('separation', [8.0, 1.2])
def test_linear_probe_matches_sklearn(separation):
    z, y = blobs(n=400, dim=10, num_classes=4, separation=separation, seed=6)
    z = z * np.arange(1, 11) + 5.0  # features of other scales and offsets: the probe standardizes
    y = np.array([3, 8, 10, 20])[y]
    l2 = 1e-3
    scaler = StandardScaler().fit(z[:300])
    reference = LogisticRegression(C=1 / (l2 * 300), tol=1e-12, max_iter=10_000)
    reference.fit(scaler.transform(z[:300]), y[:300])
    expected = reference.score(scaler.transform(z[300:]), y[300:])
    got = graph.linear_probe(z[:300], y[:300], z[300:], y[300:], l2=l2)
    assert got == pytest.approx(expected, abs=0.011)  # at most one of 100 test examples on the boundary
    if separation > 5:
        assert got == 1.0


# ----------------------------------------------------------------------------------------------- pictures


def test_stratified_subsample_and_pca():
    pytest.importorskip('matplotlib')
    from refnet_jax.analysis import plots as graph_plots

    y = np.array([2] * 50 + [0] * 30 + [1] * 20)
    sub = graph_plots.stratified_subsample(y, 10, seed=1)
    assert list(y[sub]) == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert len(set(sub.tolist())) == 10
    assert list(graph_plots.stratified_subsample(y, 500)) == sorted(range(100), key=lambda i: (y[i], i))
    z, _ = blobs(n=100)
    xy = graph_plots.pca_2d(z)
    x = z / np.linalg.norm(z, axis=1, keepdims=True)
    x -= x.mean(0)
    # The first two principal components carry the two largest variances; the signs are fixed.
    assert np.var(xy, axis=0).sum() == pytest.approx(
        np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[-2:].sum()
    )
    np.testing.assert_allclose(graph_plots.pca_2d(-z), -xy, atol=1e-10)


def test_plot_models_writes_a_png(tmp_path):
    pytest.importorskip('matplotlib')
    from refnet_jax.analysis import plots as graph_plots

    results = {}
    for name, separation in (('baseline', 0.5), ('refnet', 4.0)):
        z, y = blobs(n=300, dim=8, num_classes=4, separation=separation)
        results[name] = {'fused': z, 'labels': y, 'class_names': ('a', 'b', 'c', 'd')}
    path = tmp_path / 'graph.png'
    graph_plots.plot_models(results, path, num_similarity=100)
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    assert width > height > 500
    with pytest.raises(ValueError, match='single-label'):
        graph_plots.plot_models(
            {'m': {'fused': z, 'labels': np.zeros((300, 2), np.int32)}}, tmp_path / 'x.png'
        )


# ----------------------------------------------------------------------------------------------- on a run


@pytest.fixture(scope='module')
def run(tmp_path_factory, easy_vqa_dir):
    """A tiny easy-VQA run trained for two steps on one device: (workdir, results)."""
    config = tiny_config(easy_vqa_dir, num_steps=2)
    config.mesh.data = 1
    workdir = tmp_path_factory.mktemp('graph_run')
    return workdir, trainer.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_collect_returns_every_test_example(run):
    workdir, results = run
    config = config_lib.load_workdir_config(workdir)
    data = inference.collect(config, workdir, 'test')
    n = 9673
    assert data['fused'].shape == (n, 16) and data['logits'].shape == (n, 13)
    assert {m: e.shape for m, e in data['embeddings'].items()} == {'image': (n, 16), 'question': (n, 16)}
    assert data['labels'].shape == (n,) and 0 <= data['labels'].min() and data['labels'].max() < 13
    assert data['step'] == 2 and not data['multi_label'] and len(data['class_names']) == 13
    # The same examples and predictions as the run's own evaluation: padding rows are out.
    accuracy = np.mean(data['logits'].argmax(-1) == data['labels'])
    assert accuracy == pytest.approx(results['test']['accuracy'], abs=1e-9)

    sub = inference.collect(config, workdir, 'test', max_examples=300, seed=1)
    # A network loaded once serves several collects of its own run (tools/analyze.py), and no other run's.
    network = inference.load_network(config, workdir)
    again = inference.collect(config, workdir, 'test', max_examples=300, seed=1, network=network)
    np.testing.assert_array_equal(again['fused'], sub['fused'])
    with pytest.raises(ValueError, match='network was loaded from workdir'):
        inference.collect(config, None, 'test', network=network)
    other = config.copy_and_resolve_references()
    other.seed += 1
    with pytest.raises(ValueError, match='and another config'):
        inference.collect(other, workdir, 'test', network=network)
    assert sub['fused'].shape == (300, 16) and (np.diff(sub['index']) > 0).all()
    np.testing.assert_allclose(sub['fused'], data['fused'][sub['index']], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sub['labels'], data['labels'][sub['index']])
    for m, e in sub['embeddings'].items():
        np.testing.assert_allclose(e, data['embeddings'][m][sub['index']], rtol=1e-5, atol=1e-6)

    scores = graph.analyze(sub, k=5)
    assert set(scores) == {
        'num_examples',
        'accuracy',
        'homophily',
        'chance_homophily',
        'knn_accuracy',
        'silhouette',
        'responsibility/image',
        'responsibility/question',
    }
    assert scores['num_examples'] == 300
    assert scores['homophily'] == graph.homophily(graph.knn_graph(sub['fused'], 5), sub['labels'])


@pytest.mark.slow
def test_analyze_py_end_to_end(run, easy_vqa_dir, tmp_path):
    workdir, _ = run
    plot = importlib.util.find_spec('matplotlib') is not None
    output = tmp_path / 'docs' / 'graph'
    cmd = [
        sys.executable,
        'tools/analyze.py',
        f'--workdirs=trained={workdir},random=RANDOM',
        '--config=configs/easy_vqa.py:tiny',
        f'--config.data.data_dir={easy_vqa_dir}',
        '--split=test',
        '--max_examples=400',
        '--k=5',
        '--probe',
        '--probe_split=validation',
        '--probe_examples=400',
        f'--output={output}',
        '--plot' if plot else '--noplot',
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ONE_CPU, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / 'docs' / 'graph.json').read_text())
    assert list(report['models']) == ['trained', 'random']
    assert report['models']['trained']['step'] == 2 and report['models']['random']['step'] is None
    assert report['models']['trained']['metrics'] != report['models']['random']['metrics']
    for name in ('trained', 'random'):
        metrics = report['models'][name]['metrics']
        assert metrics['num_examples'] == 400
        for key in ('homophily', 'knn_accuracy', 'probe_accuracy', 'accuracy'):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        assert -1.0 <= metrics['silhouette'] <= 1.0
        assert metrics['responsibility/image'] <= 1.0 and metrics['responsibility/question'] <= 1.0
        assert f'| {name} | 400 |' in proc.stdout
    assert 'probe acc' in proc.stdout and 'R² question' in proc.stdout
    assert (tmp_path / 'docs' / 'graph.png').exists() == plot


@pytest.mark.slow
def test_analyze_py_names_a_missing_or_unused_config(tmp_path):
    def analyze(*args):
        proc = subprocess.run(
            [sys.executable, 'tools/analyze.py', f'--output={tmp_path / "x"}', *args],
            cwd=ROOT,
            env=ONE_CPU,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0
        return proc.stderr

    assert 'a RANDOM source needs --config' in analyze('--workdirs=random=RANDOM')
    assert '--config is only read for RANDOM sources' in analyze(
        f'--workdirs=a={tmp_path}', '--config=configs/easy_vqa.py:tiny'
    )
    assert 'expected NAME=WORKDIR or NAME=RANDOM' in analyze('--workdirs=runs/a')
