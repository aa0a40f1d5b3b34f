"""Late fusion: concatenation of the modality embeddings, then an MLP."""

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput, ordered


class ConcatMLP(Fusion):
    """Concatenation of the modality embeddings followed by an MLP (late fusion).

    Attributes:
      hidden: widths of the hidden layers.
      fused_dim: size of z.
      dropout: dropout rate on the hidden layers.
    """

    kind: ClassVar[str] = 'concat'
    hidden: Sequence[int] = (256,)
    fused_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> FusionOutput:
        p = layers.precision(self)
        x = jnp.concatenate(ordered(embeddings), axis=-1)  # (B, sum_m D_m)
        for h in self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(p.Dense(h)(x)))
        return FusionOutput(p.Dense(self.fused_dim)(x))  # z (B, fused_dim)
