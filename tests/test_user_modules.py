"""The user's own encoder and fusion module, named in the config as FILE.py:Class or package.module:Class."""

import json
import os
import re
import textwrap

import jax
import numpy as np
import pytest
from helpers import doc_blocks, run_readme_bash
from test_model import INFO, toy_batch, toy_config

from refnet_jax.data import contract
from refnet_jax.models import encoders, modules
from refnet_jax.models import model as model_lib
from refnet_jax.train import sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks between the own-modules markers of docs/how-to/own-modules.md."""
    return doc_blocks('how-to/own-modules.md', 'own-modules')


@pytest.fixture
def my_modules(tmp_path):
    """The README's my_modules.py, written into tmp_path."""
    (lang, code), *_ = readme_blocks()
    assert lang == 'python' and code.startswith('# my_modules.py')
    path = tmp_path / 'my_modules.py'
    path.write_text(code)
    return path


def with_user_modules(path, config=None):
    config = toy_config('lowrank') if config is None else config
    config.model.encoders.question.module = f'{path}:MyEncoder'
    config.model.fusion.kind = f'{path}:MyFusion'
    return config


@pytest.mark.slow(seconds=5)
def test_user_encoder_and_fusion_train_a_step(my_modules):
    config = with_user_modules(my_modules)
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    params = run.state.params
    assert type(run.model.fusion).__name__ == 'MyFusion'
    assert dict(run.model.encoders)['question'].__class__.__name__ == 'MyEncoder'
    # The README's fields: MyFusion keeps fused_dim (16 in the tiny config), and the lowrank default
    # `rank` it does not take is left out.
    assert run.model.fusion.fused_dim == 16
    before = jax.device_get(params)
    with jax.set_mesh(run.mesh):
        state = run.state
        for i in range(2):
            state, metrics = run.train_step(
                state, sharding.shard_batch(toy_batch(), run.mesh), jax.random.key(i)
            )
    after = jax.device_get(state.params)
    assert np.isfinite(float(metrics['loss']))
    for part in (before['fusion'], before['encoders']['question']):
        assert jax.tree.leaves(part)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before['fusion'], after['fusion'])
    assert any(jax.tree.leaves(moved))


def test_package_module_class_names_a_module():
    config = toy_config()
    config.model.encoders.image.module = 'refnet_jax.models.encoders:ImageCNN'
    model = model_lib.create_model(config, INFO)
    assert isinstance(dict(model.encoders)['image'], encoders.ImageCNN)


@pytest.mark.parametrize(
    'spec,message',
    [
        ('{dir}/my_modulez.py:MyEncoder', "names the file '{dir}/my_modulez.py', which does not exist"),
        (
            '{dir}/my_modules.py:MyEncodr',
            "has no 'MyEncodr'; its Linen modules are ['MyEncoder', 'MyFusion']",
        ),
        ('refnet_jax.encoderz:ImageCNN', "no module 'refnet_jax.encoderz' can be imported"),
        ('refnet_jax.models.encoders:POOLINGS', 'which is a tuple, not a flax.linen.Module class'),
        (
            'MyEncoder',
            "expected one of ['bow', 'cnn', 'conv1d', 'mlp', 'pretrained', 'text_transformer', 'vit']",
        ),
    ],
)
def test_a_misspelt_module_is_named_before_training(my_modules, spec, message):
    config = toy_config()
    config.model.encoders.question.module = spec.format(dir=my_modules.parent)
    with pytest.raises(ValueError, match=re.escape('config.model.encoders.question.module ')) as e:
        model_lib.create_model(config, INFO)
    assert message.format(dir=my_modules.parent) in str(e.value)


def test_a_field_the_user_module_lacks_is_an_error_unless_it_is_a_builtin_default(my_modules):
    config = with_user_modules(my_modules)
    config.model.fusion.rank = 8  # not lowrank's default: the user chose it, MyFusion does not take it
    with pytest.raises(
        ValueError, match=re.escape("config.model.fusion has field(s) ['rank'] that MyFusion")
    ):
        model_lib.create_model(config, INFO)


def test_modules_instantiate_fills_data_fields_and_names_missing_ones():
    enc = modules.instantiate(encoders.TokenEncoder, {'embed_dim': 4}, 'f', vocab_size=7)
    assert enc.vocab_size == 7
    with pytest.raises(ValueError, match=re.escape("f: TokenEncoder needs field(s) ['vocab_size']")):
        modules.instantiate(encoders.TokenEncoder, {'embed_dim': 4}, 'f')
    assert modules.module_fields(encoders.TokenEncoder) == {
        'embed_dim': 128,
        'use_positions': True,
        'pad_id': 0,
    }
    assert contract.KINDS['tokens'].encoder in encoders.ENCODERS


@pytest.mark.slow(seconds=110)
def test_readme_example_runs_as_written(tmp_path, easy_vqa_dir):
    """The README's my_modules.py and its command, from a scratch directory, on the prepared easy-VQA."""
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ['python', 'bash']
    (tmp_path / 'my_modules.py').write_text(blocks[0][1])
    code = blocks[1][1]
    run_readme_bash(code, tmp_path, tfds_dir=easy_vqa_dir)
    workdir = re.search(r'--workdir (\S+)', code).group(1)
    results = json.loads((tmp_path / workdir / 'results.json').read_text())
    saved = json.loads((tmp_path / workdir / 'config.json').read_text())
    assert saved['model']['fusion']['kind'] == 'my_modules.py:MyFusion'
    assert results['test']['accuracy'] >= 0.99, results['test']


def test_readme_example_is_what_the_fast_test_runs():
    """The fast tests above use the README's module file; its command names exactly these two classes."""
    blocks = readme_blocks()
    command = blocks[1][1]
    assert '--config.model.encoders.question.module=my_modules.py:MyEncoder' in command
    assert '--config.model.fusion.kind=my_modules.py:MyFusion' in command
    textwrap.dedent(blocks[0][1])  # a complete file


USER_FUSIONS = '''
import flax.linen as nn
import jax.numpy as jnp

from refnet_jax import FusionOutput
from refnet_jax.models import layers


class TokenStats(nn.Module):
    """Takes Tokens and reports stats: FusionOutput(z, readouts, stats)."""

    inputs = 'tokens'
    fused_dim: int = 16

    @nn.compact
    def __call__(self, inputs, *, train=False):
        assert all(isinstance(t, layers.Tokens) for t in inputs.values()), inputs
        readouts = {m: nn.Dense(self.fused_dim, name=f'proj_{m}')(layers.pooled(t)) for m, t in inputs.items()}
        z = sum(readouts[m] for m in sorted(readouts))
        seen = jnp.mean(jnp.asarray([t.mask.sum(1).mean() for t in inputs.values()]))
        return FusionOutput(z, readouts, {'tokens_seen': seen})


class FeedbackStats(nn.Module):
    """Takes encode= (so it gets it) and reports stats: FusionOutput(z, stats=...)."""

    fused_dim: int = 16

    @nn.compact
    def __call__(self, embeddings, *, encode, train=False):
        z = nn.Dense(self.fused_dim, name='first')(jnp.concatenate([embeddings[m] for m in sorted(embeddings)], -1))
        again = encode(z)
        z2 = nn.Dense(self.fused_dim, name='second')(jnp.concatenate([again[m] for m in sorted(again)], -1))
        return FusionOutput(z2, stats={'change': jnp.mean(jnp.abs(z2 - z))})


class OldFlags(nn.Module):
    """The contract before FusionOutput: a class flag that changed the tuple returned."""

    TOKEN_LEVEL = True
    fused_dim: int = 16

    @nn.compact
    def __call__(self, inputs, *, train=False):
        return nn.Dense(self.fused_dim)(jnp.concatenate([layers.pooled(t) for t in inputs.values()], -1)), {}


class ReturnsATuple(nn.Module):
    """Returns (z, stats) without saying which is which."""

    fused_dim: int = 16

    @nn.compact
    def __call__(self, embeddings, *, train=False):
        return nn.Dense(self.fused_dim)(jnp.concatenate(list(embeddings.values()), -1)), {}
'''


def build_with_fusion(tmp_path, fusion_class, target='embedding'):
    path = tmp_path / 'user_fusions.py'
    path.write_text(USER_FUSIONS)
    config = toy_config('lowrank', target=target)  # its tiny fields are the user fusions': fused_dim only
    config.model.fusion.kind = f'{path}:{fusion_class}'
    config.model.encoders.question.module = 'bow'
    return config


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize(
    'fusion_class, target, stat',
    [('TokenStats', 'tokens', 'tokens_seen'), ('FeedbackStats', 'embedding', 'change')],
)
def test_what_a_fusion_takes_and_returns_combine_freely(tmp_path, fusion_class, target, stat):
    """`inputs = 'tokens'`, the `encode` keyword and `FusionOutput`'s readouts and stats are independent: a
    token fusion that reports stats (its readouts the `tokens` targets), and a feedback one that does, train a
    step with their stats in the metrics; a token fusion gets Tokens for a pooled encoder's output too (`bow`:
    one token)."""
    run = trainer.build(
        build_with_fusion(tmp_path, fusion_class, target), info=INFO, devices=jax.devices()[:1]
    )
    with jax.set_mesh(run.mesh):
        state, metrics = run.train_step(
            run.state, sharding.shard_batch(toy_batch(), run.mesh), jax.random.key(0)
        )
    assert np.isfinite(float(metrics['loss']))
    assert np.isfinite(float(metrics[f'fusion/{stat}']))
    if target == 'tokens':
        _, aux = run.model.apply({'params': jax.device_get(state.params)}, toy_batch())
        readouts = {m: np.asarray(aux['targets'][m]) for m in ('image', 'question')}
        assert all(r.shape == (8, 16) for r in readouts.values())


def test_a_fusion_with_the_old_class_flags_or_a_tuple_is_refused_by_name(tmp_path):
    config = build_with_fusion(tmp_path, 'OldFlags')
    with pytest.raises(
        ValueError, match=re.escape("config.model.fusion.kind: OldFlags sets ['TOKEN_LEVEL']")
    ):
        model_lib.create_model(config, INFO)
    model = model_lib.create_model(build_with_fusion(tmp_path, 'ReturnsATuple'), INFO)
    with pytest.raises(ValueError, match=r'ReturnsATuple returned a tuple; expected a FusionOutput'):
        jax.eval_shape(model.init, jax.random.key(0), toy_batch())
