"""Pretrained towers: one module started from a big_vision-layout .npz (checked against a NumPy forward pass
written from big_vision's ViT definitions), from a refnet workdir or an orbax checkpoint; errors named."""

import jax
import numpy as np
import pytest
from helpers import doc_blocks, run_readme_bash
from test_model import INFO, toy_batch, toy_config

from refnet_jax import config_lib
from refnet_jax.models import encoders
from refnet_jax.models import model as model_lib
from refnet_jax.train import paths, pretrained, trainer

VIT = dict(module='vit', patch_size=(4, 4), width=16, depth=2, num_heads=2, pooling='gap', embed_dim=None)


def vit_config(**fields):
    config = toy_config('concat', 'baseline')
    question = dict(config.model.encoders.question)
    config_lib.set_encoders(config, {'image': dict(VIT, **fields), 'question': question})
    return config


def random_big_vision_npz(path, params, prefix='params/img/', seed=0):
    """An .npz as big_vision writes one: flat '/'-joined names under `prefix`, random values, plus another
    tower that must not be read."""
    rs = np.random.RandomState(seed)
    arrays = {
        prefix + paths.path_str(k): rs.normal(0, 0.3, v.shape).astype(np.float32)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    arrays['params/other/Embed_0/embedding'] = np.zeros((3, 4), np.float32)
    np.savez(path, **arrays)
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def layer_norm(x, scale, bias, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu(x):  # flax's (and big_vision's) default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_vit(p, images, depth):
    """big_vision `models/vit.py` (pre-LayerNorm blocks, 'gap' pooling), from the flat arrays `p`."""
    b, h, w, c = images.shape
    kernel = p['embedding/kernel']  # (ph, pw, C, D)
    ph, pw, _, d = kernel.shape
    patches = images.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum('bijklc,klcd->bijd', patches, kernel) + p['embedding/bias']
    x = x.reshape(b, -1, d) + p['pos_embedding']
    x = numpy_encoder(p, x, depth, 'Transformer/')
    return x.mean(1)


@pytest.mark.slow(seconds=9)
def test_a_big_vision_npz_loads_into_the_vit_and_matches_numpy(tmp_path):
    config = vit_config()
    model = model_lib.create_model(config, INFO)
    params = jax.jit(model.init)(jax.random.key(0), toy_batch())['params']
    arrays = random_big_vision_npz(tmp_path / 'siglip.npz', params['encoders']['image'])
    config.model.encoders.image.init_from = f'{tmp_path / "siglip.npz"}:img'
    loaded = pretrained.load_into(params, config)
    for name, value in arrays.items():
        got = loaded['encoders']['image']
        for key in name.split('/'):
            got = got[key]
        np.testing.assert_array_equal(got, value)
    jax.tree.map(np.testing.assert_array_equal, loaded['fusion'], params['fusion'])  # other modules untouched
    images = np.random.RandomState(1).rand(3, 16, 16, 3).astype(np.float32)
    vit = encoders.ViT(**{k: v for k, v in VIT.items() if k != 'module'})
    got = vit.apply({'params': loaded['encoders']['image']}, images)
    np.testing.assert_allclose(got, numpy_vit(arrays, images.astype(np.float64), 2), rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_resampled_to_another_grid(tmp_path):
    config = vit_config()
    params = jax.jit(model_lib.create_model(config, INFO).init)(jax.random.key(0), toy_batch())['params']
    tower = dict(jax.tree.map(np.asarray, params['encoders']['image']))
    tower['pos_embedding'] = np.random.RandomState(0).rand(1, 64, 16).astype(np.float32)  # an 8x8 grid
    random_big_vision_npz(tmp_path / 'big.npz', tower)
    with np.load(tmp_path / 'big.npz') as data:
        data = dict(data)
    data['params/img/pos_embedding'] = tower['pos_embedding']
    np.savez(tmp_path / 'big.npz', **data)
    config.model.encoders.image.init_from = f'{tmp_path / "big.npz"}:img'
    loaded = pretrained.load_into(params, config)
    want = pretrained.resample_posemb(tower['pos_embedding'], 16)  # this ViT: 16x16 images, 4x4 patches
    np.testing.assert_allclose(loaded['encoders']['image']['pos_embedding'], want, rtol=1e-6)
    assert want.shape == (1, 16, 16) and not np.allclose(want, 0)


@pytest.mark.parametrize(
    'source,message',
    [
        (
            '{tmp}/nothing.npz',
            r"config.model.encoders.image.init_from is '.*nothing.npz', but there is no file",
        ),
        ('{tmp}/ok.npz:image', r"no subtree 'image' in it; its top-level names are \['img', 'other'\]"),
        ('{tmp}/narrow.npz:img', r'Transformer/encoder_norm/bias: source \(8,\), module \(16,\)'),
        ('{tmp}/nowhere', r'expected a .npz file, a refnet workdir or an orbax checkpoint'),
    ],
)
def test_a_source_that_does_not_fit_is_named(tmp_path, source, message):
    config = vit_config()
    params = jax.jit(model_lib.create_model(config, INFO).init)(jax.random.key(0), toy_batch())['params']
    random_big_vision_npz(tmp_path / 'ok.npz', params['encoders']['image'])
    narrow = vit_config(width=8)
    other = jax.eval_shape(model_lib.create_model(narrow, INFO).init, jax.random.key(0), toy_batch())[
        'params'
    ]
    random_big_vision_npz(
        tmp_path / 'narrow.npz', jax.tree.map(lambda s: np.zeros(s.shape), other['encoders']['image'])
    )
    config.model.encoders.image.init_from = source.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=message):
        pretrained.load_into(params, config)


@pytest.mark.slow
def test_an_orbax_checkpoint_and_a_refnet_workdir_are_sources(tmp_path, easy_vqa_dir):
    import orbax.checkpoint as ocp
    from helpers import tiny_config

    from refnet_jax.train import checkpointing

    config = tiny_config(easy_vqa_dir, num_steps=2)
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    trained = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints').restore_params()
    tree = jax.device_get(trainer.build(config, seed=3).state.params)
    ocp.PyTreeCheckpointer().save(tmp_path / 'tree', {'params': tree})
    cases = ((str(tmp_path / 'run'), trained), (f'{tmp_path / "tree"}:encoders/question', tree))
    for init_from, want in cases:
        other = tiny_config(easy_vqa_dir, num_steps=2)
        other.model.encoders.question.init_from = init_from
        loaded = pretrained.load_into(trainer.build(other, seed=5).state.params, other)
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.device_get(loaded['encoders']['question']),
            want['encoders']['question'],
        )


def numpy_encoder(p, x, depth, prefix):
    """big_vision's `vit.Encoder` (pre-LayerNorm blocks and the final `encoder_norm`) from flat arrays."""
    for i in range(depth):
        blk = f'{prefix}encoderblock_{i}/'
        y = layer_norm(x, p[blk + 'LayerNorm_0/scale'], p[blk + 'LayerNorm_0/bias'])
        att = blk + 'MultiHeadDotProductAttention_0/'
        q, k, v = (
            np.einsum('btd,dhk->bthk', y, p[att + f'{n}/kernel']) + p[att + f'{n}/bias']
            for n in ('query', 'key', 'value')
        )
        logits = np.einsum('bqhk,bthk->bhqt', q / np.sqrt(q.shape[-1]), k)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum('bqhk,hkd->bqd', np.einsum('bhqt,bthk->bqhk', weights, v), p[att + 'out/kernel'])
        x = x + p[att + 'out/bias']
        y = layer_norm(x, p[blk + 'LayerNorm_1/scale'], p[blk + 'LayerNorm_1/bias'])
        mlp = blk + 'MlpBlock_0/'
        x = x + gelu(y @ p[mlp + 'Dense_0/kernel'] + p[mlp + 'Dense_0/bias']) @ p[mlp + 'Dense_1/kernel']
        x = x + p[mlp + 'Dense_1/bias']
    return layer_norm(x, p[f'{prefix}encoder_norm/scale'], p[f'{prefix}encoder_norm/bias'])


@pytest.mark.slow(seconds=7)
def test_a_siglip_text_tower_npz_loads_into_the_text_transformer_and_matches_numpy(tmp_path):
    fields = dict(module='text_transformer', width=16, depth=2, num_heads=2, pooling='last', embed_dim=8)
    config = toy_config('concat', 'baseline')
    config_lib.set_encoders(config, {'image': dict(config.model.encoders.image), 'question': fields})
    model = model_lib.create_model(config, INFO)
    params = jax.jit(model.init)(jax.random.key(0), toy_batch())['params']
    arrays = random_big_vision_npz(
        tmp_path / 'siglip.npz', params['encoders']['question'], prefix='params/txt/'
    )
    assert {'Embed_0/embedding', 'pos_embedding', 'Encoder_0/encoder_norm/scale', 'head/kernel'} <= set(
        arrays
    )
    config.model.encoders.question.init_from = f'{tmp_path / "siglip.npz"}:txt'
    loaded = pretrained.load_into(params, config)['encoders']['question']
    ids = np.random.RandomState(2).randint(1, 11, (3, 6))  # no padding: big_vision attends everywhere too
    text = encoders.TextTransformer(vocab_size=11, **{k: v for k, v in fields.items() if k != 'module'})
    got = text.apply({'params': loaded}, ids)
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    x = a['Embed_0/embedding'][ids] + a['pos_embedding']
    x = numpy_encoder(a, x, 2, 'Encoder_0/')[:, -1]  # pool_type 'last'
    np.testing.assert_allclose(got, x @ a['head/kernel'] + a['head/bias'], rtol=1e-5, atol=1e-5)


@pytest.mark.slow(seconds=60)
def test_readme_towers_example_runs_as_written(tmp_path):
    import json

    ((lang, code),) = doc_blocks('how-to/pretrained.md', 'towers')
    assert lang == 'bash'
    run_readme_bash(code, tmp_path)
    from refnet_jax.train import checkpointing

    with np.load(tmp_path / 'vit.npz') as saved:
        arrays = {k.removeprefix('params/img/'): saved[k] for k in saved.files}
    frozen = checkpointing.Checkpointer(tmp_path / 'runs' / 'vit_frozen' / 'checkpoints').restore_params()
    tuned = checkpointing.Checkpointer(tmp_path / 'runs' / 'vit_tuned' / 'checkpoints').restore_params()
    for name, value in arrays.items():
        node_f, node_t = frozen['encoders']['image'], tuned['encoders']['image']
        for key in name.split('/'):
            node_f, node_t = node_f[key], node_t[key]
        np.testing.assert_array_equal(node_f, value)  # frozen: bit-identical after 30 steps
    assert not np.array_equal(tuned['encoders']['image']['embedding']['kernel'], arrays['embedding/kernel'])
    for run in ('vit_source', 'vit_frozen', 'vit_tuned'):
        assert json.loads((tmp_path / 'runs' / run / 'results.json').read_text())['step'] == 30
