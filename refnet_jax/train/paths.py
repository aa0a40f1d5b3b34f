"""Parameter paths as '/'-joined strings ('encoders/image/Conv_0/kernel'), and regex rules over them.

Sharding rules, frozen parameters, learning-rate groups and the weight-decay mask all name parameters by
regexes over these paths (big_vision style).
"""

import re
from collections.abc import Iterable
from typing import Any

import jax


def path_str(keys) -> str:
    """'params/image/Conv_0/kernel': the same for a dict key, a NamedTuple field and a sequence index."""
    parts = []
    for k in keys:
        for attr in ('key', 'name', 'idx'):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return '/'.join(parts)


def matching(tree: Any, patterns: Iterable[str], field: str) -> Any:
    """A tree of bools like `tree`: whether each leaf's path fully matches one of `patterns`.

    Raises:
      ValueError: naming `field` and each pattern that matches no leaf (a misspelt rule would otherwise
        silently do nothing).
    """
    compiled = {p: re.compile(p) for p in patterns}
    used = set()

    def match(keys, leaf):
        del leaf
        name = path_str(keys)
        hits = [p for p, r in compiled.items() if r.fullmatch(name)]
        used.update(hits)
        return bool(hits)

    out = jax.tree_util.tree_map_with_path(match, tree)
    unused = [p for p in compiled if p not in used]
    if unused:
        some = sorted(path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree))[:8]
        raise ValueError(f'{field}: {unused} match(es) no parameter; parameter paths look like {some}')
    return out
