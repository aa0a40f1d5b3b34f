"""Progressive Fusion: late fusion fed back into the encoders' early layers for a few rounds."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models.fusions.base import Fusion, FusionOutput
from refnet_jax.models.fusions.concat import ConcatMLP


class ProgressiveFusion(Fusion):
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

    The model calls a fusion whose `__call__` takes `encode=` as `fusion(embeddings, encode=..., train=...)`:
    `encode(context)` runs every encoder again with `context` (B, D_c) and returns their pooled outputs
    {m: (B, D_m)}. So any such fusion can run encoders for several rounds without the model knowing how,
    and any encoder that takes `context=` works under it (the built-in ones all do).

    Attributes:
      rounds: fusion rounds R (1: plain late fusion).
      hidden: widths of the late-fusion MLP's hidden layers.
      fused_dim: size of z (and of the context the encoders get).
      dropout: dropout rate on the hidden layers.
    """

    kind: ClassVar[str] = 'progressive'
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
    ) -> FusionOutput:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f'config.model.fusion.rounds is {self.rounds!r}; expected an integer >= 1')
        late = ConcatMLP(self.hidden, self.fused_dim, self.dropout, self.dtype, self.param_dtype, name='late')
        z = late(embeddings, train=train).z  # (B, fused_dim)
        for _ in range(self.rounds - 1):
            z = late(encode(z), train=train).z
        return FusionOutput(z)
