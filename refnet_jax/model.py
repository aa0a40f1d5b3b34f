"""ReFNet: unimodal encoders -> fusion -> task head, with the refiner decoding z back into each modality.

The model is one Linen module whose output is `(logits, aux)`; `aux` carries what the losses need
(DESIGN.md §2): `embeddings` {m: e_m}, `fused` z, and, when the refiner is on, `reconstructions` {m: ê_m}
and `targets` {m: t_m}. No loss reaches into the model.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from refnet_jax import encoders, fusion, refiner


def build_module(cls: type[nn.Module], fields: Mapping[str, Any], where: str, **extra) -> nn.Module:
    """Constructs `cls(**fields, **extra)`, naming the config path of any field the module does not have."""
    known = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f'{where} has field(s) {unknown} that {cls.__name__} does not take; '
            f'its fields are {sorted(known - set(extra))}'
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}, **extra)


class ReFNet(nn.Module):
    """Refiner Fusion Network.

    Attributes:
      modalities: (name, ModalityInfo) pairs of the dataset, in a fixed order.
      num_classes: outputs of the task head.
      config: the frozen `config.model`: `encoders.<modality>` (that encoder's fields), `fusion` (`kind` and
        that module's fields), `refiner` (`hidden`, `target`, `stop_gradient_target`).
      refiner_modalities: the modalities that get a refiner decoder (those with a non-zero refiner weight);
        empty for the plain fusion baseline, which then has no refiner parameters at all.
    """

    modalities: tuple[tuple[str, Any], ...]
    num_classes: int
    config: ml_collections.FrozenConfigDict
    refiner_modalities: tuple[str, ...] = ()

    @nn.compact
    def __call__(
        self, batch: Mapping[str, jax.Array], *, train: bool = False, with_refiner: bool = True
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Runs the network on a batch keyed by modality.

        A modality marked `shared` is stored once for several examples: its rows are encoded once and gathered
        to the examples through `batch[f'{m}_index']` (B,).

        Args:
          batch: {m: (B_m, *shape)} per modality, plus `{m}_index` for shared modalities.
          train: enables dropout (needs a 'dropout' rng).
          with_refiner: set False for inference: the refiner costs nothing there.

        Returns:
          logits (B, num_classes) and aux.
        """
        cfg = self.config
        emb, inputs = {}, {}
        for m, info in self.modalities:
            fields = cfg.encoders[m]
            enc = build_module(
                encoders.ENCODERS[info.kind],
                fields,
                f'config.model.encoders.{m}',
                name=m,
                **({'vocab_size': info.vocab_size} if info.kind == 'tokens' else {}),
            )
            e = enc(batch[m], train=train)  # (B_m, D)
            x = batch[m]
            if info.shared:
                idx = batch[f'{m}_index']  # (B,)
                e = jnp.take(e, idx, axis=0)
                x = jnp.take(x, idx, axis=0) if self.refiner_modalities and with_refiner else x
            emb[m] = e
            inputs[m] = x

        fields = dict(cfg.fusion)
        kind = fields.pop('kind')
        if kind not in fusion.FUSIONS:
            raise ValueError(
                f'config.model.fusion.kind is {kind!r}; expected one of {sorted(fusion.FUSIONS)}'
            )
        z = build_module(fusion.FUSIONS[kind], fields, 'config.model.fusion', name='fusion')(emb, train=train)
        logits = nn.Dense(self.num_classes, name='head')(z)  # (B, C)
        aux = {'embeddings': emb, 'fused': z}

        if self.refiner_modalities and with_refiner:
            rcfg = cfg.refiner
            if rcfg.target not in refiner.TARGETS:
                raise ValueError(
                    f'config.model.refiner.target is {rcfg.target!r}; expected one of {refiner.TARGETS}'
                )
            infos = dict(self.modalities)
            if rcfg.target == 'embedding':
                targets = {m: emb[m] for m in self.refiner_modalities}
                if rcfg.stop_gradient_target:
                    targets = jax.lax.stop_gradient(targets)
            else:
                targets = {m: refiner.input_target(inputs[m], infos[m]) for m in self.refiner_modalities}
            aux['reconstructions'] = refiner.refine(z, targets, rcfg.hidden)
            aux['targets'] = targets
        return logits, aux


def create_model(config: ml_collections.ConfigDict, info) -> ReFNet:
    """The ReFNet of `config` for the dataset described by `info` (an `input_pipeline.DatasetInfo`).

    Checks that `config.model.encoders` and `config.loss.refiner_weights` name exactly the dataset's
    modalities, so that a misspelt modality is an error rather than an encoder or weight silently unused.
    """
    names = sorted(info.modalities)
    for field in ('model.encoders', 'loss.refiner_weights'):
        given = sorted(config.model.encoders if field == 'model.encoders' else config.loss.refiner_weights)
        if given != names:
            raise ValueError(
                f'config.{field} names modalities {given}, but dataset {info.name!r} has {names}'
            )
    weights = config.loss.refiner_weights
    for m in names:
        if weights[m] < 0:
            raise ValueError(f'config.loss.refiner_weights.{m} is {weights[m]}; expected >= 0')
    return ReFNet(
        modalities=tuple((m, info.modalities[m]) for m in names),
        num_classes=info.num_classes,
        config=ml_collections.FrozenConfigDict(config.model),
        refiner_modalities=tuple(m for m in names if weights[m] > 0),
    )
