"""`load_tower(source, part)`: a published tower as a Linen module, its parameters and its preprocessing.

The architecture (sizes, activation, LayerNorm epsilon and placement, pooling) comes from the checkpoint, never
from the caller. Every tensor the architecture needs is checked before anything runs: a missing one is named
with the architecture, a shape that does not fit gives both shapes, and a tokenizer whose ids do not fit the
embedding table is refused.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refnet_jax.data import tokenizers
from refnet_jax.models.towers import big_vision, hf
from refnet_jax.models.towers.module import Tower

IMAGE_DEFAULTS = dict(
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=0.5, image_std=0.5
)


@dataclasses.dataclass
class LoadedTower:
    """A tower ready to run: `tower(tower.preprocess(raw))` -> {'last_hidden_state', 'pooler_output'}.

    Attributes:
      module: the Linen `Tower`.
      variables: {'params': ...}.
      preprocess: raw inputs (uint8 images (B, H, W, 3) at the tower's size, or a list of strings) -> the
        module's inputs, as the checkpoint's own image processor or tokenizer prepares them.
      source: where it came from.
      architecture: e.g. 'siglip/vision'.
      config: the checkpoint's own config section of this tower (config.json's).
      tokenizer: the text tokenizer (`TextPreprocessor`), None for an image tower.
    """

    module: Tower
    variables: dict
    preprocess: Callable[[Any], dict]
    source: str
    architecture: str
    config: dict
    tokenizer: Any = None

    def __call__(self, inputs: dict) -> dict[str, jax.Array]:
        """The module's outputs on `inputs` (what `preprocess` returns), jitted."""
        return _apply(self.module, self.variables, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: Tower, variables: dict, inputs: dict) -> dict[str, jax.Array]:
    return module.apply(variables, **inputs)


def load_tower(source: str, part: str | None = None, *, scan: bool = False) -> LoadedTower:
    """The tower of `source`: 'hf:DIR', a Hugging Face model directory (`part` 'vision' or 'text' for a
    two-tower SigLIP or CLIP checkpoint), or 'PATH.npz[:sub/tree]', a big_vision ViT (`big_vision.py`).
    `scan=True` builds it with its blocks under `nn.scan`.

    Raises:
      ValueError: one line naming what is wrong (see the module docstring).
    """
    npz, dot, sub = source.partition('.npz')
    if not source.startswith('hf:') and dot and (not sub or sub.startswith(':')):  # a big_vision .npz
        if part is not None:
            raise ValueError(
                f'{source}: a big_vision file takes its tower as PATH.npz:sub/tree; part is {part!r}'
            )
        tensors = big_vision.read(npz + '.npz', sub[1:], source)
        fields = big_vision.fields(tensors, source)
        module = Tower(**fields, scan=scan)
        params = convert(big_vision.names(fields), tensors, '', module, f'{source} (big_vision)')
        if fields['modality'] == 'image':
            half = np.full(fields['num_channels'], 0.5, np.float32)  # big_vision's value_range(-1, 1)
            prep = ImagePreprocessor(fields['image_size'], 1 / 255, half, half)
        else:
            prep = _no_tokenizer(source)
        part = 'vision' if fields['modality'] == 'image' else 'text'
        return LoadedTower(module, {'params': params}, prep, source, f'big_vision/{part}', {})
    if not source.startswith('hf:'):
        raise ValueError(
            f"load_tower: source is {source!r}; expected 'hf:DIR' (a Hugging Face model directory) or "
            "'PATH.npz[:sub/tree]' (a big_vision ViT)"
        )
    path = source[len('hf:') :]
    if not os.path.isdir(path):
        raise ValueError(f'{source}: there is no directory {path!r}')
    config, tensors, family, part, section, prefix, fields = read(path, source, part)
    module = Tower(**fields, scan=scan)
    table = hf.names(family, part, fields, set(tensors))
    if fields['pooling'] == 'none':
        table = {k: v for k, v in table.items() if not k.startswith('pooler/')}
    params = convert(table, tensors, prefix, module, f'{source} ({family} {part})')
    preprocess, tokenizer = _preprocessor(path, source, family, part, section, fields)
    return LoadedTower(module, {'params': params}, preprocess, source, f'{family}/{part}', section, tokenizer)


def _no_tokenizer(source: str) -> Callable:
    def preprocess(texts):
        raise ValueError(
            f"{source}: a big_vision file carries no tokenizer; give the tower {{'x': ids}} from big_vision's own"
        )

    return preprocess


def read(path: str, source: str, part: str | None) -> tuple[dict, dict, str, str, dict, str, dict]:
    """(config.json, tensors, family, part, the tower's config section, its tensors' name prefix, `Tower`
    fields) of the Hugging Face directory `path`."""
    config, tensors = hf.read_dir(path, source)
    family, part, section, prefix = hf.architecture(config, part, source)
    fields = hf.tower_fields(family, part, section)
    if family in ('vit', 'bert') and not any(k.startswith('embeddings.') for k in tensors):
        if any(k.startswith(f'{family}.embeddings.') for k in tensors):
            prefix = f'{family}.'  # saved from a task model (ViTForImageClassification, BertFor...)
    if family in ('vit', 'bert') and f'{prefix}pooler.dense.weight' not in tensors:
        fields['pooling'] = 'none'  # saved without its pooler, as transformers then returns no pooler_output
    return config, tensors, family, part, section, prefix, fields


def _example(module: Tower) -> jax.Array:
    if module.modality == 'image':
        return jnp.zeros((1, module.image_size, module.image_size, module.num_channels), jnp.float32)
    return jnp.zeros((1, min(module.max_positions, 8)), jnp.int32)


def param_shapes(module: Tower) -> dict[str, tuple[int, ...]]:
    """{'/'-joined parameter name: shape} of `module`, unrolled (`block_{i}`) names."""
    unrolled = module.clone(scan=False) if module.scan else module
    shapes = jax.eval_shape(unrolled.init, jax.random.key(0), _example(unrolled))['params']
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {'/'.join(k.key for k in path): tuple(v.shape) for path, v in flat}


def convert(table: hf.Table, tensors: dict, prefix: str, module: Tower, where: str) -> dict:
    """The parameter tree of `module` from `tensors` by `table`, every name and shape checked."""
    want = param_shapes(module)
    flat, problems = {}, []
    for name, shape in want.items():
        tensor, to_flax = table[name]
        if prefix + tensor not in tensors:
            problems.append(f'tensor {prefix + tensor!r} is missing, which the architecture needs for {name}')
            continue
        value = np.asarray(to_flax(tensors[prefix + tensor]), np.float32)
        if value.shape != shape:
            problems.append(
                f'tensor {prefix + tensor!r} has shape {tuple(tensors[prefix + tensor].shape)}, which gives '
                f'{value.shape} for {name}; the config says {shape}'
            )
        flat[name] = value
    if problems:
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise ValueError(f'{where}: {problems[0]}{more}')
    if module.scan:
        flat = stack_blocks(flat, module.depth)
    return unflatten(flat)


def stack_blocks(flat: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """`block_{i}/...` parameters stacked on a leading depth axis as `blocks/...` (the `nn.scan` layout)."""
    out = {k: v for k, v in flat.items() if not k.startswith('block_')}
    for name in [k[len('block_0/') :] for k in flat if k.startswith('block_0/')]:
        out[f'blocks/{name}'] = np.stack([flat[f'block_{i}/{name}'] for i in range(depth)])
    return out


def unstack_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `stack_blocks`."""
    out = {k: v for k, v in flat.items() if not k.startswith('blocks/')}
    for k, v in flat.items():
        if k.startswith('blocks/'):
            for i in range(v.shape[0]):
                out[f'block_{i}/{k[len("blocks/") :]}'] = v[i]
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split('/')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


# ---- preprocessing ----


def _json(path: str) -> dict:
    """The JSON object in the file `path`, {} where there is none."""
    return tokenizers.read_json(pathlib.Path(path), path)


def _preprocessor(path, source, family, part, section, fields):
    if part == 'vision':
        return ImagePreprocessor.from_dir(path, fields['image_size'], fields['num_channels']), None
    tokenizer = TextPreprocessor.from_dir(path, source, fields['max_positions'])
    if tokenizer.vocab_size > fields['vocab_size']:
        raise ValueError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} ids, more than the tower's embedding table "
            f'({fields["vocab_size"]} rows)'
        )
    return tokenizer, tokenizer


@dataclasses.dataclass
class ImagePreprocessor:
    """uint8 (B, H, W, C) -> {'x': float32 (B, H, W, C)}: rescaled and normalized as preprocessor_config.json
    says (no resize: images must already be at the tower's size)."""

    image_size: int
    scale: float
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_dir(cls, path: str, image_size: int, channels: int) -> 'ImagePreprocessor':
        c = {**IMAGE_DEFAULTS, **_json(os.path.join(path, 'preprocessor_config.json'))}
        scale = c['rescale_factor'] if c['do_rescale'] else 1.0
        mean = np.broadcast_to(np.asarray(c['image_mean'], np.float32), (channels,))
        std = np.broadcast_to(np.asarray(c['image_std'], np.float32), (channels,))
        if not c['do_normalize']:
            mean, std = np.zeros(channels, np.float32), np.ones(channels, np.float32)
        return cls(image_size, scale, mean, std)

    def normalize(self, x: jax.Array) -> jax.Array:
        """Pixels -> the tower's input, traceable (used inside a model too)."""
        x = x.astype(jnp.float32) * self.scale
        return (x - self.mean) / self.std

    def __call__(self, images: Any) -> dict:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f'images of shape {images.shape}; the tower takes (B, {self.image_size}, {self.image_size}, C)'
            )
        return {'x': np.asarray(self.normalize(images.astype(np.float32)), np.float32)}


class TextPreprocessor:
    """A list of strings -> {'x': ids (B, T), 'mask': (B, T)}, as the checkpoint's tokenizer prepares them
    (`refnet_jax.data.tokenizers.Pretrained`): BERT and CLIP padded to the longest text (at most
    `model_max_length`), SigLIP to `model_max_length`, as its text tower was trained.

    Attributes:
      tokenizer: the `Pretrained` tokenizer; its `pad_id`, `eos_id`, `vocab_size` and `max_length` are also
        this object's.
    """

    def __init__(self, tokenizer: tokenizers.Pretrained):
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id, self.vocab_size = tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size
        self.max_length = tokenizer.max_length

    @classmethod
    def from_dir(cls, path: str, source: str, max_positions: int) -> 'TextPreprocessor':
        return cls(tokenizers.Pretrained(path, where=source, max_positions=max_positions))

    def __call__(self, texts: Sequence[str]) -> dict:
        texts = list(texts)
        length = self.max_length
        if not self.tokenizer.pad_to_max:
            length = min(length, max(len(ids) for ids in self.tokenizer.ids(texts)))
        x, mask = self.tokenizer.encode(texts, length)
        return {'x': x, 'mask': mask}


def init_shapes(module: nn.Module) -> Any:
    """The parameter shapes of `module` (for tests and the ReFNet encoder)."""
    return jax.eval_shape(module.init, jax.random.key(0), _example(module))
