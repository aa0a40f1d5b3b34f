"""Tests for refnet_jax.train.metrics against scikit-learn on random data, with ties, empty classes and masks."""

import numpy as np
import pytest
from sklearn import metrics as skm

from refnet_jax.train import metrics

AVERAGES = ('micro', 'macro', 'weighted', 'samples')


@pytest.mark.parametrize('seed', range(3))
def test_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(50, 4))
    labels = rng.integers(0, 4, size=50)
    preds = logits.argmax(-1)
    where = rng.random(50) < 0.6
    assert metrics.accuracy(logits, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert metrics.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert metrics.accuracy(logits, labels, where=where) == pytest.approx(
        skm.accuracy_score(labels[where], preds[where])
    )


@pytest.mark.parametrize('seed', range(4))
def test_multilabel_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 40, 6
    probs = rng.random((n, c))
    probs[:5] = 0.5  # Exactly on the threshold: not predicted.
    labels = (rng.random((n, c)) < 0.3).astype(int)
    labels[:, 0] = 0  # A class with no true example (zero_division=0 in macro, no weight in weighted).
    labels[3] = 0  # An example with no true label.
    probs[:, 1] = 0.0  # A class never predicted.
    where = rng.random(n) < 0.7
    preds = (probs > 0.5).astype(int)
    got = metrics.multilabel_f1(probs, labels)
    masked = metrics.multilabel_f1(probs, labels, where=where)
    shifted = metrics.multilabel_f1(probs - 0.5, labels, threshold=0.0)  # E.g. logits with threshold 0.
    assert set(got) == set(AVERAGES)
    for average in AVERAGES:
        want = skm.f1_score(labels, preds, average=average, zero_division=0)
        assert got[average] == pytest.approx(want), average
        assert shifted[average] == pytest.approx(want), average
        want = skm.f1_score(labels[where], preds[where], average=average, zero_division=0)
        assert masked[average] == pytest.approx(want), average


def test_multilabel_f1_threshold_and_all_empty():
    probs = np.array([[0.3, 0.8], [0.6, 0.2]])
    labels = np.array([[1, 1], [1, 0]])
    for threshold in (0.1, 0.5, 0.7, 0.9):
        preds = (probs > threshold).astype(int)
        got = metrics.multilabel_f1(probs, labels, threshold=threshold)
        for average in AVERAGES:
            assert got[average] == pytest.approx(
                skm.f1_score(labels, preds, average=average, zero_division=0)
            )
    # Nothing true and nothing predicted: every F1 is 0, as sklearn with zero_division=0.
    zeros = np.zeros((3, 4))
    assert metrics.multilabel_f1(zeros, zeros) == {average: 0.0 for average in AVERAGES}


@pytest.mark.parametrize('seed', range(4))
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    scores = np.round(rng.random(60) + 0.3 * labels, 1)  # Few distinct values: many ties across classes.
    assert len(np.unique(scores)) < 20
    where = rng.random(60) < 0.6
    assert metrics.roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert metrics.roc_auc(scores, labels, where=where) == pytest.approx(
        skm.roc_auc_score(labels[where], scores[where])
    )
    assert metrics.roc_auc(scores, labels.astype(bool)) == pytest.approx(skm.roc_auc_score(labels, scores))


def test_roc_auc_extremes():
    labels = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert metrics.roc_auc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert metrics.roc_auc(np.full(4, 0.7), labels) == 0.5  # All tied.
    with pytest.raises(ValueError, match='both classes'):
        metrics.roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match='binary'):
        metrics.roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))


def test_shape_mismatches_name_both_shapes():
    with pytest.raises(ValueError, match=r'\(5, 3\) and \(4,\)'):
        metrics.accuracy(np.zeros((5, 3)), np.zeros(4, int))
    with pytest.raises(ValueError, match=r'\(5, 3\) and \(5, 4\)'):
        metrics.multilabel_f1(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r'\(5,\) and \(6,\)'):
        metrics.roc_auc(np.zeros(5), np.zeros(6, int))
    with pytest.raises(ValueError, match=r'`where`.*\(5,\).*\(4,\)'):
        metrics.accuracy(np.zeros(5, int), np.zeros(5, int), where=np.ones(4, bool))
    with pytest.raises(ValueError, match='no examples'):
        metrics.accuracy(np.zeros(5, int), np.zeros(5, int), where=np.zeros(5, bool))


def test_embedding_spread_is_zero_for_collapse_and_matches_a_loop():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    collapsed = direction * rng.uniform(0.5, 3.0, size=(30, 1))  # one direction, various norms
    assert metrics.embedding_spread(collapsed) == pytest.approx(0.0, abs=1e-12)
    x = rng.normal(size=(30, 8))
    where = rng.random(30) < 0.7
    unit = [row / np.sqrt(sum(v * v for v in row)) for row, keep in zip(x, where, strict=True) if keep]
    stds = [np.sqrt(np.mean([(u[d] - np.mean([w[d] for w in unit])) ** 2 for u in unit])) for d in range(8)]
    assert metrics.embedding_spread(x, where=where) == pytest.approx(np.mean(stds), rel=1e-12)
    x[~where] = np.nan  # masked rows may hold anything
    assert metrics.embedding_spread(x, where=where) == pytest.approx(np.mean(stds), rel=1e-12)
