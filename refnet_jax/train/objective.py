"""The objective of a run: what a training step minimizes and how an evaluation split is scored.

One frozen, hashable dataclass per kind of run (a static argument of the jitted steps), all with the
interface of `Objective`: whether it reads labels, the training loss of a batch, per-example evaluation
outputs (computed in the jitted eval step) and the metrics of a whole split from them. The losses come from
`losses`, the metrics of a split from `metrics`.

Supervised: L = L_task(H(z), y) + sum_m w_m L_ref(R_m(z), t_m) + gamma L_MS(z, y); evaluated by the task
loss, accuracy (and AUROC with two classes) or the multi-label F1 scores.
Pretraining: sum_m w_m L_ref(R_m(z), t_m), labels never read; evaluated by the refiner losses and the spread
of the fused embeddings. Every term is averaged over the real examples of the batch (`batch['mask']`).
"""

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from refnet_jax import losses
from refnet_jax.models import refiner
from refnet_jax.train import metrics


def _where(mask: jax.Array | None, aux: Mapping[str, Any], m: str) -> jax.Array | None:
    """The examples whose modality m counts: real (`mask`) and with m present (`aux['present']`)."""
    present = aux.get('present', {}).get(m)
    if present is None:
        return mask
    return present if mask is None else mask & present


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
    """The interface of an objective, and the refiner terms that every kind of run shares.

    Attributes:
      config: the experiment config (frozen, so that the objective hashes).
      labeled: whether it reads labels; the batches of an objective that reads none never hold `label`.
      eval_with_refiner: whether the eval step runs the refiner.
    """

    config: ml_collections.FrozenConfigDict
    labeled: ClassVar[bool]
    eval_with_refiner: ClassVar[bool]

    def __post_init__(self):
        object.__setattr__(self, 'config', ml_collections.FrozenConfigDict(self.config))

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The part of a host batch the objective may read: all of it, less `label` when it reads none."""
        return {k: v for k, v in batch.items() if self.labeled or k != 'label'}

    def refiner_losses(self, aux: Mapping[str, Any], mask: jax.Array | None) -> dict[str, jax.Array]:
        """{m: (B,)} per-example refiner losses ({} when the refiner is off), 0 where m is absent."""
        kind = self.config.loss.refiner_kind
        return {
            m: losses.refiner_loss(recon, aux['targets'][m], kind=kind, where=_where(mask, aux, m))
            for m, recon in aux.get('reconstructions', {}).items()
        }

    def refiner_terms(
        self, aux: Mapping[str, Any], mask: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted refiner loss and its per-modality values (0 when the refiner is off)."""
        total = jnp.zeros((), jnp.float32)
        terms = {}
        for m, per_example in self.refiner_losses(aux, mask).items():
            # The mean over the examples that have m (0 when none has).
            terms[f'refiner_loss/{m}'] = value = losses.masked_mean(per_example, _where(mask, aux, m))
            total = total + self.config.loss.refiner_weights[m] * value
        return total, terms

    @abc.abstractmethod
    def loss(
        self, logits: jax.Array, aux: Mapping[str, Any], batch: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The scalar training loss of a batch and a dict of scalar metrics (at least `loss`).

        Args:
          logits: (B, C) task-head outputs.
          aux: the model's aux dict.
          batch: the batch (as `inputs` leaves it), with an optional (B,) `mask` of its real examples.
        """

    @abc.abstractmethod
    def eval_outputs(
        self, logits: jax.Array, aux: Mapping[str, Any], batch: Mapping[str, jax.Array]
    ) -> dict[str, Any]:
        """What `split_metrics` needs, computed in the eval step: a pytree whose every leaf is (B, ...)."""

    @abc.abstractmethod
    def split_metrics(self, outputs: Mapping[str, Any]) -> dict[str, float]:
        """The metrics of a split from its `eval_outputs` (NumPy), of the real examples only (no padding)."""

    @abc.abstractmethod
    def metric_names(self, num_classes: int) -> tuple[str, ...]:
        """The names of the metrics `split_metrics` reports (but `num_examples`), the first the headline."""


@dataclasses.dataclass(frozen=True)
class Supervised(Objective):
    """The ReFNet supervised loss: task, refiner and Multi-Similarity terms.

    Attributes:
      multi_label: sigmoid task loss, multi-label MS positives and F1 scores; else softmax and accuracy.
    """

    multi_label: bool = False
    labeled: ClassVar[bool] = True
    eval_with_refiner: ClassVar[bool] = False  # evaluation scores the task head alone

    def task_loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> jax.Array:
        """(B,) per-example task losses of (B, C) logits."""
        if self.multi_label:
            return losses.sigmoid_cross_entropy(logits, labels, where=mask)
        return losses.softmax_cross_entropy(logits, labels, where=mask)

    def loss(self, logits, aux, batch):
        """loss, task_loss, refiner_loss/<m>, ms_loss (when weighted) and accuracy; `batch['label']` is (B,)
        class ids, or (B, C) multi-hot when `multi_label`."""
        labels, mask = batch['label'], batch.get('mask')
        task = losses.masked_mean(self.task_loss(logits, labels, mask), mask)
        if self.multi_label:
            correct = ((logits > 0) == (labels > 0)).all(-1)
        else:
            correct = logits.argmax(-1) == labels
        ref, terms = self.refiner_terms(aux, mask)
        loss = task + ref
        ms_weight = self.config.loss.ms_weight
        if ms_weight > 0:
            ms_cfg = self.config.loss.ms
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
            loss = loss + ms_weight * ms
            terms['ms_loss'] = ms
        terms.update({f'fusion/{k}': v for k, v in aux.get('fusion_stats', {}).items()})
        terms.update(
            loss=loss, task_loss=task, accuracy=losses.masked_mean(correct.astype(jnp.float32), mask)
        )
        return loss, terms

    def eval_outputs(self, logits, aux, batch):
        """{'logits': (B, C), 'label': (B,) or (B, C), 'loss': (B,) task losses}."""
        labels = batch['label']
        return {'logits': logits, 'label': labels, 'loss': self.task_loss(logits, labels, batch.get('mask'))}

    def metric_names(self, num_classes):
        if self.multi_label:
            return ('micro_f1', 'macro_f1', 'weighted_f1', 'samples_f1', 'loss')
        return ('accuracy', 'loss') + (('auroc',) if num_classes == 2 else ())

    def split_metrics(self, outputs):
        """num_examples and the mean task loss; accuracy (and auroc with two classes), or the *_f1 scores."""
        logits, labels = np.asarray(outputs['logits'], np.float64), np.asarray(outputs['label'])
        out = {'num_examples': len(labels), 'loss': np.mean(outputs['loss'], dtype=np.float64)}
        if self.multi_label:
            f1 = metrics.multilabel_f1(logits, labels, threshold=0.0)  # sigmoid(logit) > 0.5
            out.update({f'{k}_f1': v for k, v in f1.items()})
        else:
            out['accuracy'] = metrics.accuracy(logits, labels)
            if logits.shape[1] == 2:
                out['auroc'] = metrics.roc_auc(logits[:, 1] - logits[:, 0], labels)
        return {k: float(v) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Pretraining(Objective):
    """Self-supervised pre-training: the refiner loss alone, labels never read.

    Refuses a config without a refiner, or whose refiner targets the network could collapse onto.
    """

    labeled: ClassVar[bool] = False
    eval_with_refiner: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        weights = self.config.loss.refiner_weights
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f'pre-training needs a refiner: config.loss.refiner_weights is {dict(weights)}')
        target = self.config.model.refiner.target
        if target in refiner.COLLAPSIBLE:
            # A network whose encoders output a constant reconstructs a constant target perfectly.
            raise ValueError(
                f"config.model.refiner.target is {target!r}; pre-training needs 'input': "
                f'{" and ".join(map(repr, refiner.COLLAPSIBLE))} targets are made by the network itself, '
                'which can collapse to a constant that the refiner reconstructs perfectly'
            )

    def loss(self, logits, aux, batch):
        """The weighted refiner loss and its terms (loss, refiner_loss/<m>); reads no label."""
        loss, terms = self.refiner_terms(aux, batch.get('mask'))
        terms.update({f'fusion/{k}': v for k, v in aux.get('fusion_stats', {}).items()})
        terms['loss'] = loss
        return loss, terms

    def eval_outputs(self, logits, aux, batch):
        """{'refiner_loss': {m: (B,)}, 'has': {m: (B,) bool, m present}, 'fused': (B, D)}."""
        per_example = self.refiner_losses(aux, batch.get('mask'))
        n = aux['fused'].shape[0]
        has = {m: aux['present'].get(m, jnp.ones((n,), bool)) for m in per_example}
        return {'refiner_loss': per_example, 'has': has, 'fused': aux['fused']}

    def metric_names(self, num_classes):
        del num_classes
        weights = self.config.loss.refiner_weights
        return ('loss', 'fused_spread') + tuple(
            f'refiner_loss/{m}' for m in sorted(weights) if weights[m] > 0
        )

    def split_metrics(self, outputs):
        """num_examples, refiner_loss/<m> and their weighted sum `loss`, fused_spread (0 means collapse)."""
        out = {
            'num_examples': float(len(outputs['fused'])),
            'fused_spread': metrics.embedding_spread(outputs['fused']),
            'loss': 0.0,
        }
        for m, per_example in sorted(outputs['refiner_loss'].items()):
            has = np.asarray(outputs['has'][m], bool)  # the mean over the examples that have m
            value = float(np.mean(per_example[has], dtype=np.float64)) if has.any() else 0.0
            out[f'refiner_loss/{m}'] = value
            out['loss'] += self.config.loss.refiner_weights[m] * value
        return out
