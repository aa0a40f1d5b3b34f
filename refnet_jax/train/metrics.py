"""Evaluation metrics on whole evaluation sets, in NumPy on the host (after jitted prediction).

Each takes an optional ``where`` (N,) bool mask that drops examples (padding). The classification metrics
agree with scikit-learn: ``accuracy_score``, ``f1_score(..., zero_division=0)`` and ``roc_auc_score``; the
regression ones with ``mean_squared_error``, ``mean_absolute_error`` and scipy's ``pearsonr``;
``embedding_spread`` measures how far a set of embeddings is from collapsing to one direction.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _apply_where(where: ArrayLike | None, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keeps the rows where ``where`` is True (all rows when None)."""
    if where is None:
        return arrays
    where = np.asarray(where, dtype=bool)
    if where.shape != arrays[0].shape[:1]:
        raise ValueError(f'`where` must have shape {arrays[0].shape[:1]}, got {where.shape}.')
    return tuple(a[where] for a in arrays)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2 tp / (2 tp + fp + fn), 0 where the denominator is 0 (sklearn's zero_division=0)."""
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def accuracy(logits_or_preds: ArrayLike, labels: ArrayLike, where: ArrayLike | None = None) -> float:
    """Fraction of correct predictions.

    Args:
      logits_or_preds: (N, C) scores (the argmax is the prediction) or (N,) predicted class ids.
      labels: (N,) integer class ids.
      where: optional (N,) bool mask of the examples to count.

    >>> accuracy(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 1, 1]))
    0.6666666666666666
    """
    preds, labels = np.asarray(logits_or_preds), np.asarray(labels)
    if preds.ndim == labels.ndim + 1 and preds.shape[:-1] == labels.shape:
        preds = preds.argmax(-1)
    elif preds.shape != labels.shape:
        raise ValueError(
            f'`logits_or_preds` must be (N, C) or (N,) with N as in `labels`, got {preds.shape} and {labels.shape}.'
        )
    preds, labels = _apply_where(where, preds, labels)
    if labels.size == 0:
        raise ValueError('accuracy of no examples: `labels` is empty or `where` selects nothing.')
    return float(np.mean(preds == labels))


def multilabel_f1(
    scores_or_probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5, where: ArrayLike | None = None
) -> dict[str, float]:
    """Multi-label F1 scores; a class is predicted where its score is above ``threshold``.

    Args:
      scores_or_probs: (N, C) probabilities (or logits with ``threshold=0``).
      labels: (N, C) multi-hot targets.
      threshold: decision threshold (strictly greater is positive).
      where: optional (N,) bool mask of the examples to count.

    Returns:
      {'micro', 'macro', 'weighted', 'samples'}: as ``sklearn.metrics.f1_score(average=..., zero_division=0)``.

    >>> multilabel_f1(np.array([[0.9, 0.2], [0.6, 0.7]]), np.array([[1, 0], [0, 1]]))['micro']
    0.8
    """
    scores, labels = np.asarray(scores_or_probs), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f'`scores_or_probs` and `labels` must both be (N, C), got {scores.shape} and {labels.shape}.'
        )
    scores, labels = _apply_where(where, scores, labels)
    pred, true = scores > threshold, labels != 0
    tp, fp, fn = pred & true, pred & ~true, ~pred & true
    per_class = _f1(tp.sum(0), fp.sum(0), fn.sum(0))
    support = true.sum(0)
    return {
        'micro': float(_f1(tp.sum(), fp.sum(), fn.sum())),
        'macro': float(per_class.mean()) if per_class.size else 0.0,
        'weighted': float((per_class * support).sum() / support.sum()) if support.sum() else 0.0,
        'samples': float(_f1(tp.sum(1), fp.sum(1), fn.sum(1)).mean()) if len(true) else 0.0,
    }


def roc_auc(scores: ArrayLike, labels: ArrayLike, where: ArrayLike | None = None) -> float:
    """Binary area under the ROC curve; tied scores count half (average ranks), as sklearn's roc_auc_score.

    Args:
      scores: (N,) scores, higher meaning more likely positive.
      labels: (N,) binary labels in {0, 1}.
      where: optional (N,) bool mask of the examples to count.

    >>> roc_auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1]))
    0.875
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f'`scores` and `labels` must both be (N,), got {scores.shape} and {labels.shape}.')
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f'`labels` must be binary (0 or 1), got values {np.unique(labels)}.')
    scores, labels = _apply_where(where, scores, labels)
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f'AUROC needs both classes, got {n_pos} positive and {n_neg} negative examples.')
    # Mann-Whitney U with 1-based average ranks: tied scores share the mean of the ranks they span.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def embedding_spread(embeddings: ArrayLike, where: ArrayLike | None = None) -> float:
    """Mean over dimensions of the standard deviation across examples of the L2-normalized embeddings.

    0 when every example has the same embedding direction (a collapsed network); independent random unit
    vectors in d dimensions score about 1 / sqrt(d).

    Args:
      embeddings: (N, D) embeddings.
      where: optional (N,) bool mask of the examples to count.

    >>> embedding_spread(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), where=np.array([True, True, False]))
    0.5
    """
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2:
        raise ValueError(f'`embeddings` must be (N, D), got {x.shape}.')
    (x,) = _apply_where(where, x)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return float(x.std(axis=0).mean())


# ----------------------------------------------------------------------------------------------- regression


def _targets(predictions: ArrayLike, targets: ArrayLike, where: ArrayLike | None) -> tuple[np.ndarray, ...]:
    """(N, K) float64 predictions and targets ((N,) taken as K = 1), the rows of `where` kept."""
    pred, true = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    if pred.ndim == 1:
        pred, true = pred[:, None], true.reshape(len(true), -1)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise ValueError(
            f'`predictions` and `targets` must both be (N, K) (or (N,)), got {pred.shape} and {true.shape}.'
        )
    pred, true = _apply_where(where, pred, true)
    if not len(true):
        raise ValueError('regression metrics of no examples: `targets` is empty or `where` selects nothing.')
    return pred, true


def mean_squared_error(predictions: ArrayLike, targets: ArrayLike, where: ArrayLike | None = None) -> float:
    """Mean over examples and targets of (prediction - target)², as sklearn's ``mean_squared_error``.

    Args:
      predictions: (N, K) or (N,) predicted values.
      targets: the same shape, the true values.
      where: optional (N,) bool mask of the examples to count.

    >>> mean_squared_error(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0]))
    1.6666666666666667
    """
    pred, true = _targets(predictions, targets, where)
    return float(np.mean((pred - true) ** 2))


def mean_absolute_error(predictions: ArrayLike, targets: ArrayLike, where: ArrayLike | None = None) -> float:
    """Mean over examples and targets of |prediction - target|, as sklearn's ``mean_absolute_error``.

    >>> mean_absolute_error(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0]))
    1.0
    """
    pred, true = _targets(predictions, targets, where)
    return float(np.mean(np.abs(pred - true)))


def pearson_r(predictions: ArrayLike, targets: ArrayLike, where: ArrayLike | None = None) -> float:
    """Pearson's correlation of predictions and targets, per target, averaged over the K targets
    (``scipy.stats.pearsonr`` of each column); a constant column correlates 0.

    >>> round(pearson_r(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])), 6)
    0.993399
    """
    pred, true = _targets(predictions, targets, where)
    dp, dt = pred - pred.mean(0), true - true.mean(0)
    denom = np.sqrt((dp**2).sum(0) * (dt**2).sum(0))
    r = np.where(denom > 0, (dp * dt).sum(0) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(r.mean())


def sign_accuracy(predictions: ArrayLike, targets: ArrayLike, where: ArrayLike | None = None) -> float:
    """For one real-valued target, the accuracy of its sign: over the examples whose target is not 0, the
    fraction whose prediction is > 0 exactly where the target is (MultiBench's binary accuracy of affect
    scores, `eval_affect(..., exclude_zero=True)`).

    >>> sign_accuracy(np.array([0.5, -1.0, 2.0, 0.3]), np.array([1.0, 2.0, 0.0, 0.7]))
    0.6666666666666666
    """
    pred, true = _targets(predictions, targets, where)
    if pred.shape[1] != 1:
        raise ValueError(f'sign accuracy is of one target, got {pred.shape[1]}.')
    nonzero = true[:, 0] != 0
    if not nonzero.any():
        raise ValueError('sign accuracy of no examples: every target is 0.')
    return float(np.mean((pred[nonzero, 0] > 0) == (true[nonzero, 0] > 0)))
