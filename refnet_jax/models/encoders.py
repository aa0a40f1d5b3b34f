"""Unimodal encoders E_m: Linen modules mapping one modality's batch to pooled (B, D) or `layers.Tokens`.

`ENCODERS` names the built-in ones for `config.model.encoders.<m>.module` (None picks the modality kind's
default, `contract.KINDS`); the entry's other fields are the module's fields. Any Linen module with the call
signature `(x, *, train) -> (B, D) | Tokens` can be named instead (`FILE.py:Class`, `package.module:Class`).
An encoder that also takes `context=` (B, D_c), a feedback vector from the fusion, adds its projection to
an early layer (`layers.add_context`; every built-in one does, after its first layer): what Progressive
Fusion needs. With `context=None` (the default, and every fusion but `progressive`) nothing changes.
A token-level encoder returns (B, T, D) tokens and their (B, T) mask; a pooled fusion mask-mean pools them,
and a token fusion takes a pooled vector as one token.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from refnet_jax.models import layers
from refnet_jax.models.towers.encoder import PretrainedTower

POOLINGS = ('max', 'mean', 'flatten', 'tokens')


def _to_float_image(x: jax.Array, dtype: Any) -> jax.Array:
    """uint8 pixels -> [0, 1]; float images as they are; in `dtype`."""
    return (
        (x.astype(jnp.float32) / 255.0).astype(dtype)
        if jnp.issubdtype(x.dtype, jnp.integer)
        else x.astype(dtype)
    )


class ImageCNN(nn.Module):
    """A small convolutional encoder for images.

    Attributes:
      features: output channels of each 3x3 convolution; each is followed by a stride-2 max-pool.
      embed_dim: size of the embedding (of each token, with `pooling='tokens'`).
      pooling: how the last feature map becomes the output: 'max' or 'mean' over positions (translation
        invariant: what is in the image matters, not where), 'flatten' (keeps positions), or 'tokens': one
        token per position of the last feature map, with a learned position embedding (grid features, as
        MMBT feeds a ResNet's).
    """

    features: Sequence[int] = (16, 32, 32, 32)
    embed_dim: int = 128
    pooling: str = 'max'
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, context: jax.Array | None = None
    ) -> jax.Array | layers.Tokens:
        p = layers.precision(self)
        del train
        if self.pooling not in POOLINGS:
            raise ValueError(f'ImageCNN.pooling is {self.pooling!r}; expected one of {POOLINGS}')
        x = _to_float_image(x, self.dtype)  # uint8 pixels -> [0, 1]
        for i, f in enumerate(self.features):
            x = nn.relu(p.Conv(f, (3, 3))(x))
            if i == 0:
                x = layers.add_context(self, x, context)
            x = layers.max_pool(x, (2, 2))
        if self.pooling == 'tokens':
            grid = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, H' W', C')
            grid = p.Dense(self.embed_dim)(grid)
            pos = layers.param(self, 'pos_embedding', nn.initializers.normal(0.02), grid.shape[1:])
            return layers.all_valid(grid + pos)  # (B, T, D)
        if self.pooling == 'max':
            x = x.max(axis=(1, 2))  # (B, C')
        elif self.pooling == 'mean':
            x = x.mean(axis=(1, 2))  # (B, C')
        else:
            x = x.reshape(x.shape[0], -1)  # (B, H' W' C')
        return p.Dense(self.embed_dim)(x)


class ViT(nn.Module):
    """A Vision Transformer image encoder (Dosovitskiy et al.), parameters named as big_vision's `vit.py`.

    Patches of `patch_size` are embedded by a strided convolution (`embedding`), a learned position
    embedding (`pos_embedding`) is added, and `depth` pre-LayerNorm blocks (`Transformer`) follow.

    Attributes:
      patch_size: (height, width) of a patch.
      width: token width.
      depth: transformer blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width; None: 4 x width.
      dropout: dropout rate.
      pooling: 'tokens' (every patch token), 'gap' (their mean) or 'cls' (a prepended class token).
      embed_dim: when set, a final Dense to this size (`head`); None: outputs stay `width` wide.
    """

    patch_size: Sequence[int] = (8, 8)
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    pooling: str = 'tokens'
    embed_dim: int | None = None
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)
    remat: bool = False  # rematerialize each block (config.model.remat)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, context: jax.Array | None = None
    ) -> jax.Array | layers.Tokens:
        p = layers.precision(self)
        if self.pooling not in ('tokens', 'gap', 'cls'):
            raise ValueError(f"ViT.pooling is {self.pooling!r}; expected 'tokens', 'gap' or 'cls'")
        patch = tuple(self.patch_size)
        x = p.Conv(self.width, patch, strides=patch, padding='VALID', name='embedding')(
            _to_float_image(x, self.dtype)
        )
        x = x.reshape(x.shape[0], -1, self.width)  # (B, N, width)
        pos = layers.param(
            self, 'pos_embedding', nn.initializers.normal(1 / self.width**0.5), (1, *x.shape[1:])
        )
        x = layers.add_context(self, x + pos, context)
        if self.pooling == 'cls':
            cls = layers.param(self, 'cls', nn.initializers.zeros, (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = layers.encoder_like(self, 'Transformer')(x, train=train)
        if self.embed_dim is not None:
            x = p.Dense(self.embed_dim, name='head')(x)
        if self.pooling == 'cls':
            return x[:, 0]
        if self.pooling == 'gap':
            return x.mean(axis=1)
        return layers.all_valid(x)


class TextTransformer(nn.Module):
    """A transformer text encoder over token ids (0 = padding), as big_vision's SigLIP text tower.

    Token embeddings (`Embed_0`) plus learned positions (`pos_embedding`), `depth` pre-LayerNorm blocks
    (`Encoder_0`: `encoderblock_{i}`, `encoder_norm`) that never attend to padding, and an optional `head`:
    the parameter tree of big_vision's `models/proj/image_text/text_transformer.py`, so a SigLIP text tower
    (`PATH.npz:txt`) loads with `init_from`. (big_vision attends to every position of EOS-padded text; here
    id 0 is padding and is masked, which is the same where a text has no id 0.)

    Attributes:
      vocab_size: number of token ids, padding included (from the dataset).
      width: token width.
      depth: transformer blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width; None: 4 x width.
      dropout: dropout rate.
      pooling: 'tokens' (every real token, padding masked), 'gap' (their masked mean), 'first', or 'last'
        (the last real token: the last position of EOS-padded text, big_vision's SigLIP default).
      embed_dim: when set, a final Dense to this size (`head`); None: outputs stay `width` wide.
      pad_id: the id of padding positions (from the dataset: a `text` modality's tokenizer says which).
    """

    vocab_size: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    pooling: str = 'tokens'
    embed_dim: int | None = None
    pad_id: int = 0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)
    remat: bool = False  # rematerialize each block (config.model.remat)

    @nn.compact
    def __call__(
        self, ids: jax.Array, *, train: bool = False, context: jax.Array | None = None
    ) -> jax.Array | layers.Tokens:
        p = layers.precision(self)
        if self.pooling not in ('tokens', 'gap', 'first', 'last'):
            raise ValueError(
                f"TextTransformer.pooling is {self.pooling!r}; expected 'tokens', 'gap', 'first' or 'last'"
            )
        mask = ids != self.pad_id  # (B, L)
        x = p.Embed(self.vocab_size, self.width, name='Embed_0')(ids)
        pos = layers.param(
            self, 'pos_embedding', nn.initializers.normal(1 / self.width**0.5), (1, *x.shape[1:])
        )
        x = jnp.where(mask[..., None], layers.add_context(self, x + pos, context), 0)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = layers.encoder_like(self, 'Encoder_0')(x, mask, train=train)
        if self.embed_dim is not None:
            x = p.Dense(self.embed_dim, name='head')(x)
        out = layers.Tokens(x, mask).clean()
        if self.pooling == 'gap':
            return layers.pooled(out)
        # 'last': the last real token (the last position of EOS-padded text, as big_vision)
        if self.pooling == 'last':
            last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)  # (B,)
            return jnp.take_along_axis(out.tokens, last[:, None, None], axis=1)[:, 0]
        if self.pooling == 'first':
            return out.tokens[:, 0]
        return out


class TokenEncoder(nn.Module):
    """Text over a fixed word vocabulary: masked mean of word (and position) embeddings, then an MLP.

    Token id 0 is padding and is excluded from the mean; a question's meaning in easy-VQA-like data is
    carried by its words far more than by their order, and the mean keeps the encoder cheap.

    Attributes:
      vocab_size: number of token ids, padding included.
      embed_dim: size of the returned embedding.
      use_positions: add learned position embeddings before pooling.
      pad_id: the id of padding positions (from the dataset: a `text` modality's tokenizer says which).
    """

    vocab_size: int
    embed_dim: int = 128
    use_positions: bool = True
    pad_id: int = 0
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(
        self, tokens: jax.Array, *, train: bool = False, context: jax.Array | None = None
    ) -> jax.Array:
        p = layers.precision(self)
        del train
        x = p.Embed(self.vocab_size, self.embed_dim)(tokens)  # (B, L, D)
        if self.use_positions:
            pos = layers.param(
                self, 'positions', nn.initializers.normal(0.02), tokens.shape[-1:] + (self.embed_dim,)
            )
            x = x + pos
        x = layers.masked_mean(layers.add_context(self, x, context), tokens != self.pad_id)  # (B, D)
        return p.Dense(self.embed_dim)(nn.relu(p.Dense(self.embed_dim)(x)))


class SeriesEncoder(nn.Module):
    """1-D convolutions over a multichannel time series (B, T, C).

    Attributes:
      features: channels of each width-5 convolution; each but the last is followed by a stride-2 max-pool.
      embed_dim: size of the embedding (of each token, with `pooling='tokens'`).
      pooling: 'mean' over time, or 'tokens': one token per remaining time step, with a learned position
        embedding.
    """

    features: Sequence[int] = (32, 64, 64)
    embed_dim: int = 128
    pooling: str = 'mean'
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, context: jax.Array | None = None
    ) -> jax.Array | layers.Tokens:
        p = layers.precision(self)
        del train
        if self.pooling not in ('mean', 'tokens'):
            raise ValueError(f"SeriesEncoder.pooling is {self.pooling!r}; expected 'mean' or 'tokens'")
        x = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            x = nn.relu(p.Conv(f, (5,))(x))
            if i == 0:
                x = layers.add_context(self, x, context)
            if i < len(self.features) - 1:
                x = layers.max_pool(x, (2,))
        if self.pooling == 'mean':
            return p.Dense(self.embed_dim)(x.mean(axis=-2))
        x = p.Dense(self.embed_dim)(x)  # (B, T', D)
        pos = layers.param(self, 'pos_embedding', nn.initializers.normal(0.02), x.shape[1:])
        return layers.all_valid(x + pos)


class FeatureMLP(nn.Module):
    """An MLP for a feature vector (B, F).

    Attributes:
      hidden: widths of the hidden layers.
      embed_dim: size of the returned embedding.
    """

    hidden: Sequence[int] = (256,)
    embed_dim: int = 128
    dtype: Any = jnp.float32  # computation dtype (config.model.dtype)
    param_dtype: Any = jnp.float32  # parameter dtype (config.model.param_dtype)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, context: jax.Array | None = None) -> jax.Array:
        p = layers.precision(self)
        del train
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, h in enumerate(self.hidden):
            x = nn.relu(p.Dense(h)(x))
            if i == 0:
                x = layers.add_context(self, x, context)
        x = p.Dense(self.embed_dim)(x)
        return x if self.hidden else layers.add_context(self, x, context)


ENCODERS: dict[str, type[nn.Module]] = {
    'cnn': ImageCNN,
    'vit': ViT,
    'bow': TokenEncoder,
    'text_transformer': TextTransformer,
    'conv1d': SeriesEncoder,
    'mlp': FeatureMLP,
    'pretrained': PretrainedTower,  # a published tower, built from its checkpoint (models/towers/)
}
"""Built-in encoders by `config.model.encoders.<m>.module`; a new one is its class and one line here."""
