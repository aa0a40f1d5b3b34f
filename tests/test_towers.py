"""Published towers (`refnet_jax.load_tower`): Hugging Face ViT, BERT, SigLIP and CLIP give transformers' outputs.

tests/fixtures/towers/ holds tiny random transformers models saved with `save_pretrained` and transformers'
PyTorch outputs on fixed raw inputs (`tools/make_tower_fixtures.py` writes both); a slow test regenerates them
where torch and transformers are installed (`pip install -e '.[towers-test]'`).
"""

import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import refnet_jax
from refnet_jax.models.towers import Tower, hf

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'towers'
TEXTS = ['A photo of a cat.', 'two dogs, playing in the snow!', 'hello']  # as tools/make_tower_fixtures.py
TOWERS = [
    ('vit', None),
    ('bert', None),
    ('siglip', 'vision'),
    ('siglip', 'text'),
    ('clip', 'vision'),
    ('clip', 'text'),
]


def _part(name, part):
    return part or ('vision' if name == 'vit' else 'text')


def check_against(directory: pathlib.Path, expected, name: str, part: str | None) -> None:
    """The tower `name` of `directory`, on the raw inputs of `expected`, gives its arrays to 1e-4."""
    tower = refnet_jax.load_tower(f'hf:{directory / name}', part)
    p = _part(name, part)
    inputs = tower.preprocess(expected['images'] if p == 'vision' else TEXTS)
    if p == 'text':  # the checkpoint's tokenizer's ids, padding as it pads
        np.testing.assert_array_equal(inputs['x'], expected[f'{name}/{p}/input_ids'])
    out = tower(inputs)
    for key in ('last_hidden_state', 'pooler_output'):
        want = expected[f'{name}/{p}/{key}']
        assert out[key].shape == want.shape, key
        np.testing.assert_allclose(np.asarray(out[key]), want, atol=1e-4, rtol=0, err_msg=f'{name} {p} {key}')


@pytest.mark.parametrize('name,part', TOWERS)
def test_tower_gives_the_outputs_of_transformers(name, part):
    with np.load(FIXTURES / 'expected.npz') as expected:
        check_against(FIXTURES, dict(expected), name, part)


@pytest.mark.slow(seconds=40)
def test_regenerated_fixtures_match(tmp_path):
    """The fixtures made afresh by transformers (another seed's weights would do as well) give the same match."""
    for module in ('torch', 'transformers'):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[towers-test]')")
    script = pathlib.Path(__file__).parents[1] / 'tools' / 'make_tower_fixtures.py'
    spec = importlib.util.spec_from_file_location('make_tower_fixtures', script)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    expected = make.make(str(tmp_path))
    for name, part in TOWERS:
        check_against(tmp_path, expected, name, part)


def test_architecture_comes_from_the_checkpoint():
    fields = {
        k: (t.module.activation, t.module.eps, t.module.norm, t.module.pooling)
        for k, t in ((n + str(p), refnet_jax.load_tower(f'hf:{FIXTURES / n}', p)) for n, p in TOWERS)
    }
    assert fields == {
        'vitNone': ('gelu', 1e-12, 'pre', 'cls_dense_tanh'),
        'bertNone': ('gelu', 1e-12, 'post', 'cls_dense_tanh'),
        'siglipvision': ('gelu_tanh', 1e-6, 'pre', 'map'),
        'sigliptext': ('gelu_tanh', 1e-6, 'pre', 'last'),
        'clipvision': ('quick_gelu', 1e-5, 'pre', 'cls_norm'),
        'cliptext': ('quick_gelu', 1e-5, 'pre', 'eos'),
    }


def test_bfloat16_shards_load(tmp_path):
    """A checkpoint in bfloat16 split into shards with an index loads the same values (as float32)."""
    shutil.copytree(FIXTURES / 'vit', tmp_path / 'vit')
    tensors = safetensors.numpy.load_file(tmp_path / 'vit' / 'model.safetensors')
    os.remove(tmp_path / 'vit' / 'model.safetensors')
    names = sorted(tensors)
    halves = {'model-00001-of-00002.safetensors': names[::2], 'model-00002-of-00002.safetensors': names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        safetensors.numpy.save_file(
            {k: tensors[k].astype(jnp.bfloat16) for k in keys}, tmp_path / 'vit' / shard
        )
        weight_map.update({k: shard for k in keys})
    (tmp_path / 'vit' / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    full = refnet_jax.load_tower(f'hf:{FIXTURES / "vit"}')
    shards = refnet_jax.load_tower(f'hf:{tmp_path / "vit"}')
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), full.variables)
    jax.tree.map(np.testing.assert_array_equal, shards.variables, rounded)
    assert jax.tree.leaves(shards.variables)[0].dtype == jnp.float32


@pytest.mark.parametrize(
    'name,part', [pytest.param('siglip', 'vision', marks=pytest.mark.slow(seconds=25)), ('bert', None)]
)
def test_scan_tower_equals_unrolled(name, part):
    """`scan=True` stacks the blocks: the same outputs, and the same gradients (stacked), as the unrolled tower."""
    unrolled = refnet_jax.load_tower(f'hf:{FIXTURES / name}', part)
    scanned = refnet_jax.load_tower(f'hf:{FIXTURES / name}', part, scan=True)
    assert scanned.variables['params']['blocks']['attn']['query']['kernel'].shape[0] == unrolled.module.depth
    with np.load(FIXTURES / 'expected.npz') as expected:
        inputs = unrolled.preprocess(expected['images'] if name != 'bert' else TEXTS)

    def loss(module):
        def f(params):
            out = module.apply({'params': params}, **inputs)
            return jnp.sum(out['last_hidden_state'] ** 2) + jnp.sum(jnp.sin(out['pooler_output']))

        return f

    a, ga = jax.jit(jax.value_and_grad(loss(unrolled.module)))(unrolled.variables['params'])
    b, gb = jax.jit(jax.value_and_grad(loss(scanned.module)))(scanned.variables['params'])
    np.testing.assert_allclose(a, b, rtol=1e-5)
    from refnet_jax.models.towers import loader

    flat_a = {'/'.join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(ga)[0]}
    flat_b = {'/'.join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(gb)[0]}
    flat_b = loader.unstack_blocks(flat_b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        scale = float(np.abs(flat_a[k]).max())  # float32 summation order differs between the two programs
        np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=0, atol=1e-5 * max(scale, 1), err_msg=k)


def test_tower_module_validates_its_fields():
    with pytest.raises(ValueError, match='Tower.pooling is'):
        Tower('image', 8, 1, 2, 16, pooling='avg', image_size=8, patch_size=4).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )


# ---- bad input: one plain line each ----


def _copy(tmp_path, name='vit'):
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name


def _error(source, part=None) -> str:
    with pytest.raises(ValueError) as info:
        refnet_jax.load_tower(source, part)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_directory_without_config(tmp_path):
    d = _copy(tmp_path)
    os.remove(d / 'config.json')
    assert 'has no config.json' in _error(f'hf:{d}')


def test_missing_tensor_is_named_with_the_architecture(tmp_path):
    d = _copy(tmp_path, 'bert')
    tensors = safetensors.numpy.load_file(d / 'model.safetensors')
    del tensors['encoder.layer.1.output.dense.weight']
    safetensors.numpy.save_file(tensors, d / 'model.safetensors')
    message = _error(f'hf:{d}')
    assert "'encoder.layer.1.output.dense.weight' is missing" in message and '(bert text)' in message


def test_shape_that_does_not_fit_gives_both_shapes(tmp_path):
    d = _copy(tmp_path)
    tensors = safetensors.numpy.load_file(d / 'model.safetensors')
    tensors['pooler.dense.weight'] = np.zeros((16, 8), np.float32)
    safetensors.numpy.save_file(tensors, d / 'model.safetensors')
    message = _error(f'hf:{d}')
    assert "'pooler.dense.weight' has shape (16, 8)" in message and 'the config says (16, 16)' in message


def test_unknown_model_type(tmp_path):
    d = _copy(tmp_path)
    config = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps({**config, 'model_type': 'deit'}))
    message = _error(f'hf:{d}')
    assert "model_type 'deit'" in message and "'siglip_vision_model'" in message


def test_part_missing_for_two_towers_or_given_for_one():
    assert "two-tower siglip checkpoint: part is None; expected 'vision' or 'text'" in _error(
        f'hf:{FIXTURES / "siglip"}'
    )
    assert "one-tower vit checkpoint (vision): part is 'text'" in _error(f'hf:{FIXTURES / "vit"}', 'text')


def test_tokenizer_larger_than_the_embedding_table(tmp_path):
    d = _copy(tmp_path, 'bert')
    config = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps({**config, 'vocab_size': 12}))
    tensors = safetensors.numpy.load_file(d / 'model.safetensors')
    tensors['embeddings.word_embeddings.weight'] = tensors['embeddings.word_embeddings.weight'][:12]
    safetensors.numpy.save_file(tensors, d / 'model.safetensors')
    assert "the tokenizer has 20 ids, more than the tower's embedding table (12 rows)" in _error(f'hf:{d}')


def test_source_of_another_kind():
    assert "expected 'hf:DIR'" in _error('model.bin')
    assert 'there is no directory' in _error('hf:/nonexistent/tower')


def test_known_model_types_are_documented():
    assert set(hf.MODEL_TYPES) == {
        'vit',
        'bert',
        'siglip',
        'siglip_vision_model',
        'siglip_text_model',
        'clip',
        'clip_vision_model',
        'clip_text_model',
    }


# ---- in ReFNet: config.model.encoders.<m>.module = 'pretrained' ----


@pytest.mark.slow(seconds=60)
def test_pretrained_towers_in_refnet_load_freeze_and_train(tmp_path):
    """A SigLIP image tower (frozen) and a BERT text tower, tokens into `mmft` with `tokens` refiner targets:
    the encoders start from the checkpoints and compute what `load_tower` computes; after 20 steps the frozen
    tower is bit-identical and the other has moved; `save_tower` writes the trained one back, bit-identical."""
    from etils import epath
    from test_model import INFO, toy_batch, toy_config

    from refnet_jax import config_lib
    from refnet_jax.train import checkpointing, pretrained, sharding, trainer

    config = toy_config('mmft', 'refnet', target='tokens')
    image = dict(module='pretrained', init_from=f'hf:{FIXTURES / "siglip"}', part='vision', pooling='tokens')
    text = dict(module='pretrained', init_from=f'hf:{FIXTURES / "bert"}', pooling='tokens')
    config_lib.set_encoders(config, {'image': image, 'question': text})
    config.train.frozen = ('encoders/image/.*',)
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    batch = toy_batch()
    with jax.set_mesh(run.mesh):
        params = pretrained.load_into(run.state.params, config)
        siglip = refnet_jax.load_tower(f'hf:{FIXTURES / "siglip"}', 'vision')
        loaded = params['encoders']['image']['tower']  # tokens: every parameter but the MAP pooling head
        assert set(siglip.variables['params']) - set(loaded) == {'probe', 'map_attn', 'map_norm', 'map_mlp'}
        want = {k: siglip.variables['params'][k] for k in loaded}
        jax.tree.map(np.testing.assert_array_equal, loaded, want)
        tokens = run.model.encoders[0][1].apply({'params': params['encoders']['image']}, batch['image'])
        want = siglip(siglip.preprocess(batch['image']))['last_hidden_state']
        np.testing.assert_allclose(tokens.tokens, want, atol=1e-5)
        state = pretrained.init_modules(run.state, config, run.tx)
        before = jax.device_get(state.params)
        for step in range(20):
            state, metrics = run.train_step(
                state, sharding.shard_batch(batch, run.mesh), jax.random.key(step)
            )
        after = jax.device_get(state.params)
        (tmp_path / 'run').mkdir()  # a workdir as train.py leaves it: its config and a checkpoint
        config_lib.check_workdir_config(config, epath.Path(tmp_path / 'run'))
        ckpt = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints')
        ckpt.save(state)
        ckpt.close()
    assert np.isfinite(metrics['loss'])
    jax.tree.map(np.testing.assert_array_equal, after['encoders']['image'], before['encoders']['image'])
    moved = jax.tree.map(
        lambda a, b: not np.allclose(a, b), after['encoders']['question'], before['encoders']['question']
    )
    assert any(jax.tree.leaves(moved))
    # back out: the trained text tower of the workdir as a Hugging Face directory, loaded back bit-identical
    refnet_jax.save_tower(str(tmp_path / 'run'), str(tmp_path / 'bert'), modality='question')
    again = refnet_jax.load_tower(f'hf:{tmp_path / "bert"}')
    trained = after['encoders']['question']['tower']
    jax.tree.map(np.testing.assert_array_equal, {k: again.variables['params'][k] for k in trained}, trained)
    if importlib.util.find_spec('transformers') is not None:  # and transformers computes what we compute
        import torch
        import transformers

        model = transformers.BertModel.from_pretrained(str(tmp_path / 'bert')).eval()
        inputs = again.preprocess(TEXTS)
        with torch.no_grad():
            theirs = model(
                input_ids=torch.from_numpy(inputs['x']).long(),
                attention_mask=torch.from_numpy(inputs['mask']).long(),
            )
        np.testing.assert_allclose(
            theirs.last_hidden_state.numpy(), again(inputs)['last_hidden_state'], atol=1e-4
        )


def test_pretrained_encoder_needs_its_source():
    from test_model import INFO, toy_config

    from refnet_jax import config_lib
    from refnet_jax.models import model as model_lib

    config = toy_config('concat', 'baseline')
    config_lib.set_encoders(
        config, {'image': dict(module='pretrained'), 'question': dict(config.model.encoders.question)}
    )
    with pytest.raises(ValueError, match=r"PretrainedTower needs field\(s\) \['init_from'\]"):
        model_lib.create_model(config, INFO)


# ---- back out: save_tower ----


def _perturbed(tower, seed=0):
    """`tower` with every parameter moved (as training would), so a round trip shows it keeps what changed."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(tower.variables)
    moved = [x + rng.normal(0, 0.05, x.shape).astype(np.float32) for x in map(np.asarray, leaves)]
    return dataclasses.replace(tower, variables=jax.tree.unflatten(tree, moved))


@pytest.mark.parametrize('name,part', TOWERS)
def test_save_tower_round_trip_is_bit_identical(tmp_path, name, part):
    tower = _perturbed(refnet_jax.load_tower(f'hf:{FIXTURES / name}', part))
    refnet_jax.save_tower(tower, str(tmp_path / 'out'))
    again = refnet_jax.load_tower(f'hf:{tmp_path / "out"}')  # one tower now: no part
    jax.tree.map(np.testing.assert_array_equal, again.variables, tower.variables)
    assert again.module == tower.module.clone()
    assert again.preprocess.__dict__.keys() == tower.preprocess.__dict__.keys()


@pytest.mark.slow(seconds=30)
def test_save_tower_loads_in_transformers_with_our_outputs(tmp_path):
    for module in ('torch', 'transformers'):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[towers-test]')")
    import torch
    import transformers

    classes = {
        'vit': transformers.ViTModel,
        'bert': transformers.BertModel,
        'siglip/vision': transformers.SiglipVisionModel,
        'siglip/text': transformers.SiglipTextModel,
        'clip/vision': transformers.CLIPVisionModel,
        'clip/text': transformers.CLIPTextModel,
    }
    with np.load(FIXTURES / 'expected.npz') as expected:
        images = expected['images']
    for name, part in TOWERS:
        tower = _perturbed(refnet_jax.load_tower(f'hf:{FIXTURES / name}', part), seed=1)
        out = str(tmp_path / f'{name}-{part}')
        refnet_jax.save_tower(tower, out)
        model = classes[name if part is None else f'{name}/{part}'].from_pretrained(out).eval()
        inputs = tower.preprocess(images if _part(name, part) == 'vision' else TEXTS)
        if _part(name, part) == 'vision':
            theirs = {'pixel_values': torch.from_numpy(inputs['x'].transpose(0, 3, 1, 2).copy())}
        else:
            theirs = transformers.AutoTokenizer.from_pretrained(out)(
                TEXTS,
                padding='max_length' if name == 'siglip' else True,
                truncation=True,
                return_tensors='pt',
            )
            np.testing.assert_array_equal(theirs['input_ids'].numpy(), inputs['x'])
        with torch.no_grad():
            got = model(**theirs)
        ours = tower(inputs)
        for key in ('last_hidden_state', 'pooler_output'):
            np.testing.assert_allclose(
                getattr(got, key).numpy(), ours[key], atol=1e-4, rtol=0, err_msg=f'{name} {part} {key}'
            )


def test_another_image_size_resamples_the_position_embeddings():
    """A CLIP image tower (class token) in a model of 8x8 images: the class token's position embedding is kept,
    the 4x4 grid's resampled to 2x2."""
    from test_model import INFO, toy_batch, toy_config

    from refnet_jax import config_lib
    from refnet_jax.models import model as model_lib
    from refnet_jax.train import pretrained

    config = toy_config('concat', 'baseline')
    image = dict(module='pretrained', init_from=f'hf:{FIXTURES / "clip"}', part='vision')
    config_lib.set_encoders(config, {'image': image, 'question': dict(config.model.encoders.question)})
    batch = dict(toy_batch(), image=toy_batch()['image'][:, :8, :8])
    params = jax.jit(model_lib.create_model(config, INFO).init)(jax.random.key(0), batch)['params']
    loaded = pretrained.load_into(params, config)['encoders']['image']['tower']['pos_embedding']
    clip = np.asarray(
        refnet_jax.load_tower(f'hf:{FIXTURES / "clip"}', 'vision').variables['params']['pos_embedding']
    )
    assert loaded.shape == (1, 5, 16) and clip.shape == (1, 17, 16)
    np.testing.assert_array_equal(loaded[:, 0], clip[:, 0])
    np.testing.assert_allclose(loaded[:, 1:], pretrained.resample_posemb(clip[:, 1:], 4), rtol=1e-6)


def test_a_modality_vocabulary_larger_than_the_tower_is_refused():
    from test_model import INFO, toy_batch, toy_config

    from refnet_jax import config_lib
    from refnet_jax.models import model as model_lib

    config = toy_config('concat', 'baseline')
    text = dict(
        module='pretrained', init_from=f'hf:{FIXTURES / "siglip"}', part='text'
    )  # 40 ids; the toy's 11
    config_lib.set_encoders(config, {'image': dict(config.model.encoders.image), 'question': text})
    jax.eval_shape(model_lib.create_model(config, INFO).init, jax.random.key(0), toy_batch())  # fits
    bert = dict(text, init_from=f'hf:{FIXTURES / "bert"}', part=None)
    config_lib.set_encoders(config, {'image': dict(config.model.encoders.image), 'question': bert})
    small = dataclasses.replace(
        INFO,
        modalities={
            **INFO.modalities,
            'question': dataclasses.replace(INFO.modalities['question'], vocab_size=64),
        },
    )
    with pytest.raises(
        ValueError, match=r"tokenizer has 64 ids, more than the tower's embedding table \(20 rows\)"
    ):
        jax.eval_shape(model_lib.create_model(config, small).init, jax.random.key(0), toy_batch())


# ---- big_vision .npz ----

# as tools/make_tower_fixtures.py writes them: ViTs, and SigLIP text towers (per block and stacked)
BIG_VISION = [('gap', ''), ('tok', ':img'), ('map_scan', ''), ('text', ':txt'), ('text_scan', ':txt')]


def check_big_vision(directory: pathlib.Path, expected, images, name: str, sub: str, scan: bool) -> None:
    tower = refnet_jax.load_tower(f'{directory / "big_vision" / name}.npz{sub}', scan=scan)
    out = tower({'x': expected['text/ids']} if name.startswith('text') else tower.preprocess(images))
    np.testing.assert_allclose(out['last_hidden_state'], expected[f'{name}/encoded'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out['pooler_output'], expected[f'{name}/head_input'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scan'])
@pytest.mark.parametrize('name,sub', BIG_VISION)
def test_big_vision_npz_gives_the_outputs_of_big_vision(name, sub, scan):
    """Per-block and stacked (`Transformer/encoderblock`) files, gap/tok/map pooling, and the SigLIP text tower,
    into an unrolled or a scanned tower: big_vision's own `encoded` / `transformed` and `head_input` /
    `pre_logits` (tools/make_tower_fixtures.py --big_vision)."""
    with (
        np.load(FIXTURES / 'big_vision' / 'expected.npz') as expected,
        np.load(FIXTURES / 'expected.npz') as e,
    ):
        check_big_vision(FIXTURES, dict(expected), e['images'], name, sub, scan)


def test_big_vision_fixture_layouts():
    with np.load(FIXTURES / 'big_vision' / 'map_scan.npz') as f:
        assert f['params/Transformer/encoderblock/LayerNorm_0/scale'].shape == (2, 16)  # stacked: (depth, D)
    with np.load(FIXTURES / 'big_vision' / 'tok.npz') as f:
        assert 'params/img/Transformer/encoderblock_1/LayerNorm_0/scale' in f.files
    poolings = {
        n: refnet_jax.load_tower(f'{FIXTURES / "big_vision" / n}.npz{s}').module.pooling
        for n, s in BIG_VISION
    }
    assert poolings == {'gap': 'gap', 'tok': 'cls', 'map_scan': 'map', 'text': 'last', 'text_scan': 'last'}
    text = refnet_jax.load_tower(f'{FIXTURES / "big_vision" / "text.npz"}:txt')
    with pytest.raises(ValueError, match='carries no tokenizer'):
        text.preprocess(['a photo'])


@pytest.mark.slow(seconds=20)
def test_big_vision_fixtures_regenerated(tmp_path):
    repo = os.environ.get('BIG_VISION_REPO')
    if not repo:
        pytest.skip('BIG_VISION_REPO is not set (a checkout of github.com/google-research/big_vision)')
    spec = importlib.util.spec_from_file_location(
        'make_tower_fixtures', pathlib.Path(__file__).parents[1] / 'tools' / 'make_tower_fixtures.py'
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    expected = make.make_big_vision(str(FIXTURES.parent / 'towers_regenerated'), repo)
    try:
        for name, sub in BIG_VISION:
            check_big_vision(
                FIXTURES.parent / 'towers_regenerated', expected, make.images(), name, sub, False
            )
    finally:
        shutil.rmtree(FIXTURES.parent / 'towers_regenerated')


def test_big_vision_bad_inputs(tmp_path):
    assert 'there is no file' in _error(str(tmp_path / 'none.npz'))
    assert "no subtree 'txt'" in _error(f'{FIXTURES / "big_vision" / "tok.npz"}:txt')
    assert 'takes its tower as PATH.npz:sub/tree' in _error(
        f'{FIXTURES / "big_vision" / "gap.npz"}', 'vision'
    )
    with np.load(FIXTURES / 'big_vision' / 'gap.npz') as f:
        arrays = dict(f)
    del arrays['params/Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel']
    np.savez(tmp_path / 'broken.npz', **arrays)
    assert "'Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel' is missing" in _error(
        str(tmp_path / 'broken.npz')
    )


@pytest.mark.parametrize('name,sub', BIG_VISION)
def test_save_tower_npz_round_trip_is_bit_identical(tmp_path, name, sub):
    tower = _perturbed(refnet_jax.load_tower(f'{FIXTURES / "big_vision" / name}.npz{sub}', scan=True))
    refnet_jax.save_tower(tower, str(tmp_path / 'out.npz'))
    again = refnet_jax.load_tower(str(tmp_path / 'out.npz'), scan=True)
    jax.tree.map(np.testing.assert_array_equal, again.variables, tower.variables)
    assert again.module == tower.module.clone()
    with np.load(tmp_path / 'out.npz') as f:  # per block, under params/, as big_vision writes
        assert any(k.startswith('params/') and '/encoderblock_1/' in k for k in f.files)


@pytest.mark.parametrize('part', ['vision', 'text'])
def test_a_siglip_tower_saved_as_big_vision_npz_computes_the_same(tmp_path, part):
    """A Hugging Face SigLIP tower written as a big_vision file (the reverse of big_vision#107) gives the same
    outputs loaded from it (text: unmasked, as big_vision computes)."""
    tower = _perturbed(refnet_jax.load_tower(f'hf:{FIXTURES / "siglip"}', part))
    refnet_jax.save_tower(tower, str(tmp_path / 'siglip.npz'))
    again = refnet_jax.load_tower(str(tmp_path / 'siglip.npz'))
    with np.load(FIXTURES / 'expected.npz') as expected:
        inputs = (
            tower.preprocess(expected['images']) if part == 'vision' else {'x': tower.preprocess(TEXTS)['x']}
        )
    ours, theirs = again(inputs), tower(inputs)
    np.testing.assert_allclose(ours['last_hidden_state'], theirs['last_hidden_state'], atol=1e-5, rtol=0)
    pooled = ours['pooler_output']
    if (
        part == 'text'
    ):  # big_vision's pre_logits come before its `head`, which SigLIP's pooler_output includes
        with np.load(tmp_path / 'siglip.npz') as f:
            pooled = pooled @ f['params/head/kernel'] + f['params/head/bias']
    np.testing.assert_allclose(pooled, theirs['pooler_output'], atol=1e-5, rtol=0)


def test_a_tower_big_vision_does_not_compute_is_not_saved_as_npz(tmp_path):
    tower = refnet_jax.load_tower(f'hf:{FIXTURES / "bert"}')
    with pytest.raises(
        ValueError, match=r"save_tower: bert/text is not a big_vision transformer \(\{'activation'"
    ):
        refnet_jax.save_tower(tower, str(tmp_path / 'bert.npz'))


def test_a_scanned_pretrained_encoder_loads_the_stacked_blocks():
    from test_model import INFO, toy_batch, toy_config

    from refnet_jax import config_lib
    from refnet_jax.models import model as model_lib
    from refnet_jax.models.towers import loader
    from refnet_jax.train import pretrained

    config = toy_config('concat', 'baseline')
    image = dict(module='pretrained', init_from=f'hf:{FIXTURES / "vit"}', scan=True)
    config_lib.set_encoders(config, {'image': image, 'question': dict(config.model.encoders.question)})
    model = model_lib.create_model(config, INFO)
    params = jax.jit(model.init)(jax.random.key(0), toy_batch())['params']
    loaded = pretrained.load_into(params, config)['encoders']['image']['tower']
    vit = refnet_jax.load_tower(f'hf:{FIXTURES / "vit"}', scan=True)
    jax.tree.map(np.testing.assert_array_equal, loaded, vit.variables['params'])
    assert loaded['blocks']['mlp']['fc1']['kernel'].shape == (2, 16, 32)
    assert loader.stack_blocks({'block_0/a': np.zeros(1), 'block_1/a': np.ones(1)}, 2)['blocks/a'].shape == (
        2,
        1,
    )


# ---- own text tokenized by a tower's tokenizer: config.data.tokenizer.<m> = 'hf:DIR' ----


@pytest.fixture(scope='module')
def captions(tmp_path_factory):
    """A table of 30 captions, the fixtures' three texts in turn, in two classes."""
    import csv

    root = tmp_path_factory.mktemp('captions')
    with open(root / 'captions.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['caption', 'label'])
        writer.writeheader()
        writer.writerows({'caption': TEXTS[i % 3], 'label': f'class {i % 2}'} for i in range(30))
    return root


def _caption_config(captions, data_dir, source, max_tokens=None):
    from helpers import custom_config

    config = custom_config(
        captions, data_dir, 'kinds=caption:text,tiny', table='captions.csv', tokenizer={'caption': source}
    )
    config.data.max_tokens.caption = max_tokens
    return config


@pytest.mark.parametrize('name', ['bert', 'clip', 'siglip'])
def test_own_text_is_tokenized_as_the_towers_tokenizer_does(captions, tmp_path, name):
    """Every stored text holds the ids that transformers' tokenizer of the directory gives it (the fixtures'),
    padded as the tower pads: CLIP's EOS, which is also its padding token, stays a real token; SigLIP's texts
    are padded to model_max_length without being asked."""
    from helpers import stored_records

    from refnet_jax.data import input_pipeline

    with np.load(FIXTURES / 'expected.npz') as expected:
        want = expected[f'{name}/text/input_ids']
    max_tokens = None if name == 'siglip' else want.shape[1]  # SigLIP's: model_max_length, unasked
    config = _caption_config(captions, tmp_path / 'tfds', f'hf:{FIXTURES / name}', max_tokens)
    info = input_pipeline.get_dataset_info(config.data)
    tower = refnet_jax.load_tower(f'hf:{FIXTURES / name}', 'text' if name != 'bert' else None)
    assert info.modalities['caption'].shape == want.shape[1:]
    assert info.modalities['caption'].pad_id == tower.tokenizer.pad_id
    for split in stored_records(config.data).values():
        np.testing.assert_array_equal(split['caption'], want[split['row'] % 3])
        lengths = (want != tower.tokenizer.pad_id).sum(1) + (tower.tokenizer.eos_id == tower.tokenizer.pad_id)
        np.testing.assert_array_equal(split['caption_mask'].sum(1), lengths[split['row'] % 3])


def test_a_towers_tokenizer_refuses_what_the_tower_cannot_take(captions, tmp_path):
    """Each one line, before anything is prepared."""
    from refnet_jax.data import input_pipeline

    cases = [
        (
            f'hf:{FIXTURES / "siglip"}',
            8,
            'pads every text to its model_max_length 10, as its tower was trained',
        ),
        (f'hf:{FIXTURES / "bert"}', 13, "more than the tower's 12 positions (model_max_length)"),
        (
            f'hf:{FIXTURES / "vit"}',
            None,
            'the directory has no tokenizer file tokenizer.json; expected tokenizer.json (BERT, CLIP)',
        ),
        (f'hf:{tmp_path / "nowhere"}', None, 'there is no directory'),
    ]
    for source, max_tokens, message in cases:
        config = _caption_config(captions, tmp_path / 'tfds', source, max_tokens=max_tokens)
        with pytest.raises(ValueError) as e:
            input_pipeline.get_dataset_info(config.data)
        assert message in str(e.value) and '\n' not in str(e.value)
        assert 'config.data.' in str(e.value)
    assert not (tmp_path / 'tfds').exists()


@pytest.mark.slow(seconds=70)
def test_towers_page_example_runs_as_written(tmp_path, monkeypatch):
    """docs/how-to/towers-from-hugging-face.md: tiny SigLIP and BERT directories written by the tool, the
    catalogue of own-data.md, `mmft` on the towers' tokens with the image tower frozen; it learns the task, the
    captions hold the BERT tokenizer's ids, and the frozen tower ends as the checkpoint's parameters."""
    from helpers import doc_blocks, run_readme_bash, stored_records

    catalogue = doc_blocks('how-to/own-data.md', 'own-data-image-text')[0]
    blocks = doc_blocks('how-to/towers-from-hugging-face.md', 'towers-in-refnet')
    assert [lang for lang, _ in blocks] == ['bash', 'python'] and catalogue[0] == 'python'
    (tmp_path / 'catalogue.py').write_text(catalogue[1])
    (tmp_path / 'example.py').write_text(blocks[1][1])
    code = f'python catalogue.py\n{blocks[0][1]}\npython example.py'
    run_readme_bash(code, tmp_path, tfds_dir=tmp_path / 'tensorflow_datasets', timeout=600)
    workdir = tmp_path / 'runs' / 'my_catalogue_towers'
    results = json.loads((workdir / 'results.json').read_text())
    assert results['test']['accuracy'] >= 0.95, results['test']

    from refnet_jax.train import inference

    monkeypatch.chdir(tmp_path)  # the example's relative paths, and its prepared data
    monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tensorflow_datasets'))
    run = inference.load_run(str(workdir))
    siglip = refnet_jax.load_tower(f'hf:{tmp_path / "towers" / "siglip"}', 'vision')
    frozen = run.params['encoders']['photo']['tower']
    jax.tree.map(np.testing.assert_array_equal, frozen, {k: siglip.variables['params'][k] for k in frozen})
    bert = refnet_jax.load_tower(f'hf:{tmp_path / "towers" / "bert"}')
    stored = stored_records(run.config.data)['test']
    with open(tmp_path / 'my_catalogue' / 'items.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    want = bert.preprocess([rows[r]['caption'] for r in stored['row']])['x']
    np.testing.assert_array_equal(stored['caption'][:, : want.shape[1]], want)


# ---- towers initialized here (save_initialized, tools/make_tiny_towers.py) ----

# Tensors of the two-tower classes that are not part of either tower (their contrastive heads).
HEADS = {'logit_scale', 'logit_bias', 'text_projection.weight', 'visual_projection.weight'}


@pytest.mark.parametrize('name', ['vit', 'bert', 'siglip', 'clip'])
def test_save_initialized_writes_the_tensors_transformers_writes(tmp_path, name):
    """For each fixture's config.json, the names and shapes of the tensors that transformers' save_pretrained
    wrote (but the two-tower contrastive heads), and a directory load_tower reads."""
    from refnet_jax.models.towers import export

    config = json.loads((FIXTURES / name / 'config.json').read_text())
    export.save_initialized(config, str(tmp_path / name), seed=3)
    ours = safetensors.numpy.load_file(str(tmp_path / name / 'model.safetensors'))
    theirs = safetensors.numpy.load_file(str(FIXTURES / name / 'model.safetensors'))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items() if k not in HEADS}
    for file in export.FILES:  # the tokenizer a text tower needs
        if (FIXTURES / name / file).is_file():
            shutil.copyfile(FIXTURES / name / file, tmp_path / name / file)
    for part in ('vision', 'text') if name in ('siglip', 'clip') else (None,):
        refnet_jax.load_tower(f'hf:{tmp_path / name}', part)


def _tool(name: str):
    script = pathlib.Path(__file__).parents[1] / 'tools' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_towers_tool_writes_towers_transformers_runs(tmp_path):
    """The tool's SigLIP and BERT directories load here; where transformers is installed, it loads them too,
    its tokenizers give the ids `preprocess` gives, and its models our outputs to 1e-4."""
    make = _tool('make_tiny_towers')
    siglip, bert = make.siglip(str(tmp_path), 32, 0), make.bert(str(tmp_path), 10)
    texts = ['A lovely ceramic mug, item #12', 'hello there, Tea!']
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    towers = {
        'vision': refnet_jax.load_tower(f'hf:{siglip}', 'vision'),
        'text': refnet_jax.load_tower(f'hf:{siglip}', 'text'),
        'bert': refnet_jax.load_tower(f'hf:{bert}'),
    }
    inputs = {k: t.preprocess(images if k == 'vision' else texts) for k, t in towers.items()}
    assert inputs['text']['x'].shape == (2, 16)  # SigLIP: padded to model_max_length
    assert (inputs['bert']['x'][:, 0] == 2).all()  # [CLS]
    if importlib.util.find_spec('transformers') is None:
        return
    import torch
    import transformers

    both = transformers.SiglipModel.from_pretrained(siglip).eval()
    models = {
        'vision': both.vision_model,
        'text': both.text_model,
        'bert': transformers.BertModel.from_pretrained(bert).eval(),
    }
    for k, model in models.items():
        if k == 'vision':
            x = torch.from_numpy(inputs[k]['x'].transpose(0, 3, 1, 2).copy())
            args = {'pixel_values': x}
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(siglip if k == 'text' else bert)
            padding = 'max_length' if k == 'text' else True
            args = tokenizer(texts, padding=padding, truncation=True, return_tensors='pt')
            np.testing.assert_array_equal(args['input_ids'].numpy(), inputs[k]['x'])
        with torch.no_grad():
            theirs = model(**args)
        ours = towers[k](inputs[k])
        for key in ('last_hidden_state', 'pooler_output'):
            np.testing.assert_allclose(
                ours[key], getattr(theirs, key).numpy(), atol=1e-4, err_msg=f'{k} {key}'
            )
