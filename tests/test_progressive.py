"""Progressive Fusion: one round is plain late fusion with the same parameters, more rounds feed z back
into every encoder, a shared modality gets each example's own context, and an encoder that cannot take a
context is refused before training."""

import jax
import numpy as np
import pytest
from test_model import INFO, toy_batch, toy_config

from refnet_jax.models import fusions
from refnet_jax.models import model as model_lib


def progressive_config(rounds, variant='refnet'):
    config = toy_config('progressive', variant)
    config.model.fusion.rounds = rounds
    return config


def init(config, batch):
    model = model_lib.create_model(config, INFO)
    return model, jax.jit(model.init)(jax.random.key(0), batch)['params']


def test_one_round_equals_plain_late_fusion_with_the_same_parameters():
    batch = toy_batch()
    concat, params = init(toy_config('concat', 'refnet'), batch)
    progressive = model_lib.create_model(progressive_config(1), INFO)
    same = dict(params, fusion={'late': params['fusion']})  # the late fusion lives under fusion/late
    expected_shapes = jax.eval_shape(progressive.init, jax.random.key(0), batch)['params']
    assert jax.tree.structure(expected_shapes) == jax.tree.structure(same)
    want = concat.apply({'params': params}, batch)
    got = progressive.apply({'params': same}, batch)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)


@pytest.mark.slow
def test_more_rounds_feed_the_fused_embedding_back_and_change_the_output():
    batch = toy_batch()
    two, params = init(progressive_config(2), batch)
    # Each encoder gets one backward projection, `context`, in its first layer; nothing else is added.
    for m in ('image', 'question'):
        assert 'context' in params['encoders'][m]
    one = model_lib.create_model(progressive_config(1), INFO)
    without_context = dict(
        params,
        encoders={m: {k: v for k, v in p.items() if k != 'context'} for m, p in params['encoders'].items()},
    )
    three = model_lib.create_model(progressive_config(3), INFO)

    @jax.jit
    def apply(params, without_context):  # the three models in one compiled program
        return (
            one.apply({'params': without_context}, batch),
            two.apply({'params': params}, batch),
            three.apply({'params': params}, batch),  # the same parameters for any number of rounds
        )

    (logits1, aux1), (logits2, aux2), (logits3, _) = apply(params, without_context)
    assert not np.allclose(logits1, logits2)
    # The embeddings of the last round are what the losses see (they changed with the context).
    assert not np.allclose(aux1['embeddings']['question'], aux2['embeddings']['question'])
    np.testing.assert_array_equal(aux2['targets']['image'], aux2['embeddings']['image'])
    assert not np.allclose(logits2, logits3)


@pytest.mark.slow
def test_the_context_reaches_the_parameters_of_the_backward_connections():
    batch = toy_batch()
    model, params = init(progressive_config(2), batch)
    grads = jax.jit(jax.grad(lambda p: model.apply({'params': p}, batch)[0].sum()))(params)
    for m in ('image', 'question'):
        assert float(np.abs(grads['encoders'][m]['context']['kernel']).sum()) > 0


@pytest.mark.slow
def test_a_shared_modality_is_encoded_per_example_after_the_first_round():
    """easy-VQA stores each image once for several questions; from round 2 on each question's context
    differs, so the image is encoded per example: the same as a batch with the images repeated."""
    batch = toy_batch()
    model, params = init(progressive_config(2, 'baseline'), batch)
    flat = dict(batch, image=batch['image'][batch['image_index']], image_index=np.arange(8, dtype=np.int32))
    logits = jax.jit(lambda p: [model.apply({'params': p}, b)[0] for b in (batch, flat)])  # one program
    np.testing.assert_allclose(*logits(params), rtol=1e-5, atol=1e-6)


def test_an_encoder_without_a_context_keyword_is_refused_by_name(tmp_path, monkeypatch):
    (tmp_path / 'my_encoders.py').write_text(
        'import flax.linen as nn\n'
        'class Plain(nn.Module):\n'
        '    @nn.compact\n'
        '    def __call__(self, x, *, train=False):\n'
        '        return nn.Dense(8)(x.reshape(x.shape[0], -1).astype("float32"))\n'
    )
    monkeypatch.chdir(tmp_path)
    config = progressive_config(2)
    config.model.encoders.question = {'module': 'my_encoders.py:Plain'}
    with pytest.raises(ValueError, match=r"encoder of 'question' \(Plain.*takes no `context=`"):
        model_lib.create_model(config, INFO)
    config.model.fusion.kind = 'concat'  # the same encoder is fine under a fusion without feedback
    config.model.fusion = {k: v for k, v in config.model.fusion.items() if k != 'rounds'}
    model_lib.create_model(config, INFO)


def test_rounds_below_one_are_refused():
    config = progressive_config(0)
    model = model_lib.create_model(config, INFO)
    with pytest.raises(ValueError, match='config.model.fusion.rounds is 0'):
        jax.eval_shape(model.init, jax.random.key(0), toy_batch())


def test_progressive_is_the_built_in_fusion_that_takes_encode():
    assert fusions.takes_encode(fusions.FUSIONS['progressive'])
    assert not any(fusions.takes_encode(c) for k, c in fusions.FUSIONS.items() if k != 'progressive')


def test_the_module_fuses_what_encode_returns_once_per_further_round():
    """The module alone with a stand-in `encode` (the default run's check of the feedback loop; the model
    level is in the slow tests above): rounds - 1 calls, each with the previous round's z, and the result is
    the late fusion of the last call's embeddings."""
    rs = np.random.RandomState(0)
    embeddings = {m: jax.numpy.asarray(rs.randn(3, d), jax.numpy.float32) for m, d in (('a', 4), ('b', 5))}
    calls = []

    def encode(context):
        calls.append(context)
        return {m: e + context[:, :1] for m, e in embeddings.items()}

    module = fusions.FUSIONS['progressive'](rounds=3, hidden=(8,), fused_dim=6)
    params = module.init(jax.random.key(0), embeddings, encode=encode)
    late = fusions.FUSIONS['concat'](hidden=(8,), fused_dim=6)
    late_params = {'params': params['params']['late']}
    calls.clear()
    out = module.apply(params, embeddings, encode=encode)
    assert isinstance(out, fusions.FusionOutput) and out.readouts is None and out.stats is None
    z = out.z
    assert len(calls) == 2
    z1 = late.apply(late_params, embeddings).z
    np.testing.assert_allclose(calls[0], z1, rtol=1e-6)
    z2 = late.apply(late_params, {m: e + z1[:, :1] for m, e in embeddings.items()}).z
    np.testing.assert_allclose(calls[1], z2, rtol=1e-6)
    np.testing.assert_allclose(
        z, late.apply(late_params, {m: e + z2[:, :1] for m, e in embeddings.items()}).z, rtol=1e-6
    )
    assert not np.allclose(z, z1)
