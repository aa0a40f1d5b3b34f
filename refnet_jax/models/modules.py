"""Config names -> Linen module classes and instances, for encoders and fusion modules alike.

A module is named by a built-in name (a key of `encoders.ENCODERS` or `fusions.FUSIONS`), by
`FILE.py:Class` (a Python file, relative to the working directory or absolute), or by
`package.module:Class` (an importable module). Its fields are the other entries of the config section;
their defaults are the dataclass defaults of the class (`module_fields`), never typed a second time.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
from absl import logging

FROM_MODEL_CONFIG = ('dtype', 'param_dtype', 'remat')
"""Module fields set for every module from `config.model` (mixed precision, remat), not per module."""


def module_fields(cls: type[nn.Module]) -> dict[str, Any]:
    """A module's configurable fields and their dataclass defaults. Fields without a default are left out:
    they come from the data (`vocab_size`); so are `FROM_MODEL_CONFIG`."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ('parent', 'name', *FROM_MODEL_CONFIG) or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _load_file(path: str, field: str):
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ValueError(f'{field} names the file {path!r}, which does not exist (looked for {full})')
    name = f'refnet_user_{hashlib.sha1(full.encode()).hexdigest()[:12]}'
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve(spec: Any, registry: Mapping[str, type[nn.Module]], field: str) -> type[nn.Module]:
    """The Linen module class that `spec` names (see the module docstring).

    Raises:
      ValueError naming `field`, the value and what was expected: an unknown built-in name, a missing file
      or module, a missing class, or something that is not a Linen module class.
    """
    if isinstance(spec, str) and spec in registry:
        return registry[spec]
    expected = f'one of {sorted(registry)}, FILE.py:Class or package.module:Class'
    if not isinstance(spec, str) or spec.count(':') != 1:
        raise ValueError(f'{field} is {spec!r}; expected {expected}')
    where, cls_name = spec.split(':')
    if where.endswith('.py'):
        module = _load_file(where, field)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ValueError(f'{field} is {spec!r}: no module {e.name!r} can be imported') from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module))
        raise ValueError(f'{field} is {spec!r}: {where} has no {cls_name!r}; its Linen modules are {found}')
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f'{field} is {spec!r}, which is a {type(cls).__name__}, not a flax.linen.Module class'
        )
    return cls


def instantiate(
    cls: type[nn.Module],
    fields: Mapping[str, Any],
    field: str,
    *,
    builtins: Iterable[type[nn.Module]] = (),
    **data,
) -> nn.Module:
    """`cls(**fields, **data)`, refusing fields that `cls` does not take, with the config path.

    A config section is written for a built-in module; when it names another class (the user's), a field
    that class does not take but that still holds a built-in module's default (one of `builtins`) is left
    out, and logged: it was never chosen. Any other field it does not take is an error.

    Args:
      cls: the module class.
      fields: the config section's fields for it (lists are passed as tuples).
      field: the config path of the section, for messages.
      builtins: the built-in classes whose defaults may be left out for a class that lacks them.
      **data: fields that come from the data, passed when `cls` has them (`vocab_size`).
    """
    known = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    defaults = {(k, repr(v)) for c in builtins if c is not cls for k, v in module_fields(c).items()}
    dropped = sorted(k for k in set(fields) - known if (k, repr(fields[k])) in defaults)
    unknown = sorted(set(fields) - known - set(dropped))
    if unknown:
        raise ValueError(
            f'{field} has field(s) {unknown} that {cls.__name__} does not take; its fields are '
            f'{sorted(known - set(data))}'
        )
    if dropped:
        logging.info(
            '%s: %s does not take %s; they hold built-in defaults and are left out.',
            field,
            cls.__name__,
            dropped,
        )
    kwargs = {k: v for k, v in fields.items() if k not in dropped}
    kwargs.update({k: v for k, v in data.items() if k in known})
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in ('parent', 'name')
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f'{field}: {cls.__name__} needs field(s) {missing}, which the config does not set')
    return cls(**kwargs)
