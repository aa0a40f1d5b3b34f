"""Parameter groups by regex: frozen parameters, learning-rate multipliers, the weight-decay mask."""

import jax
import numpy as np
import pytest
from test_model import INFO, toy_batch, toy_config

from refnet_jax.train import optim, paths, sharding, trainer


def steps(config, n, batch=None):
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    batch = sharding.shard_batch(toy_batch() if batch is None else batch, run.mesh)
    state0 = jax.device_get(run.state)
    state = run.state
    with jax.set_mesh(run.mesh):
        for _ in range(n):
            state, _ = run.train_step(state, batch, jax.random.key(0))
    return run, state0, jax.device_get(state)


@pytest.mark.slow(seconds=8)
def test_frozen_parameters_stay_bit_identical_hold_no_state_and_cost_no_backward_pass():
    config = toy_config('concat', 'refnet')
    config.train.frozen = ('encoders/image/.*',)
    run, before, after = steps(config, 20)
    jax.tree.map(
        np.testing.assert_array_equal, before.params['encoders']['image'], after.params['encoders']['image']
    )
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b),
        before.params['encoders']['question'],
        after.params['encoders']['question'],
    )
    assert all(jax.tree.leaves(changed))
    # Optimizer state: Adam's two moments for every trainable parameter, nothing for the frozen ones.
    frozen = sum(x.size for x in jax.tree.leaves(before.params['encoders']['image']))
    total = sum(x.size for x in jax.tree.leaves(before.params))
    held = sum(x.size for x in jax.tree.leaves(after.opt_state) if x.ndim)
    assert held == 2 * (total - frozen)

    def flops(r, state):
        with jax.set_mesh(r.mesh):
            batch = sharding.shard_batch(toy_batch(), r.mesh)
            cost = r.train_step.lower(state, batch, jax.random.key(0)).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)['flops']

    # The train step run above (its state's shapes and shardings), and the same model's with nothing frozen.
    unfrozen = trainer.build(toy_config('concat', 'refnet'), info=INFO, devices=jax.devices()[:1])
    assert flops(run, after) < 0.8 * flops(unfrozen, unfrozen.state)


@pytest.mark.slow
def test_a_learning_rate_multiplier_scales_the_update():
    config = toy_config('concat', 'baseline')
    config.train.warmup_steps = 1
    updates = {}
    for factor in (1.0, 0.1):
        config.train.lr_multipliers = (('fusion/.*', factor),)
        _, before, after = steps(config, 2)  # the first step's learning rate is 0
        updates[factor] = jax.tree.map(lambda a, b: b - a, before.params, after.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, 0.1 * b, rtol=1e-3, atol=5e-8
        ),  # float rounding of p1 - p0
        updates[0.1]['fusion'],
        updates[1.0]['fusion'],
    )
    jax.tree.map(np.testing.assert_array_equal, updates[0.1]['head'], updates[1.0]['head'])


def test_weight_decay_skips_biases_norm_scales_and_embeddings_by_default():
    config = toy_config('mmft', 'baseline', target='tokens')
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1], init=False)
    params = jax.eval_shape(run.model.init, jax.random.key(0), toy_batch())['params']
    labels = {
        paths.path_str(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(optim.param_labels(config, params))
    }
    for path, label in labels.items():
        decays = label.endswith('/decay')
        assert decays == path.endswith('/kernel'), (path, label)
    assert any(p.endswith('/embedding') for p in labels) and any(p.endswith('/scale') for p in labels)


@pytest.mark.parametrize(
    'field,value,message',
    [
        ('frozen', ('encoders/imag/.*',), r"config.train.frozen: \['encoders/imag/.\*'\] match"),
        ('lr_multipliers', (('fusoin/.*', 0.1),), r"config.train.lr_multipliers\['fusoin/.\*'\]: .* match"),
        ('decay_mask', ('.*/kernal',), r'config.train.decay_mask: .* match'),
        ('lr_multipliers', (('fusion/.*',),), r'config.train.lr_multipliers holds'),
    ],
)
def test_a_rule_that_matches_nothing_is_named_before_training(field, value, message):
    config = toy_config('concat')
    config.train[field] = value
    with pytest.raises(ValueError, match=message):
        trainer.build(config, info=INFO, devices=jax.devices()[:1])
