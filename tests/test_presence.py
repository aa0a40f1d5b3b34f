"""Missing modalities: `<m>_present` in batches, learned stand-ins, masked refiner losses, modality dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refnet_jax import config_lib
from refnet_jax.data import contract
from refnet_jax.models import fusions
from refnet_jax.models import model as model_lib
from refnet_jax.train import objective as objective_lib
from refnet_jax.train import sharding, trainer

# Float modalities, so that absent values can be NaN; `a` is shared (stored once for two examples).
INFO = contract.DatasetInfo(
    name='toy',
    modalities={
        'a': contract.ModalityInfo(kind='features', shape=(6,), dtype=np.float32, shared=True),
        'b': contract.ModalityInfo(kind='series', shape=(8, 3), dtype=np.float32),
    },
    num_classes=3,
    multi_label=False,
    class_names=('x', 'y', 'z'),
    num_examples={'train': 8},
)
N = 8  # examples; `a` has N // 2 rows


def toy_config(fusion='concat', variant='refnet', target=None):
    opts = config_lib.parse_arg(f'tiny,fusion={fusion},variant={variant}', default_fusion='concat')
    config = config_lib.base_config(opts, dataset='toy', modalities=('a', 'b'))
    token_level = config_lib.token_level(opts)
    config_lib.make_tiny(config, encoders={'a': {}, 'b': {'pooling': 'tokens' if token_level else 'mean'}})
    if target is not None:
        config.model.refiner.target = target
    return config


def toy_batch(fill=0.0, seed=0):
    """a absent in examples 0-3 (rows 0 and 1 wholly), b absent in examples 2 and 5; absent values = fill."""
    rs = np.random.RandomState(seed)
    batch = {
        'a': rs.randn(N // 2, 6).astype(np.float32),
        'a_index': np.repeat(np.arange(N // 2), 2).astype(np.int32),
        'b': rs.randn(N, 8, 3).astype(np.float32),
        'label': rs.randint(0, 3, (N,)).astype(np.int32),
        'a_present': np.arange(N) >= 4,
        'b_present': ~np.isin(np.arange(N), (2, 5)),
    }
    batch['a'][:2] = fill
    batch['b'][[2, 5]] = fill
    return batch


def loss_and_grads(config):
    """`(batch, params=None) -> (params, loss, logits, aux, grads)` of the model of `config`: one jitted
    function, compiled once for the batches of one structure (the parameters initialized when not given)."""
    model = model_lib.create_model(config, INFO)
    objective = objective_lib.Supervised(config)

    def loss(params, batch):
        logits, aux = model.apply({'params': params}, batch)
        return objective.loss(logits, aux, batch)[0], (logits, aux)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(batch, params=None):
        if params is None:
            params = jax.jit(model.init)(jax.random.key(0), toy_batch())['params']
        (value, (logits, aux)), grads = value_and_grad(params, batch)
        return params, value, logits, aux, grads

    return run


# Every fusion, and every refiner target (tokens with a token fusion).
CASES = [(f, 'embedding') for f in sorted(fusions.FUSIONS)] + [('concat', 'input'), ('mmft', 'tokens')]


@pytest.mark.parametrize(
    'fusion,target',
    [c if c == ('mmft', 'tokens') else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
)
def test_absent_values_change_neither_outputs_nor_gradients(fusion, target):
    run = loss_and_grads(toy_config(fusion, target=target))
    params, loss0, logits0, aux0, grads0 = run(toy_batch(fill=0.0))
    _, loss1, logits1, aux1, grads1 = run(toy_batch(fill=np.nan), params)
    assert np.isfinite(loss1)
    np.testing.assert_array_equal(logits0, logits1)
    np.testing.assert_array_equal(aux0['fused'], aux1['fused'])
    jax.tree.map(np.testing.assert_array_equal, grads0, grads1)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads1))
    # ... and the values present do matter.
    other = toy_batch(fill=np.nan, seed=1)
    _, _, logits2, _, _ = run(other, params)
    assert not np.allclose(logits1, logits2)


@pytest.mark.slow(seconds=2)
def test_an_absent_modality_is_its_learned_stand_in_and_omitted_presence_means_present():
    run = loss_and_grads(toy_config('concat', variant='baseline'))
    params, _, logits, aux, grads = run(toy_batch())
    for m, absent in (('a', np.arange(4)), ('b', np.array([2, 5]))):
        want = np.broadcast_to(params['missing'][m], (len(absent), params['missing'][m].shape[0]))
        np.testing.assert_array_equal(aux['embeddings'][m][absent], want)
        assert np.abs(grads['missing'][m]).sum() > 0, f'the stand-in of {m} is not trained'
    everything = {k: v for k, v in toy_batch().items() if not k.endswith('_present')}
    marked = dict(everything, a_present=np.ones(N, bool), b_present=np.ones(N, bool))
    _, _, logits_all, _, _ = run(everything, params)
    _, _, logits_marked, _, _ = run(marked, params)
    np.testing.assert_array_equal(logits_all, logits_marked)


@pytest.mark.slow(seconds=3)
def test_refiner_loss_of_an_absent_modality_is_masked_and_finite_when_a_batch_lacks_it():
    config = toy_config('concat', variant='refiner', target='input')
    model = model_lib.create_model(config, INFO)
    objective = objective_lib.Supervised(config)
    batch = toy_batch()
    params = jax.jit(model.init)(jax.random.key(0), batch)['params']

    @jax.jit
    def forward(params, batch):  # the per-example refiner losses and the loss's terms
        logits, aux = model.apply({'params': params}, batch)
        return objective.refiner_losses(aux, None), objective.loss(logits, aux, batch)[1]

    per_example, terms = forward(params, batch)
    for m in ('a', 'b'):
        present = batch[f'{m}_present']
        assert (per_example[m][~present] == 0).all() and (per_example[m][present] > 0).all()
        np.testing.assert_allclose(terms[f'refiner_loss/{m}'], per_example[m][present].mean(), rtol=1e-6)
    nothing = dict(batch, b_present=np.zeros(N, bool), a_present=np.ones(N, bool))
    _, loss, _, _, grads = loss_and_grads(config)(dict(nothing, b=np.full_like(batch['b'], np.nan)), params)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(forward(params, nothing)[1]['refiner_loss/b']) == 0.0


def test_bad_presence_is_named():
    batch = toy_batch()
    with pytest.raises(ValueError, match=r"batch\['b_present'\] must be \(8,\) bool"):
        contract.check_batch(dict(batch, b_present=np.ones(N, np.int32)), INFO)
    with pytest.raises(ValueError, match=r"batch\['c_present'\] names no modality"):
        contract.check_batch(dict(batch, c_present=np.ones(N, bool)), INFO)
    contract.check_batch(batch, INFO)


def dropped(rates, n=20000, seed=0, batch=None):
    batch = batch or {'a': jnp.zeros((n, 1)), 'b': jnp.zeros((n, 1)), 'c': jnp.zeros((n, 1))}
    return jax.jit(lambda b, k: contract.drop_modalities(b, dict(rates), k))(batch, jax.random.key(seed))


def test_modality_dropout_rates_and_never_all_modalities():
    out = dropped((('a', 0.5), ('b', 0.3), ('c', 0.0)))
    a, b = np.asarray(out['a_present']), np.asarray(out['b_present'])
    assert 'c_present' not in out  # a modality with rate 0 keeps its presence (all of it)
    assert abs((~a).mean() - 0.5) < 0.02 and abs((~b).mean() - 0.3) < 0.02
    two = dropped((('a', 0.5), ('b', 0.5)), batch={'a': jnp.zeros((20000, 1)), 'b': jnp.zeros((20000, 1))})
    a, b = np.asarray(two['a_present']), np.asarray(two['b_present'])
    assert (a | b).all()  # never both
    # Where both would go (a quarter of the examples), one of them is kept, either with probability 1/2.
    assert abs((~a).mean() - 0.375) < 0.02 and abs((~b).mean() - 0.375) < 0.02
    # An example that lacks b in the data keeps a.
    given = {'a': jnp.zeros((1000, 1)), 'b': jnp.zeros((1000, 1)), 'b_present': jnp.zeros((1000,), bool)}
    only_a = dropped((('a', 0.9), ('b', 0.9)), batch=given)
    assert np.asarray(only_a['a_present']).all() and not np.asarray(only_a['b_present']).any()
    unchanged = dropped((('a', 0.0), ('b', 0.0)), batch=given)
    assert set(unchanged) == set(given)


def test_modality_dropout_draws_do_not_depend_on_the_device_count():
    assert jax.device_count() == 8
    n = 64
    batch = {'a': np.zeros((n, 2), np.float32), 'b': np.zeros((n, 2), np.float32)}
    draws = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(toy_config(), devices=devices)
        with jax.set_mesh(mesh):
            out = dropped((('a', 0.4), ('b', 0.4)), batch=sharding.shard_batch(batch, mesh))
            draws.append(np.asarray(jax.device_get(out['a_present'])))
    np.testing.assert_array_equal(draws[0], draws[1])


@pytest.mark.slow
def test_train_step_applies_modality_dropout():
    config = toy_config('concat', variant='refiner', target='input')
    config.train.modality_dropout = {'a': 0.0, 'b': 0.999}
    run = trainer.build(config, info=INFO, devices=jax.devices()[:1])
    batch = {k: v for k, v in toy_batch(seed=2).items() if not k.endswith('_present')}
    with jax.set_mesh(run.mesh):
        _, metrics = run.train_step(run.state, sharding.shard_batch(batch, run.mesh), jax.random.key(0))
    # b is dropped from (nearly) every example, so its refiner loss has (nearly) nothing to average.
    assert float(metrics['refiner_loss/b']) < 0.5 * float(metrics['refiner_loss/a'])
