"""Fusion modules F: the encoders' outputs {m: (B, D_m) | Tokens} -> the fused embedding z (B, D).

One module per built-in fusion; `FUSIONS` ({`config.model.fusion.kind`: class}) is found by importing every
module of this package and keeping the `Fusion` subclasses defined there that set `kind`. Adding a fusion is
one class in one new file here: the registry, the config argument `fusion=KIND`, its help, the error messages
and the docs' list of fusions all follow from it.

The contract of a fusion, the built-in ones and the user's (`FILE.py:Class`, `package.module:Class`) alike:

- It is a Flax Linen module called as `fusion(inputs, *, train)`, whose other config fields are its
  dataclass fields (the defaults are the dataclass defaults).
- What it takes is its class attribute `inputs`: 'pooled' (the default, also for a class without one):
  {m: (B, D_m)}, token encoders' outputs mask-mean pooled; or 'tokens': {m: `layers.Tokens`} for every
  modality, a pooled encoder's output as one token.
- A fusion whose `__call__` takes the keyword `encode` is also given `encode=`: `encode(context)` runs every
  encoder again with `context` (B, D_c) and returns their outputs in the form the fusion takes (`progressive`
  feeds z back into the encoders that way). Every encoder then has to take `context=`.
- It returns a `FusionOutput(z, readouts=None, stats=None)`: z (B, D); `readouts` {m: (B, D)}, the masked
  mean of m's own tokens at the layer z is read from, which the refiner's `tokens` target needs (the token
  fusions give them); `stats` {name: scalar}, logged during training as `fusion/<name>`. A bare (B, D) array
  is taken as `FusionOutput(z)`.

Every built-in module takes the modalities in sorted-name order, so that the result does not depend on the
order of a dict.
"""

import importlib
import inspect
import pkgutil
from typing import NamedTuple

import flax.linen as nn

from refnet_jax.models.fusions.base import (
    INPUTS,
    Fusion,
    FusionOutput,
    as_output,
    check_class,
    input_kind,
    takes_encode,
)

__all__ = [
    'FUSIONS',
    'INPUTS',
    'Fusion',
    'FusionInfo',
    'FusionOutput',
    'as_output',
    'check_class',
    'describe',
    'input_kind',
    'takes_encode',
]


def _discover() -> dict[str, type[nn.Module]]:
    """{kind: class} of the `Fusion` subclasses with a `kind` defined in the modules of this package."""
    found: dict[str, type[nn.Module]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f'{__name__}.{info.name}')
        for cls in vars(module).values():
            if not (
                isinstance(cls, type)
                and issubclass(cls, Fusion)
                and cls.__module__ == module.__name__
                and 'kind' in vars(cls)
            ):
                continue
            if cls.kind in found:
                other = found[cls.kind]
                raise ValueError(
                    f'fusion kind {cls.kind!r} is declared twice: by {other.__module__}.{other.__qualname__} '
                    f'and by {cls.__module__}.{cls.__qualname__}'
                )
            check_class(cls, f'{cls.__module__}.{cls.__qualname__}')
            found[cls.kind] = cls
    return dict(sorted(found.items()))


FUSIONS: dict[str, type[nn.Module]] = _discover()
"""The built-in fusion modules by `config.model.fusion.kind`, sorted by name."""


class FusionInfo(NamedTuple):
    """One built-in fusion, as the docs list it."""

    kind: str  # its name in config.model.fusion.kind
    path: str  # package.module.Class
    description: str  # the first paragraph of its docstring, on one line
    inputs: str  # 'pooled' or 'tokens'


def describe() -> list[FusionInfo]:
    """Every fusion of `FUSIONS`, in name order, with its class path, one-line description and inputs."""
    rows = []
    for kind, cls in FUSIONS.items():
        paragraph = (inspect.getdoc(cls) or '').split('\n\n', 1)[0]
        rows.append(
            FusionInfo(
                kind, f'{cls.__module__}.{cls.__qualname__}', ' '.join(paragraph.split()), input_kind(cls)
            )
        )
    return rows
