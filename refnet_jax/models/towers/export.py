"""`save_tower`: a tower trained here, written back as a Hugging Face directory that transformers loads.

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

from refnet_jax.models.towers import hf, loader

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


def _back(to_flax, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The PyTorch tensor of `shape` that `to_flax` maps to `value`."""
    if to_flax is hf._linear:
        return value.T
    if to_flax is hf._conv:
        return value.transpose(3, 2, 0, 1)
    return value.reshape(shape)


def save_tower(tower: 'loader.LoadedTower', path: str) -> str:
    """Writes `tower` (from `load_tower('hf:DIR', part)`, its `variables` trained or not) to the directory
    `path` as a Hugging Face model directory: config.json, model.safetensors (float32) and DIR's tokenizer and
    preprocessor files. Returns `path`.

    Raises:
      ValueError: `tower` did not come from a Hugging Face directory, or `path` is an existing file.
    """
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
    flat = {
        '/'.join(k.key for k in p): np.asarray(v, np.float32)
        for p, v in jax.tree_util.tree_flatten_with_path(tower.variables['params'])[0]
    }
    if tower.module.scan:
        flat = loader.unstack_blocks(flat)
    out: dict[str, np.ndarray] = {}
    packed: dict[str, list] = {}
    for name, value in sorted(flat.items()):
        tensor, to_flax = table[name]
        original = tensors[prefix + tensor]  # its layout and shape
        if tensor.startswith('head.attention.in_proj_'):  # q, k and v packed into one tensor
            packed.setdefault(tensor, [None] * 3)[('query', 'key', 'value').index(name.split('/')[1])] = value
            continue
        out[out_prefix + tensor] = np.ascontiguousarray(_back(to_flax, value, original.shape), np.float32)
    for tensor, parts in packed.items():
        # (C order: safetensors.numpy writes an array's memory as it lies, and a concatenation of transposes is F)
        joined = np.concatenate([p.T if p.ndim == 2 else p for p in parts], axis=0)
        out[out_prefix + tensor] = np.ascontiguousarray(joined, np.float32)
    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(out, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    for name in FILES:
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(path, name))
    return path
