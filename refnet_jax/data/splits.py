"""Stratified splits of labeled rows: the held-out splits of a dataset's preparation and the labeled subset
of `config.data.label_fraction`. NumPy only, so that the input pipeline and the dataset modules both use it
without importing each other."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from jax.typing import ArrayLike

DRAWS = ('permutation', 'choice')
ROUNDINGS = ('half_up', 'half_even')


def stratified_split(
    labels: ArrayLike,
    seed: int,
    *,
    fractions: Mapping[str, float] | None = None,
    counts: Mapping[str, int] | None = None,
    rest: str | None = None,
    rounding: str = 'half_up',
    at_least: int = 0,
    draw: str = 'permutation',
) -> dict[str, np.ndarray]:
    """Sorted row indices of `labels` for each split, drawn per class with one `np.random.default_rng(seed)`.

    The strata are the classes of `labels` (N,) class ids, in increasing order; multi-hot labels (N, C) are
    one stratum (their combinations are too many to stratify on). Each split of `fractions` or `counts` gets
    its share of every stratum of n rows: round(n * fraction) or the count, at least `at_least`.

    Args:
      labels: (N,) class ids or (N, C) multi-hot.
      seed: the seed of the one rng that draws every stratum.
      fractions: split -> its share of each stratum; or
      counts: split -> its number of rows of each stratum.
      rest: a split that gets the rows of each stratum left over (returned first), or None to drop them.
      rounding: of n * fraction: 'half_up' (int(x + 0.5)) or 'half_even' (Python's `round`).
      at_least: the fewest rows a split gets of a stratum.
      draw: 'permutation': a permutation of the stratum's rows is cut into the splits' shares, in the order
        of `fractions` or `counts`; 'choice': one split's share is drawn with
        `rng.choice(rows, k, replace=False)` (no `rest`), which picks other rows than the permutation does.

    Returns:
      {split: sorted (n_split,) int64 row indices}: `rest` (if any), then the splits in order.
    """
    if (fractions is None) == (counts is None):
        raise ValueError('stratified_split takes fractions or counts, expected exactly one of them')
    if rounding not in ROUNDINGS or draw not in DRAWS:
        raise ValueError(f'rounding={rounding!r}, draw={draw!r}; expected one of {ROUNDINGS} and of {DRAWS}')
    shares = dict(fractions if fractions is not None else counts)
    if draw == 'choice' and (len(shares) != 1 or rest is not None):
        raise ValueError(
            f"draw='choice' draws one split, expected one and no rest; got {list(shares)}, {rest=}"
        )

    def size(n: int, share: float) -> int:
        if counts is not None:
            k = share
        elif rounding == 'half_up':
            k = int(n * share + 0.5)
        else:
            k = round(share * n)
        return max(at_least, k)

    labels = np.asarray(labels)
    strata = labels if labels.ndim == 1 else np.zeros(len(labels), np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in ((rest,) if rest else ()) + tuple(shares)}
    for c in np.unique(strata):
        members = np.flatnonzero(strata == c)
        if draw == 'choice':
            ((split, share),) = shares.items()
            parts[split].append(rng.choice(members, size(len(members), share), replace=False))
            continue
        rows = rng.permutation(members)
        start = 0
        for split, share in shares.items():
            n = size(len(rows), share)
            parts[split].append(rows[start : start + n])
            start += n
        if rest:
            parts[rest].append(rows[start:])
    return {split: np.sort(np.concatenate(p)) for split, p in parts.items()}
