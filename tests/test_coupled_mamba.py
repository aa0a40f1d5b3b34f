"""Coupled Mamba: the parallel associative scan equals the sequential recurrence (values and gradients, the
scan's own backward pass included), padded steps leave the states as they were, and the chains are coupled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refnet_jax.models import layers
from refnet_jax.models.fusions import coupled_mamba


def case(seed=0):
    rs = np.random.RandomState(seed)
    b, t, m, d, n = 2, 7, 3, 4, 5
    decay = jnp.asarray(rs.uniform(0.5, 1.0, (b, t, m, d, n)), jnp.float32)
    inputs = jnp.asarray(rs.randn(b, t, m, d, n), jnp.float32)
    coupling = jax.nn.softmax(jnp.asarray(rs.randn(m, m), jnp.float32), axis=-1)
    mask = jnp.asarray(rs.rand(b, t, m) > 0.3)
    return decay, inputs, coupling, mask


def numpy_recurrence(decay, inputs, coupling, mask):
    decay, inputs, coupling, mask = (np.asarray(x, np.float64) for x in (decay, inputs, coupling, mask))
    h = np.zeros(inputs.shape[:1] + inputs.shape[2:])  # (B, M, D, N)
    out = []
    for t in range(inputs.shape[1]):
        mixed = np.einsum('mk,bkdn->bmdn', coupling, h)
        new = decay[:, t] * mixed + inputs[:, t]
        h = np.where(mask[:, t, :, None, None] > 0, new, h)
        out.append(h)
    return np.stack(out, 1)


@pytest.mark.slow(seconds=1)
def test_the_parallel_scan_equals_the_sequential_one_in_values_and_gradients():
    args = case()
    weights = jnp.asarray(np.random.RandomState(3).randn(*args[1].shape), jnp.float32)

    def loss(decay, inputs, coupling, parallel):
        return jnp.sum(
            weights * coupled_mamba.coupled_scan(decay, inputs, coupling, args[3], parallel=parallel)
        )

    @jax.jit
    def scans(decay, inputs, coupling):  # both scans' values and gradients, in one compiled program
        return [
            (
                coupled_mamba.coupled_scan(decay, inputs, coupling, args[3], parallel=parallel),
                jax.grad(loss, argnums=(0, 1, 2))(decay, inputs, coupling, parallel),
            )
            for parallel in (True, False)
        ]

    (parallel, got), (sequential, want) = scans(*args[:3])
    np.testing.assert_allclose(parallel, numpy_recurrence(*args), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sequential, numpy_recurrence(*args), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.slow(seconds=1)
def test_linear_recurrence_and_its_backward_pass_equal_autodiff_of_a_sequential_scan():
    rs = np.random.RandomState(1)
    a = jnp.asarray(rs.uniform(-0.6, 0.6, (2, 9, 3, 2, 2)), jnp.float32)  # general transitions, not only
    b = jnp.asarray(rs.randn(2, 9, 3, 2), jnp.float32)  # the coupled ones
    weights = jnp.asarray(rs.randn(2, 9, 3, 2), jnp.float32)

    def sequential(a, b):
        def step(h, ab):
            h = jnp.einsum('...ij,...j->...i', ab[0], h) + ab[1]
            return h, h

        return jnp.moveaxis(
            jax.lax.scan(step, jnp.zeros_like(b[:, 0]), (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))[1],
            0,
            1,
        )

    @jax.jit
    def both(a, b):  # the values and gradients of both, in one compiled program
        return [
            (f(a, b), jax.grad(lambda a, b, f=f: jnp.sum(weights * f(a, b)), argnums=(0, 1))(a, b))
            for f in (coupled_mamba.linear_recurrence, sequential)
        ]

    (value, got), (value_sequential, want) = both(a, b)
    np.testing.assert_allclose(value, value_sequential, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, want)


def test_padded_steps_keep_the_state_and_the_chains_are_coupled():
    decay, inputs, coupling, mask = case()
    h = coupled_mamba.coupled_scan(decay, inputs, coupling, mask)
    for b, t, m in zip(*np.nonzero(~np.asarray(mask)), strict=True):
        previous = h[b, t - 1, m] if t else jnp.zeros_like(h[b, t, m])
        np.testing.assert_array_equal(h[b, t, m], previous)
    changed = inputs.at[:, :, 1].add(1.0)  # chain 1's input reaches chain 0 through the coupling
    assert not np.allclose(coupled_mamba.coupled_scan(decay, changed, coupling, mask)[:, -1, 0], h[:, -1, 0])
    alone = coupled_mamba.coupled_scan(decay, changed, jnp.eye(3), mask)
    np.testing.assert_allclose(
        alone[:, :, 0], coupled_mamba.coupled_scan(decay, inputs, jnp.eye(3), mask)[:, :, 0]
    )


@pytest.mark.slow(seconds=1)
def test_step_sizes_start_as_mambas_between_one_thousandth_and_one_tenth():
    tokens = {m: layers.Tokens(jnp.ones((2, 5, 8)), jnp.ones((2, 5), bool)) for m in ('a', 'b')}
    module = coupled_mamba.CoupledMamba(fused_dim=8, depth=1, state_size=4)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), tokens)['params']
    step = np.asarray(jax.nn.softplus(params['delta_0']['bias']))  # the step size of a zero input
    assert step.shape == (2, 8)
    assert step.min() >= 1e-3 * (1 - 1e-5) and step.max() <= 0.1 * (1 + 1e-5)
    assert step.max() / step.min() > 10  # spread over the range (log-uniform), not one value
