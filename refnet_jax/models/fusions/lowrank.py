"""Low-rank multimodal tensor fusion (LMF): the modalities interact multiplicatively."""

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput, ordered


class LowRankTensorFusion(Fusion):
    """Low-rank multimodal tensor fusion (LMF, Liu et al., ACL 2018).

    The full tensor fusion is the outer product of the embeddings, each extended by a constant 1, mapped
    linearly to z; LMF factorizes that map into `rank` modality-specific factors, so
    z = sum_r prod_m (W_m^r [e_m; 1]). The product makes modalities interact multiplicatively, which plain
    concatenation has to learn through its MLP.

    Attributes:
      fused_dim: size of z.
      rank: number of rank-one factors.
    """

    kind: ClassVar[str] = 'lowrank'
    fused_dim: int = 128
    rank: int = 4
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> FusionOutput:
        p = layers.precision(self)
        del train
        prod = None
        for i, x in enumerate(ordered(embeddings)):
            x1 = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=-1)  # (B, D_m + 1)
            f = p.DenseGeneral((self.rank, self.fused_dim), use_bias=False, name=f'factor_{i}')(
                x1
            )  # (B, R, D)
            prod = f if prod is None else prod * f
        weights = layers.param(self, 'rank_weights', nn.initializers.lecun_normal(), (1, self.rank))
        z = jnp.einsum('brd,or->bd', prod, weights)  # (B, D)
        return FusionOutput(z + layers.param(self, 'bias', nn.initializers.zeros, (self.fused_dim,)))
