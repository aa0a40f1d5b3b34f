"""The model: every fusion module builds and trains a step; the refiner is real and trained; shapes."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import easy_vqa
from refnet_jax import config_lib
from refnet_jax.data import contract
from refnet_jax.models import fusions, refiner
from refnet_jax.models import model as model_lib
from refnet_jax.train import sharding, trainer

MODALITIES = {
    'image': contract.ModalityInfo(kind='image', shape=(16, 16, 3), dtype=np.uint8, shared=True),
    'question': contract.ModalityInfo(kind='tokens', shape=(6,), dtype=np.int32, vocab_size=11),
}
INFO = contract.DatasetInfo(
    name='toy',
    modalities=MODALITIES,
    num_classes=5,
    multi_label=False,
    class_names=tuple('abcde'),
    num_examples={'train': 8},
)


def toy_batch(rows=4, per_row=2, seed=0):
    rs = np.random.RandomState(seed)
    n = rows * per_row
    return {
        'image': rs.randint(0, 256, (rows, 16, 16, 3)).astype(np.uint8),
        'image_index': np.repeat(np.arange(rows), per_row).astype(np.int32),
        'question': rs.randint(0, 11, (n, 6)).astype(np.int32),
        'label': rs.randint(0, 5, (n,)).astype(np.int32),
    }


def toy_config(fusion='concat', variant='refnet', target='embedding'):
    config = easy_vqa.get_config(f'tiny,fusion={fusion},variant={variant}')
    config.model.refiner.target = target
    return config


def one_step(config, batch, with_grads=False):
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    model, mesh, state = run.model, run.mesh, run.state
    with jax.set_mesh(mesh):
        params0 = jax.device_get(state.params)

        def loss(params):
            logits, aux = model.apply(
                {'params': params}, batch, train=True, rngs={'dropout': jax.random.key(1)}
            )
            return run.objective.loss(logits, aux, batch)[0]

        grads = jax.jit(jax.grad(loss))(state.params) if with_grads else None
        for _ in range(2):  # the warm-up's first learning rate is 0
            state, metrics = run.train_step(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
    return model, params0, grads, jax.device_get(state.params), jax.device_get(metrics)


def check_one_step(fusion, variant, target='embedding'):
    config = toy_config(fusion, variant, target)
    model, params0, _, params1, metrics = one_step(config, toy_batch())
    assert np.isfinite(metrics['loss'])
    assert ('refiner' in params0) == (variant != 'baseline')
    assert ('ms_loss' in metrics) == (variant == 'refnet')
    if fusion == 'deq':  # how the solver went, in the training metrics
        assert {'fusion/deq_iterations', 'fusion/deq_residual'} <= set(metrics)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), params0['fusion'], params1['fusion'])
    assert any(jax.tree.leaves(changed))
    logits, aux = jax.eval_shape(model.apply, {'params': params1}, toy_batch())
    assert logits.shape == (8, 5) and aux['fused'].shape[0] == 8


# Every fusion with every loss term on (refnet: the refiner and the MS loss) and with the `input` targets of
# pre-training; the variants that switch terms off with one fusion. Every fusion and variant also builds for
# every config file in the default run (tests/test_configs.py).
CASES = [(f, v) for f in sorted(fusions.FUSIONS) for v in ('refnet', 'pretrain')]
CASES += [('concat', v) for v in config_lib.VARIANTS if v not in ('refnet', 'pretrain')]


@pytest.mark.slow
@pytest.mark.parametrize('fusion,variant', CASES, ids=[f'{f}-{v}' for f, v in CASES])
def test_fusion_and_variant_trains_a_step(fusion, variant):
    check_one_step(fusion, variant)


@pytest.mark.slow
@pytest.mark.parametrize(
    'fusion', sorted(f for f, c in fusions.FUSIONS.items() if fusions.input_kind(c) == 'tokens')
)
def test_token_fusion_trains_a_step_with_tokens_targets(fusion):
    """The author's scheme on every token-level fusion: `tokens` targets, the MS loss on top."""
    check_one_step(fusion, 'refnet', target='tokens')


@pytest.mark.parametrize(
    'target', [t if t == 'embedding' else pytest.param(t, marks=pytest.mark.slow) for t in refiner.TARGETS]
)
def test_refiner_parameters_get_gradients_and_change(target):
    config = toy_config(fusion='mmft' if target == 'tokens' else 'concat', target=target)
    _, params0, grads, params1, _ = one_step(config, toy_batch(), with_grads=True)
    for m in MODALITIES:
        assert m in params0['refiner'], f'no parameters for the {m} refiner'
        before, grad, after = (p['refiner'][m] for p in (params0, grads, params1))
        grad_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grad))
        assert grad_norm > 0, f'refiner/{m} receives no gradient'
        assert any(
            not np.allclose(a, b)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )


def test_refiner_targets_and_reconstructions_have_matching_shapes():
    for target, dims in (
        ('embedding', {'image': 16, 'question': 16}),
        ('input', {'image': 768, 'question': 11}),
        ('tokens', {'image': 16, 'question': 16}),
    ):
        config = toy_config(fusion='mmft' if target == 'tokens' else 'concat', target=target)
        model = model_lib.create_model(config, INFO)
        params = jax.eval_shape(model.init, jax.random.key(0), toy_batch())['params']  # shapes only
        _, aux = jax.eval_shape(model.apply, {'params': params}, toy_batch())
        for m, d in dims.items():
            assert aux['targets'][m].shape == aux['reconstructions'][m].shape == (8, d)


@pytest.mark.slow(seconds=1)
def test_shared_modality_is_encoded_once_per_row_and_gathered():
    config = toy_config(variant='baseline')
    model = model_lib.create_model(config, INFO)
    batch = toy_batch()
    flat = dict(batch, image=batch['image'][batch['image_index']], image_index=np.arange(8, dtype=np.int32))

    def fused(key, batch, flat):  # one compiled program: the parameters, both batches' fused embeddings
        params = model.init(key, batch)['params']
        return [model.apply({'params': params}, b)[1]['fused'] for b in (batch, flat)]

    np.testing.assert_allclose(*jax.jit(fused)(jax.random.key(0), batch, flat), rtol=1e-5, atol=1e-6)


@pytest.mark.slow(seconds=1)
def test_inference_without_refiner_gives_the_same_logits():
    config = toy_config()
    model = model_lib.create_model(config, INFO)

    def both(key, batch):  # one compiled program: the parameters, the model with and without the refiner
        variables = {'params': model.init(key, batch)['params']}
        return model.apply(variables, batch), model.apply(variables, batch, with_refiner=False)

    (a, aux), (b, aux_b) = jax.jit(both)(jax.random.key(0), toy_batch())
    np.testing.assert_array_equal(a, b)
    assert 'reconstructions' not in aux_b


@pytest.mark.parametrize(
    'field,value,message',
    [
        ('model.fusion.unknown_field', 3, "field(s) ['unknown_field']"),
        ('model.encoders.image.depth', 3, "config.model.encoders.image has field(s) ['depth']"),
        ('model.refiner.target', 'pixels', "config.model.refiner.target is 'pixels'"),
        (
            'model.refiner.target',
            'tokens',
            "config.model.refiner.target is 'tokens', which needs a token-level",
        ),
        ('model.fusion.kind', 'nope', "config.model.fusion.kind is 'nope'; expected one of"),
        ('model.encoders.image.module', 'vitt', "config.model.encoders.image.module is 'vitt'"),
    ],
)
def test_bad_model_config_is_named_before_any_work(field, value, message):
    config = toy_config()
    section, _, key = field.rpartition('.')
    node = config
    for part in section.split('.'):
        node = node[part]
    with node.unlocked() if hasattr(node, 'unlocked') else ml_collections.ConfigDict().unlocked():
        node[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        model_lib.create_model(config, INFO)


def test_config_must_name_the_dataset_modalities():
    config = toy_config()
    config.loss.refiner_weights = {'image': 0.1, 'text': 0.1}
    with pytest.raises(ValueError, match=r"config.loss.refiner_weights names modalities \['image', 'text'\]"):
        model_lib.create_model(config, INFO)


@pytest.mark.slow
def test_trivially_learnable_data_reaches_full_accuracy():
    # The label is the first word of the question: any working network learns it exactly.
    config = toy_config()
    config.train.num_steps = 150
    config.train.learning_rate = 1e-2
    batch = toy_batch(rows=8, per_row=4, seed=3)
    batch['label'] = batch['question'][:, 0] % 5
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    model, mesh, state, step = run.model, run.mesh, run.state, run.train_step
    with jax.set_mesh(mesh):
        sharded = sharding.shard_batch(batch, mesh)
        for i in range(config.train.num_steps):
            state, metrics = step(state, sharded, jax.random.key(i))
    logits, _ = model.apply({'params': state.params}, batch)
    assert (np.asarray(logits).argmax(-1) == batch['label']).all()
    assert float(metrics['task_loss']) < 0.05


@pytest.mark.slow(seconds=4)
def test_tokens_targets_are_the_fusions_readouts():
    """With `tokens` targets the refiner decodes the fusion's per-modality read-outs (not the encoders'
    pooled embeddings, which have the same width here)."""
    model = model_lib.create_model(toy_config(fusion='mmft', target='tokens'), INFO)

    def apply(key, batch):  # one compiled program: the parameters, the model's outputs and the fusion's
        return model.apply(
            {'params': model.init(key, batch)['params']},
            batch,
            capture_intermediates=lambda mdl, _: mdl.name == 'fusion',
            mutable=['intermediates'],
        )

    (_, aux), state = jax.jit(apply)(jax.random.key(0), toy_batch())
    out = state['intermediates']['fusion']['__call__'][0]
    assert isinstance(out, fusions.FusionOutput)
    z, readouts = out.z, out.readouts
    np.testing.assert_array_equal(aux['fused'], z)
    for m in MODALITIES:
        np.testing.assert_array_equal(aux['targets'][m], readouts[m])
        assert not np.allclose(aux['targets'][m], aux['embeddings'][m])


def test_refiner_targets_of_each_kind():
    """`refiner.refiner_targets`, the function ReFNet uses: the embeddings or readouts of the modalities asked
    for (constants for the refiner loss unless told otherwise), or the inputs flattened as their kind says."""
    rs = np.random.RandomState(0)
    embeddings = {m: jnp.asarray(rs.randn(8, 4), jnp.float32) for m in MODALITIES}
    readouts = {m: jnp.asarray(rs.randn(8, 3), jnp.float32) for m in MODALITIES}
    batch = toy_batch()
    inputs = {'image': batch['image'][batch['image_index']], 'question': batch['question']}

    got = refiner.refiner_targets('embedding', embeddings=embeddings, modalities=['question'])
    assert list(got) == ['question'] and got['question'] is not None
    np.testing.assert_array_equal(got['question'], embeddings['question'])
    got = refiner.refiner_targets('tokens', embeddings=embeddings, readouts=readouts)
    assert sorted(got) == sorted(MODALITIES)
    np.testing.assert_array_equal(got['image'], readouts['image'])

    got = refiner.refiner_targets('input', embeddings=embeddings, inputs=inputs, infos=MODALITIES)
    np.testing.assert_allclose(got['image'], inputs['image'].reshape(8, -1) / 255.0, rtol=1e-6)
    bags = np.stack([np.bincount(q, minlength=11) for q in inputs['question']]).astype(np.float32)
    bags[:, 0] = 0  # padding is not a word
    np.testing.assert_array_equal(got['question'], bags)

    def through_targets(e, stop_gradient):
        return refiner.refiner_targets('embedding', embeddings=e, stop_gradient=stop_gradient)['image'].sum()

    assert not np.asarray(jax.grad(through_targets)(embeddings, True)['image']).any()
    assert np.asarray(jax.grad(through_targets)(embeddings, False)['image']).all()

    with pytest.raises(ValueError, match="refiner target 'tokens' needs `readouts`"):
        refiner.refiner_targets('tokens', embeddings=embeddings)
    with pytest.raises(ValueError, match="refiner target 'input' needs `inputs` and `infos`"):
        refiner.refiner_targets('input', embeddings=embeddings)
    with pytest.raises(ValueError, match=re.escape("refiner target kind is 'pixels'; expected one of")):
        refiner.refiner_targets('pixels', embeddings=embeddings)
