"""Fusion modules F: a dict of unimodal embeddings {m: (B, D_m)} -> the fused embedding z (B, D).

Every fusion module takes the modalities in sorted-name order, so that the result does not depend on the
order of a dict. `FUSIONS` maps `config.model.fusion.kind` to a module; the other fields of
`config.model.fusion` are that module's attributes.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        x = jnp.concatenate(_ordered(embeddings), axis=-1)  # (B, sum_m D_m)
        for h in self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(h)(x)))
        return nn.Dense(self.fused_dim)(x)


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

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        e = _ordered(embeddings)
        tokens = jnp.stack(
            [nn.Dense(self.fused_dim, name=f'proj_{i}')(x) for i, x in enumerate(e)], 1
        )  # (B, M, D)
        types = self.param('type_embedding', nn.initializers.normal(0.02), (len(e), self.fused_dim))
        fusion_token = self.param('fusion_token', nn.initializers.normal(0.02), (1, 1, self.fused_dim))
        x = jnp.concatenate(
            [jnp.broadcast_to(fusion_token, (tokens.shape[0], 1, self.fused_dim)), tokens + types], axis=1
        )  # (B, 1 + M, D)
        for _ in range(self.num_layers):
            y = nn.LayerNorm()(x)
            y = nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train
            )(y, y)
            x = x + y
            y = nn.LayerNorm()(x)
            y = nn.Dense(self.mlp_ratio * self.fused_dim)(y)
            y = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(y))
            x = x + nn.Dense(self.fused_dim)(y)
        return nn.LayerNorm()(x[:, 0])  # (B, D)


class LowRankTensorFusion(nn.Module):
    """Low-rank multimodal tensor fusion (LMF, Liu et al., ACL 2018).

    The full tensor fusion is the outer product of the embeddings, each extended by a constant 1, mapped
    linearly to z; LMF factorises that map into `rank` modality-specific factors, so
    z = sum_r prod_m (W_m^r [e_m; 1]). The product makes modalities interact multiplicatively, which plain
    concatenation has to learn through its MLP.

    Attributes:
      fused_dim: size of z.
      rank: number of rank-one factors.
    """

    fused_dim: int = 128
    rank: int = 4

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        del train
        prod = None
        for i, x in enumerate(_ordered(embeddings)):
            x1 = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=-1)  # (B, D_m + 1)
            f = nn.DenseGeneral((self.rank, self.fused_dim), use_bias=False, name=f'factor_{i}')(
                x1
            )  # (B, R, D)
            prod = f if prod is None else prod * f
        weights = self.param('rank_weights', nn.initializers.lecun_normal(), (1, self.rank))
        z = jnp.einsum('brd,or->bd', prod, weights)  # (B, D)
        return z + self.param('bias', nn.initializers.zeros, (self.fused_dim,))


class GatedFusion(nn.Module):
    """Gated multimodal unit (GMU, Arevalo et al., 2017), generalised to M modalities.

    z = sum_m g_m * tanh(W_m e_m), with gates g = softmax over modalities of a linear map of all embeddings.

    Attributes:
      fused_dim: size of z.
    """

    fused_dim: int = 128

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        del train
        e = _ordered(embeddings)
        h = jnp.stack([jnp.tanh(nn.Dense(self.fused_dim, name=f'proj_{i}')(x)) for i, x in enumerate(e)], 1)
        gates = nn.Dense(len(e) * self.fused_dim, name='gates')(jnp.concatenate(e, -1))
        gates = nn.softmax(gates.reshape(-1, len(e), self.fused_dim), axis=1)  # (B, M, D)
        return (gates * h).sum(1)  # (B, D)


FUSIONS: dict[str, type[nn.Module]] = {
    'concat': ConcatMLP,
    'transformer': TransformerFusion,
    'lowrank': LowRankTensorFusion,
    'gated': GatedFusion,
}
"""Fusion modules by `config.model.fusion.kind`; a new one needs its module and one line here."""
