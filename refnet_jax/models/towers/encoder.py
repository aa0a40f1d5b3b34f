"""A published tower as a ReFNet encoder: `config.model.encoders.<m>.module = 'pretrained'`.

    config.model.encoders.image = dict(module='pretrained', init_from='hf:towers/siglip', part='vision',
                                       pooling='tokens')

The architecture comes from the checkpoint (`init_from`, and `part` for a two-tower file); its parameters are
loaded by `refnet_jax.train.pretrained` like every `init_from`, so `train.frozen` and `lr_multipliers` apply
to them (`encoders/<m>/tower/...`). Images are rescaled and normalized as the tower's preprocessing says
(uint8 pixels, or floats in [0, 1] as the other image encoders take them); text ids are masked after the first
padding id where padding is the EOS (SigLIP, CLIP), after none otherwise, as their tokenizers' attention masks.
With `pooling='tokens'` the tower has no pooling head (its parameters in the checkpoint are not loaded). A
feedback context (`progressive` fusion) adds its projection (`context`) to the embedded tokens.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refnet_jax.models import layers
from refnet_jax.models.towers import hf, loader
from refnet_jax.models.towers.module import Tower

OUTPUTS = ('pooled', 'tokens')


@functools.lru_cache(maxsize=32)
def spec(source: str, part: str | None) -> tuple[dict, Any]:
    """(Tower fields, preprocessor) of a checkpoint, from its config and preprocessing files alone."""
    path = _path(source)
    config = loader._json(f'{path}/config.json')
    if not config:
        raise ValueError(
            f'{source}: the directory has no config.json; expected a Hugging Face model directory'
        )
    family, part, section, _ = hf.architecture(config, part, source)
    fields = hf.tower_fields(family, part, section)
    return fields, loader._preprocessor(path, source, family, part, section, fields)[0]


def _path(source: str) -> str:
    if not source.startswith('hf:'):
        raise ValueError(f"the 'pretrained' encoder's init_from is {source!r}; expected 'hf:DIR'")
    return source[len('hf:') :]


def checkpoint_params(source: str, part: str | None) -> dict[str, np.ndarray]:
    """The flat parameters ('tower/...', unrolled blocks) of `PretrainedTower` from `source`."""
    tower = loader.load_tower(source, part)
    flat = jax.tree_util.tree_flatten_with_path(tower.variables['params'])[0]
    return {'tower/' + '/'.join(k.key for k in p): np.asarray(v) for p, v in flat}


POOLING_HEAD = ('pooler', 'probe', 'map_attn', 'map_norm', 'map_mlp', 'head', 'final_norm')


def fit_layout(given: dict[str, np.ndarray], want: set[str]) -> dict[str, np.ndarray]:
    """`given` (unrolled `tower/block_{i}`) without the pooling head where the encoder outputs tokens
    (`POOLING_HEAD`: the names it lacks), and stacked as `tower/blocks` where it runs under `nn.scan`."""
    given = {k: v for k, v in given.items() if k in want or k.split('/')[1] not in POOLING_HEAD}
    if not any(k.startswith('tower/blocks/') for k in want):
        return given
    inner = loader.stack_blocks({k[len('tower/') :]: v for k, v in given.items()}, _depth(given))
    return {'tower/' + k: v for k, v in inner.items()}


def _depth(flat: dict) -> int:
    return len({k.split('/')[1] for k in flat if k.startswith('tower/block_')})


class PretrainedTower(nn.Module):
    """A Hugging Face tower (`init_from = 'hf:DIR'`) as an encoder: its tokens or its pooled output.

    Attributes:
      init_from: 'hf:DIR', the checkpoint (its architecture; its parameters are loaded by `init_from`).
      part: 'vision' or 'text' for a two-tower checkpoint (SigLIP, CLIP); None for a one-tower one.
      pooling: 'pooled' (the tower's `pooler_output`, (B, D)) or 'tokens' (`last_hidden_state` with its
        mask, for the token-level fusions and `tokens` refiner targets).
      scan: run the blocks under `nn.scan`.
      pad_id: the padding id of a text modality (from the dataset).
      vocab_size: the ids of a text modality (from the dataset): at most the tower's embedding table.
    """

    init_from: str
    part: str | None = None
    pooling: str = 'pooled'
    scan: bool = False
    pad_id: int = 0
    vocab_size: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, context: jax.Array | None = None
    ) -> jax.Array | layers.Tokens:
        if self.pooling not in OUTPUTS:
            raise ValueError(f'PretrainedTower.pooling is {self.pooling!r}; expected one of {OUTPUTS}')
        fields, prep = spec(self.init_from, self.part)
        if (
            fields['modality'] == 'text'
            and self.vocab_size is not None
            and self.vocab_size > fields['vocab_size']
        ):
            raise ValueError(
                f"{self.init_from}: the modality's tokenizer has {self.vocab_size} ids, more than the tower's "
                f"embedding table ({fields['vocab_size']} rows); tokenize it with the tower's own tokenizer"
            )
        if self.pooling == 'tokens':  # no pooling head: it would get no gradient (and is not loaded)
            fields = dict(fields, pooling='none', head_dim=None)
            if fields.get('final_norm') == 'pooled':  # CLIP vision: the LayerNorm of the pooled token only
                fields['final_norm'] = 'none'
        tower = Tower(**fields, scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype, name='tower')
        added = None  # a feedback context (progressive fusion): its projection added to the embeddings
        if context is not None:
            added = layers.precision(self).Dense(fields['width'], name='context')(context.astype(self.dtype))
        if fields['modality'] == 'image':
            if jnp.issubdtype(x.dtype, jnp.integer):
                x = prep.normalize(x)
            else:  # floats in [0, 1]
                x = (x.astype(jnp.float32) - prep.mean) / prep.std
            out = tower(x.astype(self.dtype), train=train, added=added)
            mask = jnp.ones(out['last_hidden_state'].shape[:2], bool)
        else:
            pad = x == self.pad_id
            if self.pad_id == prep.pad_id == prep.eos_id:
                pad = jnp.cumsum(pad, axis=1) > 1  # the first padding id is the EOS, a real token
            mask = ~pad
            out = tower(x, mask, train=train, added=added)
        if self.pooling == 'tokens':
            return layers.Tokens(out['last_hidden_state'], mask).clean()
        return out['pooler_output']
