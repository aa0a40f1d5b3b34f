"""Deep Equilibrium fusion: the implicit gradient is the unrolled one, memory does not grow with the
iterations, and a fixed point that is not reached shows in the statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refnet_jax.models.fusions import deq


def setup(tol=1e-7, max_iter=200):
    rs = np.random.RandomState(0)
    embeddings = {
        'a': jnp.asarray(rs.randn(4, 5), jnp.float32),
        'b': jnp.asarray(rs.randn(4, 3), jnp.float32),
    }
    module = deq.DEQFusion(fused_dim=8, tol=tol, max_iter=max_iter)
    params = jax.jit(module.init)(jax.random.key(0), embeddings)
    return module, params, embeddings


def unrolled_iterates(params, embeddings, n):
    """z_0 = 0, ..., z_n of z <- f(z; x), the block applied n times by hand (no solver)."""
    p = params['params']
    xs = {m: e @ p[f'proj_{m}']['kernel'] + p[f'proj_{m}']['bias'] for m, e in embeddings.items()}
    block = deq._PurifyCombine(('a', 'b'), 8, parent=None)
    iterates = [jnp.zeros((4, 8))]
    for _ in range(n):
        iterates.append(block.apply({'params': p['block']}, iterates[-1], xs))
    return iterates


def unrolled_fixed_point(params, embeddings, n):
    """z_n of `unrolled_iterates` as a loop of n applications of the block (a scan: one compiled step, which
    reverse-mode autodiff differentiates through every iteration)."""
    p = params['params']
    xs = {m: e @ p[f'proj_{m}']['kernel'] + p[f'proj_{m}']['bias'] for m, e in embeddings.items()}
    block = deq._PurifyCombine(('a', 'b'), 8, parent=None)
    step = lambda _, z: block.apply({'params': p['block']}, z, xs)  # noqa: E731
    return jax.lax.fori_loop(0, n, step, jnp.zeros((4, 8)))


@pytest.mark.slow(seconds=3)
def test_the_implicit_gradient_equals_the_unrolled_one():
    module, params, embeddings = setup()
    weights = jnp.asarray(np.random.RandomState(1).randn(4, 8), jnp.float32)

    def implicit(params, embeddings):
        return jnp.sum(weights * module.apply(params, embeddings).z)

    def unrolled(params, embeddings):
        return jnp.sum(weights * unrolled_fixed_point(params, embeddings, 100))

    # The loop is the block applied by hand 100 times.
    np.testing.assert_allclose(
        unrolled_fixed_point(params, embeddings, 100),
        unrolled_iterates(params, embeddings, 100)[-1],
        rtol=1e-6,
        atol=1e-7,
    )

    @jax.jit
    def values_and_grads(params, embeddings):  # both ways, and the solver's statistics, in one program
        return (
            jax.value_and_grad(implicit, argnums=(0, 1))(params, embeddings),
            jax.value_and_grad(unrolled, argnums=(0, 1))(params, embeddings),
            module.apply(params, embeddings).stats,
        )

    (value, got), (value_unrolled, want), stats = values_and_grads(params, embeddings)
    np.testing.assert_allclose(value, value_unrolled, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    assert 1 < int(stats['deq_iterations']) < 200 and float(stats['deq_residual']) <= 1e-7


def test_memory_does_not_grow_with_the_iterations_and_non_convergence_shows():
    temps = {}
    for max_iter in (5, 50):
        module, params, embeddings = setup(tol=0.0, max_iter=max_iter)  # tol 0: every iteration runs
        grad = jax.jit(jax.grad(lambda p, e, module=module: jnp.sum(module.apply(p, e).z ** 2)))
        temps[max_iter] = grad.lower(params, embeddings).compile().memory_analysis().temp_size_in_bytes
        stats = module.apply(params, embeddings).stats
        assert int(stats['deq_iterations']) == max_iter and float(stats['deq_residual']) > 0
    assert temps[50] == temps[5]


def test_a_capped_solve_reports_its_last_relative_change():
    """Stopped at max_iter = 3 short of tol: 3 iterations, and the residual is the relative change of the
    third, recomputed here by unrolling the block; above tol, as the docstring says such a run shows."""
    module, params, embeddings = setup(tol=1e-7, max_iter=3)
    out = module.apply(params, embeddings)
    z, stats = out.z, out.stats
    assert out.readouts is None  # a pooled fusion
    iterates = unrolled_iterates(params, embeddings, 3)
    want = np.linalg.norm(iterates[3] - iterates[2]) / (np.linalg.norm(iterates[3]) + 1e-8)
    assert int(stats['deq_iterations']) == 3
    np.testing.assert_allclose(z, iterates[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(stats['deq_residual']), want, rtol=1e-4)
    assert float(stats['deq_residual']) > 1e-7
