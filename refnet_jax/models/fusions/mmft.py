"""Single-stream multimodal transformer over the tokens of every modality (MMF's MMFT)."""

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput


class MMFT(Fusion):
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

    kind: ClassVar[str] = 'mmft'
    inputs: ClassVar[str] = 'tokens'
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
    def __call__(self, inputs: Mapping[str, layers.Tokens], *, train: bool = False) -> FusionOutput:
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
        return FusionOutput(z, readouts)
