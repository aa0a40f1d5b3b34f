"""Exact gradient accumulation (GradCache): k micro-batches give the whole batch's gradient, MS pairs included."""

import jax
import numpy as np
import pytest
from test_model import INFO, toy_batch, toy_config

from refnet_jax.train import accumulation, sharding, trainer


def forward_and_loss(run):
    def forward(params, batch, rng):
        return run.model.apply({'params': params}, batch, train=True, rngs={'dropout': rng})

    return forward


@pytest.mark.slow(seconds=5)
def test_cached_gradients_equal_the_whole_batch_gradient_and_naive_accumulation_does_not():
    config = toy_config('concat', 'refnet')  # task + refiner + Multi-Similarity terms
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    params, batch, rng = run.state.params, toy_batch(rows=8, per_row=2), jax.random.key(3)
    forward = forward_and_loss(run)

    def loss(params, batch):
        return run.objective.loss(*forward(params, batch, rng), batch)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, want_metrics), want = grad(params, batch)
    got, metrics = jax.jit(
        lambda p: accumulation.cached_gradients(
            forward, lambda logits, aux: run.objective.loss(logits, aux, batch), p, batch, rng, 4
        )
    )(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)
    for key in ('loss', 'ms_loss', 'task_loss', 'accuracy'):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6)
    # Micro-batches of 4 examples on their own: the MS loss sees other pairs, the gradient is another.
    naive = [
        grad(params, b)[1]
        for b in (
            {**{k: v[j::4] for k, v in batch.items() if k != 'image'}, 'image': batch['image']}
            for j in range(4)
        )
    ]
    naive = jax.tree.map(lambda *g: sum(g) / 4, *naive)
    differs = jax.tree.map(lambda a, b: not np.allclose(a, b, rtol=1e-3, atol=1e-5), naive, want)
    assert any(jax.tree.leaves(differs['fusion']))


@pytest.mark.slow(seconds=17)
def test_on_8_devices_the_accumulated_gradient_and_step_equal_the_whole_batch_ones():
    assert jax.device_count() == 8
    batch = toy_batch(rows=16, per_row=2)  # 32 examples on 16 images
    config = toy_config('mmft', 'refnet', target='tokens')
    config.train.batch_size = 32
    run = trainer.build(config, info=INFO)
    forward, rng = forward_and_loss(run), jax.random.key(3)
    with jax.set_mesh(run.mesh):
        sharded = sharding.shard_batch(batch, run.mesh)
        want = jax.jit(jax.grad(lambda p, b: run.objective.loss(*forward(p, b, rng), b)[0]))(
            run.state.params, sharded
        )
        got, _ = jax.jit(
            lambda p, b: accumulation.cached_gradients(
                forward, lambda logits, aux: run.objective.loss(logits, aux, b), p, b, rng, 4
            )
        )(run.state.params, sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)
    metrics = {}
    for k in (1, 4):
        config.train.accumulation_steps = k
        run = trainer.build(config, info=INFO)
        with jax.set_mesh(run.mesh):
            _, metrics[k] = run.train_step(
                run.state, sharding.shard_batch(batch, run.mesh), jax.random.key(0)
            )
    for key in ('loss', 'ms_loss', 'grad_norm'):
        np.testing.assert_allclose(metrics[4][key], metrics[1][key], rtol=1e-5)


def test_micro_batches_must_divide_over_the_devices():
    config = toy_config('concat')
    config.train.batch_size = 64
    config.train.accumulation_steps = 3
    with pytest.raises(ValueError, match='with config.train.accumulation_steps 3 it must be a multiple of 3'):
        trainer.build(config, info=INFO, devices=jax.devices()[:1], init=False)
