"""Deep Equilibrium fusion (Ni, Bai, Zhang, Yao, Mei, 2023): the fused embedding is the fixed point
z* = f(z*; x) of one weight-tied purify-then-combine block, found by iteration, differentiated implicitly.

`fixed_point` is a `jax.custom_vjp`: the forward pass iterates z <- f(z) in a `lax.while_loop` until the
relative change is below `tol` or `max_iter` iterations; the backward pass solves u = g + (df/dz)^T u by the
same iteration (the implicit function theorem), then takes one vector-Jacobian product into the parameters
and inputs. Nothing of the forward iterations is kept, so memory does not grow with their number. (Our own
`custom_vjp` rather than optimistix: optimistix's default `ImplicitAdjoint` solves the backward system with
`lineax.AutoLinearSolver`, which picks a direct solver (LU, QR) and so works on df/dz as a matrix: (B * D)^2
entries, 4 GiB at B = 256, D = 128, though the block never mixes examples. A matrix-free solve there has to be
chosen by hand (lineax's GMRES, say); the DEQ paper's own backward pass is the fixed-point iteration below,
which needs only vector-Jacobian products, and it brings no new dependency (equinox, lineax).
`tests/test_deq.py` checks the implicit gradient against the unrolled one.)

Two limits, known and left as they are: the stopping test is one relative norm over the whole batch, so an
example's z* depends on the rest of its batch within `tol` (gradient accumulation, which splits the batch,
is exact for this fusion only to that tolerance); and the backward solve's iterations are not reported (a
custom VJP returns cotangents only): it converges where the forward one does, as both iterate the same
contraction, but one that stops at `max_iter` does so silently.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput


def _iterate(step: Callable[[jax.Array], jax.Array], z0: jax.Array, tol: float, max_iter: int):
    """Iterates z <- step(z) from z0; returns (z, iterations, relative change of the last one)."""

    def cond(state):
        k, _, res = state
        return (k < max_iter) & (res > tol)

    def body(state):
        k, z, _ = state
        new = step(z)
        res = jnp.linalg.norm(new - z) / (jnp.linalg.norm(new) + 1e-8)
        return k + 1, new, res

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), z0, jnp.asarray(jnp.inf, z0.dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def fixed_point(f: Callable, params: Any, x: Any, z0: jax.Array, tol: float, max_iter: int):
    """(z*, iterations, residual) with z* = f(params, x, z*); z* differentiable in `params` and `x`."""
    return _forward(f, params, x, z0, tol, max_iter)


def _forward(f, params, x, z0, tol, max_iter):
    k, z, res = _iterate(lambda z: f(params, x, z), z0, tol, max_iter)
    return z, k, res


def _fixed_point_fwd(f, params, x, z0, tol, max_iter):
    z, k, res = _forward(f, params, x, z0, tol, max_iter)
    return (z, k, res), (params, x, z)


def _fixed_point_bwd(f, tol, max_iter, saved, cotangents):
    params, x, z = saved
    g = cotangents[0]
    _, vjp_z = jax.vjp(lambda z: f(params, x, z), z)
    # u = g + (df/dz)^T u, by the same iteration (converges where the forward one does).
    _, u, _ = _iterate(lambda u: g + vjp_z(u)[0], g, tol, max_iter)
    _, vjp_px = jax.vjp(lambda p, x: f(p, x, z), params, x)
    d_params, d_x = vjp_px(u)
    return d_params, d_x, jnp.zeros_like(z)


fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


class _PurifyCombine(nn.Module):
    """f(z; x): each modality's projected input x_m is purified by a gate computed from the fused state z
    and x_m itself, the purified inputs are combined with z, and tanh keeps the map bounded."""

    names: tuple[str, ...]
    fused_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, xs: Mapping[str, jax.Array]) -> jax.Array:
        p = layers.precision(self)
        small = nn.initializers.variance_scaling(0.5, 'fan_in', 'truncated_normal')  # a contraction at init
        combined = p.Dense(self.fused_dim, kernel_init=small, name='state')(z)
        for m in self.names:
            gate = nn.sigmoid(p.Dense(self.fused_dim, name=f'gate_{m}')(jnp.concatenate([z, xs[m]], -1)))
            combined = combined + p.Dense(self.fused_dim, kernel_init=small, name=f'combine_{m}')(
                gate * xs[m]
            )
        return jnp.tanh(combined)


class DEQFusion(Fusion):
    """Deep Equilibrium fusion (Ni et al., 2023) of pooled embeddings: z is the fixed point z* = f(z*; x) of
    one weight-tied block, found by iteration and differentiated implicitly.

    The module docstring says how. Its `FusionOutput.stats` hold the solver's iterations and final relative
    residual, which the objective logs as `fusion/deq_iterations` and `fusion/deq_residual`; a residual above
    `tol` means the iteration hit `max_iter` without converging.

    Attributes:
      fused_dim: size of z.
      tol: relative change at which the iteration stops.
      max_iter: the most iterations (forward, and backward).
    """

    kind: ClassVar[str] = 'deq'
    fused_dim: int = 128
    tol: float = 1e-4
    max_iter: int = 30
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, embeddings: Mapping[str, jax.Array], *, train: bool = False) -> FusionOutput:
        del train
        p = layers.precision(self)
        names = tuple(sorted(embeddings))
        xs = {m: p.Dense(self.fused_dim, name=f'proj_{m}')(embeddings[m]) for m in names}
        block = _PurifyCombine(names, self.fused_dim, self.dtype, self.param_dtype, parent=None)
        z0 = jnp.zeros((next(iter(xs.values())).shape[0], self.fused_dim), xs[names[0]].dtype)
        params = self.param('block', lambda rng: block.init(rng, z0, xs)['params'])

        def f(params, xs, z):
            return block.apply({'params': params}, z, xs)

        z, iterations, residual = fixed_point(f, params, xs, z0, self.tol, self.max_iter)
        stats = {
            'deq_iterations': iterations.astype(jnp.float32),
            'deq_residual': residual.astype(jnp.float32),
        }
        return FusionOutput(z, stats=stats)
