"""Coupled Mamba fusion (Li, Zhou, Yu, Song, Yang, NeurIPS 2024): one selective state-space chain per
modality, each state depending on its own chain's input and on every chain's previous state.

Per layer and modality m (tokens u_m (B, T, D), after a LayerNorm): a selective SSM as Mamba's, with a
step size delta = softplus(W u + b) (b set so that delta starts log-uniform in [0.001, 0.1], Mamba's
initialisation: a memory of 10 to 1,000 steps), input and output maps B_t, C_t (B, T, N) and a decay
A_m = -exp(A_log) (D, N); the coupled recurrence over the time steps is

  h_t[m] = exp(delta_t[m] A_m) * sum_k S[m, k] h_{t-1}[k] + delta_t[m] B_t[m] u_t[m]
  y_t[m] = C_t[m] . h_t[m] + D_m u_t[m]

with S = softmax over k of learned logits (each chain a convex mix of all chains' previous states; it
starts near the identity: chains nearly independent). The recurrence is linear in h, so the whole sequence
is one `jax.lax.associative_scan` over (transition, input) pairs, no Python loop over time (the paper's
global convolution kernel plays that part in PyTorch); `coupled_scan(..., parallel=False)` is the
sequential `lax.scan` reference it is tested against. Modalities of different lengths are padded to the
longest; at a padded step a chain keeps its state (identity transition, no input), so padding changes
nothing. z is the mean over modalities of the masked mean of each modality's final tokens (LayerNorm'd),
that per-modality mean being its `tokens` refiner target.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.fusions.base import Fusion, FusionOutput


def _compose(first, second):
    """(a1, b1) then (a2, b2): the map h -> a2 (a1 h + b1) + b2 as one (transition, input) pair."""
    (a1, b1), (a2, b2) = first, second
    return a2 @ a1, (a2 @ b1[..., None])[..., 0] + b2


@jax.custom_vjp
def linear_recurrence(a: jax.Array, b: jax.Array) -> jax.Array:
    """h_t = a_t h_{t-1} + b_t along axis 1, h_{-1} = 0, by `lax.associative_scan`.

    Args:
      a: (B, T, ..., M, M) transitions.
      b: (B, T, ..., M) inputs.

    Returns:
      (B, T, ..., M) states.

    The backward pass is the adjoint recurrence, itself linear and run by the same scan backwards in time:
    lambda_t = g_t + a_{t+1}^T lambda_{t+1}, then d b_t = lambda_t and d a_t = lambda_t h_{t-1}^T. Autodiff
    through the scan's tree of strided slices instead keeps every level's intermediates and differentiates
    each; this keeps only a and h and runs one more scan (the HAPT `coupled_mamba` train step: 682 -> 544 ms, temporary
    memory 778 -> 639 MB, `benchmarks/train_step.py` on 2 loaded CPU cores).
    """
    return jax.lax.associative_scan(_compose, (a, b), axis=1)[1]


def _linear_recurrence_fwd(a, b):
    h = linear_recurrence(a, b)
    return h, (a, h)


def _linear_recurrence_bwd(residuals, g):
    a, h = residuals
    # lambda_t = a_{t+1}^T lambda_{t+1} + g_t: a forward recurrence on the time-reversed sequence, whose
    # transition at reversed step s is a_{T-s}^T (the one at s = 0 meets lambda_T = 0: any value, here 0).
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    a_rev = jnp.flip(jnp.swapaxes(a_next, -1, -2), axis=1)
    lam = jnp.flip(linear_recurrence(a_rev, jnp.flip(g, axis=1)), axis=1)
    h_prev = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
    return lam[..., :, None] * h_prev[..., None, :], lam


linear_recurrence.defvjp(_linear_recurrence_fwd, _linear_recurrence_bwd)


def _step_size_bias(key: jax.Array, shape, dtype=jnp.float32, dt_min: float = 1e-3, dt_max: float = 0.1):
    """Mamba's step-size initialisation: softplus(bias) = delta, log-uniform in [dt_min, dt_max] per channel.

    With a zero bias every step size starts at softplus(0) = 0.69, so exp(delta A) <= 0.5: every state
    forgets within two steps. Mamba (Gu and Dao, 2023, `dt_init`) starts delta between 0.001 and 0.1 instead,
    a memory of 10 to 1,000 steps, and the scan learns which channels to shorten.
    """
    log_dt = jax.random.uniform(key, shape, jnp.float32, jnp.log(dt_min), jnp.log(dt_max))
    dt = jnp.exp(log_dt)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # the inverse of softplus


def coupled_scan(
    decay: jax.Array, inputs: jax.Array, coupling: jax.Array, mask: jax.Array, *, parallel: bool = True
) -> jax.Array:
    """The states h_t of h_t[m] = decay_t[m] * sum_k coupling[m, k] h_{t-1}[k] + inputs_t[m], h_{-1} = 0;
    where mask_t[m] is False, h_t[m] = h_{t-1}[m].

    Args:
      decay: (B, T, M, D, N) per-step decays.
      inputs: (B, T, M, D, N) per-step inputs.
      coupling: (M, M) mixing of the chains' previous states.
      mask: (B, T, M) bool, True on real steps.
      parallel: `linear_recurrence` (True: `lax.associative_scan`, its own backward pass) or the sequential
        `lax.scan` reference, differentiated by autodiff.

    Returns:
      (B, T, M, D, N) states.
    """
    m = coupling.shape[0]
    eye = jnp.eye(m, dtype=decay.dtype)
    keep = mask[..., None, None]  # (B, T, M, 1, 1)
    # Transition rows: (B, T, D, N, M, M) with row m = decay[m] * coupling[m, :] (identity row when padded).
    rows = jnp.where(keep[..., None], decay[..., None] * coupling[:, None, None, :], eye[:, None, None, :])
    transition = jnp.moveaxis(rows, 2, -2)  # (B, T, D, N, M, M)
    b = jnp.moveaxis(jnp.where(keep, inputs, 0), 2, -1)  # (B, T, D, N, M)
    if parallel:
        h = linear_recurrence(transition, b)
    else:

        def step(h, ab):
            a, bt = ab
            h = (a @ h[..., None])[..., 0] + bt
            return h, h

        h0 = jnp.zeros_like(b[:, 0])
        _, h = jax.lax.scan(step, h0, (jnp.moveaxis(transition, 1, 0), jnp.moveaxis(b, 1, 0)))
        h = jnp.moveaxis(h, 0, 1)
    return jnp.moveaxis(h, -1, 2)  # (B, T, M, D, N)


class CoupledMamba(Fusion):
    """Coupled Mamba fusion (Li et al., NeurIPS 2024) of token inputs: one selective state-space chain per
    modality, each state mixing every chain's previous state.

    The module docstring gives the recurrence. z is the mean over modalities of each one's readout, as in
    the other token fusions.

    Attributes:
      fused_dim: token width D and size of z.
      depth: coupled layers.
      state_size: SSM state size N per channel.
      dropout: dropout rate after each layer.
    """

    kind: ClassVar[str] = 'coupled_mamba'
    inputs: ClassVar[str] = 'tokens'
    fused_dim: int = 128
    depth: int = 2
    state_size: int = 8
    dropout: float = 0.0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, inputs: Mapping[str, layers.Tokens], *, train: bool = False) -> FusionOutput:
        p = layers.precision(self)
        names, tokens, masks = layers.token_inputs(self, inputs, self.fused_dim)
        lengths = [t.shape[1] for t in tokens]
        t_max = max(lengths)
        x = jnp.stack([jnp.pad(t, ((0, 0), (0, t_max - t.shape[1]), (0, 0))) for t in tokens], 2)  # (B,T,M,D)
        mask = jnp.stack([jnp.pad(k, ((0, 0), (0, t_max - k.shape[1]))) for k in masks], 2)  # (B, T, M)
        n_mod, d, n = len(names), self.fused_dim, self.state_size
        for i in range(self.depth):
            u = p.LayerNorm(name=f'norm_{i}')(x)
            delta_proj = p.DenseGeneral(
                (n_mod, d), axis=(-2, -1), bias_init=_step_size_bias, name=f'delta_{i}'
            )
            delta = nn.softplus(delta_proj(u))  # (B, T, M, D)
            b_map = p.DenseGeneral((n_mod, n), axis=(-2, -1), name=f'B_{i}')(u)  # (B, T, M, N)
            c_map = p.DenseGeneral((n_mod, n), axis=(-2, -1), name=f'C_{i}')(u)
            a_log = layers.param(
                self,
                f'A_log_{i}',
                lambda _, s, dt: jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=dt), s)),
                (n_mod, d, n),
            )
            logits = layers.param(
                self, f'coupling_{i}', lambda _, s, dt: 2.0 * jnp.eye(s[0], dtype=dt), (n_mod, n_mod)
            )
            decay = jnp.exp(delta[..., None] * -jnp.exp(a_log))  # (B, T, M, D, N)
            drive = delta[..., None] * b_map[..., None, :] * u[..., None]
            h = coupled_scan(decay, drive, nn.softmax(logits, axis=-1), mask)
            skip = layers.param(self, f'D_{i}', nn.initializers.ones, (n_mod, d))
            y = jnp.einsum('btmdn,btmn->btmd', h, c_map) + skip * u
            y = p.DenseGeneral((n_mod, d), axis=(-2, -1), name=f'out_{i}')(nn.gelu(y))
            x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
            x = jnp.where(mask[..., None], x, 0)
        h = p.LayerNorm(name='readout_norm')(x)
        readouts = {m: layers.masked_mean(h[:, : lengths[j], j], masks[j]) for j, m in enumerate(names)}
        z = jnp.mean(jnp.stack([readouts[m] for m in names]), axis=0)
        return FusionOutput(z, readouts)
