"""What every fusion module shares: the `Fusion` base class that declares a built-in fusion's config name and
inputs, and `FusionOutput`, the one type a fusion returns (the package docstring states the contract)."""

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import numpy as np

INPUTS = ('pooled', 'tokens')
"""What a fusion can take: `pooled` {m: (B, D_m)}, or `tokens` {m: `layers.Tokens`}."""

_RETIRED_FLAGS = ('TOKEN_LEVEL', 'FEEDBACK', 'STATS')  # the class flags of the contract before FusionOutput


@flax.struct.dataclass
class FusionOutput:
    """What a fusion returns.

    Attributes:
      z: (B, D) the fused embedding, which the task head, the MS loss and the refiner read.
      readouts: {m: (B, D)} per modality, the masked mean of m's own tokens at the layer z is read from (the
        refiner's `tokens` target); None for a fusion that has none (the pooled ones).
      stats: {name: scalar} of how the fusion went (a solver's iterations, say), logged during training as
        `fusion/<name>`; None for none.
    """

    z: jax.Array
    readouts: dict[str, jax.Array] | None = None
    stats: dict[str, jax.Array] | None = None


class Fusion(nn.Module):
    """Base class of the built-in fusion modules (a fusion of your own needs not derive from it).

    A subclass in a module of `refnet_jax.models.fusions` that sets `kind` is registered under it in
    `FUSIONS`: adding a fusion is writing that one class in one new file.

    Attributes:
      kind: its name in `config.model.fusion.kind`.
      inputs: 'pooled' (the default) or 'tokens': what `__call__` gets (see the package docstring).
    """

    kind: ClassVar[str]
    inputs: ClassVar[str] = 'pooled'


def ordered(embeddings: Mapping[str, Any]) -> list[Any]:
    """The values of {m: ...} in sorted-name order: a fusion's result does not depend on a dict's order."""
    return [embeddings[m] for m in sorted(embeddings)]


def input_kind(cls: type[nn.Module]) -> str:
    """'pooled' or 'tokens': what a fusion class takes (its `inputs` class attribute; 'pooled' without one)."""
    return getattr(cls, 'inputs', 'pooled')


def takes_encode(cls: type[nn.Module]) -> bool:
    """Whether a fusion class's `__call__` takes the `encode=` keyword (it re-runs the encoders with a
    context, as `progressive` does)."""
    return 'encode' in inspect.signature(cls.__call__).parameters


def check_class(cls: type[nn.Module], field: str) -> None:
    """Refuses a fusion class that breaks the contract in a way visible before any work, naming `field`: an
    `inputs` that is neither 'pooled' nor 'tokens', or a class flag of the contract before `FusionOutput`."""
    kind = input_kind(cls)
    if kind not in INPUTS:
        raise ValueError(f'{field}: {cls.__name__}.inputs is {kind!r}; expected one of {INPUTS}')
    retired = [flag for flag in _RETIRED_FLAGS if hasattr(cls, flag)]
    if retired:
        raise ValueError(
            f'{field}: {cls.__name__} sets {retired}, which no longer mean anything: a fusion returns '
            "FusionOutput(z, readouts, stats), declares inputs = 'tokens' to take Tokens, and takes encode= "
            'in its __call__ to re-run the encoders'
        )


def as_output(out: Any, cls: type[nn.Module]) -> FusionOutput:
    """A fusion's return value as a `FusionOutput`: one passes through, a bare (B, D) array is its z.

    Raises:
      ValueError naming the class for anything else (a tuple, say: the return of the contract before).
    """
    if isinstance(out, FusionOutput):
        return out
    if isinstance(out, jax.Array | np.ndarray) and out.ndim == 2:
        return FusionOutput(out)
    what = (
        f'an array of shape {out.shape}'
        if isinstance(out, jax.Array | np.ndarray)
        else f'a {type(out).__name__}'
    )
    raise ValueError(
        f'the fusion module {cls.__name__} returned {what}; expected a FusionOutput(z, readouts, stats) or '
        'a (B, D) array z'
    )
