"""Building blocks shared by encoders and fusion modules: token sequences with masks, transformer blocks.

An encoder returns either one pooled vector per example, (B, D), or `Tokens`: (B, T, D) with a (B, T)
validity mask. The transformer blocks follow big_vision's `models/vit.py` (pre-LayerNorm `Encoder1DBlock`,
`MlpBlock`, parameter names included), with a padding mask.

Masks are applied with `jnp.where`, never by multiplying, and padded positions are zeroed before any
arithmetic (`Tokens.clean`), so padding may hold any value, NaN included, without changing outputs or
gradients.
"""

import functools
import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class Tokens(NamedTuple):
    """A batch of token sequences.

    Attributes:
      tokens: (B, T, D).
      mask: (B, T) bool, True on real tokens.
    """

    tokens: jax.Array
    mask: jax.Array

    def clean(self) -> 'Tokens':
        """The same tokens with every padded position set to 0."""
        return Tokens(jnp.where(self.mask[..., None], self.tokens, 0), self.mask)


def all_valid(tokens: jax.Array) -> Tokens:
    """`Tokens` for (B, T, D) tokens that are all real."""
    return Tokens(tokens, jnp.ones(tokens.shape[:2], bool))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over axis -2 of x (..., T, D) at the positions where mask (..., T) is True; 0 where none is."""
    keep = mask[..., None]
    total = jnp.where(keep, x, 0).sum(-2)
    return total / jnp.maximum(keep.sum(-2), 1).astype(x.dtype)


def pooled(x: jax.Array | Tokens) -> jax.Array:
    """An encoder output as one vector per example: tokens are mask-mean pooled, (B, D) passes through."""
    return masked_mean(x.tokens, x.mask) if isinstance(x, Tokens) else x


def as_tokens(x: jax.Array | Tokens) -> Tokens:
    """An encoder output as tokens: a pooled (B, D) vector becomes one real token."""
    return x.clean() if isinstance(x, Tokens) else all_valid(x[:, None, :])


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Non-overlapping max pooling over the spatial axes of x (B, *spatial, C): what
    `nn.max_pool(x, window, strides=window)` computes ('VALID': a remainder is dropped).

    The same values, written as a reshape and a max, with its own backward pass: the gradient goes to the
    positions that hold their window's maximum (an exact tie shares it equally, as `jax.grad` of the max
    would; `nn.max_pool` gives it to one). `nn.max_pool`'s backward pass is XLA's select_and_scatter, and
    autodiff of the reshape-max builds the same mask less directly. On 2 idle CPU cores the default easy-VQA
    image CNN's forward and backward take 50 ms with autodiff of the reshape-max and 37 ms with this; on a
    loaded machine, `nn.max_pool` took 1.6x the reshape-max (docs/BENCHMARKS.md).
    """
    window = tuple(window)
    spatial = x.shape[1:-1]
    if len(window) != len(spatial):
        raise ValueError(f'max_pool window {window} for {len(spatial)} spatial axes of {x.shape}')
    x = x[(slice(None), *(slice(0, s - s % w) for s, w in zip(spatial, window, strict=True)), slice(None))]
    return _pool(x, window)


def _windows(x: jax.Array, window: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """x (B, *spatial, C) viewed as (B, s_1 / w_1, w_1, ..., C), and the axes of the w_i."""
    split = [x.shape[0]]
    for s, w in zip(x.shape[1:-1], window, strict=True):
        split += [s // w, w]
    return x.reshape(*split, x.shape[-1]), tuple(2 + 2 * i for i in range(len(window)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    view, axes = _windows(x, window)
    return view.max(axis=axes)


def _pool_fwd(x, window):
    y = _pool(x, window)
    return y, (x, y)


def _pool_bwd(window, saved, g):
    x, y = saved
    view, axes = _windows(x, window)
    hit = view == jnp.expand_dims(y, axes)  # where each window's maximum is
    share = g / hit.sum(axis=axes).astype(g.dtype)
    return (jnp.where(hit, jnp.expand_dims(share, axes), 0).reshape(x.shape),)


_pool.defvjp(_pool_fwd, _pool_bwd)


def precision(module: nn.Module) -> types.SimpleNamespace:
    """Flax layers that compute in `module.dtype` and keep their parameters in `module.param_dtype`
    (`Dense`, `DenseGeneral`, `Conv`, `Embed`, `LayerNorm`, `Attention`): every built-in module builds its
    layers from these, so that `config.model.dtype` / `param_dtype` reach every layer."""
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    return types.SimpleNamespace(
        Dense=functools.partial(nn.Dense, **kw),
        DenseGeneral=functools.partial(nn.DenseGeneral, **kw),
        Conv=functools.partial(nn.Conv, **kw),
        Embed=functools.partial(nn.Embed, **kw),
        LayerNorm=functools.partial(nn.LayerNorm, **kw),
        Attention=functools.partial(nn.MultiHeadDotProductAttention, **kw),
    )


def add_context(module: nn.Module, x: jax.Array, context: jax.Array | None) -> jax.Array:
    """x (B, ..., C) plus a learned projection of a feedback context (B, D_c), broadcast over the middle
    axes: how an encoder takes a fusion's feedback into an early layer (`fusion.ProgressiveFusion`). With
    no context, x unchanged and no parameter: the encoder is exactly its feed-forward self."""
    if context is None:
        return x
    c = precision(module).Dense(x.shape[-1], name='context')(context.astype(module.dtype))  # (B, C)
    return x + c.reshape((c.shape[0],) + (1,) * (x.ndim - 2) + (c.shape[-1],)).astype(x.dtype)


def param(module: nn.Module, name: str, init, shape) -> jax.Array:
    """`module.param(name, init, shape)` kept in `module.param_dtype`, used in `module.dtype`."""
    return module.param(name, init, shape, module.param_dtype).astype(module.dtype)


class MlpBlock(nn.Module):
    """Transformer MLP (big_vision `MlpBlock`): Dense(mlp_dim) -> GELU -> dropout -> Dense(width).

    Attributes:
      mlp_dim: hidden width; None: 4x the input width.
      dropout: dropout rate after the activation.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    mlp_dim: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        init = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1e-6))
        p = precision(self)
        x = p.Dense(self.mlp_dim or 4 * d, **init)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(x))
        return p.Dense(d, **init)(x)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block (big_vision `Encoder1DBlock`) with a padding mask.

    Attributes:
      num_heads: attention heads.
      mlp_dim: MLP hidden width; None: 4x the token width.
      dropout: dropout rate after attention and the MLP.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    mlp_dim: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """x (B, T, D), mask (B, T) bool or None (all real) -> (B, T, D)."""
        attn_mask = None if mask is None else nn.make_attention_mask(mask, mask)  # (B, 1, T, T)
        p = precision(self)
        y = p.LayerNorm()(x)
        y = p.Attention(num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform())(
            y, y, mask=attn_mask, deterministic=True
        )
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = p.LayerNorm()(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype)(y, train=train)
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


def encoder_block(remat: bool) -> type[nn.Module]:
    """`EncoderBlock`, or with `remat` its rematerialized version (activations recomputed in the backward
    pass instead of kept: `config.model.remat`). Call it as `block(x, mask, train)`, positionally."""
    return nn.remat(EncoderBlock, static_argnums=(3,)) if remat else EncoderBlock


def block_like(module: nn.Module, name: str) -> nn.Module:
    """An `EncoderBlock` with `module`'s num_heads, mlp_dim, dropout, dtype, param_dtype and remat (a
    transformer encoder's or fusion's own fields); call it as `block(x, mask, train)`."""
    cls = encoder_block(getattr(module, 'remat', False))
    return cls(module.num_heads, module.mlp_dim, module.dropout, module.dtype, module.param_dtype, name=name)


def encoder_like(module: nn.Module, name: str) -> 'Encoder':
    """An `Encoder` of `module`'s depth and block fields (see `block_like`)."""
    return Encoder(
        module.depth,
        module.num_heads,
        module.mlp_dim,
        module.dropout,
        module.dtype,
        module.param_dtype,
        getattr(module, 'remat', False),
        name=name,
    )


class Encoder(nn.Module):
    """A stack of `EncoderBlock`s and a final LayerNorm (big_vision's `Encoder`: `encoderblock_{i}`,
    `encoder_norm`).

    Attributes:
      depth: number of blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width; None: 4x the token width.
      dropout: dropout rate.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      remat: rematerialize each block.
    """

    depth: int
    num_heads: int
    mlp_dim: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        for i in range(self.depth):
            x = block_like(self, f'encoderblock_{i}')(x, mask, train)
        return precision(self).LayerNorm(name='encoder_norm')(x)


def token_inputs(
    module: nn.Module, inputs: Mapping[str, jax.Array | Tokens], width: int
) -> tuple[list[str], list[jax.Array], list[jax.Array]]:
    """Sorted modality names, their tokens projected to `width` plus a learned modality-type embedding
    (`proj_<m>`, `type_<m>` of `module`), and their masks. Padded positions are zeroed before any arithmetic,
    so padding values never reach the outputs or the gradients."""
    p = precision(module)
    names, tokens, masks = sorted(inputs), [], []
    for m in names:
        t = as_tokens(inputs[m])
        x = p.Dense(width, name=f'proj_{m}')(t.tokens)  # (B, T_m, width)
        x = x + param(module, f'type_{m}', nn.initializers.normal(0.02), (width,))
        tokens.append(jnp.where(t.mask[..., None], x, 0))
        masks.append(t.mask)
    return names, tokens, masks
