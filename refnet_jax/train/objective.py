"""The objective of a run: what a training step minimizes and how an evaluation split is scored.

One frozen, hashable dataclass per kind of run (a static argument of the jitted steps), all with the
interface of `Objective`: whether it reads labels, the training loss of a batch, per-example evaluation
outputs (computed in the jitted eval step) and the metrics of a whole split from them. The losses come from
`losses`, the metrics of a split from `metrics`.

Supervised: L = L_task(H(z), y) + sum_m w_m L_ref(R_m(z), t_m) + gamma L_MS(z, y); evaluated by the task
loss, accuracy (and AUROC with two classes) or the multi-label F1 scores. With `config.data.task =
'regression'` the head's K outputs are real values and L_task is their squared error (or absolute error,
`config.loss.task = 'l1'`), evaluated by MSE, MAE and Pearson's r (and the sign accuracy of one target,
`config.eval.sign_accuracy`); the MS loss, which needs classes, is refused (`check_config`).
Pretraining: sum_m w_m L_ref(R_m(z), t_m), labels never read; evaluated by the refiner losses and the spread
of the fused embeddings. Every term is averaged over the real examples of the batch (`batch['mask']`).

The terms of the training loss are the table `TERMS`: a name, a weight read from the config, and the
function that computes the term on a batch. The loss is the weighted sum of the terms that a kind of run
uses (`Objective.terms`), each logged as `<name>_loss` (or `<name>_loss/<m>` for a term per modality), so
adding a term is one `Term` entry in `TERMS` (and its config field, read by its `weight`).
"""

import abc
import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from refnet_jax import losses
from refnet_jax.models import refiner
from refnet_jax.train import metrics

TASK_LOSSES = ('auto', 'mse', 'l1')
"""`config.loss.task`: 'auto' (cross-entropy for classes, 'mse' for regression), or a regression loss."""

TermValue = jax.Array | dict[str, jax.Array]
"""A term's value on a batch: a scalar, or {m: scalar} for a term per modality."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One term of the training loss.

    Attributes:
      name: its name; logged as `<name>_loss`, or `<name>_loss/<m>` for a term per modality.
      weight: config -> its weight (a float), or {m: weight} for a term per modality. A term or modality of
        weight 0 is left out: neither computed nor logged.
      value: (objective, logits (B, C), aux, batch) -> the term on the batch, averaged over the examples
        that count (`batch['mask']`, and for a modality the examples that have it): a scalar, or {m: scalar}
        for a term per modality.
      labeled: whether it reads labels; a run without labels (pre-training) leaves it out.
    """

    name: str
    weight: Callable[[ml_collections.ConfigDict], float | Mapping[str, float]]  # {m: w} may be a ConfigDict
    value: Callable[['Objective', jax.Array, Mapping[str, Any], Mapping[str, jax.Array]], TermValue]
    labeled: bool

    def metric(self, modality: str | None = None) -> str:
        """The logged name of the term, or of its part for `modality`."""
        return f'{self.name}_loss' if modality is None else f'{self.name}_loss/{modality}'


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses, naming the field, a supervised config whose task and losses do not go together (before any
    work: the trainer calls it before it reads the data): the MS loss or sign accuracy without classes to
    use, a regression loss for classes."""
    task = config.data.get('task', 'classification')
    loss = config.loss.get('task', 'auto')
    if loss not in TASK_LOSSES:
        raise ValueError(f'config.loss.task is {loss!r}; expected one of {TASK_LOSSES}')
    if task == 'regression':
        if config.loss.ms_weight > 0:
            raise ValueError(
                f"config.loss.ms_weight is {config.loss.ms_weight} with config.data.task='regression'; the "
                'Multi-Similarity loss needs classes: set config.loss.ms_weight=0 (or the variant=refiner config)'
            )
    else:
        if loss != 'auto':
            raise ValueError(
                f'config.loss.task is {loss!r}, a regression loss, but config.data.task is {task!r}; expected '
                "'auto' (cross-entropy) for classes"
            )
        if config.eval.get('sign_accuracy', False):
            raise ValueError(
                f"config.eval.sign_accuracy is True, which needs config.data.task='regression' (it is {task!r})"
            )


def regression_loss(
    predictions: jax.Array, targets: jax.Array, kind: str, where: jax.Array | None
) -> jax.Array:
    """(B,) per-example squared (`kind` 'mse') or absolute ('l1') error of (B, K) predictions, averaged over
    the K targets; 0 where `where` is False.

    >>> regression_loss(jnp.array([[1.0], [3.0]]), jnp.array([[2.0], [0.0]]), 'mse', jnp.array([True, False]))
    Array([1., 0.], dtype=float32)
    """
    error = predictions - jnp.asarray(targets, predictions.dtype)
    values = jnp.mean(jnp.square(error) if kind == 'mse' else jnp.abs(error), -1)
    return values if where is None else jnp.where(where, values, 0.0)


def _where(mask: jax.Array | None, aux: Mapping[str, Any], m: str) -> jax.Array | None:
    """The examples whose modality m counts: real (`mask`) and with m present (`aux['present']`)."""
    present = aux.get('present', {}).get(m)
    if present is None:
        return mask
    return present if mask is None else mask & present


def _task(objective, logits, aux, batch):
    """The mean task loss (softmax or sigmoid cross-entropy) over the real examples."""
    del aux
    mask = batch.get('mask')
    return losses.masked_mean(objective.task_loss(logits, batch['label'], mask), mask)


def _refiner(objective, logits, aux, batch):
    """{m: the mean refiner loss over the real examples that have m (0 when none has)} for every modality
    the model refines ({} when the refiner is off)."""
    del logits
    mask = batch.get('mask')
    return {
        m: losses.masked_mean(per_example, _where(mask, aux, m))
        for m, per_example in objective.refiner_losses(aux, mask).items()
    }


def _multi_similarity(objective, logits, aux, batch):
    """The Multi-Similarity loss of the fused embeddings over the real examples (`config.loss.ms`)."""
    del logits
    ms = objective.config.loss.ms
    return losses.multi_similarity_loss(
        aux['fused'],
        batch['label'],
        alpha=ms.alpha,
        beta=ms.beta,
        base=ms.base,
        epsilon=ms.epsilon,
        mining=ms.mining,
        where=batch.get('mask'),
        block_size=ms.get('block_size'),
    )


REFINER = Term('refiner', weight=lambda config: config.loss.refiner_weights, value=_refiner, labeled=False)
TERMS: tuple[Term, ...] = (
    Term('task', weight=lambda config: 1.0, value=_task, labeled=True),
    REFINER,
    Term('ms', weight=lambda config: config.loss.ms_weight, value=_multi_similarity, labeled=True),
)
"""The terms of the training loss, in the order they are summed: L = L_task + sum_m w_m L_ref,m + gamma L_MS."""


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
    """The interface of an objective, the weighted sum of its `TERMS`, and the refiner losses that every
    kind of run shares.

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

    @property
    def terms(self) -> tuple[Term, ...]:
        """The terms of `TERMS` this objective sums: all of them, less those that read labels when it reads
        none."""
        return tuple(t for t in TERMS if self.labeled or not t.labeled)

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

    def loss(
        self, logits: jax.Array, aux: Mapping[str, Any], batch: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The scalar training loss of a batch, the weighted sum of `terms`, and a dict of scalar metrics:
        `loss`, each term's value (`Term.metric`) and the fusion's stats (`fusion/<stat>`).

        Args:
          logits: (B, C) task-head outputs.
          aux: the model's aux dict.
          batch: the batch (as `inputs` leaves it), with an optional (B,) `mask` of its real examples.
        """
        total, metrics = None, {}
        for term in self.terms:
            weight = term.weight(self.config)
            if isinstance(weight, numbers.Real):
                if weight == 0:
                    continue
                value = term.value(self, logits, aux, batch)
                metrics[term.metric()] = value
                weighted = weight * value
            else:
                values = {m: v for m, v in term.value(self, logits, aux, batch).items() if weight[m] != 0}
                weighted = jnp.zeros((), jnp.float32)  # a term per modality sums its modalities first
                for m, value in values.items():
                    metrics[term.metric(m)] = value
                    weighted = weighted + weight[m] * value
            total = weighted if total is None else total + weighted
        if total is None:  # every term weighted 0
            total = jnp.zeros((), jnp.float32)
        metrics.update({f'fusion/{k}': v for k, v in aux.get('fusion_stats', {}).items()})
        metrics['loss'] = total
        return total, metrics

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

    Classification, or regression when `config.data.task` is 'regression' (see the module docstring).

    Attributes:
      multi_label: sigmoid task loss, multi-label MS positives and F1 scores; else softmax and accuracy.
    """

    multi_label: bool = False
    labeled: ClassVar[bool] = True
    eval_with_refiner: ClassVar[bool] = False  # evaluation scores the task head alone

    def __post_init__(self):
        super().__post_init__()
        check_config(self.config)

    @property
    def regression(self) -> bool:
        """Whether the labels are real-valued targets (`config.data.task`)."""
        return self.config.data.get('task', 'classification') == 'regression'

    def task_loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> jax.Array:
        """(B,) per-example task losses of (B, C) logits (regression: (B, K) predictions)."""
        if self.regression:
            kind = self.config.loss.get('task', 'auto')
            return regression_loss(logits, labels, 'mse' if kind == 'auto' else kind, mask)
        if self.multi_label:
            return losses.sigmoid_cross_entropy(logits, labels, where=mask)
        return losses.softmax_cross_entropy(logits, labels, where=mask)

    def loss(self, logits, aux, batch):
        """The weighted terms (loss, task_loss, refiner_loss/<m>, ms_loss when weighted) and accuracy;
        `batch['label']` is (B,) class ids, or (B, C) multi-hot when `multi_label`."""
        loss, metrics = super().loss(logits, aux, batch)
        labels, mask = batch['label'], batch.get('mask')
        if self.regression:  # instead of accuracy, the mean absolute error
            metrics['mae'] = losses.masked_mean(regression_loss(logits, labels, 'l1', mask), mask)
            return loss, metrics
        if self.multi_label:
            correct = ((logits > 0) == (labels > 0)).all(-1)
        else:
            correct = logits.argmax(-1) == labels
        metrics['accuracy'] = losses.masked_mean(correct.astype(jnp.float32), mask)
        return loss, metrics

    def eval_outputs(self, logits, aux, batch):
        """{'logits': (B, C), 'label': (B,) or (B, C), 'loss': (B,) task losses}."""
        labels = batch['label']
        return {'logits': logits, 'label': labels, 'loss': self.task_loss(logits, labels, batch.get('mask'))}

    def metric_names(self, num_classes):
        if self.regression:
            if self.config.eval.get('sign_accuracy', False) and num_classes != 1:
                raise ValueError(
                    f'config.eval.sign_accuracy is True, but the data have {num_classes} regression targets; '
                    'it is the accuracy of the sign of one target'
                )
            return ('mae', 'mse', 'pearson_r', 'loss') + (
                ('sign_accuracy',) if self.config.eval.get('sign_accuracy', False) else ()
            )
        if self.multi_label:
            return ('micro_f1', 'macro_f1', 'weighted_f1', 'samples_f1', 'loss')
        return ('accuracy', 'loss') + (('auroc',) if num_classes == 2 else ())

    def split_metrics(self, outputs):
        """num_examples and the mean task loss; accuracy (and auroc with two classes), the *_f1 scores, or
        (regression) mae, mse, pearson_r and sign_accuracy."""
        logits, labels = np.asarray(outputs['logits'], np.float64), np.asarray(outputs['label'])
        out = {'num_examples': len(labels), 'loss': np.mean(outputs['loss'], dtype=np.float64)}
        if self.regression:
            out['mae'] = metrics.mean_absolute_error(logits, labels)
            out['mse'] = metrics.mean_squared_error(logits, labels)
            out['pearson_r'] = metrics.pearson_r(logits, labels)
            if self.config.eval.get('sign_accuracy', False):
                out['sign_accuracy'] = metrics.sign_accuracy(logits, labels)
            return {k: float(v) for k, v in out.items()}
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

    def eval_outputs(self, logits, aux, batch):
        """{'refiner_loss': {m: (B,)}, 'has': {m: (B,) bool, m present}, 'fused': (B, D)}."""
        per_example = self.refiner_losses(aux, batch.get('mask'))
        n = aux['fused'].shape[0]
        has = {m: aux['present'].get(m, jnp.ones((n,), bool)) for m in per_example}
        return {'refiner_loss': per_example, 'has': has, 'fused': aux['fused']}

    def metric_names(self, num_classes):
        del num_classes
        weights = self.config.loss.refiner_weights
        return ('loss', 'fused_spread') + tuple(REFINER.metric(m) for m in sorted(weights) if weights[m] > 0)

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
            out[REFINER.metric(m)] = value
            out['loss'] += self.config.loss.refiner_weights[m] * value
        return out
