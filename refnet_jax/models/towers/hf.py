"""Hugging Face tower directories: `config.json` -> `Tower` fields, and the parameter names of each architecture.

A directory holds `config.json` and `model.safetensors` (or its shards and `model.safetensors.index.json`), as
`save_pretrained` writes them. The architecture is `config.json`'s `model_type`: 'vit' and 'bert' (one tower),
'siglip' and 'clip' (two towers: `part` 'vision' or 'text' picks one), and their one-tower forms
'siglip_vision_model', 'siglip_text_model', 'clip_vision_model', 'clip_text_model'. Each has one table of
its parameter names (`names`): PyTorch's Linear weights are (out, in) and its convolutions (out, in, h, w);
here Dense kernels are (in, out) and convolutions (h, w, in, out).

The safetensors files are read into NumPy with `safetensors.numpy` (no framework), bfloat16 included (as
`ml_dtypes.bfloat16`; parameters are then kept in float32).
"""

import json
import os
from collections.abc import Callable

import numpy as np
import safetensors.numpy

# model_type -> (the family, its part; None for a two-tower file)
MODEL_TYPES = {
    'vit': ('vit', 'vision'),
    'bert': ('bert', 'text'),
    'siglip': ('siglip', None),
    'siglip_vision_model': ('siglip', 'vision'),
    'siglip_text_model': ('siglip', 'text'),
    'clip': ('clip', None),
    'clip_vision_model': ('clip', 'vision'),
    'clip_text_model': ('clip', 'text'),
}
ACTIVATIONS = {
    'gelu': 'gelu',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'gelu_new': 'gelu_tanh',
    'quick_gelu': 'quick_gelu',
}


def read_dir(path: str, source: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, every tensor) of the Hugging Face directory `path`.

    Raises:
      ValueError: no config.json, or no model.safetensors (nor shards and their index).
    """
    config_file = os.path.join(path, 'config.json')
    if not os.path.isfile(config_file):
        raise ValueError(
            f'{source}: the directory has no config.json; expected a Hugging Face model directory'
        )
    with open(config_file) as f:
        config = json.load(f)
    single, index = (
        os.path.join(path, 'model.safetensors'),
        os.path.join(path, 'model.safetensors.index.json'),
    )
    if os.path.isfile(single):
        return config, safetensors.numpy.load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        tensors = {}
        for shard in shards:
            tensors.update(safetensors.numpy.load_file(os.path.join(path, shard)))
        return config, tensors
    raise ValueError(
        f'{source}: the directory has no model.safetensors nor model.safetensors.index.json with its shards'
    )


def architecture(config: dict, part: str | None, source: str) -> tuple[str, str, dict, str]:
    """(family, part, the tower's own config section, the prefix of its tensor names) of a config.json.

    Raises:
      ValueError: an unknown model_type, or `part` missing for a two-tower file or given for a one-tower one.
    """
    model_type = config.get('model_type')
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f'{source}: config.json has model_type {model_type!r}, which is not a known tower; '
            f'expected one of {sorted(MODEL_TYPES)}'
        )
    family, own_part = MODEL_TYPES[model_type]
    if own_part is None:
        if part not in ('vision', 'text'):
            raise ValueError(
                f"{source} is a two-tower {model_type} checkpoint: part is {part!r}; expected 'vision' or 'text'"
            )
        return family, part, config[f'{part}_config'], f'{part}_model.'
    if part is not None and part != own_part:
        raise ValueError(
            f'{source} is a one-tower {model_type} checkpoint ({own_part}): part is {part!r}; expected None'
        )
    prefix = {'siglip': f'{own_part}_model.', 'clip': f'{own_part}_model.'}.get(family, '')
    return family, own_part, config, prefix


def tower_fields(family: str, part: str, c: dict) -> dict:
    """The `Tower` fields of one tower's config section."""
    act = c.get('hidden_act', 'gelu')
    if act not in ACTIVATIONS:
        raise ValueError(f'config.json: hidden_act is {act!r}; expected one of {sorted(ACTIVATIONS)}')
    fields = dict(
        modality='image' if part == 'vision' else 'text',
        width=c['hidden_size'],
        depth=c['num_hidden_layers'],
        num_heads=c['num_attention_heads'],
        mlp_dim=c['intermediate_size'],
        activation=ACTIVATIONS[act],
    )
    if part == 'vision':
        fields.update(
            patch_size=c['patch_size'], image_size=c['image_size'], num_channels=c.get('num_channels', 3)
        )
    else:
        fields.update(vocab_size=c['vocab_size'], max_positions=c['max_position_embeddings'])
    if family == 'vit':
        fields.update(eps=c.get('layer_norm_eps', 1e-12), cls_token=True, pooling='cls_dense_tanh')
    elif family == 'bert':
        fields.update(
            eps=c.get('layer_norm_eps', 1e-12),
            norm='post',
            type_vocab_size=c.get('type_vocab_size', 2),
            embed_norm=True,
            final_norm='none',
            pooling='cls_dense_tanh',
        )
    elif family == 'siglip' and part == 'vision':
        fields.update(
            eps=c.get('layer_norm_eps', 1e-6), pooling='map' if c.get('vision_use_head', True) else 'none'
        )
    elif family == 'siglip':
        fields.update(
            eps=c.get('layer_norm_eps', 1e-6),
            pooling='last',
            head_dim=c.get('projection_size', c['hidden_size']),
        )
    elif part == 'vision':  # clip
        fields.update(
            eps=c.get('layer_norm_eps', 1e-5),
            cls_token=True,
            patch_bias=False,
            embed_norm=True,
            final_norm='pooled',
            pooling='cls_norm',
        )
    else:
        eos = c.get('eos_token_id', 2)
        fields.update(
            eps=c.get('layer_norm_eps', 1e-5), causal=True, pooling='eos', eos_id=-1 if eos == 2 else eos
        )
    return fields


# How a PyTorch tensor becomes a Flax parameter, and back.
def _linear(w):
    return w.T


def _conv(w):
    return w.transpose(2, 3, 1, 0)


def _same(w):
    return w


def _pos(w):
    return w.reshape(1, -1, w.shape[-1])


def _flat(w):
    return w.reshape(-1)


Table = dict[str, tuple[str, Callable]]  # Flax name -> (tensor name, to Flax)


def _dense(table: Table, ours: str, theirs: str) -> None:
    table[f'{ours}/kernel'] = (f'{theirs}.weight', _linear)
    table[f'{ours}/bias'] = (f'{theirs}.bias', _same)


def _norm(table: Table, ours: str, theirs: str) -> None:
    table[f'{ours}/scale'] = (f'{theirs}.weight', _same)
    table[f'{ours}/bias'] = (f'{theirs}.bias', _same)


def names(family: str, part: str, fields: dict, tensors: set[str]) -> Table:
    """{Flax parameter name: (tensor name, conversion)} of one tower (`block_{i}` unrolled names)."""
    t: Table = {}
    depth = fields['depth']
    if family in ('vit', 'bert'):
        for i in range(depth):
            if family == 'vit':
                at, b = f'encoder.layer.{i}.attention.attention', f'encoder.layer.{i}'
                _norm(t, f'block_{i}/norm1', f'{b}.layernorm_before')
                _norm(t, f'block_{i}/norm2', f'{b}.layernorm_after')
            else:
                at, b = f'encoder.layer.{i}.attention.self', f'encoder.layer.{i}'
                _norm(t, f'block_{i}/norm1', f'{b}.attention.output.LayerNorm')
                _norm(t, f'block_{i}/norm2', f'{b}.output.LayerNorm')
            for q in ('query', 'key', 'value'):
                _dense(t, f'block_{i}/attn/{q}', f'{at}.{q}')
            _dense(t, f'block_{i}/attn/out', f'{b}.attention.output.dense')
            _dense(t, f'block_{i}/mlp/fc1', f'{b}.intermediate.dense')
            _dense(t, f'block_{i}/mlp/fc2', f'{b}.output.dense')
        _dense(t, 'pooler', 'pooler.dense')
        if family == 'vit':
            t['patch/kernel'] = ('embeddings.patch_embeddings.projection.weight', _conv)
            t['patch/bias'] = ('embeddings.patch_embeddings.projection.bias', _same)
            t['cls'] = ('embeddings.cls_token', _flat)
            t['pos_embedding'] = ('embeddings.position_embeddings', _pos)
            _norm(t, 'final_norm', 'layernorm')
        else:
            t['token_embedding/embedding'] = ('embeddings.word_embeddings.weight', _same)
            t['type_embedding/embedding'] = ('embeddings.token_type_embeddings.weight', _same)
            t['pos_embedding'] = ('embeddings.position_embeddings.weight', _pos)
            _norm(t, 'embed_norm', 'embeddings.LayerNorm')
        return t
    # siglip and clip share their block names
    for i in range(depth):
        b = f'encoder.layers.{i}'
        for ours, theirs in (
            ('query', 'q_proj'),
            ('key', 'k_proj'),
            ('value', 'v_proj'),
            ('out', 'out_proj'),
        ):
            _dense(t, f'block_{i}/attn/{ours}', f'{b}.self_attn.{theirs}')
        _norm(t, f'block_{i}/norm1', f'{b}.layer_norm1')
        _norm(t, f'block_{i}/norm2', f'{b}.layer_norm2')
        _dense(t, f'block_{i}/mlp/fc1', f'{b}.mlp.fc1')
        _dense(t, f'block_{i}/mlp/fc2', f'{b}.mlp.fc2')
    if part == 'vision':
        t['patch/kernel'] = ('embeddings.patch_embedding.weight', _conv)
        if fields.get('patch_bias', True):
            t['patch/bias'] = ('embeddings.patch_embedding.bias', _same)
        t['pos_embedding'] = ('embeddings.position_embedding.weight', _pos)
        _norm(t, 'final_norm', 'post_layernorm')
    else:
        t['token_embedding/embedding'] = ('embeddings.token_embedding.weight', _same)
        t['pos_embedding'] = ('embeddings.position_embedding.weight', _pos)
        _norm(t, 'final_norm', 'final_layer_norm')
    if family == 'clip' and part == 'vision':
        t['cls'] = ('embeddings.class_embedding', _flat)
        _norm(t, 'embed_norm', 'pre_layrnorm')
    if family == 'siglip' and part == 'text':
        _dense(t, 'head', 'head')
    if fields.get('pooling') == 'map':
        t['probe'] = ('head.probe', _same)
        _norm(t, 'map_norm', 'head.layernorm')
        _dense(t, 'map_mlp/fc1', 'head.mlp.fc1')
        _dense(t, 'map_mlp/fc2', 'head.mlp.fc2')
        _dense(t, 'map_attn/out', 'head.attention.out_proj')
        for j, q in enumerate(('query', 'key', 'value')):  # nn.MultiheadAttention packs q, k, v in one
            t[f'map_attn/{q}/kernel'] = ('head.attention.in_proj_weight', _packed(j, True))
            t[f'map_attn/{q}/bias'] = ('head.attention.in_proj_bias', _packed(j, False))
    return t


def _packed(j: int, weight: bool) -> Callable:
    def take(w):
        part = np.split(w, 3, axis=0)[j]
        return part.T if weight else part

    return take
