"""ReFNet: unimodal encoders -> fusion -> task head, with the refiner decoding z back into each modality.

`create_model(config, info)` is the one place that turns config into modules: each modality's encoder
(`config.model.encoders.<m>.module`: a built-in name, None for its kind's default, or the user's
`FILE.py:Class` / `package.module:Class`) and the fusion module (`config.model.fusion.kind`, the same way).
`ReFNet` receives the module instances and composes them. Its output is `(logits, aux)`; `aux` carries what
the losses need (docs/architecture.md, "Decisions"): `embeddings` {m: e_m} (pooled), `fused` z,
`present` {m: (B,) bool} for the modalities absent somewhere in the batch, and, when the refiner is on,
`reconstructions` {m: ê_m} and `targets` {m: t_m} (`refiner.refiner_targets`), and `fusion_stats`
when the fusion reports any. No loss reaches into the model.
"""

import inspect
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from refnet_jax.data import contract
from refnet_jax.models import encoders, fusions, layers, modules, refiner


class _Encoders(nn.Module):
    """Runs each modality's encoder under `encoders/<m>` (a container, so that parameter paths read
    `encoders/image/...`)."""

    members: tuple[tuple[str, nn.Module], ...]

    @nn.compact
    def __call__(
        self, batch: Mapping[str, jax.Array], *, train: bool, context: jax.Array | None = None
    ) -> dict[str, Any]:
        # Encoders that never get a context (every fusion but a feedback one) need not take the keyword.
        feedback = {} if context is None else {'context': context}
        return {
            m: enc.clone(parent=self, name=m)(batch[m], train=train, **feedback) for m, enc in self.members
        }


class _StandIns(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    """A learned stand-in for each modality where it is absent (`missing/<m>`, one vector of the encoder's
    width): a pooled encoding (B, D) becomes the vector; `Tokens` become one real token holding it (the
    others masked out), so that every fusion, token-level or pooled, built-in or the user's, handles absence
    without knowing of it. The parameters exist whether or not a batch marks anything absent."""

    @nn.compact
    def __call__(self, encoded: Mapping[str, Any], present: Mapping[str, jax.Array]) -> dict[str, Any]:
        out = {}
        for m, e in encoded.items():
            width = (e.tokens if isinstance(e, layers.Tokens) else e).shape[-1]
            stand_in = layers.param(self, m, nn.initializers.normal(0.02), (width,))
            if m not in present:
                out[m] = e
            elif isinstance(e, layers.Tokens):
                here = present[m][:, None]  # (B, 1)
                first = (jnp.arange(e.tokens.shape[1]) == 0)[None, :]  # (1, T)
                mask = jnp.where(here, e.mask, first)
                tokens = jnp.where(here[..., None], e.tokens, jnp.where(first[..., None], stand_in, 0))
                out[m] = layers.Tokens(tokens.astype(e.tokens.dtype), mask)
            else:
                out[m] = jnp.where(present[m][:, None], e, stand_in).astype(e.dtype)
        return out


def _hide_absent(x: jax.Array, present: jax.Array, index: jax.Array | None) -> jax.Array:
    """x with zeros in the rows of absent examples, so that their values (NaN included) reach neither the
    outputs nor the gradients; a shared modality's row is kept when any example using it has it."""
    if index is None:
        rows = present
    else:
        rows = jnp.zeros((x.shape[0],), jnp.int32).at[index].max(present.astype(jnp.int32)) > 0
    return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


class ReFNet(nn.Module):
    """Refiner Fusion Network.

    Attributes:
      modalities: (name, ModalityInfo) pairs of the dataset, in sorted-name order.
      encoders: (name, encoder module) pairs, one per modality; each maps the modality's batch to
        (B, D) or `layers.Tokens`.
      fusion: the fusion module (the contract: `refnet_jax.models.fusions`): it takes {m: (B, D)}, or
        {m: Tokens} when its `inputs` are 'tokens' (a pooled encoder's output as one token), also `encode=`
        when its `__call__` takes it, and returns a `FusionOutput` (or a bare z).
      num_classes: outputs of the task head.
      refiner_modalities: the modalities that get a refiner decoder (those with a non-zero refiner weight);
        empty for the plain fusion baseline, which then has no refiner parameters at all.
      refiner_target: one of `refiner.TARGETS`.
      refiner_hidden: hidden widths of each decoder.
      stop_gradient_target: `embedding` and `tokens` targets are constants for the refiner loss.
      dtype: computation dtype of the head, stand-ins and refiner (`config.model.dtype`; the encoders and
        fusion get theirs from `create_model`); logits and aux come out in float32 whatever it is.
      param_dtype: their parameter dtype (`config.model.param_dtype`).
    """

    modalities: tuple[tuple[str, contract.ModalityInfo], ...]
    encoders: tuple[tuple[str, nn.Module], ...]
    fusion: nn.Module
    num_classes: int
    refiner_modalities: tuple[str, ...] = ()
    refiner_target: str = 'embedding'
    refiner_hidden: tuple[int, ...] = (256,)
    stop_gradient_target: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, batch: Mapping[str, jax.Array], *, train: bool = False, with_refiner: bool = True
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Runs the network on a batch keyed by modality.

        A modality marked `shared` is stored once for several examples: its rows are encoded once and gathered
        to the examples through `batch[contract.index_key(m)]` (B,). Where `batch[contract.present_key(m)]`
        (B,) is False, m is absent: its values are never read, the fusion gets m's learned stand-in
        (`_StandIns`), and `aux['present'][m]` tells the objective to skip m's refiner loss there.

        Args:
          batch: {m: (B_m, *shape)} per modality, plus the index keys of shared modalities and the presence
            keys of modalities absent somewhere.
          train: enables dropout (needs a 'dropout' rng).
          with_refiner: set False for inference: the refiner costs nothing there.

        Returns:
          logits (B, num_classes) and aux.
        """
        refine = bool(self.refiner_modalities) and with_refiner
        infos = dict(self.modalities)
        present = {m: batch[contract.present_key(m)] for m in infos if contract.present_key(m) in batch}
        batch = dict(batch)
        for m, p in present.items():
            batch[m] = _hide_absent(
                batch[m], p, batch.get(contract.index_key(m)) if infos[m].shared else None
            )
        run_encoders = _Encoders(self.encoders, name='encoders')
        stand_ins = _StandIns(self.dtype, self.param_dtype, name='missing')
        inputs = {m: batch[m] for m in infos}  # per example: the refiner's `input` targets
        kind = type(self.fusion)
        for m, info in self.modalities:
            if info.shared and ((refine and self.refiner_target == 'input') or fusions.takes_encode(kind)):
                inputs[m] = jnp.take(batch[m], batch[contract.index_key(m)], axis=0)

        def encode(context: jax.Array | None = None) -> dict[str, Any]:
            """Every encoder's output per example, stand-ins where absent. With a context (B, D_c) from a
            feedback fusion, a shared modality's rows are gathered to the examples first: each example
            gets its own context."""
            rows = dict(batch)
            if context is not None:
                rows.update({m: inputs[m] for m in infos if infos[m].shared})
            outputs = run_encoders(rows, train=train, context=context)
            if context is None:
                for m in infos:
                    if infos[m].shared:
                        idx = batch[contract.index_key(m)]  # (B,)
                        outputs[m] = jax.tree.map(lambda a, idx=idx: jnp.take(a, idx, axis=0), outputs[m])
            return stand_ins(outputs, present)

        encoded = encode()
        embeddings = {m: layers.pooled(e) for m, e in encoded.items()}  # {m: (B, D_m)}

        token_level = fusions.input_kind(kind) == 'tokens'

        def fusion_inputs(outputs: dict[str, Any], pooled: dict[str, jax.Array]) -> dict[str, Any]:
            """What the fusion sees: Tokens for a token-level one (a pooled output is one token), else the
            pooled (B, D) embeddings."""
            return {m: layers.as_tokens(e) for m, e in outputs.items()} if token_level else dict(pooled)

        extra = {}
        if fusions.takes_encode(kind):  # it runs the encoders again with its context

            def encode_again(context: jax.Array) -> dict[str, Any]:
                outputs = encode(context)
                pooled = {m: layers.pooled(e) for m, e in outputs.items()}
                embeddings.update(pooled)  # the last round's: those the refiner and the MS loss see
                return fusion_inputs(outputs, pooled)

            extra['encode'] = encode_again
        out = fusions.as_output(self.fusion(fusion_inputs(encoded, embeddings), train=train, **extra), kind)
        z = out.z
        logits = layers.precision(self).Dense(self.num_classes, name='head')(z)  # (B, C)
        aux = {'embeddings': embeddings, 'fused': z, 'present': present}
        if out.stats:
            aux['fusion_stats'] = out.stats

        if refine:
            targets = refiner.refiner_targets(
                self.refiner_target,
                embeddings=embeddings,
                readouts=out.readouts,
                inputs=inputs,
                infos=infos,
                modalities=self.refiner_modalities,
                stop_gradient=self.stop_gradient_target,
            )
            aux['reconstructions'] = refiner.Refiner(
                self.refiner_hidden, self.dtype, self.param_dtype, name='refiner'
            )(z, targets)
            aux['targets'] = targets
        # The losses see float32, whatever the computation dtype (mixed precision: f32 losses and gradients).
        as_f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        return as_f32(logits), jax.tree.map(as_f32, aux)


def create_model(config: ml_collections.ConfigDict, info: contract.DatasetInfo) -> ReFNet:
    """The ReFNet of `config` for the dataset described by `info`.

    Checks, before any work, that `config.model.encoders`, `config.loss.refiner_weights` and
    `config.train.modality_dropout` name exactly the dataset's modalities, and `config.eval.without` some of
    them (a misspelt modality is an error rather than an encoder or weight silently
    unused), that every module name resolves to a Linen module that takes the given fields, and that the
    refiner target suits the fusion.
    """
    names = sorted(info.modalities)
    per_modality = {
        'model.encoders': config.model.encoders,
        'loss.refiner_weights': config.loss.refiner_weights,
        'train.modality_dropout': config.train.get('modality_dropout', dict.fromkeys(names)),
    }
    for field, entries in per_modality.items():
        if sorted(entries) != names:
            raise ValueError(
                f'config.{field} names modalities {sorted(entries)}, but dataset {info.name!r} has {names}'
            )
    unknown = [m for m in config.eval.get('without', ()) if m not in names]
    if unknown:
        raise ValueError(
            f'config.eval.without is {tuple(config.eval.without)}: {unknown} not among the modalities {names}'
        )
    precision = model_wide(config)  # to every module that takes these fields, the user's included
    built = []
    for m in names:
        fields = dict(config.model.encoders[m])
        source = fields.pop('init_from', None)  # read by pretrained.py, not a module field ...
        spec = fields.pop('module', None) or contract.KINDS[info.modalities[m].kind].encoder
        field = f'config.model.encoders.{m}'
        cls = modules.resolve(spec, encoders.ENCODERS, f'{field}.module')
        # ... but for a module built from it ('pretrained')
        if source and 'init_from' in cls.__dataclass_fields__:
            fields['init_from'] = source
        enc = modules.instantiate(
            cls,
            fields,
            field,
            builtins=encoders.ENCODERS.values(),
            vocab_size=info.modalities[m].vocab_size,
            pad_id=info.modalities[m].pad_id,
            **precision,
        )
        built.append((m, enc))

    fields = dict(config.model.fusion)
    fields.pop('init_from', None)
    cls = modules.resolve(fields.pop('kind'), fusions.FUSIONS, 'config.model.fusion.kind')
    fusions.check_class(cls, 'config.model.fusion.kind')
    fusion_module = modules.instantiate(
        cls, fields, 'config.model.fusion', builtins=fusions.FUSIONS.values(), **precision
    )

    if fusions.takes_encode(cls):
        for m, enc in built:
            if 'context' not in inspect.signature(type(enc).__call__).parameters:
                raise ValueError(
                    f'config.model.fusion.kind is {config.model.fusion.kind!r}, which feeds the fused embedding '
                    f'back into every encoder, but the encoder of {m!r} ({type(enc).__name__}, '
                    f'config.model.encoders.{m}.module) takes no `context=` keyword (encoders.py says how)'
                )

    rcfg = config.model.refiner
    if rcfg.target not in refiner.TARGETS:
        raise ValueError(f'config.model.refiner.target is {rcfg.target!r}; expected one of {refiner.TARGETS}')
    refined = tuple(m for m in names if config.loss.refiner_weights[m] > 0)
    if refined and rcfg.target == 'tokens' and fusions.input_kind(cls) != 'tokens':
        token_level = [k for k, v in fusions.FUSIONS.items() if fusions.input_kind(v) == 'tokens']
        raise ValueError(
            f"config.model.refiner.target is 'tokens', which needs a token-level fusion ({token_level}); "
            f'config.model.fusion.kind is {config.model.fusion.kind!r}'
        )
    return ReFNet(
        modalities=tuple((m, info.modalities[m]) for m in names),
        encoders=tuple(built),
        fusion=fusion_module,
        num_classes=info.num_classes,
        refiner_modalities=refined,
        refiner_target=rcfg.target,
        refiner_hidden=tuple(rcfg.hidden),
        stop_gradient_target=rcfg.stop_gradient_target,
        dtype=precision['dtype'],
        param_dtype=precision['param_dtype'],
    )


def model_wide(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields every module that takes them gets from `config.model` (`modules.FROM_MODEL_CONFIG`):
    `dtype` and `param_dtype` as jnp dtypes, `remat` (float32 and False when a config predates them)."""
    out = {'remat': bool(config.model.get('remat', False))}
    for field in ('dtype', 'param_dtype'):
        name = config.model.get(field, 'float32')
        try:
            value = jnp.dtype(name)
        except TypeError:
            value = None
        if value is None or not jnp.issubdtype(value, jnp.floating):
            raise ValueError(
                f"config.model.{field} is {name!r}; expected a float dtype: 'float32', 'bfloat16' or 'float16'"
            )
        out[field] = value
    return out
