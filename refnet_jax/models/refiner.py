"""The refiner (defusion) module: one small decoder R_m per modality, from the fused embedding z.

R_m(z) = ê_m is compared with a per-modality target t_m by the refiner loss, so that z keeps each
modality's own information. Which target (`config.model.refiner.target`, docs/architecture.md, "The method"):

- `embedding`: the unimodal encoder output e_m, pooled (the paper's framing);
- `input`: the modality's input as a flat float vector (`contract.KINDS[kind].input_target`: pixels in
  [0, 1], a bag of words for tokens, the raw values otherwise), which a constant network cannot reconstruct;
- `tokens`: the masked mean of modality m's own tokens at the token fusion's read-out layer (the author's
  scheme on MMF's single-stream transformer); needs a token-level fusion.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers

TARGETS = ('embedding', 'input', 'tokens')
COLLAPSIBLE = ('embedding', 'tokens')  # targets made by the network itself: pre-training can collapse on them


class RefinerDecoder(nn.Module):
    """An MLP decoder from the fused embedding to one modality's target.

    Attributes:
      out_dim: size of the target.
      hidden: widths of the hidden layers.
    """

    out_dim: int
    hidden: Sequence[int] = (256,)
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        p = layers.precision(self)
        x = z
        for h in self.hidden:
            x = nn.relu(p.Dense(h)(x))
        return p.Dense(self.out_dim)(x)  # (B, out_dim)


class Refiner(nn.Module):
    """One `RefinerDecoder` per target modality, named by the modality (`refiner/<m>`).

    Attributes:
      hidden: widths of each decoder's hidden layers.
    """

    hidden: Sequence[int] = (256,)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, targets: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """z (B, D), targets {m: (B, F_m)} -> reconstructions {m: (B, F_m)}."""
        return {
            m: RefinerDecoder(t.shape[-1], tuple(self.hidden), self.dtype, self.param_dtype, name=m)(z)
            for m, t in targets.items()
        }
