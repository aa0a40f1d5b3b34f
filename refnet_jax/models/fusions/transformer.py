"""A multimodal transformer over one token per modality, read out at a learned fusion token."""

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput, ordered


class TransformerFusion(Fusion):
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

    kind: ClassVar[str] = 'transformer'
    fused_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> FusionOutput:
        p = layers.precision(self)
        e = ordered(embeddings)
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
        return FusionOutput(p.LayerNorm()(x[:, 0]))  # z (B, D)
