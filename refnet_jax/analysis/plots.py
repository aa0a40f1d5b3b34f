"""The pictures of tools/analyze.py: the fused embeddings of several models side by side (matplotlib).

Only tools/analyze.py imports this module; it needs matplotlib (the `analysis` extra), which the library
(`refnet_jax`) does not depend on. The numbers in the titles come from `refnet_jax.analysis.graph`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import ArrayLike

from refnet_jax.analysis import graph


def _class_codes(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(codes (N,) in [0, C), C): single-label class ids (N,) renumbered by sorted value."""
    if labels.ndim != 1 or labels.dtype.kind not in 'iub':
        raise ValueError(
            f'labels must be (N,) integer class ids (single-label); got {labels.dtype} {labels.shape}'
        )
    classes, codes = np.unique(labels, return_inverse=True)
    return codes, len(classes)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero), as `graph.knn_graph` compares them."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def stratified_subsample(labels: ArrayLike, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` examples (all of them if fewer), sorted by label and then by index.

    Each class gets a share proportional to its size (largest remainders first, ties to the smaller class id),
    drawn without replacement by `np.random.default_rng(seed)`.
    """
    y = np.asarray(labels)
    codes, num_classes = _class_codes(y)
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
    """(N, 2): the L2-normalized rows of z projected on their first two principal components (NumPy SVD),
    each component's sign fixed so that its largest-magnitude loading is positive."""
    x = _unit_rows(np.asarray(z, np.float64))
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
    from `scores` ({model: `graph.analyze` output}) or, without it, computed here with `k` neighbours.

    Args:
      results: {model name: `inference.collect` output}, single-label.
      path: the PNG written.
    """
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
        codes, _ = _class_codes(labels)
        score = dict(scores[name]) if scores and name in scores else {}
        if 'homophily' not in score:
            nb = graph.knn_graph(z, k)
            score = {
                'homophily': graph.homophily(nb, labels),
                'knn_accuracy': graph.knn_accuracy(nb, labels),
                **score,
            }

        xy = pca_2d(z)
        shown = np.random.default_rng(seed).permutation(len(z))[:num_scatter]
        ax = axes[0, col]
        ax.scatter(xy[shown, 0], xy[shown, 1], c=cmap(codes[shown] % 20), s=4, linewidths=0, alpha=0.7)
        ax.set_title(f'{name}\nhomophily {score["homophily"]:.3f}, kNN acc {score["knn_accuracy"]:.3f}')
        ax.set_xlabel('PC 1')
        ax.set_ylabel('PC 2')
        ax.set_aspect('equal', adjustable='datalim')

        sub = stratified_subsample(labels, num_similarity, seed)
        x = _unit_rows(z[sub].astype(np.float64))
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
