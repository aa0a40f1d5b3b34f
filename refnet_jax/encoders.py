"""Unimodal encoders E_m: one Linen module per kind of modality, each mapping a batch to (B, D).

Which encoder a modality gets follows from its kind in the dataset's `ModalityInfo` (`image`, `tokens`,
`series`, `features`) through `ENCODERS`; its fields come from `config.model.encoders.<modality>`.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ImageCNN(nn.Module):
    """A small convolutional encoder for images.

    Attributes:
      features: output channels of each 3x3 convolution; each is followed by a stride-2 max-pool.
      embed_dim: size of the returned embedding.
      pooling: how the last feature map becomes a vector: 'max' or 'mean' over positions (translation
        invariant: what is in the image matters, not where), or 'flatten' (keeps positions).
    """

    features: Sequence[int] = (16, 32, 32, 32)
    embed_dim: int = 128
    pooling: str = 'max'

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 255.0  # uint8 pixels -> [0, 1]
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        if self.pooling == 'max':
            x = x.max(axis=(1, 2))  # (B, C')
        elif self.pooling == 'mean':
            x = x.mean(axis=(1, 2))  # (B, C')
        elif self.pooling == 'flatten':
            x = x.reshape(x.shape[0], -1)  # (B, H' * W' * C')
        else:
            raise ValueError(f"ImageCNN.pooling is {self.pooling!r}; expected 'max', 'mean' or 'flatten'")
        return nn.Dense(self.embed_dim)(x)


class TokenEncoder(nn.Module):
    """Text over a fixed word vocabulary: masked mean of word (and position) embeddings, then an MLP.

    Token id 0 is padding and is excluded from the mean; a question's meaning in easy-VQA-like data is
    carried by its words far more than by their order, and the mean keeps the encoder cheap.

    Attributes:
      vocab_size: number of token ids, padding included.
      embed_dim: size of the returned embedding.
      use_positions: add learned position embeddings before pooling.
    """

    vocab_size: int
    embed_dim: int = 128
    use_positions: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        mask = (tokens != 0)[..., None].astype(jnp.float32)  # (B, L, 1)
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)  # (B, L, D)
        if self.use_positions:
            pos = self.param('positions', nn.initializers.normal(0.02), tokens.shape[-1:] + (self.embed_dim,))
            x = x + pos
        x = (x * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1.0)  # (B, D)
        return nn.Dense(self.embed_dim)(nn.relu(nn.Dense(self.embed_dim)(x)))


class SeriesEncoder(nn.Module):
    """1-D convolutions over a multichannel time series (B, T, C), global average pooled.

    Attributes:
      features: channels of each width-5 convolution; each but the last is followed by a stride-2 max-pool.
      embed_dim: size of the returned embedding.
    """

    features: Sequence[int] = (32, 64, 64)
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        x = x.astype(jnp.float32)
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (5,))(x))
            if i < len(self.features) - 1:
                x = nn.max_pool(x, (2,), strides=(2,))
        return nn.Dense(self.embed_dim)(x.mean(axis=-2))


class FeatureMLP(nn.Module):
    """An MLP for a feature vector (B, F).

    Attributes:
      hidden: widths of the hidden layers.
      embed_dim: size of the returned embedding.
    """

    hidden: Sequence[int] = (256,)
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.embed_dim)(x)


ENCODERS: dict[str, type[nn.Module]] = {
    'image': ImageCNN,
    'tokens': TokenEncoder,
    'series': SeriesEncoder,
    'features': FeatureMLP,
}
"""The encoder class for each kind of modality; a new kind needs its module and one line here."""
