"""Gated multimodal unit (GMU): a softmax gate over the modalities weighs their projections."""

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput, ordered


class GatedFusion(Fusion):
    """Gated multimodal unit (GMU, Arevalo et al., 2017), generalized to M modalities.

    z = sum_m g_m * tanh(W_m e_m), with gates g = softmax over modalities of a linear map of all embeddings.

    Attributes:
      fused_dim: size of z.
    """

    kind: ClassVar[str] = 'gated'
    fused_dim: int = 128
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> FusionOutput:
        p = layers.precision(self)
        del train
        e = ordered(embeddings)
        h = jnp.stack([jnp.tanh(p.Dense(self.fused_dim, name=f'proj_{i}')(x)) for i, x in enumerate(e)], 1)
        gates = p.Dense(len(e) * self.fused_dim, name='gates')(jnp.concatenate(e, -1))
        gates = nn.softmax(gates.reshape(-1, len(e), self.fused_dim), axis=1)  # (B, M, D)
        return FusionOutput((gates * h).sum(1))  # z (B, D)
