"""The refiner (defusion) module: one small decoder R_m per modality, from the fused embedding z.

R_m(z) = ê_m is compared with a per-modality target t_m by the refiner loss, so that z keeps each
modality's own information. Which target (`config.model.refiner.target`, docs/architecture.md, "The method"):

- `embedding`: the unimodal encoder output e_m, pooled (the paper's framing);
- `input`: the modality's input as a flat float vector (`contract.KINDS[kind].input_target`: pixels in
  [0, 1], a bag of words for tokens, the raw values otherwise), which a constant network cannot reconstruct;
- `tokens`: the masked mean of modality m's own tokens at the token fusion's read-out layer (the author's
  scheme on MMF's single-stream transformer); needs a token-level fusion.

`refiner_targets` makes them, `Refiner` decodes z into each modality's; `losses.refiner_loss` compares the two.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.data import contract
from refnet_jax.models import layers

TARGETS = ('embedding', 'input', 'tokens')
COLLAPSIBLE = ('embedding', 'tokens')  # targets made by the network itself: pre-training can collapse on them


def refiner_targets(
    kind: str,
    *,
    embeddings: Mapping[str, jax.Array],
    readouts: Mapping[str, jax.Array] | None = None,
    inputs: Mapping[str, jax.Array] | None = None,
    infos: Mapping[str, contract.ModalityInfo] | None = None,
    modalities: Sequence[str] | None = None,
    stop_gradient: bool = True,
) -> dict[str, jax.Array]:
    """The refiner's target t_m for each modality m: what R_m(z) is trained to reconstruct.

    Args:
      kind: one of `TARGETS` (see the module docstring).
      embeddings: {m: (B, D_m)} the pooled encoder outputs; the targets of kind 'embedding'.
      readouts: {m: (B, D)} a token fusion's `FusionOutput.readouts`; needed by kind 'tokens'.
      inputs: {m: (B, *shape)} each modality's input, one row per example; needed by kind 'input'.
      infos: {m: `contract.ModalityInfo`}; needed by kind 'input', which flattens each input as its kind
        says (`contract.KINDS[kind].input_target`).
      modalities: the modalities to make targets for (None: every modality of `embeddings`).
      stop_gradient: whether 'embedding' and 'tokens' targets, which the network makes itself, are
        constants for the refiner loss (its gradient then trains the decoders and z, not the target).

    Returns:
      {m: (B, F_m)} for each of `modalities`: F_m = D_m ('embedding'), D ('tokens') or the flattened input
      size ('input').

    >>> e = {'a': jnp.ones((2, 3)), 'b': jnp.zeros((2, 4))}
    >>> {m: t.shape for m, t in refiner_targets('embedding', embeddings=e, modalities=['b']).items()}
    {'b': (2, 4)}
    """
    names = tuple(embeddings) if modalities is None else tuple(modalities)
    if kind not in TARGETS:
        raise ValueError(f'refiner target kind is {kind!r}; expected one of {TARGETS}')
    if kind == 'input':
        if inputs is None or infos is None:
            raise ValueError("refiner target 'input' needs `inputs` and `infos`")
        return {m: contract.KINDS[infos[m].kind].input_target(inputs[m], infos[m]) for m in names}
    source = embeddings if kind == 'embedding' else readouts
    if source is None:
        raise ValueError("refiner target 'tokens' needs `readouts`: FusionOutput.readouts of a token fusion")
    targets = {m: source[m] for m in names}
    return jax.lax.stop_gradient(targets) if stop_gradient else targets


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
