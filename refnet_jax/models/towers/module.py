"""`Tower`: one Linen transformer encoder whose fields cover the published ViT, BERT, SigLIP and CLIP towers.

The towers differ in a handful of choices, each a field here: the GELU (exact, tanh-approximated, or CLIP's
quick GELU `x * sigmoid(1.702 x)`), the LayerNorm epsilon, LayerNorm before (ViT, SigLIP, CLIP) or after
(BERT) attention and MLP, a LayerNorm on the embeddings (BERT's, CLIP vision's `pre_layrnorm`), a class token,
BERT's token-type embeddings, a final LayerNorm on every token or on the pooled one only (CLIP vision), and how
the pooled output is made: the class token through Dense + tanh (ViT's and BERT's pooler), attention pooling
with a learned probe (SigLIP vision's MAP head), the last position (SigLIP text), the EOS position (CLIP text),
the class token through the final LayerNorm (CLIP vision), or the mean of the tokens (big_vision's 'gap').

Attention masks only keys, as the reference implementations do: padded positions still get (unused) outputs,
computed exactly as theirs, so `last_hidden_state` matches everywhere. `scan=True` runs the blocks under
`nn.scan` (parameters stacked along a leading depth axis, big_vision's `scan=True`): compile time does not
grow with depth.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers

ACTIVATIONS = ('gelu', 'gelu_tanh', 'quick_gelu')
POOLINGS = ('cls_dense_tanh', 'map', 'last', 'eos', 'cls_norm', 'cls', 'gap', 'none')


def activation(name: str, x: jax.Array) -> jax.Array:
    """The named GELU of x: 'gelu' (exact, erf), 'gelu_tanh' (tanh approximation), 'quick_gelu'."""
    if name == 'gelu':
        return nn.gelu(x, approximate=False)
    if name == 'gelu_tanh':
        return nn.gelu(x, approximate=True)
    if name == 'quick_gelu':
        return x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f'Tower.activation is {name!r}; expected one of {ACTIVATIONS}')


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value/out Dense layers (kernels (in, out), with biases).

    Attributes:
      num_heads: attention heads.
      dtype, param_dtype: computation and parameter dtypes.
    """

    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q_in: jax.Array, kv_in: jax.Array, allowed: jax.Array | None) -> jax.Array:
        """q_in (B, Tq, D), kv_in (B, Tk, D), allowed (B, 1 or Tq, Tk) bool or None -> (B, Tq, D)."""
        p = layers.precision(self)
        d = q_in.shape[-1]
        head = d // self.num_heads

        def split(name, x):
            return p.Dense(d, name=name)(x).reshape(*x.shape[:2], self.num_heads, head)

        q, k, v = split('query', q_in), split('key', kv_in), split('value', kv_in)
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head).astype(self.dtype)
        if allowed is not None:
            logits = jnp.where(allowed[:, None], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(*q_in.shape[:2], d)
        return p.Dense(d, name='out')(out)


class Mlp(nn.Module):
    """Dense(mlp_dim) -> activation -> Dense(width) (`fc1`, `fc2`)."""

    mlp_dim: int
    activation: str = 'gelu'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = layers.precision(self)
        return p.Dense(x.shape[-1], name='fc2')(
            activation(self.activation, p.Dense(self.mlp_dim, name='fc1')(x))
        )


class Block(nn.Module):
    """One transformer block: attention and MLP, each with a residual, LayerNorm before ('pre') or after
    ('post', BERT) each (`norm1`, `norm2`)."""

    num_heads: int
    mlp_dim: int
    activation: str
    eps: float
    norm: str = 'pre'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
        p = layers.precision(self)
        attn = Attention(self.num_heads, self.dtype, self.param_dtype, name='attn')
        mlp = Mlp(self.mlp_dim, self.activation, self.dtype, self.param_dtype, name='mlp')
        norm1, norm2 = p.LayerNorm(self.eps, name='norm1'), p.LayerNorm(self.eps, name='norm2')
        if self.norm == 'post':
            x = norm1(x + attn(x, x, allowed))
            return norm2(x + mlp(x))
        y = norm1(x)
        x = x + attn(y, y, allowed)
        return x + mlp(norm2(x))


class _ScanBlock(Block):
    """`Block` with the (carry, input) -> (carry, output) signature of `nn.scan`."""

    def __call__(self, x, allowed):
        return super().__call__(x, allowed), None


class Tower(nn.Module):
    """A transformer tower over images (B, H, W, C) float pixels, already normalized) or token ids (B, T).

    Returns {'last_hidden_state': (B, T, D), 'pooler_output': (B, D') or absent with pooling 'none'}.

    Attributes:
      modality: 'image' or 'text'.
      width, depth, num_heads, mlp_dim: the transformer's sizes.
      activation: 'gelu', 'gelu_tanh' or 'quick_gelu'.
      eps: LayerNorm epsilon.
      norm: 'pre' or 'post' LayerNorm blocks.
      patch_size, image_size: image towers: square patches and the image side the position embeddings are for.
      patch_bias: the patch embedding has a bias (CLIP's has none).
      cls_token: a learned class token is prepended (ViT, CLIP vision) or, for text, position 0 is the CLS.
      pos_before_cls: position embeddings are added to the patches before the class token is prepended
        (big_vision's ViT: the class token has none).
      vocab_size, max_positions, type_vocab_size: text towers (type_vocab_size 0: no token types).
      embed_norm: a LayerNorm on the embeddings (BERT `embeddings.LayerNorm`, CLIP `pre_layrnorm`).
      final_norm: 'tokens' (a LayerNorm on every output token), 'pooled' (on the pooled token only, CLIP
        vision) or 'none' (BERT).
      pooling: one of `POOLINGS`.
      causal: causal attention (CLIP text).
      eos_id: the EOS id whose first position CLIP text pools (-1: the position of the largest id, CLIP's
        legacy configs with eos_token_id 2).
      head_dim: when set, a Dense of the pooled output to this size (`head`: SigLIP text); None: no head.
      scan: run the blocks under `nn.scan` (`blocks`, stacked); False: `block_{i}`.
    """

    modality: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = 'gelu'
    eps: float = 1e-6
    norm: str = 'pre'
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    patch_bias: bool = True
    cls_token: bool = False
    pos_before_cls: bool = False
    vocab_size: int = 0
    max_positions: int = 0
    type_vocab_size: int = 0
    embed_norm: bool = False
    final_norm: str = 'tokens'
    pooling: str = 'none'
    causal: bool = False
    eos_id: int = -1
    head_dim: int | None = None
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _embed(self, x: jax.Array, token_type_ids: jax.Array | None) -> jax.Array:
        p = layers.precision(self)
        if self.modality == 'image':
            k = (self.patch_size, self.patch_size)
            x = p.Conv(self.width, k, strides=k, padding='VALID', use_bias=self.patch_bias, name='patch')(
                x.astype(self.dtype)
            )
            x = x.reshape(x.shape[0], -1, self.width)  # (B, N, D)
            if self.pos_before_cls:  # big_vision: the class token has no position embedding
                pos = layers.param(self, 'pos_embedding', nn.initializers.normal(0.02), (1, *x.shape[1:]))
                x = x + pos
            if self.cls_token:
                cls = layers.param(self, 'cls', nn.initializers.normal(0.02), (self.width,))
                x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        else:
            x = p.Embed(self.vocab_size, self.width, name='token_embedding')(x)  # (B, T, D)
            if self.type_vocab_size:
                types = jnp.zeros(x.shape[:2], jnp.int32) if token_type_ids is None else token_type_ids
                x = x + p.Embed(self.type_vocab_size, self.width, name='type_embedding')(types)
        if not (self.modality == 'image' and self.pos_before_cls):
            n = x.shape[1] if self.modality == 'image' else self.max_positions
            pos = layers.param(self, 'pos_embedding', nn.initializers.normal(0.02), (1, n, self.width))
            x = x + pos[:, : x.shape[1]]
        if self.embed_norm:
            x = p.LayerNorm(self.eps, name='embed_norm')(x)
        return x

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
        added: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """x: images (B, H, W, C) or ids (B, T); mask (B, T) bool, True on real tokens (text; None: all);
        added: (B, width) added to every embedded token (a ReFNet encoder's feedback context)."""
        del train  # no dropout: the published towers are used as they were trained, at inference settings
        if self.pooling not in POOLINGS:
            raise ValueError(f'Tower.pooling is {self.pooling!r}; expected one of {POOLINGS}')
        p = layers.precision(self)
        ids = x
        x = self._embed(x, token_type_ids)
        if added is not None:
            x = x + added[:, None, :].astype(x.dtype)
        t = x.shape[1]
        allowed = None if mask is None else jnp.asarray(mask, bool)[:, None, :]  # (B, 1, T): keys
        if self.causal:
            causal = jnp.tril(jnp.ones((t, t), bool))[None]
            allowed = causal if allowed is None else allowed & causal
        kw = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            eps=self.eps,
            norm=self.norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan:
            blocks = nn.scan(
                _ScanBlock,
                variable_axes={'params': 0},
                split_rngs={'params': True},
                in_axes=nn.broadcast,
                length=self.depth,
            )
            x, _ = blocks(**kw, name='blocks')(x, allowed)
        else:
            for i in range(self.depth):
                x = Block(**kw, name=f'block_{i}')(x, allowed)
        final = p.LayerNorm(self.eps, name='final_norm') if self.final_norm != 'none' else None
        if self.final_norm == 'tokens':
            x = final(x)
        out = {'last_hidden_state': x}
        if self.pooling == 'none':
            return out
        if self.pooling in ('cls_dense_tanh', 'cls', 'cls_norm'):
            pooled = x[:, 0]
        elif self.pooling == 'last':
            pooled = x[:, -1]
        elif self.pooling == 'gap':
            pooled = x.mean(axis=1)
        elif self.pooling == 'eos':
            where = jnp.argmax(ids if self.eos_id < 0 else (ids == self.eos_id).astype(jnp.int32), axis=-1)
            pooled = jnp.take_along_axis(x, where[:, None, None], axis=1)[:, 0]
        else:  # 'map': attention pooling with a learned probe, then a LayerNorm'd MLP with a residual
            probe = layers.param(self, 'probe', nn.initializers.normal(0.02), (1, 1, self.width))
            probe = jnp.broadcast_to(probe, (x.shape[0], 1, self.width))
            y = Attention(self.num_heads, self.dtype, self.param_dtype, name='map_attn')(probe, x, None)
            mlp = Mlp(self.mlp_dim, self.activation, self.dtype, self.param_dtype, name='map_mlp')
            pooled = (y + mlp(p.LayerNorm(self.eps, name='map_norm')(y)))[:, 0]
        if self.pooling == 'cls_dense_tanh':
            pooled = jnp.tanh(p.Dense(self.width, name='pooler')(pooled))
        if self.final_norm == 'pooled':
            pooled = final(pooled)
        if self.head_dim is not None:
            pooled = p.Dense(self.head_dim, name='head')(pooled)
        out['pooler_output'] = pooled
        return out
