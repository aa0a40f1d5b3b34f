"""big_vision ViT and text-transformer checkpoints (`PATH.npz[:sub/tree]`): the architecture from the arrays.

A big_vision `.npz` holds flat '/'-joined parameter names (under `params/`, dropped); `:img` picks one tower of
a two-tower file. Its blocks are `Transformer/encoderblock_{i}/...`, or stacked on a leading depth axis under
`Transformer/encoderblock/...` (written by `scan=True`, as the So400m and B/16-512 SigLIP checkpoints are).
From the arrays: width and patch size (`embedding/kernel`), depth, heads (the query kernel's (D, H, d)), MLP
width, the image size (`pos_embedding`'s grid) and the pooling: `map` (a `MAPHead_0`), `tok` (a `cls` token),
else `gap`. The tower's outputs are big_vision's `encoded` tokens (`last_hidden_state`) and its pooled
`head_input` (`pooler_output`); a classifier `head` is not part of the tower. big_vision's ViT computes with
tanh-approximated GELU, LayerNorm epsilon 1e-6 and pre-LayerNorm blocks; images in [-1, 1].

The SigLIP text tower (`models/proj/image_text/text_transformer.py`: `Embed_0`, `pos_embedding`, `Encoder_0`)
is read the same way; its outputs are `transformed` (`last_hidden_state`) and `pre_logits`, the last position
(`pooler_output`; a `MAPHead_0` where it has one), over every position (big_vision masks nothing: its texts are
padded with EOS). Its ids come from big_vision's tokenizer, which the file does not carry.
"""

import math
import os
import re

import numpy as np

from refnet_jax.models.towers import hf

Table = hf.Table


def read_npz(path: str, where: str) -> dict[str, np.ndarray]:
    """Every array of the big_vision-layout .npz `path` by '/'-joined name, a leading `params/` dropped; a
    missing file is an error that starts with `where` (the field or source that named it)."""
    if not os.path.isfile(path):
        raise ValueError(f'{where}, but there is no file {path!r}')
    with np.load(path, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    if all(k.startswith('params/') for k in flat):
        flat = {k[len('params/') :]: v for k, v in flat.items()}
    return flat


def read(path: str, sub: str, source: str) -> dict[str, np.ndarray]:
    """The arrays of the tower at `sub` of the .npz `path`, stacked blocks split into `encoderblock_{i}`."""
    flat = read_npz(path, source)
    if sub:
        prefix = sub.strip('/') + '/'
        tower = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        if not tower:
            tops = sorted({k.split('/')[0] for k in flat})
            raise ValueError(f'{source}: no subtree {sub!r} in it; its top-level names are {tops}')
        flat = tower
    out = {}
    for name, value in flat.items():
        stacked = re.match(r'(Transformer|Encoder_0)/encoderblock/(.*)', name)
        if stacked:  # stacked for nn.scan: (depth, ...)
            for i in range(value.shape[0]):
                out[f'{stacked[1]}/encoderblock_{i}/{stacked[2]}'] = value[i]
        else:
            out[name] = value
    return out


def _encoder(tensors: dict) -> str:
    """The name of the transformer: 'Transformer' (ViT) or 'Encoder_0' (the text tower)."""
    return 'Encoder_0' if 'Embed_0/embedding' in tensors else 'Transformer'


def fields(tensors: dict[str, np.ndarray], source: str) -> dict:
    """The `Tower` fields of a big_vision ViT's arrays."""
    image = 'embedding/kernel' in tensors
    if not (image or 'Embed_0/embedding' in tensors) or 'pos_embedding' not in tensors:
        raise ValueError(
            f'{source}: not a big_vision ViT or text transformer (no embedding/kernel or Embed_0/embedding, and '
            f'pos_embedding); its arrays start {sorted(tensors)[:5]}'
        )
    enc = _encoder(tensors)
    depth = len({m[1] for k in tensors if (m := re.match(rf'{enc}/encoderblock_(\d+)/', k))})
    attn = f'{enc}/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'
    if depth == 0 or attn not in tensors:
        raise ValueError(f'{source}: tensor {attn!r} is missing, which a big_vision transformer needs')
    common = dict(
        num_heads=tensors[attn].shape[1],
        mlp_dim=tensors[f'{enc}/encoderblock_0/MlpBlock_0/Dense_0/kernel'].shape[1],
        activation='gelu_tanh',
        eps=1e-6,
        depth=depth,
    )
    n = tensors['pos_embedding'].shape[1]
    if not image:  # the SigLIP text tower: pools the last position (EOS-padded text), or with a MAP head
        vocab_size, width = tensors['Embed_0/embedding'].shape
        pooling = 'map' if 'MAPHead_0/probe' in tensors else 'last'
        return dict(
            common, modality='text', width=width, vocab_size=vocab_size, max_positions=n, pooling=pooling
        )
    ph, pw, channels, width = tensors['embedding/kernel'].shape
    if ph != pw or math.isqrt(n) ** 2 != n:
        raise ValueError(f'{source}: patches {ph}x{pw} and {n} positions; expected square patches and grid')
    pooling = 'map' if 'MAPHead_0/probe' in tensors else 'cls' if 'cls' in tensors else 'gap'
    return dict(
        common,
        modality='image',
        width=width,
        patch_size=ph,
        image_size=ph * math.isqrt(n),
        num_channels=channels,
        cls_token=pooling == 'cls',
        pos_before_cls=True,
        pooling=pooling,
    )


def _heads_in(w):  # (D, H, d) -> (D, H d); a bias (H, d) -> (H d)
    return w.reshape(w.shape[0], -1) if w.ndim == 3 else w.reshape(-1)


def _heads_out(w):  # (H, d, D) -> (H d, D)
    return w.reshape(-1, w.shape[-1])


def _attention(t: Table, ours: str, theirs: str) -> None:
    for q in ('query', 'key', 'value'):
        t[f'{ours}/{q}/kernel'] = (f'{theirs}/{q}/kernel', _heads_in)
        t[f'{ours}/{q}/bias'] = (f'{theirs}/{q}/bias', _heads_in)
    t[f'{ours}/out/kernel'] = (f'{theirs}/out/kernel', _heads_out)
    t[f'{ours}/out/bias'] = (f'{theirs}/out/bias', hf._same)


def _same(t: Table, ours: str, theirs: str, leaves=('kernel', 'bias')) -> None:
    for leaf in leaves:
        t[f'{ours}/{leaf}'] = (f'{theirs}/{leaf}', hf._same)


def names(f: dict) -> Table:
    """{Flax parameter name: (big_vision name, conversion)} of a big_vision ViT or text transformer."""
    t: Table = {}
    enc = 'Transformer' if f['modality'] == 'image' else 'Encoder_0'
    if f['modality'] == 'image':
        _same(t, 'patch', 'embedding')
    else:
        t['token_embedding/embedding'] = ('Embed_0/embedding', hf._same)
    t['pos_embedding'] = ('pos_embedding', hf._same)
    if f.get('cls_token'):
        t['cls'] = ('cls', hf._flat)
    for i in range(f['depth']):
        b = f'{enc}/encoderblock_{i}'
        _same(t, f'block_{i}/norm1', f'{b}/LayerNorm_0', ('scale', 'bias'))
        _same(t, f'block_{i}/norm2', f'{b}/LayerNorm_1', ('scale', 'bias'))
        _attention(t, f'block_{i}/attn', f'{b}/MultiHeadDotProductAttention_0')
        _same(t, f'block_{i}/mlp/fc1', f'{b}/MlpBlock_0/Dense_0')
        _same(t, f'block_{i}/mlp/fc2', f'{b}/MlpBlock_0/Dense_1')
    _same(t, 'final_norm', f'{enc}/encoder_norm', ('scale', 'bias'))
    if f['pooling'] == 'map':
        t['probe'] = ('MAPHead_0/probe', hf._same)
        _attention(t, 'map_attn', 'MAPHead_0/MultiHeadDotProductAttention_0')
        _same(t, 'map_norm', 'MAPHead_0/LayerNorm_0', ('scale', 'bias'))
        _same(t, 'map_mlp/fc1', 'MAPHead_0/MlpBlock_0/Dense_0')
        _same(t, 'map_mlp/fc2', 'MAPHead_0/MlpBlock_0/Dense_1')
    return t
