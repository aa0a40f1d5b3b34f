"""Export for serving: tools/export.py on a trained tiny run, loaded in a fresh process with jax and numpy only."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from etils import epath
from helpers import one_cpu_env

from configs import easy_vqa
from refnet_jax import config_lib
from refnet_jax.data import input_pipeline
from refnet_jax.export import serving as export_lib
from refnet_jax.models import model as model_lib
from refnet_jax.train import checkpointing, objective, sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_CPU = one_cpu_env()  # Subprocesses: one device, for speed.
pytestmark = pytest.mark.slow  # every test needs the `trained` run (training and tools/export.py)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, easy_vqa_dir):
    """A tiny run trained for two steps, and its export written by the real `tools/export.py`."""
    config = easy_vqa.get_config('tiny')
    config.data.data_dir = str(easy_vqa_dir)
    config.train.num_steps = 2
    workdir = tmp_path_factory.mktemp('run')
    trainer.train_and_evaluate(config, str(workdir))
    out = workdir / 'export'
    proc = subprocess.run(
        [sys.executable, 'tools/export.py', '--workdir', str(workdir), '--output', str(out)],
        cwd=ROOT,
        env=ONE_CPU,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return config, workdir, out


def initialized_run(config, workdir):
    """The workdir of a run of `config` as it starts (on one device): its `config.json` and a checkpoint of the
    initialized state at step 0, which is all an export reads. (Training is not what the later fusions' exports
    are tested for; the `trained` run's export is that of a trained model.)"""
    workdir.mkdir(parents=True)
    config_lib.check_workdir_config(config, epath.Path(workdir))
    state = trainer.build(config, devices=jax.devices()[:1]).state
    ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
    try:
        ckpt.save(state)
    finally:
        ckpt.close()
    return workdir


def training_logits(config, workdir, batch):
    """The logits of the training code's eval step, with the checkpoint's parameters, on one device."""
    info = input_pipeline.get_dataset_info(config.data)
    model = model_lib.create_model(config, info)
    params = checkpointing.Checkpointer(workdir / 'checkpoints').restore_params()
    state = trainer.TrainState.create(apply_fn=model.apply, params=params, tx=optax.identity())
    mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        outputs = trainer.eval_step(state, sharding.shard_batch(batch, mesh), objective.Supervised(config))
    return np.asarray(outputs['logits'])


def test_exported_model_runs_without_flax_and_matches_training(trained, tmp_path):
    config, workdir, out = trained
    train_batch = next(input_pipeline.make_train_iterator(config, seed=1))  # 64 questions on 8 images
    eval_batch = next(input_pipeline.eval_batches(config, 'test'))  # 256 rows (padding included), 8 images
    small = {k: v[: 3 if k == 'image' else 24] for k, v in train_batch.items()}  # 24 questions on 3 images
    # Modalities missing: every other question, and the image of the first image's 8 questions; their
    # values are garbage, which the model must not read.
    missing = dict(train_batch, question_present=np.arange(64) % 2 == 0, image_present=np.arange(64) >= 8)
    missing['question'] = np.where(missing['question_present'][:, None], train_batch['question'], 7)
    missing['image'] = train_batch['image'].copy()
    missing['image'][0] = np.random.RandomState(0).randint(0, 256, missing['image'][0].shape)
    batches = {'train': train_batch, 'eval': eval_batch, 'small': small, 'missing': missing}
    sizes = {(b['question'].shape[0], b['image'].shape[0]) for b in batches.values()}
    assert sizes == {(64, 8), (256, 8), (24, 3)}
    for name, batch in batches.items():
        np.savez(tmp_path / f'{name}.npz', **batch)

    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from refnet_jax import export
        predict = export.load({str(out)!r})
        for name in ('train', 'eval', 'small', 'missing'):
            with np.load({str(tmp_path)!r} + f'/{{name}}.npz') as batch:
                logits = predict(dict(batch))  # `label` and `mask` are ignored.
            np.save({str(tmp_path)!r} + f'/{{name}}_logits.npy', np.asarray(logits))
        unwanted = [m for m in ('flax', 'refnet_jax.models.model', 'orbax', 'ml_collections') if m in sys.modules]
        assert not unwanted, unwanted
        """
    )
    proc = subprocess.run(
        [sys.executable, '-c', script], cwd=ROOT, env=ONE_CPU, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr

    for name, batch in batches.items():
        got = np.load(tmp_path / f'{name}_logits.npy')
        want = training_logits(config, workdir, batch)
        assert got.shape == (batch['question'].shape[0], 13)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.ptp(want) > 1e-3  # Not a constant output.
    clean = dict(missing, question=train_batch['question'], image=train_batch['image'])
    np.testing.assert_array_equal(
        np.load(tmp_path / 'missing_logits.npy'), training_logits(config, workdir, clean)
    )
    assert not np.allclose(np.load(tmp_path / 'missing_logits.npy'), np.load(tmp_path / 'train_logits.npy'))


def test_export_files(trained):
    config, workdir, out = trained
    signature = json.loads((out / export_lib.SIGNATURE_FILE).read_text())
    assert signature['inputs'] == {
        'image': {'shape': ['rows_image', 64, 64, 3], 'dtype': 'uint8'},
        'image_index': {'shape': ['b'], 'dtype': 'int32'},
        'question': {'shape': ['b', 12], 'dtype': 'int32'},
        'image_present': {'shape': ['b'], 'dtype': 'bool'},  # optional: all True when not given
        'question_present': {'shape': ['b'], 'dtype': 'bool'},
    }
    assert signature['output']['shape'] == ['b', 13] and len(signature['class_names']) == 13
    # The parameters inference uses, and only those: the checkpoint's, minus the refiner decoders.
    with np.load(out / export_lib.PARAMS_FILE, allow_pickle=False) as saved:
        saved = {k: saved[k] for k in saved.files}
    checkpoint = export_lib._flatten(checkpointing.Checkpointer(workdir / 'checkpoints').restore_params())
    refiner = {k for k in checkpoint if k.startswith('refiner/')}
    assert refiner and set(saved) == set(checkpoint) - refiner
    for k, v in saved.items():
        np.testing.assert_array_equal(v, checkpoint[k])
    # The weights live in params.npz, not in the serialized function.
    exported = jax.export.deserialize(bytearray((out / export_lib.EXPORTED_FILE).read_bytes()))
    assert len(exported.in_avals) == len(saved) + 5
    blob = (out / export_lib.EXPORTED_FILE).read_bytes()
    largest = max(saved.values(), key=lambda v: v.nbytes)
    assert largest.nbytes > 1000 and largest.tobytes() not in blob


def test_loader_names_bad_inputs(trained):
    _, _, out = trained
    predict = export_lib.load(out)
    batch = {
        'image': np.zeros((2, 64, 64, 3), np.uint8),
        'question': np.zeros((3, 12), np.int64),  # Another integer width is converted.
        'image_index': np.array([0, 1, 1]),
    }
    assert predict(batch).shape == (3, 13)
    with pytest.raises(ValueError, match=r"lacks input 'image_index'"):
        predict({k: v for k, v in batch.items() if k != 'image_index'})
    with pytest.raises(ValueError, match=r"batch\['image'\] has dtype float32.*expected uint8"):
        predict(batch | {'image': np.zeros((2, 64, 64, 3), np.float32)})
    with pytest.raises(
        ValueError, match=r"batch\['question'\] has dtype int64 and shape \(3, 11\).*\('b', 12\)"
    ):
        predict(batch | {'question': np.zeros((3, 11), np.int64)})
    with pytest.raises(
        ValueError, match=r"batch\['image_index'\] holds rows \[0, 2\] of batch\['image'\], which has 2"
    ):
        predict(batch | {'image_index': np.array([0, 1, 2])})


def test_export_of_a_checkpoint_that_does_not_fit_its_config_names_the_parameter(trained, tmp_path):
    config, workdir, _ = trained
    changed = tmp_path / 'run'
    changed.mkdir()
    (changed / 'checkpoints').symlink_to(workdir / 'checkpoints')
    saved = json.loads((workdir / 'config.json').read_text())
    saved['model']['encoders']['image']['embed_dim'] = 32
    (changed / 'config.json').write_text(json.dumps(saved))
    with pytest.raises(
        checkpointing.ShapeMismatchError, match=r'encoders/image/Dense_0/kernel: checkpoint \(8, 16\)'
    ):
        export_lib.export_workdir(changed, tmp_path / 'out')
    with pytest.raises(FileNotFoundError, match='config.json'):
        export_lib.export_workdir(tmp_path / 'nowhere', tmp_path / 'out')


@pytest.mark.slow(seconds=12)
@pytest.mark.parametrize('fusion', ['mmft', 'mbt', 'deq', 'progressive', 'coupled_mamba'])
def test_exported_later_fusion_model_runs_in_a_fresh_process(tmp_path, easy_vqa_dir, fusion):
    """Token-level and later fusions (a fixed point, feedback rounds, a scan) export like the others: symbolic
    batch, no model code in the loading process, the training code's logits."""
    config = easy_vqa.get_config(f'tiny,fusion={fusion}')
    config.data.data_dir = str(easy_vqa_dir)
    workdir = initialized_run(config, tmp_path / 'run')
    out = tmp_path / 'export'
    export_lib.export_workdir(workdir, out)
    batch = next(input_pipeline.eval_batches(config, 'test'))
    small = {k: v[: 2 if k == 'image' else 5] for k, v in batch.items()}
    small['image_index'] = np.array([0, 1, 1, 0, 1], np.int32)
    for name, b in (('eval', batch), ('small', small)):
        np.savez(tmp_path / f'{name}.npz', **b)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from refnet_jax import export
        predict = export.load({str(out)!r})
        for name in ('eval', 'small'):
            with np.load({str(tmp_path)!r} + f'/{{name}}.npz') as batch:
                np.save({str(tmp_path)!r} + f'/{{name}}_logits.npy', np.asarray(predict(dict(batch))))
        unwanted = [
            m for m in ('flax', 'refnet_jax.models.model', 'refnet_jax.models.fusions', 'orbax') if m in sys.modules
        ]
        assert not unwanted, unwanted
        """
    )
    proc = subprocess.run(
        [sys.executable, '-c', script], cwd=ROOT, env=ONE_CPU, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    for name, b in (('eval', batch), ('small', small)):
        got = np.load(tmp_path / f'{name}_logits.npy')
        np.testing.assert_allclose(
            got, training_logits(config, workdir, b), rtol=1e-5, atol=1e-5, err_msg=name
        )
