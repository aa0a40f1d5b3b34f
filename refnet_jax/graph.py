"""Latent-graph analysis of the fused embeddings z: neighbourhood structure, label geometry, modality content.

The paper behind ReFNet says that the refiner induces graph structure among the fused embeddings and that the
Multi-Similarity loss strengthens it. This module measures that structure on a split, for one model at a time:

  knn_graph                the cosine k-nearest-neighbour graph of z (self excluded).
  homophily                the mean share of a node's neighbours that carry its label.
  knn_accuracy             leave-one-out majority vote of the neighbours.
  silhouette               the mean silhouette coefficient of the labels as clusters (cosine distance).
  modality_responsibility  how much of each unimodal embedding e_m a linear map recovers from z (held-out R²).
  linear_probe             test accuracy of a multinomial logistic regression fitted on (frozen) z.

`collect` runs a workdir's latest checkpoint (or the network a run of a config starts from) on a split and
returns the embeddings; `analyze` computes every scalar for one model; `plot_models` draws the models side by
side. The metrics are NumPy functions computing in float64; pairwise quantities are computed in blocks of rows,
so that N up to ~20k examples needs a few hundred MB, not N² floats at once.

Labels: the metrics take single-label class ids (N,). For a multi-label dataset (labels (N, C) multi-hot),
`analyze` computes only what needs no labels (modality responsibility) and leaves the label metrics out, and
`plot_models` refuses: homophily, kNN accuracy, silhouette and the pictures are defined for one label per example.

Only NumPy is needed to import this module: `collect` imports JAX and the model code when called, and
`plot_models` imports matplotlib (the `analysis` extra), which the library does not depend on.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
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


def _normalise(x: np.ndarray) -> np.ndarray:
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
    x = _normalise(_matrix(z))
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
        x = _normalise(x)
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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


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
    """Multinomial logistic regression by L-BFGS in float64: the minimiser (W, b) of

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
      W (D, C) and b (C,).
    """
    x = _matrix(x, 'x')
    n, dim = x.shape
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in 'iu' or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f'y must be ({n},) class ids in [0, {num_classes}); got {y.dtype} {y.shape}')
    if not l2 > 0:
        raise ValueError(f'l2={l2!r}, expected > 0')
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0

    def unpack(theta):
        return theta[: dim * num_classes].reshape(dim, num_classes), theta[dim * num_classes :]

    def value_and_grad(theta):
        w, b = unpack(theta)
        logp = _log_softmax(x @ w + b)
        err = (np.exp(logp) - onehot) / n  # (N, C)
        value = -np.sum(onehot * logp) / n + 0.5 * l2 * np.sum(w**2)
        return value, np.concatenate([(x.T @ err + l2 * w).ravel(), err.sum(0)])

    theta = np.zeros(dim * num_classes + num_classes)
    f, g = value_and_grad(theta)
    s_hist, y_hist = [], []
    for _ in range(max_iter):
        if np.max(np.abs(g)) < tol:
            break
        # Two-loop recursion: d = -H g.
        q, alphas = g.copy(), []
        for s, t in zip(reversed(s_hist), reversed(y_hist), strict=True):
            a = (s @ q) / (t @ s)
            alphas.append(a)
            q -= a * t
        q *= (
            (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
            if s_hist
            else 1.0 / max(np.abs(g).sum(), 1.0)
        )
        for s, t, a in zip(s_hist, y_hist, reversed(alphas), strict=True):
            q += (a - (t @ q) / (t @ s)) * s
        d = -q
        slope = g @ d
        if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
            s_hist, y_hist, d, slope = [], [], -g, -(g @ g)
        step = 1.0
        while True:  # backtracking to the Armijo condition
            f_new, g_new = value_and_grad(theta + step * d)
            if f_new <= f + 1e-4 * step * slope or step < 1e-20:
                break
            step *= 0.5
        s, t = step * d, g_new - g
        theta, f, g = theta + s, f_new, g_new
        if s @ t > 1e-12 * (t @ t):
            s_hist.append(s)
            y_hist.append(t)
            if len(s_hist) > history:
                s_hist.pop(0)
                y_hist.pop(0)
    else:
        if np.max(np.abs(g)) >= tol:
            raise RuntimeError(
                f'logistic regression did not converge in max_iter={max_iter} iterations '
                f'(largest gradient entry {np.max(np.abs(g)):.3g} >= tol={tol})'
            )
    return unpack(theta)


def standardise(train_x: ArrayLike, *others: ArrayLike) -> tuple[np.ndarray, ...]:
    """`train_x` and `others` minus the mean of `train_x`, divided by its standard deviation per feature
    (features constant on `train_x` are only centred)."""
    x = _matrix(train_x, 'train_x')
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    return tuple((_matrix(a, 'x') - mean) / std for a in (x, *others))


def linear_probe(
    train_z: ArrayLike,
    train_y: ArrayLike,
    test_z: ArrayLike,
    test_y: ArrayLike,
    *,
    l2: float = 1e-3,
    max_iter: int = 2000,
    tol: float = 1e-7,
) -> float:
    """Test accuracy of a linear probe: multinomial logistic regression on frozen embeddings.

    Features are standardised with the training set's mean and standard deviation (`standardise`), then
    `fit_logistic(l2=l2)` fits on the training set (classes are the distinct `train_y`, at least 2); a test
    example is correct when the class of its largest score is its label (a test label absent from training is
    always wrong).

    Args:
      train_z, train_y: (N, D) embeddings and (N,) class ids to fit on.
      test_z, test_y: (M, D) and (M,) to score on.
      l2, max_iter, tol: as in `fit_logistic`.
    """
    train_x, test_x = standardise(train_z, test_z)
    codes, classes = _classes(train_y, train_x.shape[0], 'train_y')
    if len(classes) < 2:
        raise ValueError(f'linear_probe needs at least 2 classes in train_y; got {classes.tolist()}')
    test_y = np.asarray(test_y)
    if test_y.shape != (test_x.shape[0],):
        raise ValueError(f'test_y must be ({test_x.shape[0]},) class ids; got {test_y.shape}')
    w, b = fit_logistic(train_x, codes, len(classes), l2=l2, max_iter=max_iter, tol=tol)
    predicted = classes[np.argmax(test_x @ w + b, axis=1)]
    return float(np.mean(predicted == test_y))


# ----------------------------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Network:
    """A ReFNet ready for inference on one device (`load_network`).

    Attributes:
      config: its config.
      workdir: the run its parameters come from; None for the random network.
      step: the checkpoint step; None for the random network.
      info: the dataset's `contract.DatasetInfo`.
      params: the parameters inference uses (no refiner).
      embed: jitted `(params, batch) -> {'logits', 'fused', 'embeddings'}`, without dropout or refiner.
    """

    config: Any
    workdir: str | None
    step: int | None
    info: Any
    params: Any
    embed: Callable[[Any, Mapping[str, Any]], dict[str, Any]]


def load_network(config, workdir: str | pathlib.Path | None, *, step: int | None = None) -> Network:
    """The ReFNet of `config` with the parameters of `workdir`'s checkpoint at `step` (default: the latest).

    `workdir=None` gives the network a training run of `config` starts from: initialised from `config.seed`
    exactly as `train_lib.train_and_evaluate` does, before any step (the random-network baseline of the linear
    probe). Only the parameters that inference uses are kept (no refiner), each shape-checked against the
    config's model.
    """
    import jax

    from refnet_jax import checkpointing, contract, train_lib

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data = 1
    # The state exactly as a training run starts it (the random-network baseline) when workdir is None.
    run = train_lib.build(config, devices=jax.devices()[:1], init=workdir is None)
    info, model = run.info, run.model
    if workdir is None:
        params = jax.device_get(run.state.params)
        where = f'the initialisation of seed {config.seed}'
        step = None
    else:
        ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / 'checkpoints')
        try:
            step = ckpt.latest_step() if step is None else step
            params = ckpt.restore_params(step)
        finally:
            ckpt.close()
        where = f'the checkpoint at step {step} in {workdir}'
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), contract.dummy_batch(info, 2), train=False, with_refiner=False)
    )['params']
    params = {k: v for k, v in params.items() if k in abstract}
    checkpointing.check_shapes(params, abstract, where)

    @jax.jit
    def embed(params, batch):
        logits, aux = model.apply({'params': params}, batch, train=False, with_refiner=False)
        return {'logits': logits, 'fused': aux['fused'], 'embeddings': aux['embeddings']}

    return Network(
        config=config,
        workdir=None if workdir is None else str(workdir),
        step=step,
        info=info,
        params=params,
        embed=embed,
    )


def collect(
    config,
    workdir: str | pathlib.Path | None,
    split: str,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    network: Network | None = None,
) -> dict[str, Any]:
    """The embeddings of a model on every real example of a split (or a seeded subsample of them).

    Runs on one device, in this process, over `input_pipeline.eval_batches` (padding rows dropped), with the
    model in inference mode (no dropout, no refiner).

    Args:
      config: the run's config (`train_lib.load_workdir_config(workdir)`).
      workdir: a training or pre-training run; its latest checkpoint is used. None: the randomly initialised
        network of `config` (`load_network`).
      split: 'train', 'validation', 'test', ... of `config.data`.
      max_examples: keep this many examples, drawn without replacement by `np.random.default_rng(seed)` and
        kept in split order; None: all of them.
      seed: seeds the subsample.
      batch_size: evaluation batch rows (default `config.eval.batch_size`).
      network: `load_network(config, workdir)`, when already loaded (to embed several splits with one load).

    Returns:
      {'fused': (N, D) float32, 'embeddings': {m: (N, D_m)}, 'logits': (N, C), 'labels': (N,) class ids or
      (N, C) multi-hot, 'index': (N,) position of each example among the split's examples, 'multi_label',
      'class_names', 'step' (of the checkpoint; None for the random network)}.
    """
    import jax

    from refnet_jax import contract, input_pipeline

    if max_examples is not None and (isinstance(max_examples, bool) or not int(max_examples) >= 1):
        raise ValueError(f'max_examples={max_examples!r}, expected a positive int or None')
    if network is None:
        network = load_network(config, workdir)
    elif network.workdir != (None if workdir is None else str(workdir)) or network.config is not config:
        raise ValueError(
            f'network was loaded from workdir {network.workdir!r} and another config; collect was given '
            f'workdir {workdir!r}'
        )
    info = network.info
    parts = []
    for batch in input_pipeline.eval_batches(config, split, batch_size, process_index=0, process_count=1):
        contract.check_batch(batch, info)
        mask = np.asarray(batch['mask'], bool)
        if not mask.any():
            continue
        inputs = {k: v for k, v in batch.items() if k not in ('label', 'mask')}
        out = jax.device_get(network.embed(network.params, inputs))
        out['labels'] = batch['label']
        parts.append(jax.tree.map(lambda a, mask=mask: np.asarray(a)[mask], out))
    if not parts:
        raise ValueError(f'split {split!r} of {info.name!r} has no examples')
    data = jax.tree.map(lambda *a: np.concatenate(a), *parts)
    n = data['labels'].shape[0]
    data['index'] = np.arange(n)
    if max_examples is not None and max_examples < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=int(max_examples), replace=False))
        data = jax.tree.map(lambda a: a[keep], data)
    data['multi_label'] = info.multi_label
    data['class_names'] = tuple(info.class_names)
    data['step'] = network.step
    return data


def analyze(
    collected: Mapping[str, Any],
    *,
    k: int = 10,
    seed: int = 0,
    ridge: float = 1e-3,
    probe_train: Mapping[str, Any] | None = None,
    probe_l2: float = 1e-3,
) -> dict[str, float]:
    """Every scalar of the analysis for one model, on the examples of `collected` (`collect`'s output).

    Keys: `num_examples`, `accuracy` (of the model's own head), `homophily`, `chance_homophily`,
    `knn_accuracy` (k-NN graph of the fused embeddings, `k` neighbours), `silhouette` (cosine), and
    `responsibility/<m>` per modality (`modality_responsibility` with `ridge`, split seeded by `seed`). With
    `probe_train` (a `collect` of another split, e.g. train), also `probe_accuracy`: `linear_probe` fitted on
    its fused embeddings and scored on these. Multi-label data get `num_examples` and the responsibilities only.
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


# ----------------------------------------------------------------------------------------------- pictures


def stratified_subsample(labels: ArrayLike, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` examples (all of them if fewer), sorted by label and then by index.

    Each class gets a share proportional to its size (largest remainders first, ties to the smaller class id),
    drawn without replacement by `np.random.default_rng(seed)`.
    """
    y = np.asarray(labels)
    codes, num_classes = _class_ids(y, y.shape[0] if y.ndim == 1 else -1)
    n = codes.size
    if size >= n:
        return np.lexsort((np.arange(n), codes))
    counts = np.bincount(codes, minlength=num_classes)
    quota = counts * size / n
    take = np.floor(quota).astype(int)
    for c in np.lexsort((np.arange(num_classes), -(quota - take)))[: size - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    keep = [
        np.sort(rng.choice(np.flatnonzero(codes == c), size=take[c], replace=False))
        for c in range(num_classes)
    ]
    return np.concatenate(keep)


def pca_2d(z: ArrayLike) -> np.ndarray:
    """(N, 2): the L2-normalised rows of z projected on their first two principal components (NumPy SVD),
    each component's sign fixed so that its largest-magnitude loading is positive."""
    x = _normalise(_matrix(z))
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[:2].T  # (D, 2)
    v = v * np.sign(v[np.argmax(np.abs(v), axis=0), [0, 1]])
    return x @ v


def plot_models(
    results: Mapping[str, Mapping[str, Any]],
    path: str | pathlib.Path,
    *,
    scores: Mapping[str, Mapping[str, float]] | None = None,
    k: int = 10,
    num_similarity: int = 600,
    num_scatter: int = 3000,
    seed: int = 0,
) -> None:
    """One PNG with a column per model: the fused embeddings in 2-D (top) and their similarity matrix (bottom).

    Top: `pca_2d` of all the model's fused embeddings; a seeded subsample of `num_scatter` of them is drawn,
    coloured by label. Bottom: the cosine similarities of a `stratified_subsample` of `num_similarity`
    examples, sorted by label, with lines at the class boundaries. Titles give the homophily and kNN accuracy,
    from `scores` ({model: `analyze` output}) or, without it, computed here with `k` neighbours.

    Args:
      results: {model name: `collect` output}, single-label.
      path: the PNG written.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError(
            'plot_models needs matplotlib: pip install "refnet_jax[analysis]" (or analyze.py --noplot)'
        ) from e

    names = list(results)
    if not names:
        raise ValueError('plot_models needs at least one model')
    for name, data in results.items():
        if np.asarray(data['labels']).ndim != 1:
            raise ValueError(
                f'plot_models draws single-label data; {name!r} has labels of shape {data["labels"].shape}'
            )
    fig = Figure(figsize=(4.6 * len(names) + 1.5, 8.6), layout='constrained')
    axes = fig.subplots(2, len(names), squeeze=False)
    cmap = colormaps['tab20']
    for col, name in enumerate(names):
        data = results[name]
        z, labels = np.asarray(data['fused']), np.asarray(data['labels'])
        codes, num_classes = _class_ids(labels, labels.shape[0])
        score = dict(scores[name]) if scores and name in scores else {}
        if 'homophily' not in score:
            nb = knn_graph(z, k)
            score = {'homophily': homophily(nb, labels), 'knn_accuracy': knn_accuracy(nb, labels), **score}

        xy = pca_2d(z)
        shown = np.random.default_rng(seed).permutation(len(z))[:num_scatter]
        ax = axes[0, col]
        ax.scatter(xy[shown, 0], xy[shown, 1], c=cmap(codes[shown] % 20), s=4, linewidths=0, alpha=0.7)
        ax.set_title(f'{name}\nhomophily {score["homophily"]:.3f}, kNN acc {score["knn_accuracy"]:.3f}')
        ax.set_xlabel('PC 1')
        ax.set_ylabel('PC 2')
        ax.set_aspect('equal', adjustable='datalim')

        sub = stratified_subsample(labels, num_similarity, seed)
        x = _normalise(z[sub].astype(np.float64))
        sim = x @ x.T
        n = len(sub)
        # The colour range is the model's own (1st to 99th percentile of the off-diagonal similarities): raw
        # cosine similarities can all lie near 1, which a fixed [-1, 1] range would show as one flat colour.
        lo, hi = np.percentile(sim[~np.eye(n, dtype=bool)], [1, 99]) if n > 1 else (-1.0, 1.0)
        norm = Normalize(lo, max(hi, lo + 1e-6))
        strip = max(2, n // 40)  # the label of each row and column, in the colours of the scatter plot
        canvas = np.ones((n + strip, n + strip, 4))
        canvas[strip:, strip:] = colormaps['viridis'](norm(sim))
        canvas[:strip, strip:] = cmap(codes[sub] % 20)[None]
        canvas[strip:, :strip] = cmap(codes[sub] % 20)[:, None]
        ax = axes[1, col]
        ax.imshow(canvas, interpolation='nearest')
        for e in np.flatnonzero(np.diff(codes[sub])) + 0.5 + strip:
            ax.axhline(e, color='w', linewidth=0.4)
            ax.axvline(e, color='w', linewidth=0.4)
        ax.set_title(f'similarity of {n} examples,\nsorted by label')
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(ScalarMappable(norm, 'viridis'), ax=ax, shrink=0.7, label='cos(z_i, z_j)')
    class_names = results[names[0]].get('class_names')
    used = np.unique(np.asarray(results[names[0]]['labels']))
    if class_names is not None and len(used) <= 20:
        handles = [
            Line2D([], [], marker='o', linestyle='', color=cmap(i % 20), label=str(class_names[c]))
            for i, c in enumerate(used)
        ]
        fig.legend(handles=handles, loc='outside right upper', fontsize='small', title='label')
    fig.savefig(path, dpi=110)
