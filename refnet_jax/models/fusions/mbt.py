"""Multimodal bottleneck transformer: modalities exchange information only through shared bottleneck tokens."""

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput


class MBT(Fusion):
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

    kind: ClassVar[str] = 'mbt'
    inputs: ClassVar[str] = 'tokens'
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
    def __call__(self, inputs: Mapping[str, layers.Tokens], *, train: bool = False) -> FusionOutput:
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
        return FusionOutput(z, readouts)
