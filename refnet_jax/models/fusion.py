"""Fusion modules F: the encoders' outputs {m: (B, D_m) | Tokens} -> the fused embedding z (B, D).

Pooled fusions (concat, transformer, lowrank, gated) see one vector per modality: token encoders' outputs
are mask-mean pooled for them. Token fusions (`TOKEN_LEVEL = True`: mmft, mbt) see `layers.Tokens` for every
modality (a pooled encoder's output is one token) and return `(z, readouts)`, where `readouts[m]` (B, D) is
the masked mean of modality m's own tokens at the layer z is read from: the `tokens` refiner target.
A fusion with `FEEDBACK = True` (progressive) also gets `encode=`, to run the encoders again with a context;
one with `STATS = True` (deq) returns its stats dict after its other outputs (`(z, stats)`, or
`(z, readouts, stats)` when token-level), which the training metrics report as `fusion/<stat>`. The three
class variables combine freely.

Every module takes the modalities in sorted-name order, so that the result does not depend on the order of
a dict. `FUSIONS` maps `config.model.fusion.kind` to a module; the other fields of `config.model.fusion` are
that module's attributes, with the dataclass defaults as their defaults.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import coupled_mamba, deq, layers


def _ordered(embeddings: Mapping[str, jax.Array]) -> list[jax.Array]:
    return [embeddings[m] for m in sorted(embeddings)]


class ConcatMLP(nn.Module):
    """Concatenation of the modality embeddings followed by an MLP (late fusion).

    Attributes:
      hidden: widths of the hidden layers.
      fused_dim: size of z.
      dropout: dropout rate on the hidden layers.
    """

    hidden: Sequence[int] = (256,)
    fused_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        p = layers.precision(self)
        x = jnp.concatenate(_ordered(embeddings), axis=-1)  # (B, sum_m D_m)
        for h in self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(p.Dense(h)(x)))
        return p.Dense(self.fused_dim)(x)


class ProgressiveFusion(nn.Module):
    """Progressive Fusion (Shankar, Thompson, Fiterau, 2022): late fusion whose output is fed back, through
    backward connections, into the encoders' early layers, for `rounds` rounds.

    Round 1 is plain late fusion (`ConcatMLP`, under `late`): z_1 = F(e_1, ..., e_M). Each further round
    re-runs every encoder with z_{r-1} as its context, which the encoder projects into its first layer
    (`layers.add_context`: the backward connection, one projection per encoder), and fuses again with the
    same F: z_r = F(E_1(x_1; z_{r-1}), ..., E_M(x_M; z_{r-1})). z_R is the output, and the encodings of
    round R are the embeddings the refiner and the MS loss see. Gradients flow through every round (the
    rounds are unrolled). With `rounds=1` the module is `ConcatMLP` with the same parameters. (Built from
    the paper's description, backward connections that bring the late-fused representation to the encoders'
    early layers for a few rounds; the authors' code was not at hand: where the context enters each built-in
    encoder, and that it is added rather than concatenated, are this library's choices.)

    The model calls a fusion that declares `FEEDBACK = True` as `fusion(embeddings, encode=..., train=...)`:
    `encode(context)` runs every encoder again with `context` (B, D_c) and returns their pooled outputs
    {m: (B, D_m)}. So any such fusion can run encoders for several rounds without the model knowing how,
    and any encoder that takes `context=` works under it (the built-in ones all do).

    Attributes:
      rounds: fusion rounds R (1: plain late fusion).
      hidden: widths of the late-fusion MLP's hidden layers.
      fused_dim: size of z (and of the context the encoders get).
      dropout: dropout rate on the hidden layers.
    """

    FEEDBACK: ClassVar[bool] = True
    rounds: int = 2
    hidden: Sequence[int] = (256,)
    fused_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(
        self,
        embeddings: Mapping[str, jax.Array],
        *,
        encode: Callable[[jax.Array], Mapping[str, jax.Array]],
        train: bool = False,
    ) -> jax.Array:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f'config.model.fusion.rounds is {self.rounds!r}; expected an integer >= 1')
        late = ConcatMLP(self.hidden, self.fused_dim, self.dropout, self.dtype, self.param_dtype, name='late')
        z = late(embeddings, train=train)  # (B, fused_dim)
        for _ in range(self.rounds - 1):
            z = late(encode(z), train=train)
        return z


class TransformerFusion(nn.Module):
    """A multimodal transformer over modality tokens, read out at a learned fusion token.

    Each modality embedding is projected to one token of width `fused_dim` plus a learned modality-type
    embedding; a learned fusion token is prepended, and z is its output after `num_layers` pre-LayerNorm
    transformer blocks (as in MulT / MBT-style bottleneck readouts, with one token per modality).

    Attributes:
      fused_dim: token width and size of z.
      num_layers: transformer blocks.
      num_heads: attention heads.
      mlp_ratio: hidden width of each block's MLP relative to `fused_dim`.
      dropout: dropout rate in attention and MLP.
    """

    fused_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        p = layers.precision(self)
        e = _ordered(embeddings)
        tokens = jnp.stack(
            [p.Dense(self.fused_dim, name=f'proj_{i}')(x) for i, x in enumerate(e)], 1
        )  # (B, M, D)
        types = layers.param(self, 'type_embedding', nn.initializers.normal(0.02), (len(e), self.fused_dim))
        fusion_token = layers.param(
            self, 'fusion_token', nn.initializers.normal(0.02), (1, 1, self.fused_dim)
        )
        x = jnp.concatenate(
            [jnp.broadcast_to(fusion_token, (tokens.shape[0], 1, self.fused_dim)), tokens + types], axis=1
        )  # (B, 1 + M, D)
        for _ in range(self.num_layers):
            y = p.LayerNorm()(x)
            y = p.Attention(num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train)(
                y, y
            )
            x = x + y
            y = p.LayerNorm()(x)
            y = p.Dense(self.mlp_ratio * self.fused_dim)(y)
            y = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(y))
            x = x + p.Dense(self.fused_dim)(y)
        return p.LayerNorm()(x[:, 0])  # (B, D)


class LowRankTensorFusion(nn.Module):
    """Low-rank multimodal tensor fusion (LMF, Liu et al., ACL 2018).

    The full tensor fusion is the outer product of the embeddings, each extended by a constant 1, mapped
    linearly to z; LMF factorizes that map into `rank` modality-specific factors, so
    z = sum_r prod_m (W_m^r [e_m; 1]). The product makes modalities interact multiplicatively, which plain
    concatenation has to learn through its MLP.

    Attributes:
      fused_dim: size of z.
      rank: number of rank-one factors.
    """

    fused_dim: int = 128
    rank: int = 4
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        p = layers.precision(self)
        del train
        prod = None
        for i, x in enumerate(_ordered(embeddings)):
            x1 = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=-1)  # (B, D_m + 1)
            f = p.DenseGeneral((self.rank, self.fused_dim), use_bias=False, name=f'factor_{i}')(
                x1
            )  # (B, R, D)
            prod = f if prod is None else prod * f
        weights = layers.param(self, 'rank_weights', nn.initializers.lecun_normal(), (1, self.rank))
        z = jnp.einsum('brd,or->bd', prod, weights)  # (B, D)
        return z + layers.param(self, 'bias', nn.initializers.zeros, (self.fused_dim,))


class GatedFusion(nn.Module):
    """Gated multimodal unit (GMU, Arevalo et al., 2017), generalized to M modalities.

    z = sum_m g_m * tanh(W_m e_m), with gates g = softmax over modalities of a linear map of all embeddings.

    Attributes:
      fused_dim: size of z.
    """

    fused_dim: int = 128
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        p = layers.precision(self)
        del train
        e = _ordered(embeddings)
        h = jnp.stack([jnp.tanh(p.Dense(self.fused_dim, name=f'proj_{i}')(x)) for i, x in enumerate(e)], 1)
        gates = p.Dense(len(e) * self.fused_dim, name='gates')(jnp.concatenate(e, -1))
        gates = nn.softmax(gates.reshape(-1, len(e), self.fused_dim), axis=1)  # (B, M, D)
        return (gates * h).sum(1)  # (B, D)


class MMFT(nn.Module):
    """Single-stream multimodal transformer (MMF's MMFT; the model the author's refiner head sits on).

    The tokens of every modality, projected to `fused_dim` with a modality-type embedding each, are
    concatenated and run through `depth` pre-LayerNorm blocks that attend across modalities and never to
    padding. z is read from the output of block `depth - readout_layer + 1` (MMF's `average_k_from_last`:
    layer -k), after a LayerNorm: the masked mean over all real tokens (`readout='mean'`), or a prepended
    CLS token (`readout='cls'`). The `tokens` refiner target of modality m is the masked mean of m's own
    tokens at that same layer.

    Attributes:
      fused_dim: token width and size of z.
      depth: transformer blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width; None: 4 x fused_dim.
      dropout: dropout rate.
      readout: 'mean' (masked mean of all tokens) or 'cls'.
      readout_layer: k, the read-out layer counted from the last (1: the last block).
    """

    TOKEN_LEVEL: ClassVar[bool] = True
    fused_dim: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    readout: str = 'mean'
    readout_layer: int = 1
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)
    remat: bool = False  # rematerialize each block (config.model.remat)

    @nn.compact
    def __call__(
        self, inputs: Mapping[str, layers.Tokens], *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        p = layers.precision(self)
        if self.readout not in ('mean', 'cls'):
            raise ValueError(f"MMFT.readout is {self.readout!r}; expected 'mean' or 'cls'")
        if not 1 <= self.readout_layer <= self.depth:
            raise ValueError(f'MMFT.readout_layer is {self.readout_layer}; expected 1..depth ({self.depth})')
        names, tokens, masks = layers.token_inputs(self, inputs, self.fused_dim)
        sizes = [t.shape[1] for t in tokens]
        x, mask = jnp.concatenate(tokens, 1), jnp.concatenate(masks, 1)  # (B, T, D), (B, T)
        offset = 0
        if self.readout == 'cls':
            cls = layers.param(self, 'cls', nn.initializers.normal(0.02), (1, 1, self.fused_dim))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.fused_dim)), x], 1)
            mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], 1)
            offset = 1
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.depth - self.readout_layer + 1):
            x = layers.block_like(self, f'encoderblock_{i}')(x, mask, train)
        h = p.LayerNorm(name='readout_norm')(x)  # (B, [1 +] T, D)
        z = h[:, 0] if self.readout == 'cls' else layers.masked_mean(h, mask)
        readouts, start = {}, offset
        for m, size in zip(names, sizes, strict=True):
            readouts[m] = layers.masked_mean(h[:, start : start + size], mask[:, start : start + size])
            start += size
        return z, readouts


class MBT(nn.Module):
    """Multimodal bottleneck transformer (MBT; Nagrani et al., NeurIPS 2021; scenic `projects/mbt`).

    Each modality runs its own blocks on its own tokens up to `fusion_layer`; from there on, modality m's
    block attends over [its tokens; `num_bottlenecks` shared bottleneck tokens], and the bottleneck tokens
    that the modalities' blocks return are averaged: the only path between modalities. z is the mean over
    modalities of the masked mean of each modality's final tokens (after its LayerNorm); that per-modality
    mean is also its `tokens` refiner target.

    Information crosses between modalities only from a fused block's bottleneck output to the next fused
    block, so it takes at least two fused blocks (`depth - fusion_layer >= 2`): with one, that block reads the
    learned initial bottleneck tokens, which are the same for every example, and what it writes into them is
    read by no one, i.e. late fusion. (Scenic's MBT fuses the last 4 of 12 layers.) With our default depth 2
    that means `fusion_layer = 0`: a first default of 1 left MBT as late fusion, and it stalled at 0.87 test
    accuracy on easy-VQA, whose questions need the image.

    Attributes:
      fused_dim: token width and size of z.
      depth: blocks per modality.
      fusion_layer: the first block that uses the bottlenecks (0: all of them; depth - 1 or depth: no
        exchange between modalities, late fusion).
      num_bottlenecks: shared bottleneck tokens.
      num_heads: attention heads.
      mlp_dim: MLP hidden width; None: 4 x fused_dim.
      dropout: dropout rate.
    """

    TOKEN_LEVEL: ClassVar[bool] = True
    fused_dim: int = 128
    depth: int = 2
    fusion_layer: int = 0
    num_bottlenecks: int = 4
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)
    remat: bool = False  # rematerialize each block (config.model.remat)

    @nn.compact
    def __call__(
        self, inputs: Mapping[str, layers.Tokens], *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        p = layers.precision(self)
        if not 0 <= self.fusion_layer <= self.depth:
            raise ValueError(f'MBT.fusion_layer is {self.fusion_layer}; expected 0..depth ({self.depth})')
        names, tokens, masks = layers.token_inputs(self, inputs, self.fused_dim)
        x = dict(zip(names, tokens, strict=True))
        mask = dict(zip(names, masks, strict=True))
        batch = tokens[0].shape[0]
        init = layers.param(
            self, 'bottleneck', nn.initializers.normal(0.02), (1, self.num_bottlenecks, self.fused_dim)
        )
        bottleneck = jnp.broadcast_to(init, (batch, self.num_bottlenecks, self.fused_dim))
        b_mask = jnp.ones((batch, self.num_bottlenecks), bool)
        for i in range(self.depth):
            block = {m: layers.block_like(self, f'{m}_encoderblock_{i}') for m in names}
            if i < self.fusion_layer:
                x = {m: block[m](x[m], mask[m], train) for m in names}
                continue
            shared = []
            for m in names:
                n = x[m].shape[1]
                y = block[m](
                    jnp.concatenate([x[m], bottleneck], 1), jnp.concatenate([mask[m], b_mask], 1), train
                )
                x[m] = y[:, :n]
                shared.append(y[:, n:])
            bottleneck = jnp.mean(jnp.stack(shared), axis=0)  # (B, num_bottlenecks, D)
        readouts = {
            m: layers.masked_mean(p.LayerNorm(name=f'{m}_encoder_norm')(x[m]), mask[m]) for m in names
        }
        z = jnp.mean(jnp.stack([readouts[m] for m in names]), axis=0)  # (B, D)
        return z, readouts


FUSIONS: dict[str, type[nn.Module]] = {
    'concat': ConcatMLP,
    'transformer': TransformerFusion,
    'lowrank': LowRankTensorFusion,
    'gated': GatedFusion,
    'mmft': MMFT,
    'mbt': MBT,
    'deq': deq.DEQFusion,
    'progressive': ProgressiveFusion,
    'coupled_mamba': coupled_mamba.CoupledMamba,
}
"""Built-in fusion modules by `config.model.fusion.kind`; a new one is its class and one line here."""


def takes_feedback(cls: type[nn.Module]) -> bool:
    """Whether a fusion class re-runs the encoders with a context (its `FEEDBACK` class variable): it is
    called with `encode=` (`ProgressiveFusion`)."""
    return bool(getattr(cls, 'FEEDBACK', False))


def is_token_level(cls: type[nn.Module]) -> bool:
    """Whether a fusion class takes `Tokens` and returns `(z, readouts)` (its `TOKEN_LEVEL` class variable;
    False for any module that does not declare it)."""
    return bool(getattr(cls, 'TOKEN_LEVEL', False))


def reports_stats(cls: type[nn.Module]) -> bool:
    """Whether a fusion class returns a dict of scalars after its other outputs (its `STATS` class variable:
    `(z, stats)`, or `(z, readouts, stats)` when also token-level), logged as `fusion/<name>` (`DEQFusion`)."""
    return bool(getattr(cls, 'STATS', False))
