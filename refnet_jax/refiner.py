"""The refiner (defusion) module: one small decoder R_m per modality, from the fused embedding z.

R_m(z) = ê_m is compared with a per-modality target t_m by the refiner loss, so that z keeps each
modality's own information. The targets are built here too, because what a target is depends on the
modality (DESIGN.md §1):

- `embedding`: the unimodal encoder output e_m (the paper's framing);
- `input`: the modality's input as a flat float vector (pixels in [0, 1], a bag of words over the vocabulary
  for tokens, the raw values otherwise), which a constant network cannot reconstruct.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

TARGETS = ('embedding', 'input')


class RefinerDecoder(nn.Module):
    """An MLP decoder from the fused embedding to one modality's target.

    Attributes:
      out_dim: size of the target.
      hidden: widths of the hidden layers.
    """

    out_dim: int
    hidden: Sequence[int] = (256,)

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = z
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.out_dim)(x)  # (B, out_dim)


def input_target(x: jax.Array, info) -> jax.Array:
    """The `input` refiner target of one modality: its input batch as a (B, F) float array.

    Args:
      x: the modality's batch, (B, *info.shape).
      info: the modality's `input_pipeline.ModalityInfo`.
    """
    if info.kind == 'tokens':
        bag = jax.nn.one_hot(x, info.vocab_size, dtype=jnp.float32).sum(-2)  # (B, V)
        return bag.at[:, 0].set(0.0)  # padding is not a word
    x = x.reshape(x.shape[0], -1)
    if info.kind == 'image' and jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def refine(z: jax.Array, targets: Mapping[str, jax.Array], hidden: Sequence[int]) -> dict[str, jax.Array]:
    """Decodes z into a reconstruction of every target (call inside a compact Linen module)."""
    return {m: RefinerDecoder(t.shape[-1], tuple(hidden), name=f'refiner_{m}')(z) for m, t in targets.items()}
