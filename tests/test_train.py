"""End to end: train.py on the tiny config, one run per workdir, resumption after SIGKILL, 1 vs 8 devices, bad
input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import fresh_state, one_cpu_env, tiny_config, tiny_train_command

from refnet_jax.data import contract, input_pipeline
from refnet_jax.train import checkpointing, objective, sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(workdir, data_dir, *overrides, wait=True, xla_flags=None):
    cmd = [sys.executable, *tiny_train_command(workdir, data_dir, *overrides)]
    env = one_cpu_env()  # one device, for speed
    if xla_flags is not None:
        env['XLA_FLAGS'] = xla_flags
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def one_device(config):
    """`config` on a one-device mesh, for the in-process runs that are not about devices: their checkpoints and
    evaluations are cheaper than on the 8 CPU devices of the test process, and they share its programs."""
    config.mesh.data = 1
    return config


@pytest.mark.slow
def test_train_py_runs_and_writes_results(tmp_path, easy_vqa_dir):
    rc, out = run_train(tmp_path / 'run', easy_vqa_dir)
    assert rc == 0, out
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['step'] == 4
    assert np.isfinite(results['train']['loss'])
    assert 0.0 <= results['test']['accuracy'] <= 1.0
    assert results['test']['num_examples'] == 9673
    assert results['val']['num_examples'] > 0
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    train_rows = [r for r in rows if 'train/loss' in r]
    assert [r['step'] for r in train_rows] == [2, 4]
    for key in (
        'train/task_loss',
        'train/ms_loss',
        'train/refiner_loss/image',
        'train/refiner_loss/question',
        'train/grad_norm',
        'train/param_norm',
        'train/learning_rate',
        'train/examples_per_second',
    ):
        assert key in train_rows[0], key
    assert list((tmp_path / 'run' / 'tensorboard').iterdir())


@pytest.mark.slow
def test_unknown_config_key_is_an_error(tmp_path, easy_vqa_dir):
    rc, out = run_train(tmp_path / 'run', easy_vqa_dir, '--config.train.num_stepz=3')
    assert rc != 0
    assert 'num_stepz' in out
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow(seconds=30)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, easy_vqa_dir):
    args = (
        '--config.train.num_steps=300',
        '--config.train.checkpoint_every_steps=5',
        '--config.train.log_every_steps=5',
        # Modality dropout, checkpoint selection and early stopping resume exactly too. Selecting the largest
        # loss, which falls, stops the run after two validations without a larger one (at step 30).
        '--config.train.modality_dropout.question=0.3',
        '--config.train.eval_every_steps=10',
        '--config.train.select=val/loss',
        '--config.train.select_mode=max',
        '--config.train.early_stop=2',
    )
    # A second run on the workdir of a running one stops at once, naming the holder; the first goes on.
    straight = run_train(tmp_path / 'straight', easy_vqa_dir, *args, wait=False)
    claim = tmp_path / 'straight' / 'claim.json'
    deadline = time.time() + 300
    while time.time() < deadline and straight.poll() is None and not claim.exists():
        time.sleep(0.01)
    t = time.time()
    rc, out = run_train(tmp_path / 'straight', easy_vqa_dir, *args)
    assert rc == 2 and time.time() - t < 60, out
    assert (
        f'error: workdir {tmp_path / "straight"} is in use by another run: process {straight.pid} on host'
        in out
    )
    assert 'Traceback' not in out
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    assert not claim.exists()  # released at the end
    rows = [json.loads(line) for line in (tmp_path / 'straight' / 'metrics.jsonl').read_text().splitlines()]
    steps = [r['step'] for r in rows if 'train/loss' in r]
    assert steps == sorted(set(steps)) and steps[0] == 5, steps  # each logged step once

    proc = run_train(tmp_path / 'killed', easy_vqa_dir, *args, wait=False)
    ckpt_dir = tmp_path / 'killed' / 'checkpoints'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpt_dir.glob('*') if p.name.isdigit()] if ckpt_dir.exists() else []
        if done:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / 'killed' / 'results.json').exists(), 'the run finished before it could be killed'
    killed_at = checkpointing.Checkpointer(ckpt_dir).latest_step()
    assert killed_at is not None and killed_at < 300
    # The killed run's claim is left behind; the same command takes it over, with a warning, and resumes.
    assert json.loads((tmp_path / 'killed' / 'claim.json').read_text())['pid'] == proc.pid

    rc, out = run_train(tmp_path / 'killed', easy_vqa_dir, *args)
    assert rc == 0, out
    assert f'Taking over {tmp_path / "killed" / "claim.json"} from process {proc.pid} on host' in out, out
    assert 'that process no longer exists' in out
    assert f'Restoring step {killed_at}' in out
    assert not (tmp_path / 'killed' / 'claim.json').exists()
    a = json.loads((tmp_path / 'straight' / 'results.json').read_text())
    b = json.loads((tmp_path / 'killed' / 'results.json').read_text())
    assert a['test'] == b['test'] and a['val'] == b['val'] and a['train']['loss'] == b['train']['loss']
    assert a['selected'] == b['selected'] and a['step'] == b['step']
    assert a['selected']['stopped_early'] and a['step'] < 300, a
    pa = checkpointing.Checkpointer(tmp_path / 'straight' / 'checkpoints').restore_params()
    pb = checkpointing.Checkpointer(ckpt_dir).restore_params()
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.mark.slow(seconds=18)
def test_selected_checkpoint_reports_what_a_fresh_evaluation_of_it_gives(tmp_path, easy_vqa_dir):
    config = tiny_config(
        easy_vqa_dir, num_steps=8, eval_every_steps=2, checkpoint_every_steps=4, select='val/loss'
    )
    config.train.modality_dropout.question = 0.3
    config.eval.without = ('question',)
    one_device(config)
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    selected = results['selected']
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    val_loss = {r['step']: r['val/loss'] for r in rows if 'val/loss' in r}
    assert sorted(val_loss) == [2, 4, 6, 8] and val_loss[8] == results['val']['loss']
    assert selected['step'] == min(val_loss, key=val_loss.get) and selected['mode'] == 'min'
    assert set(results) >= {'val_without_question', 'test_without_question'}
    best = checkpointing.Checkpointer(tmp_path / 'run' / 'best')
    assert best.all_steps() == (selected['step'],)
    run = trainer.build(config)
    with jax.set_mesh(run.mesh):
        state = best.restore(run.state, step=selected['step'])
        for key, absent in (('test', ()), ('val', ()), ('test_without_question', ('question',))):
            split = 'validation' if key == 'val' else 'test'
            fresh = trainer.evaluate(
                state, input_pipeline.eval_batches(config, split), run.objective, run.info, run.mesh, absent
            )
            assert fresh == selected[key], key
    best.close()


@pytest.mark.slow(seconds=16)
def test_one_and_eight_devices_give_the_same_training(tmp_path, easy_vqa_dir):
    assert jax.device_count() == 8
    runs = {}
    for n in (1, 8):
        config = tiny_config(easy_vqa_dir, num_steps=10, log_every_steps=1, checkpoint_every_steps=10)
        config.mesh.data = n
        results = trainer.train_and_evaluate(config, str(tmp_path / f'd{n}'))
        rows = [json.loads(line) for line in (tmp_path / f'd{n}' / 'metrics.jsonl').read_text().splitlines()]
        losses = np.array([r['train/loss'] for r in rows if 'train/loss' in r])
        params = checkpointing.Checkpointer(tmp_path / f'd{n}' / 'checkpoints').restore_params()
        runs[n] = results, losses, params
    assert len(runs[1][1]) == 10
    np.testing.assert_allclose(runs[1][1], runs[8][1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), runs[1][2], runs[8][2])
    assert runs[1][0]['test']['accuracy'] == pytest.approx(runs[8][0]['test']['accuracy'], abs=1e-3)


@pytest.mark.slow(seconds=20)
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, easy_vqa_dir):
    args = (
        '--config.train.num_steps=150',
        '--config.train.checkpoint_every_steps=1000',  # no checkpoint but the one SIGTERM asks for
        '--config.train.log_every_steps=10',
    )
    proc = run_train(tmp_path / 'run', easy_vqa_dir, *args, wait=False)
    metrics = tmp_path / 'run' / 'metrics.jsonl'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.stat().st_size:  # training, logged at step 10
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    step = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints').latest_step()
    assert step is not None and 10 <= step < 150
    assert f'stopped: SIGTERM at step {step} of 150' in out
    assert not (tmp_path / 'run' / 'results.json').exists()
    rc, out = run_train(tmp_path / 'run', easy_vqa_dir, *args)
    assert rc == 0, out
    assert f'Restoring step {step}' in out


@pytest.mark.slow(seconds=28)
def test_a_second_run_reads_its_programs_from_the_compilation_cache(tmp_path, easy_vqa_dir):
    cache = f'--config.compilation_cache_dir={tmp_path / "cache"}'
    # Compiled as a user compiles (one device): the programs that the cache keeps (compiled in 1 s or more) take
    # well over that, and the others well under. At the tests' quick optimization level some come close to it,
    # and one that the first run compiles just under it and the second just over it would count as compiled.
    first_rc, first = run_train(tmp_path / 'first', easy_vqa_dir, cache, xla_flags='')
    second_rc, second = run_train(tmp_path / 'second', easy_vqa_dir, cache, xla_flags='')
    assert first_rc == second_rc == 0, first + second
    assert re.search(r'Compilation cache .*: 0 program\(s\) read from it, [1-9]\d* compiled', first), first
    assert re.search(r'Compilation cache .*: [1-9]\d* program\(s\) read from it, 0 compiled', second), second
    times = [
        json.loads((tmp_path / r / 'results.json').read_text())['first_step_seconds']
        for r in ('first', 'second')
    ]
    assert times[1] < times[0]


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_asked_steps(tmp_path, easy_vqa_dir):
    config = one_device(tiny_config(easy_vqa_dir, profile=(1, 2)))
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert list((tmp_path / 'run' / 'profile').rglob('*.xplane.pb'))
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert all(r['train/step_seconds'] > 0 for r in rows if 'train/loss' in r)
    config = tiny_config(easy_vqa_dir, profile=(1,))
    with pytest.raises(
        ValueError, match=r'config.train.profile is \(1,\); expected \(first_step, num_steps\)'
    ):
        trainer.train_and_evaluate(config, str(tmp_path / 'bad'))


def damage(step_dir):
    """Truncates every file of a checkpoint to half its size, as a preemption or a full disk leaves them."""
    for f in step_dir.rglob('*'):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.slow(seconds=20)
def test_a_damaged_checkpoint_is_moved_aside_for_the_newest_intact_one(tmp_path, easy_vqa_dir):
    # The tiny config's 4 steps, checkpointed at steps 2 and 4 (the programs of the other tiny runs).
    rc, out = run_train(tmp_path / 'run', easy_vqa_dir)
    assert rc == 0, out
    first = json.loads((tmp_path / 'run' / 'results.json').read_text())
    ckpt_dir = tmp_path / 'run' / 'checkpoints'
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ['2', '4']
    damage(ckpt_dir / '4')
    rc, out = run_train(tmp_path / 'run', easy_vqa_dir)
    assert rc == 0, out
    assert 'The checkpoint at step 4 is damaged' in out and 'Restoring step 2' in out
    assert (tmp_path / 'run' / 'checkpoints_damaged' / '4').is_dir()
    again = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert again['test'] == first['test'] and again['train']['loss'] == first['train']['loss']
    for step in (2, 4):
        damage(ckpt_dir / str(step))
    rc, out = run_train(tmp_path / 'run', easy_vqa_dir)
    assert rc == 2, out
    assert f'error: every checkpoint in {ckpt_dir} is damaged' in out


@pytest.mark.slow
def test_shared_modality_rows_need_not_divide_by_the_devices(easy_vqa_dir):
    """32 questions on 4 images over 8 devices: the image rows are padded, and training is as on 1."""
    losses = {}
    for n in (1, 8):
        config = tiny_config(easy_vqa_dir, batch_size=32)
        config.mesh.data = n
        run = trainer.build(config)
        batch = next(input_pipeline.make_train_iterator(config, seed=0))
        assert batch['image'].shape[0] == 4
        with jax.set_mesh(run.mesh):
            sharded = sharding.shard_batch(batch, run.mesh)
            _, metrics = run.train_step(run.state, sharded, jax.random.key(0))
        losses[n] = float(metrics['loss'])
    assert losses[1] == pytest.approx(losses[8], rel=1e-5)


@pytest.mark.slow(seconds=2)
def test_train_step_compiles_once(easy_vqa_dir):
    config = one_device(tiny_config(easy_vqa_dir))
    _, mesh, _, schedule, state = fresh_state(config)
    with jax.set_mesh(mesh):
        step = trainer.make_train_step(objective.Supervised(config), schedule, mesh, state)
        it = input_pipeline.make_train_iterator(config, seed=0)
        for _ in range(3):
            state, _ = step(state, sharding.shard_batch(next(it), mesh), jax.random.key(0))
    assert step._cache_size() == 1


@pytest.mark.slow(seconds=3)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, easy_vqa_dir):
    # The warm-up's learning rate is 0 at step 0, so the losses of steps 1 and 2 are those of the initial
    # parameters (finite) and step 2 is checkpointed. Its parameters are one Adam step of learning rate 1e38
    # away, |update| <= ~1.0014 * 1e38 < float32's max: finite, but their loss (step 3) is not.
    config = tiny_config(
        easy_vqa_dir,
        num_steps=8,
        checkpoint_every_steps=2,
        log_every_steps=2,
        learning_rate=1e38,
        grad_clip_norm=0.0,
        warmup_steps=1,
    )
    one_device(config)
    with pytest.raises(trainer.NonFiniteLossError, match=r'last good checkpoint \(step 2\)'):
        trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    ckpt = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints')
    assert ckpt.latest_step() == 2
    params = ckpt.restore_params()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_resuming_with_another_model_config_is_refused(tmp_path, easy_vqa_dir):
    trainer.train_and_evaluate(one_device(tiny_config(easy_vqa_dir)), str(tmp_path / 'run'))
    config = one_device(tiny_config(easy_vqa_dir))
    config.model.encoders.image.embed_dim = 32
    with pytest.raises(ValueError, match=r'model.encoders.image.embed_dim: workdir 16, now 32'):
        trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert (tmp_path / 'run' / 'results.json').exists()


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_names_the_parameter(tmp_path, easy_vqa_dir):
    config = one_device(tiny_config(easy_vqa_dir))
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    config.model.encoders.image.embed_dim = 32
    _, mesh, _, _, state = fresh_state(config)
    with jax.set_mesh(mesh):
        ckpt = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints')
        with pytest.raises(
            checkpointing.ShapeMismatchError,
            match=r'params/encoders/image/Dense_0/kernel: checkpoint \(8, 16\), config \(8, 32\)',
        ):
            ckpt.restore(state)


def _batch(easy_vqa_dir):
    config = tiny_config(easy_vqa_dir)
    return input_pipeline.get_dataset_info(config.data), next(
        input_pipeline.make_train_iterator(config, seed=0)
    )


@pytest.mark.parametrize(
    'corrupt,message',
    [
        (lambda b: b.pop('question'), r"batch lacks modality \['question'\]"),
        (lambda b: b.update(question=b['question'][:, :5]), r"batch\['question'\] has items of shape \(5,\)"),
        (
            lambda b: b.update(image=b['image'].astype(np.float32)),
            r"batch\['image'\] has dtype float32; expected uint8",
        ),
        (
            lambda b: b.update(label=b['label'] + 13),
            r"batch\['label'\] row 0 is (1[3-9]|2[0-5]); expected a class id",
        ),
        (lambda b: b.pop('image_index'), r"batch\['image_index'\] is missing"),
    ],
)
def test_bad_batches_are_named(easy_vqa_dir, corrupt, message):
    info, batch = _batch(easy_vqa_dir)
    contract.check_batch(batch, info)
    corrupt(batch)
    with pytest.raises(ValueError, match=message):
        contract.check_batch(batch, info)


@pytest.mark.slow(seconds=15)
def test_a_run_checkpointed_on_8_devices_resumes_on_1(tmp_path, easy_vqa_dir):
    config = tiny_config(easy_vqa_dir, num_steps=2, checkpoint_every_steps=2)
    config.mesh.data = 8
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    config.mesh.data = 1
    config.train.num_steps = 4
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 4
    assert np.isfinite(results['train']['loss'])
    straight = tiny_config(easy_vqa_dir, num_steps=4, checkpoint_every_steps=2)
    straight.mesh.data = 1
    expected = trainer.train_and_evaluate(straight, str(tmp_path / 'straight'))
    assert results['train']['loss'] == pytest.approx(expected['train']['loss'], rel=1e-5)
