"""Exact gradient accumulation for losses that compare examples (GradCache; Gao et al., 2021).

Accumulating the gradients of micro-batches changes a loss that pairs examples: the Multi-Similarity loss
of each micro-batch sees only its own pairs (sentence-transformers PR #1822). The loss here depends on the
parameters only through the network's per-example outputs (logits and aux: z, reconstructions, targets),
and each example's outputs only on its own inputs. So, as GradCache does for the embeddings of a
contrastive loss:

1. run every micro-batch forward, without keeping activations for a backward pass, and concatenate the
   outputs into those of the whole batch;
2. take the loss of the whole batch on them (every pair of the MS loss, every mean over the whole batch),
   and its gradient with respect to the outputs;
3. run every micro-batch forward again and backpropagate its share of that output gradient into the
   parameters, summing over micro-batches.

By the chain rule the sum is the gradient of the whole batch, exactly (up to float summation order), at
the activation memory of one micro-batch (`config.train.accumulation_steps` of them make a batch). The
loss and metrics are those of the whole batch too. Dropout draws a key per micro-batch (the same in both
passes), so with dropout on, training differs from an unaccumulated run as a different seed would.

Micro-batch j holds the examples j, j + k, j + 2k, ... of the batch, so that each spreads evenly over the
devices of a row-sharded batch. A shared modality's rows (`contract.index_key`) go whole into every
micro-batch (each is encoded k times; the index picks each example's row).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from refnet_jax.data import contract

Outputs = tuple[jax.Array, dict[str, Any]]


def _split(batch: Mapping[str, jax.Array], k: int) -> tuple[dict, dict]:
    """(per-example keys as (k, B/k, ...) micro-batches, shared rows as they are)."""
    shared = {key: v for key, v in batch.items() if contract.index_key(key) in batch}
    split = {
        key: v.reshape(v.shape[0] // k, k, *v.shape[1:]).swapaxes(0, 1)
        for key, v in batch.items()
        if key not in shared
    }
    return split, shared


def _merge(stacked: Any) -> Any:
    """(k, B/k, ...) leaves -> (B, ...) in the batch's order (the inverse of `_split`)."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), stacked)


def _unmerge(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), tree)


def cached_gradients(
    forward: Callable[[Any, Mapping[str, jax.Array], jax.Array], Outputs],
    loss: Callable[[jax.Array, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]],
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    steps: int,
) -> tuple[Any, dict[str, jax.Array]]:
    """The gradient of `loss` over the whole `batch`, computed `steps` micro-batches at a time.

    Args:
      forward: (params, micro-batch, rng) -> (logits, aux), the network's per-example outputs.
      loss: (logits, aux) of the whole batch -> (scalar loss, metrics).
      params: the parameters to differentiate.
      batch: the whole batch; its examples must divide by `steps`.
      rng: the step's key; micro-batch j uses `fold_in(rng, j)`.
      steps: the number of micro-batches.

    Returns:
      (gradients, metrics), the metrics those of `loss` on the whole batch.
    """
    split, shared = _split(batch, steps)
    keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(steps))

    def run(p, micro, key):
        return forward(p, {**shared, **micro}, key)

    # 1. Every micro-batch forward, outputs only.
    stacked = jax.lax.map(lambda xs: run(params, *xs), (split, keys))
    outputs = _merge(stacked)
    leaves, treedef = jax.tree.flatten(outputs)
    is_float = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]

    def rebuild(floats, others):
        floats, others = iter(floats), iter(others)
        return jax.tree.unflatten(treedef, [next(floats) if f else next(others) for f in is_float])

    floats = [x for x, f in zip(leaves, is_float, strict=True) if f]
    others = [x for x, f in zip(leaves, is_float, strict=True) if not f]

    # 2. The whole batch's loss, and its gradient with respect to the (float) outputs.
    def loss_of(floats):
        return loss(*rebuild(floats, others))

    (_, metrics), cotangents = jax.value_and_grad(loss_of, has_aux=True)(floats)
    cotangents = _unmerge(cotangents, steps)

    # 3. Each micro-batch again, backpropagating its share of the output gradient.
    def backward(total, xs):
        micro, key, cotangent = xs

        def float_outputs(p):
            out = jax.tree.leaves(run(p, micro, key))
            return [x for x, f in zip(out, is_float, strict=True) if f]

        _, vjp = jax.vjp(float_outputs, params)
        (grads,) = vjp(cotangent)
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backward, zeros, (split, keys, cotangents))
    return grads, metrics
