"""The training objectives: the model's outputs and a batch -> (loss, metrics).

Supervised: L = L_task(H(z), y) + sum_m w_m L_ref(R_m(z), t_m) + gamma L_MS(z, y).
Pre-training: sum_m w_m L_ref(R_m(z), t_m), labels never read.
Every term is averaged over the real examples of the batch (`batch['mask']`, where padding exists).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from refnet_jax import losses


def refiner_terms(
    aux: Mapping[str, Any], config: ml_collections.ConfigDict, mask: jax.Array | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted refiner loss and its per-modality values (0 when the refiner is off)."""
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for m, recon in aux.get('reconstructions', {}).items():
        per_example = losses.refiner_loss(recon, aux['targets'][m], kind=config.loss.refiner_kind, where=mask)
        value = losses.masked_mean(per_example, mask)
        metrics[f'refiner_loss/{m}'] = value
        total = total + config.loss.refiner_weights[m] * value
    return total, metrics


def supervised_loss(
    logits: jax.Array,
    aux: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    config: ml_collections.ConfigDict,
    multi_label: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ReFNet supervised loss and its terms.

    Args:
      logits: (B, C) task-head outputs.
      aux: the model's aux dict.
      batch: holds `label` ((B,) int, or (B, C) multi-hot when `multi_label`) and optionally `mask` (B,).
      config: the experiment config (`config.loss`).
      multi_label: sigmoid task loss and multi-label MS positives.

    Returns:
      The scalar loss and a dict of scalar metrics (loss, task_loss, refiner_loss/<m>, ms_loss, accuracy).
    """
    labels = batch['label']
    mask = batch.get('mask')
    if multi_label:
        task = losses.masked_mean(losses.sigmoid_cross_entropy(logits, labels, where=mask), mask)
        correct = ((logits > 0) == (labels > 0)).all(-1)
    else:
        task = losses.masked_mean(losses.softmax_cross_entropy(logits, labels, where=mask), mask)
        correct = logits.argmax(-1) == labels
    ref, metrics = refiner_terms(aux, config, mask)
    loss = task + ref
    if config.loss.ms_weight > 0:
        ms_cfg = config.loss.ms
        ms = losses.multi_similarity_loss(
            aux['fused'],
            labels,
            alpha=ms_cfg.alpha,
            beta=ms_cfg.beta,
            base=ms_cfg.base,
            epsilon=ms_cfg.epsilon,
            mining=ms_cfg.mining,
            where=mask,
            block_size=ms_cfg.get('block_size'),
        )
        loss = loss + config.loss.ms_weight * ms
        metrics['ms_loss'] = ms
    metrics.update(loss=loss, task_loss=task, accuracy=losses.masked_mean(correct.astype(jnp.float32), mask))
    return loss, metrics


def pretraining_loss(
    aux: Mapping[str, Any], batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The self-supervised refiner loss; reads no label."""
    loss, metrics = refiner_terms(aux, config, batch.get('mask'))
    metrics['loss'] = loss
    return loss, metrics
