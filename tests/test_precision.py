"""Mixed precision: config.model.dtype (computation) and config.model.param_dtype reach every built-in module;
losses and gradients stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import INFO, toy_batch, toy_config

from refnet_jax import config_lib
from refnet_jax.models import fusions
from refnet_jax.models import model as model_lib
from refnet_jax.train import sharding, trainer

FUSIONS = sorted(fusions.FUSIONS)


def dtypes_of(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize(
    'fusion', [f if f == 'concat' else pytest.param(f, marks=pytest.mark.slow) for f in FUSIONS]
)
def test_bfloat16_computation_with_float32_parameters_trains(fusion):
    config = toy_config(fusion, target='tokens' if fusion in ('mmft', 'mbt') else 'embedding')
    config.model.dtype = 'bfloat16'
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    assert dtypes_of(run.state.params) == {'float32'}
    assert dtypes_of(run.state.opt_state) <= {'float32', 'int32'}
    batch = toy_batch()
    # One trace gives the program and the dtypes of what it returns (dtypes are fixed when tracing; the train
    # step below runs the model for real).
    jaxpr, (logits, aux) = jax.make_jaxpr(lambda p: run.model.apply({'params': p}, batch), return_shape=True)(
        run.state.params
    )
    matmuls = [line for line in str(jaxpr).splitlines() if 'dot_general' in line or 'conv_general' in line]
    assert matmuls and all('bf16' in line for line in matmuls), 'a matmul or convolution outside bfloat16'
    assert logits.dtype == jnp.float32 and dtypes_of(aux) <= {'float32', 'bool'}
    with jax.set_mesh(run.mesh):
        state, metrics = run.train_step(run.state, sharding.shard_batch(batch, run.mesh), jax.random.key(0))
    assert np.isfinite(float(metrics['loss'])) and metrics['loss'].dtype == jnp.float32
    assert dtypes_of(state.params) == {'float32'}


@pytest.mark.slow(seconds=3)
def test_bfloat16_logits_are_close_to_float32_and_param_dtype_keeps_parameters():
    config = toy_config('concat', variant='baseline')
    model32 = model_lib.create_model(config, INFO)
    config.model.dtype = 'bfloat16'
    model16 = model_lib.create_model(config, INFO)

    def logits(key, batch):  # one compiled program: the float32 parameters, both models' logits
        params = model32.init(key, batch)['params']
        return model16.apply({'params': params}, batch)[0], model32.apply({'params': params}, batch)[0]

    logits16, logits32 = jax.jit(logits)(jax.random.key(0), toy_batch())
    np.testing.assert_allclose(logits16, logits32, rtol=0.05, atol=0.05)
    assert not np.array_equal(logits16, logits32)
    config.model.param_dtype = 'bfloat16'
    abstract = jax.eval_shape(model_lib.create_model(config, INFO).init, jax.random.key(0), toy_batch())
    assert dtypes_of(abstract['params']) == {'bfloat16'}


@pytest.mark.parametrize('value', ['bf16', 'int32'])
def test_a_bad_dtype_is_named(value):
    config = toy_config('concat')
    config.model.dtype = value
    with pytest.raises(ValueError, match=f"config.model.dtype is '{value}'; expected a float dtype"):
        model_lib.create_model(config, INFO)


@pytest.mark.slow
@pytest.mark.parametrize('fusion', ['mmft', 'mbt', 'concat'])
def test_remat_recomputes_blocks_and_changes_nothing_else(fusion):
    batch = toy_batch()
    out = {}
    for remat in (False, True):
        config = toy_config(fusion, target='tokens' if fusion != 'concat' else 'embedding')
        if fusion == 'concat':  # the encoder's blocks alone: a text transformer under a pooled fusion
            text = dict(module='text_transformer', width=16, depth=1, num_heads=2, pooling='gap')
            config_lib.set_encoders(config, {'image': dict(config.model.encoders.image), 'question': text})
        config.model.remat = remat
        run = trainer.build(config, info=INFO, devices=jax.devices()[:1], init=False)
        model = run.model
        params = jax.jit(model.init)(jax.random.key(0), batch)['params']

        def loss(p, model=model, objective=run.objective):
            return objective.loss(*model.apply({'params': p}, batch), batch)[0]

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ('remat' in jaxpr or 'checkpoint' in jaxpr) == remat
        out[remat] = jax.jit(jax.value_and_grad(loss))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out[False], out[True])
