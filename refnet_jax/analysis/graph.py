"""Latent-graph analysis of the fused embeddings z: neighbourhood structure, label geometry, modality content.

The paper behind ReFNet says that the refiner induces graph structure among the fused embeddings and that the
Multi-Similarity loss strengthens it. This module measures that structure on a split, for one model at a time:

  knn_graph                the cosine k-nearest-neighbour graph of z (self excluded).
  homophily                the mean share of a node's neighbours that carry its label.
  knn_accuracy             leave-one-out majority vote of the neighbours.
  silhouette               the mean silhouette coefficient of the labels as clusters (cosine distance).
  modality_responsibility  how much of each unimodal embedding e_m a linear map recovers from z (held-out R²).
  linear_probe             test accuracy of a multinomial logistic regression fitted on (frozen) z.

`analyze` computes every scalar for one model from the embeddings that `inference.collect` returns. The
metrics take NumPy arrays and compute in float64; pairwise quantities are computed in blocks of rows, so that
N up to ~20k examples needs a few hundred MB, not N² floats at once. The probe's logistic regression is fitted
by `optax.lbfgs`, in float64 too. The pictures of tools/analyze.py are drawn by `plots`, the one module
here that needs matplotlib.

Labels: the metrics take single-label class ids (N,). For a multi-label dataset (labels (N, C) multi-hot),
`analyze` computes only what needs no labels (modality responsibility) and leaves the label metrics out:
homophily, kNN accuracy, silhouette and the probe are defined for one label per example.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike

# Bytes of one block of pairwise similarities or distances (rows x N float64).
BLOCK_BYTES = 1 << 27
METRICS = ('cosine', 'euclidean')


# ----------------------------------------------------------------------------------------------- helpers


def _matrix(z: ArrayLike, name: str = 'z') -> np.ndarray:
    x = np.asarray(z, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f'{name} must be a non-empty (N, D) array; got shape {x.shape}')
    if not np.isfinite(x).all():
        raise ValueError(f'{name} has {int((~np.isfinite(x)).sum())} non-finite values')
    return x


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (cosine similarity 0 with everything)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def _class_ids(labels: ArrayLike, n: int, name: str = 'labels') -> tuple[np.ndarray, int]:
    """(codes (N,) in [0, C), C): `labels` (N,) of any integer ids, renumbered by sorted value."""
    codes, classes = _classes(labels, n, name)
    return codes, len(classes)


def _classes(labels: ArrayLike, n: int, name: str = 'labels') -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) in [0, C), classes (C,)): `labels` (N,) of any integer ids, renumbered by sorted value."""
    y = np.asarray(labels)
    if y.shape != (n,) or y.dtype.kind not in 'iub':
        raise ValueError(
            f'{name} must be ({n},) integer class ids (single-label); got {y.dtype} {y.shape}'
            + (' (multi-label data have no single class per example)' if y.ndim == 2 else '')
        )
    classes, codes = np.unique(y, return_inverse=True)
    return codes.reshape(-1), classes


def _block_rows(n: int, block_size: int | None) -> int:
    if block_size is None:
        return max(1, min(n, BLOCK_BYTES // (8 * max(n, 1))))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f'block_size={block_size!r}, expected a positive int or None')
    return block_size


def _check_k(k: Any, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < n - 1:
        raise ValueError(
            f'k={k!r} with N={n} examples; expected an int with 1 <= k < N - 1 = {n - 1} '
            '(k = N - 1 makes every other example a neighbour)'
        )


def _neighbours(neighbours: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    nb = np.asarray(neighbours)
    if nb.ndim != 2 or nb.dtype.kind not in 'iu' or nb.shape[1] == 0:
        raise ValueError(f'neighbours must be (N, k) integer indices with k >= 1; got {nb.dtype} {nb.shape}')
    codes, _ = _class_ids(labels, nb.shape[0])
    if nb.size and (nb.min() < 0 or nb.max() >= nb.shape[0]):
        raise ValueError(f'neighbours holds indices in [{nb.min()}, {nb.max()}]; expected [0, {nb.shape[0]})')
    return nb, codes


# ----------------------------------------------------------------------------------------------- graph


def knn_graph(z: ArrayLike, k: int, *, block_size: int | None = None) -> np.ndarray:
    """The cosine k-nearest-neighbour graph: for each example, the k others most similar to it.

    Similarity is cos(z_i, z_j) = <z_i, z_j> / (|z_i| |z_j|) in float64 (an all-zero row has similarity 0 with
    every row). Example i is never its own neighbour. Row i lists its neighbours by decreasing similarity;
    equal similarities are ordered by increasing index, also at the k-th place, so the graph is deterministic.

    Args:
      z: (N, D) embeddings.
      k: neighbours per example, 1 <= k < N - 1.
      block_size: rows of the N x N similarity matrix computed at once (default: ~128 MB of them).

    Returns:
      (N, k) int64 indices.
    """
    x = _normalize(_matrix(z))
    n = x.shape[0]
    _check_k(k, n)
    rows = _block_rows(n, block_size)
    out = np.empty((n, k), np.int64)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        s = x[start:stop] @ x.T  # (b, N)
        r = np.arange(stop - start)
        s[r, start + r] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]  # the k largest, in no order
        kth = np.take_along_axis(s, top, 1).min(1)
        # Where several examples tie with the k-th largest similarity, argpartition picks any of them: sort the
        # row fully (stable, so the smaller indices come first).
        tied = np.flatnonzero((s >= kth[:, None]).sum(1) > k)
        if tied.size:
            top[tied] = np.argsort(-s[tied], axis=1, kind='stable')[:, :k]
        order = np.lexsort((top, -np.take_along_axis(s, top, 1)), axis=-1)
        out[start:stop] = np.take_along_axis(top, order, 1)
    return out


def homophily(neighbours: ArrayLike, labels: ArrayLike) -> float:
    """Label homophily of a k-NN graph: (1/N) Σ_i (1/k) Σ_{j ∈ nb(i)} [y_j = y_i].

    Every node has k out-edges, so this node average is also the share of edges joining two examples of the
    same label. Random neighbours would give Σ_c p_c² (`chance_homophily`).

    Args:
      neighbours: (N, k) indices (`knn_graph`).
      labels: (N,) class ids.
    """
    nb, codes = _neighbours(neighbours, labels)
    return float(np.mean(codes[nb] == codes[:, None]))


def chance_homophily(labels: ArrayLike) -> float:
    """Σ_c p_c², p_c the share of class c: the homophily of neighbours drawn at random (with replacement)."""
    y = np.asarray(labels)
    codes, _ = _class_ids(y, y.shape[0] if y.ndim else -1)
    p = np.bincount(codes) / codes.size
    return float(np.sum(p**2))


def knn_accuracy(neighbours: ArrayLike, labels: ArrayLike) -> float:
    """Leave-one-out k-NN accuracy: the share of examples whose neighbours' majority label is their own.

    Example i (never its own neighbour) is predicted the label most frequent among its k neighbours. A tie
    between labels goes to the one whose first occurrence in i's neighbour list comes earliest, i.e. the label
    of the most similar neighbour among the tied labels (with `knn_graph`'s order).

    Args:
      neighbours: (N, k) indices, each row ordered by decreasing similarity (`knn_graph`).
      labels: (N,) class ids.
    """
    nb, codes = _neighbours(neighbours, labels)
    n, k = nb.shape
    num_classes = int(codes.max()) + 1
    nb_codes = codes[nb]  # (N, k)
    counts = np.zeros((n, num_classes), np.int64)
    first = np.full((n, num_classes), k, np.int64)  # position of each label's first occurrence
    rows = np.arange(n)
    for j in range(k - 1, -1, -1):
        counts[rows, nb_codes[:, j]] += 1
        first[rows, nb_codes[:, j]] = j
    predicted = np.argmax(counts * (k + 1) - first, axis=1)
    return float(np.mean(predicted == codes))


def silhouette(
    z: ArrayLike, labels: ArrayLike, metric: str = 'cosine', *, block_size: int | None = None
) -> float:
    """The mean silhouette coefficient of the labels as clusters, exact (all pairs), computed in row blocks.

    With d the distance (`cosine`: 1 - cos(z_i, z_j) clipped to [0, 2]; `euclidean`: |z_i - z_j|), and d_ii = 0:
      a(i) = mean of d(i, j) over the other examples j of i's class,
      b(i) = min over the other classes c of the mean of d(i, j) over the examples j of class c,
      s(i) = (b(i) - a(i)) / max(a(i), b(i)), and 0 when i is alone in its class or a(i) = b(i) = 0;
    the result is the mean of s(i). This is `sklearn.metrics.silhouette_score`'s definition.

    Args:
      z: (N, D) embeddings.
      labels: (N,) class ids, with 2 <= number of classes <= N - 1.
      metric: 'cosine' or 'euclidean'.
      block_size: rows of the N x N distance matrix computed at once (default: ~128 MB of them).
    """
    if metric not in METRICS:
        raise ValueError(f'metric={metric!r}, expected one of {METRICS}')
    x = _matrix(z)
    n = x.shape[0]
    codes, num_classes = _class_ids(labels, n)
    if not 2 <= num_classes <= n - 1:
        raise ValueError(
            f'silhouette needs 2 <= number of classes <= N - 1 = {n - 1}; labels hold {num_classes} '
            f'class(es) over {n} examples'
        )
    if metric == 'cosine':
        x = _normalize(x)
    sq = np.sum(x**2, axis=1)
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), codes] = 1.0
    sizes = onehot.sum(0)  # (C,)
    rows = _block_rows(n, block_size)
    total = 0.0
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        g = x[start:stop] @ x.T  # (b, N)
        if metric == 'cosine':
            d = np.clip(1.0 - g, 0.0, 2.0)
        else:
            d = np.sqrt(np.maximum(sq[start:stop, None] + sq[None, :] - 2.0 * g, 0.0))
        r = np.arange(stop - start)
        d[r, start + r] = 0.0
        sums = d @ onehot  # (b, C): sum of distances to each class
        own = codes[start:stop]
        a = sums[r, own] / np.maximum(sizes[own] - 1, 1)
        means = sums / sizes
        means[r, own] = np.inf
        b = means.min(1)
        denom = np.maximum(a, b)
        s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
        s[sizes[own] == 1] = 0.0
        total += s.sum()
    return float(total / n)


# ----------------------------------------------------------------------------------------------- linear maps


def modality_responsibility(
    fused: ArrayLike, unimodal: Mapping[str, ArrayLike], *, ridge: float = 1e-3, seed: int = 0
) -> dict[str, float]:
    """How much of each unimodal embedding e_m a linear map recovers from the fused embedding z: held-out R².

    The examples are split by `np.random.default_rng(seed).permutation(N)`: the first N // 2 fit, the rest
    score. On the fitting half, with X the fused embeddings and Y = e_m, both centred by their fitting-half
    means, the ridge map is W = (XᵀX + λI)⁻¹ XᵀY, with an unpenalised intercept (the means), and
    λ = ridge · tr(XᵀX) / D (`ridge` times the mean eigenvalue of XᵀX, so the amount of shrinkage does not
    depend on the scale of z). On the scoring half, with Ŷ the predictions and Ȳ that half's own mean,

      R² = 1 - Σ_{i,d} (Y_id - Ŷ_id)² / Σ_{i,d} (Y_id - Ȳ_d)²   (sums over all examples i and output dims d),

    which is `sklearn.metrics.r2_score(..., multioutput='variance_weighted')`. 1: e_m is a linear function of
    z; 0: no better than predicting the mean; it can be negative. NaN when e_m is constant on the scoring half.

    Args:
      fused: (N, D) fused embeddings, N >= 4.
      unimodal: {m: (N, D_m)} unimodal embeddings of the same examples.
      ridge: relative ridge strength, > 0.
      seed: seeds the split.

    Returns:
      {m: R²}.
    """
    x = _matrix(fused, 'fused')
    n, dim = x.shape
    if n < 4:
        raise ValueError(f'modality_responsibility needs N >= 4 examples (two per half); got {n}')
    if not ridge > 0:
        raise ValueError(f'ridge={ridge!r}, expected > 0')
    perm = np.random.default_rng(seed).permutation(n)
    fit, score = perm[: n // 2], perm[n // 2 :]
    x_mean = x[fit].mean(0)
    xc = x[fit] - x_mean
    gram = xc.T @ xc
    lam = ridge * np.trace(gram) / dim
    if lam == 0:  # z constant on the fitting half: only the intercept remains
        lam = ridge
    chol = np.linalg.cholesky(gram + lam * np.eye(dim))
    out = {}
    for m, e in unimodal.items():
        y = _matrix(e, f'unimodal[{m!r}]')
        if y.shape[0] != n:
            raise ValueError(f'unimodal[{m!r}] has {y.shape[0]} rows; fused has {n}')
        y_mean = y[fit].mean(0)
        w = np.linalg.solve(chol.T, np.linalg.solve(chol, xc.T @ (y[fit] - y_mean)))  # (D, D_m)
        pred = (x[score] - x_mean) @ w + y_mean
        sse = np.sum((y[score] - pred) ** 2)
        sst = np.sum((y[score] - y[score].mean(0)) ** 2)
        out[m] = float(1.0 - sse / sst) if sst > 0 else float('nan')
    return out


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter', 'history'))
def _lbfgs_logistic(x, y, l2, tol, *, num_classes, max_iter, history):
    """(W, b, largest gradient entry) after `optax.lbfgs` (zoom line search) from 0; run with x64 enabled."""

    def objective(params):
        logits = x @ params['w'] + params['b']
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return cross_entropy + 0.5 * l2 * jnp.sum(params['w'] ** 2)

    solver = optax.lbfgs(memory_size=history)
    # The line search leaves the value and gradient at the new point in the state: no second evaluation.
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def not_converged(carry):
        _, state = carry
        count = optax.tree.get(state, 'count')
        largest = optax.tree.norm(optax.tree.get(state, 'grad'), ord='inf')
        return (count == 0) | ((count < max_iter) & (largest >= tol))

    start = {'w': jnp.zeros((x.shape[1], num_classes), x.dtype), 'b': jnp.zeros((num_classes,), x.dtype)}
    params, _ = jax.lax.while_loop(not_converged, step, (start, solver.init(start)))
    largest = optax.tree.norm(jax.grad(objective)(params), ord='inf')
    return params['w'], params['b'], largest


def fit_logistic(
    x: ArrayLike,
    y: ArrayLike,
    num_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 2000,
    tol: float = 1e-7,
    history: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by L-BFGS (`optax.lbfgs`) in float64: the minimizer (W, b) of

      (1/N) Σ_i -log softmax(x_i W + b)_{y_i} + (l2 / 2) |W|²    (b is not penalised),

    which is strictly convex for l2 > 0, so the answer does not depend on the solver (it is sklearn's
    `LogisticRegression(C=1 / (l2 N))` on the same features). Deterministic: no randomness, a fixed start (0).

    Args:
      x: (N, D) features.
      y: (N,) class ids in [0, num_classes).
      num_classes: C.
      l2: the penalty on W, > 0.
      max_iter: L-BFGS iterations at most; not converging by then is an error.
      tol: stop when the largest gradient entry is below this.
      history: L-BFGS memory (pairs kept).

    Returns:
      W (D, C) and b (C,), float64.
    """
    x = _matrix(x, 'x')
    n = x.shape[0]
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in 'iu' or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f'y must be ({n},) class ids in [0, {num_classes}); got {y.dtype} {y.shape}')
    if not l2 > 0:
        raise ValueError(f'l2={l2!r}, expected > 0')
    with jax.enable_x64(True):
        w, b, largest = jax.device_get(
            _lbfgs_logistic(
                jnp.asarray(x),
                jnp.asarray(y, jnp.int32),
                l2,
                tol,
                num_classes=num_classes,
                max_iter=max_iter,
                history=history,
            )
        )
    if not largest < tol:
        raise RuntimeError(
            f'logistic regression did not converge in max_iter={max_iter} iterations '
            f'(largest gradient entry {largest:.3g} >= tol={tol})'
        )
    return np.asarray(w), np.asarray(b)


def standardize(train_x: ArrayLike, *others: ArrayLike) -> tuple[np.ndarray, ...]:
    """`train_x` and `others` minus the mean of `train_x`, divided by its standard deviation per feature
    (features constant on `train_x` are only centred)."""
    x = _matrix(train_x, 'train_x')
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    return tuple((_matrix(a, 'x') - mean) / std for a in (x, *others))


def linear_probe(
    train_z: ArrayLike, train_y: ArrayLike, test_z: ArrayLike, test_y: ArrayLike, **fit_options: Any
) -> float:
    """Test accuracy of a linear probe: multinomial logistic regression on frozen embeddings.

    Features are standardized with the training set's mean and standard deviation (`standardize`), then
    `fit_logistic(**fit_options)` fits on the training set (classes are the distinct `train_y`, at least 2); a
    test example is correct when the class of its largest score is its label (a test label absent from
    training is always wrong).

    Args:
      train_z, train_y: (N, D) embeddings and (N,) class ids to fit on.
      test_z, test_y: (M, D) and (M,) to score on.
      **fit_options: `fit_logistic`'s `l2`, `max_iter`, `tol`, `history` (its defaults where not given).
    """
    train_x, test_x = standardize(train_z, test_z)
    codes, classes = _classes(train_y, train_x.shape[0], 'train_y')
    if len(classes) < 2:
        raise ValueError(f'linear_probe needs at least 2 classes in train_y; got {classes.tolist()}')
    test_y = np.asarray(test_y)
    if test_y.shape != (test_x.shape[0],):
        raise ValueError(f'test_y must be ({test_x.shape[0]},) class ids; got {test_y.shape}')
    w, b = fit_logistic(train_x, codes, len(classes), **fit_options)
    predicted = classes[np.argmax(test_x @ w + b, axis=1)]
    return float(np.mean(predicted == test_y))


def analyze(
    collected: Mapping[str, Any],
    *,
    k: int = 10,
    seed: int = 0,
    ridge: float = 1e-3,
    probe_train: Mapping[str, Any] | None = None,
    probe_l2: float = 1e-3,
) -> dict[str, float]:
    """Every scalar of the analysis for one model, on the examples of `collected` (`inference.collect`).

    Keys: `num_examples`, `accuracy` (of the model's own head), `homophily`, `chance_homophily`,
    `knn_accuracy` (k-NN graph of the fused embeddings, `k` neighbours), `silhouette` (cosine), and
    `responsibility/<m>` per modality (`modality_responsibility` with `ridge`, split seeded by `seed`). With
    `probe_train` (an `inference.collect` of another split, e.g. train), also `probe_accuracy`: `linear_probe`
    fitted on its fused embeddings and scored on these. Multi-label data get `num_examples` and the
    responsibilities only.
    """
    z = collected['fused']
    out: dict[str, float] = {'num_examples': float(z.shape[0])}
    labels = np.asarray(collected['labels'])
    if not collected.get('multi_label', labels.ndim == 2):
        if 'logits' in collected:
            out['accuracy'] = float(np.mean(np.argmax(collected['logits'], -1) == labels))
        nb = knn_graph(z, k)
        out['homophily'] = homophily(nb, labels)
        out['chance_homophily'] = chance_homophily(labels)
        out['knn_accuracy'] = knn_accuracy(nb, labels)
        out['silhouette'] = silhouette(z, labels)
        if probe_train is not None:
            out['probe_accuracy'] = linear_probe(
                probe_train['fused'], probe_train['labels'], z, labels, l2=probe_l2
            )
    for m, r2 in modality_responsibility(z, collected['embeddings'], ridge=ridge, seed=seed).items():
        out[f'responsibility/{m}'] = r2
    return out
