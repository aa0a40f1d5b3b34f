"""`save_tower`: a tower trained here, written back as a Hugging Face directory that transformers loads, or as
a big_vision `.npz`.

The inverse of `load_tower`: each parameter goes back to its tensor name, layout and shape by the same table
(`hf.names`), `config.json` is the tower's own (a two-tower file's part becomes its one-tower model type,
`siglip_text_model`, `clip_vision_model`, ...), and the tokenizer and preprocessor files it came with are
copied, so `AutoTokenizer` / the image processor of the directory prepare inputs as before.
"""

import json
import os
import shutil

import jax
import numpy as np
import safetensors.numpy

from refnet_jax.models.towers import big_vision, hf, loader
from refnet_jax.models.towers.module import Tower

FILES = (
    'preprocessor_config.json',
    'tokenizer.json',
    'tokenizer_config.json',
    'special_tokens_map.json',
    'spiece.model',
    'vocab.txt',
    'vocab.json',
    'merges.txt',
)


def _hf_tensors(
    flat: dict[str, np.ndarray], table: hf.Table, shape_of, out_prefix: str
) -> dict[str, np.ndarray]:
    """The PyTorch tensors (float32, by name with `out_prefix`) of the flat Flax parameters `flat`, by the
    loading table `table` reversed; `shape_of(tensor name, conversion, value)` is each tensor's PyTorch shape."""
    out: dict[str, np.ndarray] = {}
    packed: dict[str, list] = {}
    for name, value in sorted(flat.items()):
        tensor, to_flax = table[name]
        if tensor.startswith('head.attention.in_proj_'):  # q, k and v packed into one tensor
            packed.setdefault(tensor, [None] * 3)[('query', 'key', 'value').index(name.split('/')[1])] = value
            continue
        out[out_prefix + tensor] = np.ascontiguousarray(
            _back(to_flax, value, shape_of(tensor, to_flax, value)), np.float32
        )
    for tensor, parts in packed.items():
        # (C order: safetensors.numpy writes an array's memory as it lies, and a concatenation of transposes is F)
        joined = np.concatenate([p.T if p.ndim == 2 else p for p in parts], axis=0)
        out[out_prefix + tensor] = np.ascontiguousarray(joined, np.float32)
    return out


def _hf_shape(tensor: str, to_flax, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of the tensor `tensor` whose Flax parameter has `shape` (the layouts of `hf.names`):
    Linear weights (out, in), convolutions (out, in, h, w), position embeddings (N, D) as an Embedding's
    `.weight` or (1, N, D) as ViT's parameter, class tokens (1, 1, D) (ViT) or (D,) (CLIP)."""
    if to_flax is hf._linear:
        return shape[::-1]
    if to_flax is hf._conv:
        return (shape[3], shape[2], shape[0], shape[1])
    if to_flax is hf._pos:
        return shape[1:] if tensor.endswith('.weight') else shape
    if to_flax is hf._flat:
        return shape if tensor == 'embeddings.class_embedding' else (1, 1, *shape)
    return shape


def save_initialized(config: dict, path: str, *, seed: int = 0) -> str:
    """Writes a Hugging Face model directory of the architecture `config` (a config.json, as a dict: any
    `model_type` `load_tower` knows; both towers of a two-tower one) with freshly initialized parameters (this
    library's initializers, from `seed`): config.json and model.safetensors. The tokenizer and preprocessor
    files are the caller's to add. Returns `path`.

    Raises:
      ValueError: an unknown `model_type`, or a config that lacks a size.
    """
    where = f'save_initialized({path!r})'
    family, own = hf.MODEL_TYPES.get(config.get('model_type'), (None, None))
    parts = ('vision', 'text') if family in ('siglip', 'clip') and own is None else (None,)
    out = {}
    for i, part in enumerate(parts):
        family, part, section, prefix = hf.architecture(config, part, where)
        try:
            fields = hf.tower_fields(family, part, section)
        except KeyError as e:
            raise ValueError(f'{where}: the {family} {part} config has no {e.args[0]!r}') from None
        module = Tower(**fields)
        params = module.init(jax.random.key(seed + i), loader._example(module))['params']
        flat = {
            '/'.join(k.key for k in p): np.asarray(v, np.float32)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        table = hf.names(family, part, fields, set())
        out |= _hf_tensors(flat, table, lambda t, to_flax, value: _hf_shape(t, to_flax, value.shape), prefix)
    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(out, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    return path


def _back(to_flax, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The PyTorch tensor of `shape` that `to_flax` maps to `value`."""
    if to_flax is hf._linear:
        return value.T
    if to_flax is hf._conv:
        return value.transpose(3, 2, 0, 1)
    return value.reshape(shape)


def save_tower(tower: 'loader.LoadedTower', path: str) -> str:
    """Writes `tower` (a `load_tower` result, its `variables` trained or not) to `path`: a `.npz` path is a
    big_vision-layout file (`save_npz`); any other path a directory, a Hugging Face model directory:
    config.json, model.safetensors (float32) and the tokenizer and preprocessor files of the directory the
    tower came from. Returns `path`.

    Raises:
      ValueError: a Hugging Face directory for a tower that did not come from one, or `path` is an existing file.
    """
    if str(path).endswith('.npz'):
        return save_npz(tower, str(path))
    if not tower.source.startswith('hf:'):
        raise ValueError(
            f'save_tower: the tower comes from {tower.source!r}; expected one loaded from hf:DIR'
        )
    if os.path.isfile(path):
        raise ValueError(f'save_tower: {path!r} is a file; expected a directory to write the tower into')
    source_dir = tower.source[len('hf:') :]
    family, part = tower.architecture.split('/')
    config, tensors, _, _, section, prefix, fields = loader.read(source_dir, tower.source, part)
    out_prefix = f'{part}_model.' if family in ('siglip', 'clip') else ''  # as the one-tower classes save
    if hf.MODEL_TYPES[config['model_type']][1] is None:  # one part of a two-tower file: its one-tower type
        config = dict(section, model_type=f'{family}_{part}_model')
    table = hf.names(family, part, fields, set(tensors))
    out = _hf_tensors(_flat(tower), table, lambda tensor, _, __: tensors[prefix + tensor].shape, out_prefix)
    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(out, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    for name in FILES:
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(path, name))
    return path


# big_vision's ViT and text transformer: the `Tower` fields they fix
BIG_VISION = dict(
    activation='gelu_tanh', eps=1e-6, norm='pre', embed_norm=False, final_norm='tokens', causal=False
)


def save_npz(tower: 'loader.LoadedTower', path: str) -> str:
    """Writes `tower` as a big_vision `.npz` (flat '/'-joined names under `params/`, blocks per block): what
    big_vision's `models/vit.py` (or its text transformer) loads, and `load_tower('PATH.npz')` reads back.
    The tower must be one big_vision computes: a big_vision file's, or a SigLIP tower's.

    Raises:
      ValueError: naming the fields where the tower is not a big_vision transformer.
    """
    m = tower.module
    wrong = {k: getattr(m, k) for k, v in BIG_VISION.items() if getattr(m, k) != v}
    if m.modality == 'image':
        if m.cls_token and not m.pos_before_cls:
            wrong['pos_before_cls'] = False
        if m.pooling not in ('gap', 'cls', 'map', 'none') or m.head_dim is not None:
            wrong['pooling'] = m.pooling
    elif m.pooling not in ('last', 'map') or m.type_vocab_size:
        wrong.update(pooling=m.pooling, type_vocab_size=m.type_vocab_size)
    if wrong:
        raise ValueError(
            f'save_tower: {tower.architecture} is not a big_vision transformer ({wrong}; big_vision fixes {BIG_VISION})'
        )
    table = big_vision.names(
        dict(modality=m.modality, depth=m.depth, cls_token=m.cls_token, pooling=m.pooling)
    )
    if m.head_dim is not None:  # SigLIP's text head: big_vision's `head` Dense of the pooled output
        table['head/kernel'], table['head/bias'] = ('head/kernel', hf._same), ('head/bias', hf._same)
    flat = _flat(tower)
    h = m.num_heads
    out = {}
    for name, value in flat.items():
        tensor, to_flax = table[name]
        if to_flax is big_vision._heads_in:
            value = value.reshape(value.shape[0], h, -1) if value.ndim == 2 else value.reshape(h, -1)
        elif to_flax is big_vision._heads_out:
            value = value.reshape(h, -1, value.shape[-1])
        elif to_flax is hf._flat:
            value = value.reshape(1, 1, -1)
        out[f'params/{tensor}'] = np.ascontiguousarray(value, np.float32)
    np.savez(path, **out)
    return path


def _flat(tower: 'loader.LoadedTower') -> dict[str, np.ndarray]:
    """The tower's parameters, flat by '/'-joined name, blocks unrolled."""
    flat = {
        '/'.join(k.key for k in p): np.asarray(v, np.float32)
        for p, v in jax.tree_util.tree_flatten_with_path(tower.variables['params'])[0]
    }
    return loader.unstack_blocks(flat) if tower.module.scan else flat
