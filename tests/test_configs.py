"""Every config file under configs/: its `tiny` variant builds and trains two steps on real (or fixture) data,
and it accepts every fusion module and every variant.

The cases are generated from `configs/*.py`, `fusions.FUSIONS` and `config_lib.VARIANTS`: a new config file or
registry entry is tested without editing this file. A config whose dataset (`config.data.name`) has no test
data in `DATA` fails, saying how to add some. The data: easy-VQA and the HAPT and UCI packages are the real
data; MM-IMDB, Hateful Memes and custom data are the small fixtures their own tests write.
"""

import importlib
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from test_custom_data import arrays as custom_arrays
from test_hateful_memes import write_features, write_fixture
from test_mm_imdb import fixture_arrays, write_hdf5

from refnet_jax import config_lib
from refnet_jax.data import contract, input_pipeline
from refnet_jax.models import fusions
from refnet_jax.models import model as model_lib
from refnet_jax.train import sharding, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


# --- Test data per dataset: a session fixture giving, for a config, the `config.data` fields that point it at
# small data.


@pytest.fixture(scope='session')
def easy_vqa_data(easy_vqa_dir):
    return lambda config: {'data_dir': str(easy_vqa_dir)}


@pytest.fixture(scope='session')
def package_data(tmp_path_factory):
    """HAPT and UCI: prepared from their installed packages on first use (a few seconds)."""
    data_dir = tmp_path_factory.mktemp('tfds_packages')
    return lambda config: {'data_dir': str(data_dir)}


@pytest.fixture(scope='session')
def mm_imdb_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('mm_imdb')
    manual_dir = write_hdf5(root / 'manual', fixture_arrays())
    return lambda config: {'data_dir': str(root / 'tfds'), 'manual_dir': manual_dir}


@pytest.fixture(scope='session')
def hateful_memes_data(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp('hateful_memes_manual')
    written = write_fixture(manual_dir)
    write_features(manual_dir, list(written['rgb']))  # for the `features` builder config
    data_dir = tmp_path_factory.mktemp('hateful_memes_tfds')
    return lambda config: {'data_dir': str(data_dir), 'manual_dir': str(manual_dir)}


@pytest.fixture(scope='session')
def custom_data(tmp_path_factory):
    """A `train.npz` with the config's modalities (`config.data.kinds`), each an array of its kind."""
    written = {}

    def fields(config):
        kinds = tuple(sorted(config.data.kinds.items()))
        if kinds not in written:
            root = tmp_path_factory.mktemp('custom')
            rows = custom_arrays(90)  # one array per kind, and labels
            np.savez(root / 'train.npz', label=rows['label'], **{m: rows[kind] for m, kind in kinds})
            written[kinds] = {'data_dir': str(root / 'tfds'), 'manual_dir': str(root)}
        return written[kinds]

    return fields


# `config.data.name` -> the fixture above that gives its data.
DATA = {
    'easy_vqa': 'easy_vqa_data',
    'hapt': 'package_data',
    'uci_mfeat': 'package_data',
    'mm_imdb': 'mm_imdb_data',
    'hateful_memes': 'hateful_memes_data',
    'custom': 'custom_data',
}


@pytest.fixture(scope='session')
def prepared_infos():
    return {}


def load(name: str):
    return importlib.import_module(f'configs.{name}')


def with_data(name: str, request) -> tuple[ml_collections.ConfigDict, contract.DatasetInfo]:
    """`configs/<name>.py:tiny` pointed at its test data, and the data's description."""
    config = load(name).get_config('tiny')
    dataset = config.data.name
    if dataset not in DATA:
        pytest.fail(
            f'configs/{name}.py reads dataset {dataset!r} (config.data.name), for which tests/test_configs.py '
            'has no test data: add a session fixture that writes a small copy of it in the layout the builder '
            "reads (or points at a package that installs it), and name it in DATA, as for 'mm_imdb'"
        )
    config.data.update(request.getfixturevalue(DATA[dataset])(config))
    infos = request.getfixturevalue('prepared_infos')
    if name not in infos:
        infos[name] = input_pipeline.get_dataset_info(config.data)
    return config, infos[name]


@pytest.mark.slow
@pytest.mark.parametrize('name', CONFIGS)
def test_tiny_config_trains_two_steps(name, request):
    config, info = with_data(name, request)
    config.mesh.data = 1  # one device compiles faster; test_train.py compares 1 and 8 devices
    run = trainer.build(config, info=info, devices=jax.devices()[:1])
    labeled = run.objective.labeled
    with jax.set_mesh(run.mesh):
        params0 = jax.device_get(run.state.params)
        batches = input_pipeline.make_train_iterator(config, seed=config.seed, labeled=labeled)
        state, rng = run.state, trainer.init_rngs(config)[1]
        losses = []
        for _ in range(2):  # the warm-up's first learning rate is 0
            batch = run.objective.inputs(next(batches))
            contract.check_batch(batch, info, labeled=labeled)
            state, metrics = run.train_step(state, sharding.shard_batch(batch, run.mesh), rng)
            losses.append(float(metrics['loss']))
        params1 = jax.device_get(state.params)
    assert np.isfinite(losses).all(), losses
    assert int(state.step) == 2
    # Every part of the network (each modality's encoder, the fusion, the head, the refiner) was trained; the
    # stand-ins of absent modalities (`missing`) learn only where a modality is absent, none is here.
    parts = {k: v for k, v in params0.items() if k not in ('encoders', 'missing')}
    parts.update({f'encoders/{m}': v for m, v in params0['encoders'].items()})
    assert set(params0['encoders']) == set(info.modalities)
    for part, before in parts.items():
        after = params1[part] if '/' not in part else params1['encoders'][part.split('/')[1]]
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
        assert any(changed), f'configs/{name}.py: no parameter of {part} changed in two steps'


def check_builds(name, request, arg):
    """`configs/<name>.py:<arg>` parses, and its model builds and initializes (abstractly: shapes only) on
    the data of the tiny config."""
    _, info = with_data(name, request)
    config = load(name).get_config(arg)
    model = model_lib.create_model(config, info)
    assert sorted(dict(model.encoders)) == sorted(info.modalities)
    batch = contract.dummy_batch(info, 2)
    rng = jax.random.key(0)
    logits, aux = jax.eval_shape(lambda: model.init_with_output({'params': rng, 'dropout': rng}, batch)[0])
    assert logits.shape == (2, info.num_classes)
    assert aux['fused'].shape[0] == 2
    assert set(aux.get('reconstructions', {})) == set(model.refiner_modalities)
    return config, model


@pytest.mark.parametrize('fusion', list(fusions.FUSIONS))
@pytest.mark.parametrize('name', CONFIGS)
def test_every_fusion(name, fusion, request):
    for arg in (f'fusion={fusion}', f'tiny,fusion={fusion}'):
        config, model = check_builds(name, request, arg)
        assert config.model.fusion.kind == fusion
        assert isinstance(model.fusion, fusions.FUSIONS[fusion])


@pytest.mark.parametrize('variant', config_lib.VARIANTS)
@pytest.mark.parametrize('name', CONFIGS)
def test_every_variant(name, variant, request):
    for arg in (f'variant={variant}', f'tiny,variant={variant}'):
        config, model = check_builds(name, request, arg)
        assert bool(model.refiner_modalities) == (variant != 'baseline')
        assert (config.loss.ms_weight > 0) == (variant == 'refnet')
