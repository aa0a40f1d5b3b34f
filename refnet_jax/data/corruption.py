"""Test-time corruption of one modality, for robustness studies (MultiBench style).

Three kinds, each applied to one modality of a host batch:
- `noise`: Gaussian noise of standard deviation `level` x the modality's own standard deviation (over the
  split), added to its values; pixels stay in [0, 255]. Not defined for token ids.
- `mask`: a random share `level` of the modality's positions zeroed: pixels (all channels of one position),
  time steps, features, or tokens (set to padding: `ModalityInfo.pad_id`, 0 for `tokens`).
- `absent`: the modality marked absent in every example (`contract.present_key`); its values are not read.

Draws come from a NumPy generator that the caller seeds per batch, so an evaluation is reproducible.
"""

from collections.abc import Iterable, Mapping

import numpy as np

from refnet_jax.data import contract

KINDS = ('noise', 'mask', 'absent')
NOISE_LEVELS = (0.25, 0.5, 1.0, 1.5, 2.0)  # x the modality's standard deviation
MASK_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # share of positions zeroed


def levels(kind: str) -> tuple[float, ...]:
    """The corruption levels of `kind` (absence has one)."""
    return {'noise': NOISE_LEVELS, 'mask': MASK_LEVELS, 'absent': (1.0,)}[kind]


def applies(kind: str, info: contract.ModalityInfo) -> bool:
    """Whether `kind` is defined for a modality (Gaussian noise is not, on token ids: tokens, text)."""
    return not (kind == 'noise' and contract.KINDS[info.kind].needs_vocab)


def modality_std(batches: Iterable[Mapping[str, np.ndarray]], modality: str) -> float:
    """The standard deviation of a modality's values over the real rows of a split's batches (a shared
    modality's rows: those that some real example uses)."""
    total, total_sq, count = 0.0, 0.0, 0
    for batch in batches:
        x = np.asarray(batch[modality], np.float64)
        index = batch.get(contract.index_key(modality))
        if index is not None:
            rows = np.unique(np.asarray(index)[np.asarray(batch['mask'], bool)])
        else:
            rows = np.flatnonzero(np.asarray(batch['mask'], bool))
        x = x[rows]
        total, total_sq, count = total + x.sum(), total_sq + (x**2).sum(), count + x.size
    mean = total / max(count, 1)
    return float(np.sqrt(max(total_sq / max(count, 1) - mean**2, 0.0)))


def corrupt(
    batch: Mapping[str, np.ndarray],
    modality: str,
    info: contract.ModalityInfo,
    kind: str,
    level: float,
    rng: np.random.Generator,
    std: float = 1.0,
) -> dict[str, np.ndarray]:
    """A copy of `batch` with `modality` corrupted by `kind` at `level` (see the module docstring).

    Args:
      batch: a host batch (an evaluation batch carries its `mask`).
      modality: the modality to corrupt.
      info: its description (kind, shape, dtype).
      kind: one of KINDS.
      level: the noise's standard deviation in units of `std`, or the share of positions masked.
      rng: the generator of the draws.
      std: the modality's standard deviation (`modality_std`), for `noise`.
    """
    if kind not in KINDS:
        raise ValueError(f'corruption kind is {kind!r}; expected one of {KINDS}')
    if not applies(kind, info):
        raise ValueError(f'{kind!r} corruption does not apply to {modality!r} (kind {info.kind!r})')
    out = dict(batch)
    if kind == 'absent':
        n = len(batch['mask']) if 'mask' in batch else len(batch['label'])
        out[contract.present_key(modality)] = np.zeros((n,), bool)
        return out
    x = np.asarray(batch[modality])
    if kind == 'noise':
        noisy = x.astype(np.float64) + rng.normal(0.0, level * std, x.shape)
        if info.kind == 'image' and np.issubdtype(x.dtype, np.integer):
            noisy = np.clip(np.rint(noisy), 0, 255)
        out[modality] = noisy.astype(x.dtype)
        return out
    # mask: positions are the item's leading axes (image: H x W; series: T; features: F; tokens: L).
    positions = x.shape[:3] if info.kind == 'image' else x.shape[:2]
    keep = rng.random(positions) >= level
    keep = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
    fill = info.pad_id if contract.KINDS[info.kind].needs_vocab else 0  # a masked token is padding
    out[modality] = np.where(keep, x, np.asarray(fill, x.dtype)).astype(x.dtype)
    return out
