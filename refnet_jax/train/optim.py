"""The optimizer of a run, from config: AdamW with linear warm-up and cosine decay, clipping by global norm,
and big_vision-style parameter groups by regex over parameter paths (`paths.path_str`):

- `config.train.frozen`: parameters kept bit-identical. They get no optimizer state (optax `set_to_zero`
  inside `multi_transform`), and the train step stops their gradient (`frozen_mask`), so XLA drops the
  backward pass of a wholly frozen module.
- `config.train.lr_multipliers`: (regex, factor) pairs; a parameter's learning rate is the schedule times
  the factor of the first regex it matches (1 when none).
- `config.train.decay_mask`: the parameters that get AdamW's weight decay; by default the kernels of dense,
  convolution and attention layers, not biases, norm scales or embeddings.

A regex that matches no parameter is an error naming its field (it would otherwise do nothing, silently).
"""

from typing import Any

import jax
import ml_collections
import optax

from refnet_jax.train import paths

FROZEN = 'frozen'


def _rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], dict[str, float], tuple[str, ...]]:
    t = config.train
    frozen = tuple(t.get('frozen', ()))
    pairs = t.get('lr_multipliers', ())
    pairs = pairs.items() if hasattr(pairs, 'items') else pairs
    multipliers = {}
    for pair in pairs:
        if (
            len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], int | float)
            or pair[1] < 0
        ):
            raise ValueError(
                f'config.train.lr_multipliers holds {pair!r}; expected (regex, factor >= 0) pairs, e.g. '
                "(('encoders/.*', 0.1),)"
            )
        multipliers[pair[0]] = float(pair[1])
    decay = tuple(t.get('decay_mask', ('.*',)))
    return frozen, multipliers, decay


def frozen_mask(config: ml_collections.ConfigDict, params: Any) -> Any:
    """A tree of bools like `params`: True where `config.train.frozen` freezes the parameter."""
    frozen = _rules(config)[0]
    if not frozen:
        return jax.tree.map(lambda _: False, params)
    return paths.matching(params, frozen, 'config.train.frozen')


def param_labels(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Each parameter's group: 'frozen', or 'lr<factor>/decay' / 'lr<factor>/no_decay'."""
    _, multipliers, decay = _rules(config)
    frozen = frozen_mask(config, params)
    decays = (
        paths.matching(params, decay, 'config.train.decay_mask')
        if decay
        else jax.tree.map(lambda _: False, params)
    )
    groups = [
        paths.matching(params, (pattern,), f'config.train.lr_multipliers[{pattern!r}]')
        for pattern in multipliers
    ]
    factors = list(multipliers.values())

    def label(is_frozen, decayed, *in_group):
        if is_frozen:
            return FROZEN
        factor = next((f for f, hit in zip(factors, in_group, strict=True) if hit), 1.0)
        return f'lr{factor:g}/{"decay" if decayed else "no_decay"}'

    return jax.tree.map(label, frozen, decays, *groups)


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, base learning-rate schedule) of `config.train` (see the module docstring)."""
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.num_steps, t.warmup_steps + 1)
    )
    _, multipliers, _ = _rules(config)
    transforms = {FROZEN: optax.set_to_zero()}
    for factor in {1.0, *multipliers.values()}:
        scaled = schedule if factor == 1.0 else (lambda step, f=factor: f * schedule(step))
        for decayed in (True, False):
            name = f'lr{factor:g}/{"decay" if decayed else "no_decay"}'
            transforms[name] = optax.adamw(scaled, weight_decay=t.weight_decay if decayed else 0.0)
    tx = optax.multi_transform(transforms, lambda params: param_labels(config, params))
    if t.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
    return tx, schedule
