"""Losses for ReFNet: Multi-Similarity, refiner and task losses (docs/architecture.md, "The method").

All functions are pure and jittable with fixed shapes. Per-example losses return one value per example, optax
style, and take an optional ``where`` mask of shape (B,): masked examples give 0 and may hold any values (padding,
even NaN) without affecting the value or the gradient of the others. Reduce with :func:`masked_mean`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

_NORM_EPS = 1e-12  # As torch.nn.functional.normalize, which pytorch-metric-learning uses.
_REFINER_KINDS = ('cosine', 'mse')


def _valid_mask(where: jax.Array | None, batch: int, name: str) -> jax.Array:
    """Returns ``where`` as a (B,) bool array (all True when None), checking its shape."""
    if where is None:
        return jnp.ones((batch,), dtype=bool)
    if jnp.shape(where) != (batch,):
        raise ValueError(f'`where` must have shape ({batch},) to match `{name}`, got {jnp.shape(where)}.')
    return jnp.asarray(where, dtype=bool)


def _as_float(x: jax.Array) -> jax.Array:
    """``x`` as a float array of at least float32 precision (bfloat16 similarities times beta=50 are too coarse)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) along the last axis: a zero row stays zero, with a finite gradient."""
    sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, _NORM_EPS**2))


def _zero_masked_rows(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Replaces masked rows by zeros, so NaN padding cannot leak into gradients through 0 * NaN."""
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def _masked_log1p_sum_exp(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """log(1 + sum_k exp(logits_ik)) over the entries where mask_ik, per row; exactly 0 for an empty row.

    Stable, and with a finite gradient for empty rows: the appended zero logit keeps logsumexp away from a
    row of only -inf, and masked entries receive a zero gradient.
    """
    masked = jnp.where(mask, logits, -jnp.inf)
    with_one = jnp.concatenate([masked, jnp.zeros_like(masked[:, :1])], axis=1)
    return jax.nn.logsumexp(with_one, axis=1)


def _ms_anchor_losses(
    anchors: jax.Array,
    anchor_labels: jax.Array,
    anchor_valid: jax.Array,
    anchor_ids: jax.Array,
    normed: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    alpha: float,
    beta: float,
    base: float,
    epsilon: float,
    mining: bool,
) -> jax.Array:
    """MS loss_i of R anchor rows against the whole batch: (R,) values, 0 for an anchor without pairs.

    Everything an anchor needs (its similarities, its pairs, its hardest positive and negative) lies in its own
    row of the similarity matrix, so any set of rows can be computed alone.

    Args:
      anchors: (R, D) L2-normalized anchor embeddings.
      anchor_labels: (R,) class ids or (R, C) float 0/1 multi-hot labels of the anchors.
      anchor_valid: (R,) bool, False for masked or padding anchors (their row is all zeros).
      anchor_ids: (R,) int, each anchor's row in the batch (an example is never its own pair).
      normed: (B, D) L2-normalized batch.
      labels: (B,) or (B, C), as ``anchor_labels``.
      valid: (B,) bool.
    """
    sim = anchors @ normed.T  # (R, B)
    if labels.ndim == 1:
        same = anchor_labels[:, None] == labels[None, :]
    else:
        same = (anchor_labels @ labels.T) > 0
    not_self = anchor_ids[:, None] != jnp.arange(normed.shape[0])[None, :]
    pair_ok = anchor_valid[:, None] & valid[None, :] & not_self
    pos = same & pair_ok
    neg = ~same & pair_ok

    if mining:
        s = jax.lax.stop_gradient(sim)
        min_pos = jnp.min(jnp.where(pos, s, jnp.inf), axis=1, keepdims=True)  # +inf without positives.
        max_neg = jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True)  # -inf without negatives.
        # Same comparisons, in the same form, as MultiSimilarityMiner for an inverted (similarity) distance.
        neg = neg & (s + epsilon > min_pos)
        pos = pos & (s - epsilon < max_neg)

    pos_term = _masked_log1p_sum_exp(-alpha * (sim - base), pos) / alpha  # (R,)
    neg_term = _masked_log1p_sum_exp(beta * (sim - base), neg) / beta  # (R,)
    return pos_term + neg_term


# Automatic blocking: the largest (rows, B) similarity tile held at once, in elements. 2**24 float32 values are
# 64 MiB, the size of the whole matrix at B = 4096.
MS_BLOCK_ELEMENTS = 4096 * 4096


def ms_block_size(batch: int, block_size: int | None = None) -> int:
    """The anchor rows per block that :func:`multi_similarity_loss` uses; 0 means dense (one B x B matrix).

    ``block_size=None`` picks automatically: dense while B * B <= MS_BLOCK_ELEMENTS (B <= 4096), else the largest
    multiple of 8 rows with rows * B <= MS_BLOCK_ELEMENTS (B = 8192: 2048; 32768: 512; 65536: 256), so the
    similarity tile never exceeds 64 MiB of float32. ``block_size=0`` forces dense; a positive value is taken as
    is, except that a block of at least B rows is the dense computation.
    """
    if block_size is None:
        if batch * batch <= MS_BLOCK_ELEMENTS:
            return 0
        return max(8, MS_BLOCK_ELEMENTS // batch // 8 * 8)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise ValueError(
            f'`block_size` must be None (automatic), 0 (dense) or a positive int, got {block_size!r}.'
        )
    return 0 if block_size >= batch else block_size


def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    where: jax.Array | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Multi-Similarity loss (Wang et al., 2019) on cosine similarities, with its hard-pair miner.

    Equals pytorch-metric-learning's ``MultiSimilarityLoss(alpha, beta, base)`` with indices from
    ``MultiSimilarityMiner(epsilon)`` (``mining=True``) or all pairs (``mining=False``), extended to multi-label
    data and to a ``where`` mask (one corner differs: pytorch-metric-learning returns 0 outright when at most one
    positive and one negative pair survive in the whole batch; here those pairs still count). For anchor i with
    positives P_i and negatives N_i (after mining):

      loss_i = 1/alpha log(1 + sum_{k in P_i} exp(-alpha (S_ik - base)))
             + 1/beta  log(1 + sum_{k in N_i} exp( beta (S_ik - base)))

    where S is the cosine similarity matrix; a term with no pair is 0. The result is the mean of loss_i over the
    valid anchors (every anchor counts, also one without pairs). Mining keeps negative k if
    S_ik + epsilon > min_{p in pos(i)} S_ip and positive k if S_ik - epsilon < max_{n in neg(i)} S_in, so an
    anchor without positives keeps no negatives and vice versa. The mining masks carry no gradient.

    Works on a fixed-shape (B, B) matrix with masks: it jits once per shape, and under ``jax.jit`` with the batch
    sharded on an Auto mesh axis XLA partitions the pairwise computation itself. Large batches are computed in
    blocks of anchor rows (see ``block_size``), each a (rows, B) tile against the whole batch, rematerialized in
    the backward pass: memory O(rows * B) instead of O(B^2), same value and gradient up to float rounding.

    Args:
      embeddings: (B, D) embeddings, computed in at least float32; L2-normalized here (a zero row stays zero and
        has similarity 0 to every row).
      labels: (B,) integer class ids, or (B, C) multi-hot labels. Two examples are positives if they share a
        class (multi-hot: at least one label) and negatives if they share none; an example is never its own pair.
      alpha: scale of the positive term.
      beta: scale of the negative term.
      base: similarity margin lambda.
      epsilon: mining margin.
      mining: whether to mine hard pairs as ``MultiSimilarityMiner(epsilon)``; if False all pairs are used.
      where: optional (B,) bool mask; a False row is neither an anchor nor a pair of any anchor.
      block_size: anchor rows per block. None (default): dense up to B = 4096, blocks of at most 2**24 similarity
        entries above (:func:`ms_block_size`); 0: always dense; n > 0: blocks of n rows (B need not be a
        multiple: the last block is padded with masked rows), dense when n >= B.

    Returns:
      Scalar loss, the mean over valid anchors; 0 when there is none.

    >>> emb = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    >>> print(f'{multi_similarity_loss(emb, jnp.array([0, 0, 1, 1])):.4f}')
    0.3889
    >>> print(f'{multi_similarity_loss(emb, jnp.array([0, 0, 1, 1]), block_size=3):.4f}')
    0.3889
    """
    embeddings, labels = _as_float(embeddings), jnp.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f'`embeddings` must have shape (B, D), got {embeddings.shape}.')
    batch = embeddings.shape[0]
    if labels.ndim not in (1, 2) or labels.shape[0] != batch:
        raise ValueError(
            f'`labels` must have shape ({batch},) (class ids) or ({batch}, C) (multi-hot) to match `embeddings` '
            f'{embeddings.shape}, got {labels.shape}.'
        )
    valid = _valid_mask(where, batch, 'embeddings')
    rows = ms_block_size(batch, block_size)

    normed = _l2_normalize(_zero_masked_rows(embeddings, valid))  # (B, D)
    if labels.ndim == 2:
        labels = (labels != 0).astype(jnp.float32)  # (B, C) multi-hot: shared labels by one matmul.
    anchor_losses = functools.partial(
        _ms_anchor_losses,
        normed=normed,
        labels=labels,
        valid=valid,
        alpha=alpha,
        beta=beta,
        base=base,
        epsilon=epsilon,
        mining=mining,
    )
    ids = jnp.arange(batch)
    if rows == 0:
        values = anchor_losses(normed, labels, valid, ids)  # (B,)
        return masked_mean(values, where=valid)

    # Blocks of anchor rows, padded to a multiple of `rows` with masked rows. Block k holds rows k, k + n, k + 2n,
    # ... (n blocks): with the batch sharded contiguously over devices, every block then has rows on every
    # device, so each step of the loop is split across devices rather than run by one.
    num_blocks = -(-batch // rows)
    padded = num_blocks * rows

    def blocks(x):  # (B, ...) -> (num_blocks, rows, ...)
        x = jnp.pad(x, [(0, padded - batch)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape(rows, num_blocks, *x.shape[1:]), 0, 1)

    # Remat: the backward pass recomputes each block's (rows, B) tile instead of storing B x B intermediates.
    block_fn = jax.checkpoint(lambda xs: anchor_losses(*xs))
    values = jax.lax.map(block_fn, (blocks(normed), blocks(labels), blocks(valid), blocks(ids)))
    values = jnp.swapaxes(values, 0, 1).reshape(padded)[:batch]  # (B,) in batch order.
    return masked_mean(values, where=valid)


def refiner_loss(
    reconstruction: jax.Array,
    target: jax.Array,
    kind: str = 'cosine',
    where: jax.Array | None = None,
) -> jax.Array:
    """Per-example refiner loss between a modality's reconstruction R_m(z) and its target t_m.

    Args:
      reconstruction: (B, ...) reconstruction; trailing dimensions are flattened.
      target: (B, ...) target with as many elements per example as ``reconstruction`` (any numeric dtype).
      kind: ``'cosine'`` for the cosine distance 1 - cos(reconstruction, target) (a zero vector has cosine 0 to
        everything, so distance 1), or ``'mse'`` for the squared error averaged over the feature dimensions.
      where: optional (B,) bool mask; masked examples give 0.

    Returns:
      (B,) losses.

    >>> refiner_loss(jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[2.0, 0.0], [1.0, 0.0]]))
    Array([0., 1.], dtype=float32)
    """
    if kind not in _REFINER_KINDS:
        raise ValueError(f'`kind` must be one of {_REFINER_KINDS}, got {kind!r}.')
    reconstruction, target = _as_float(reconstruction), _as_float(target)
    if (
        reconstruction.ndim < 1
        or target.shape[:1] != reconstruction.shape[:1]
        or target.size != reconstruction.size
    ):
        raise ValueError(
            '`reconstruction` and `target` must both be (B, ...) with the same number of elements per example, '
            f'got {reconstruction.shape} and {target.shape}.'
        )
    batch = reconstruction.shape[0]
    recon = reconstruction.reshape(batch, -1)  # (B, F)
    tgt = target.reshape(batch, -1)  # (B, F)
    valid = _valid_mask(where, batch, 'reconstruction')
    recon = _zero_masked_rows(recon, valid)
    tgt = _zero_masked_rows(tgt, valid)
    if kind == 'cosine':
        values = 1.0 - jnp.sum(_l2_normalize(recon) * _l2_normalize(tgt), axis=1)
    else:
        values = jnp.mean(jnp.square(recon - tgt), axis=1)
    return jnp.where(valid, values, 0.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Per-example softmax cross-entropy for single-label classification.

    Args:
      logits: (B, C) unnormalized scores.
      labels: (B,) integer class ids in [0, C).
      where: optional (B,) bool mask; masked examples give 0 (their labels may be out of range).

    Returns:
      (B,) losses.

    >>> softmax_cross_entropy(jnp.array([[0.0, 0.0], [0.0, 0.0]]), jnp.array([0, 1]), where=jnp.array([True, False]))
    Array([0.6931472, 0.       ], dtype=float32)
    """
    logits, labels = _as_float(logits), jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f'`logits` must be (B, C) and `labels` (B,), got {logits.shape} and {labels.shape}.')
    valid = _valid_mask(where, logits.shape[0], 'logits')
    logits = _zero_masked_rows(logits, valid)
    labels = jnp.where(valid, labels, 0)
    values = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.where(valid, values, 0.0)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Per-example sigmoid (binary) cross-entropy for multi-label classification, averaged over classes.

    Args:
      logits: (B, C) unnormalized scores.
      labels: (B, C) multi-hot targets in {0, 1} (soft targets in [0, 1] also work).
      where: optional (B,) bool mask; masked examples give 0.

    Returns:
      (B,) losses.

    >>> sigmoid_cross_entropy(jnp.zeros((1, 3)), jnp.array([[1, 0, 1]]))
    Array([0.6931472], dtype=float32)
    """
    logits, labels = _as_float(logits), jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape:
        raise ValueError(f'`logits` and `labels` must both be (B, C), got {logits.shape} and {labels.shape}.')
    valid = _valid_mask(where, logits.shape[0], 'logits')
    logits = _zero_masked_rows(logits, valid)
    labels = _zero_masked_rows(jnp.asarray(labels, logits.dtype), valid)
    values = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=1)
    return jnp.where(valid, values, 0.0)


def masked_mean(values: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Mean of (B,) ``values`` over the entries where ``where`` is True; 0 when there is none.

    >>> masked_mean(jnp.array([1.0, 2.0, 9.0]), where=jnp.array([True, True, False]))
    Array(1.5, dtype=float32)
    """
    values = jnp.asarray(values)
    if values.ndim != 1:
        raise ValueError(f'`values` must have shape (B,), got {values.shape}.')
    valid = _valid_mask(where, values.shape[0], 'values')
    total = jnp.sum(jnp.where(valid, values, jnp.zeros_like(values)))
    count = jnp.sum(valid)
    return total / jnp.maximum(count, 1).astype(total.dtype)
