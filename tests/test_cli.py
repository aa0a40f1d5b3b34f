"""The entry points' command line (refnet_jax/cli.py): a user's mistake is one plain `error:` line with exit
status 2, a bug keeps its traceback, and --debug or REFNET_DEBUG=1 shows every traceback."""

import os
import subprocess
import sys

import pytest
from helpers import one_cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, debug_env=False):
    """(exit status, stderr) of `python *args` in the repository root, on one CPU device."""
    env = one_cpu_env()
    env.pop('REFNET_DEBUG', None)
    if debug_env:
        env['REFNET_DEBUG'] = '1'
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    return proc.returncode, proc.stderr


def assert_plain(rc, stderr, *names):
    """Exit status 2 and one `error:` line naming `names`, without a traceback."""
    assert rc == 2, stderr
    assert 'Traceback' not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, stderr
    message = stderr[stderr.index('error: ') :]
    for name in names:
        assert name in message, stderr


def train(workdir, config, *overrides, debug_env=False):
    # data_dir: a directory of its own, so that an input that gets past the checks does not prepare the data
    # into ~/tensorflow_datasets (each bad input here fails before the data is read).
    return run(
        'train.py',
        '--workdir',
        str(workdir / 'run'),
        '--config',
        config,
        f'--config.data.data_dir={workdir / "tfds"}',
        *overrides,
        debug_env=debug_env,
    )


def test_a_config_argument_that_is_not_understood_is_one_plain_line(tmp_path):
    rc, stderr = train(tmp_path, 'configs/easy_vqa.py:fusion=nope')
    assert_plain(rc, stderr, 'fusion=nope', 'expected tiny, fusion=', '|lowrank|', '|transformer')
    assert not (tmp_path / 'run').exists()


def test_a_misspelt_config_field_is_one_plain_line_with_the_right_name(tmp_path):
    rc, stderr = train(tmp_path, 'configs/easy_vqa.py:tiny', '--config.train.num_stepz=3')
    assert_plain(rc, stderr, 'num_stepz', 'Did you mean "num_steps"')
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_a_config_value_of_the_wrong_type_is_one_plain_line(tmp_path):
    rc, stderr = train(tmp_path, 'configs/easy_vqa.py:tiny', '--config.train.num_steps=many')
    assert_plain(rc, stderr, '--config.train.num_steps=many')


@pytest.mark.slow
def test_a_config_file_that_does_not_exist_is_one_plain_line(tmp_path):
    rc, stderr = train(tmp_path, 'configs/nope.py')
    assert_plain(rc, stderr, 'configs/nope.py', 'No such file')


def test_a_value_out_of_range_is_refused_before_any_work(tmp_path):
    rc, stderr = train(
        tmp_path, 'configs/easy_vqa.py:tiny', '--config.train.learning_rate=-0.1', '--config.loss.ms.alpha=0'
    )
    assert_plain(rc, stderr, 'config.train.learning_rate is -0.1; expected a number >= 0')
    assert 'config.loss.ms.alpha is 0.0; expected a number > 0' in stderr  # every bad field at once
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'tfds').exists()


def test_a_bad_config_value_raised_by_the_run_is_one_plain_line(tmp_path):
    # trainer's own checks raise ValueError (here before any data is prepared).
    rc, stderr = train(tmp_path, 'configs/easy_vqa.py:tiny', '--config.data.name=nope')
    assert_plain(rc, stderr, "config.data.name='nope'", 'refnet_jax/data/datasets/nope.py')


@pytest.mark.slow
@pytest.mark.parametrize(
    'args, names',
    [
        (
            ['pretrain.py', '--config', 'configs/easy_vqa.py:tiny', '--workdir', '{tmp}/run'],
            ['refiner.target'],
        ),
        (['tools/export.py', '--workdir', '{tmp}/none', '--output', '{tmp}/out'], ['config.json not found']),
        (
            ['tools/analyze.py', '--workdirs', 'a={tmp}/none', '--output', '{tmp}/out'],
            ['config.json not found'],
        ),
        (['tools/analyze.py', '--workdirs', 'a', '--output', '{tmp}/out'], ["--workdirs entry 'a'"]),
        (
            ['tools/export.py', '--workdir', '{tmp}/run', '--output', '{tmp}/out', '--step', '3'],
            ['--step 3', 'holds the checkpoints of steps [2, 4]'],
        ),
        (
            ['tools/export.py', '--workdir', '{tmp}/run', '--output', '{tmp}/out', '--platforms', 'cpu,gpu'],
            ["['gpu'] unknown", "'cpu', 'cuda', 'rocm', 'tpu'"],  # jax.export would lower for 'gpu' silently
        ),
        (['train.py', '--config', 'configs/easy_vqa.py:tiny', '--workdir', ''], ['--workdir is empty']),
        (
            ['train.py', '--config', 'configs/easy_vqa.py:tiny', '--workdir', '{tmp}/run/config.json'],
            ['run/config.json is a file; expected a directory'],
        ),
        (
            ['train.py', '--config', 'configs/easy_vqa.py:tiny', '--workdir', '{tmp}/x', '--log_level=loud'],
            ['loud'],
        ),
        (
            ['train.py', '--config', 'configs/custom.py:kinds=signal:audio', '--workdir', '{tmp}/x'],
            ['kinds', 'audio'],
        ),
        (
            ['tools/export.py', '--workdir', '{tmp}/broken', '--output', '{tmp}/out'],
            ['broken/config.json is not a config.json this library wrote'],
        ),
    ],
    ids=[
        'pretrain-embedding-target',
        'export-no-run',
        'analyze-no-run',
        'analyze-usage',
        'export-no-such-step',
        'export-unknown-platform',
        'empty-workdir',
        'workdir-is-a-file',
        'unknown-log-level',
        'unknown-modality-kind',
        'damaged-config-json',
    ],
)
def test_every_entry_point_prints_a_users_mistake_plainly(tmp_path, args, names):
    # A workdir with checkpoints of steps 2 and 4 (their contents are not read before the error).
    for step in (2, 4):
        (tmp_path / 'run' / 'checkpoints' / str(step)).mkdir(parents=True)
    (tmp_path / 'run' / 'config.json').write_text('{}')
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'config.json').write_text('{"seed": 0,')  # a run killed while writing it
    rc, stderr = run(*(a.format(tmp=tmp_path) for a in args))
    assert_plain(rc, stderr, *names)
    for name in ('config.json', 'claim.json', 'checkpoints'):  # an empty --workdir is not the repository
        assert not os.path.exists(os.path.join(ROOT, name))


@pytest.mark.slow
def test_an_init_from_that_is_not_a_run_is_refused_and_left_alone(tmp_path, easy_vqa_dir):
    (tmp_path / 'a_file').write_text('')
    for source in (tmp_path / 'nothing', tmp_path / 'a_file'):
        rc, stderr = run(
            'train.py',
            '--config',
            'configs/easy_vqa.py:tiny',
            '--workdir',
            str(tmp_path / f'run_{source.name}'),
            f'--config.data.data_dir={easy_vqa_dir}',
            f'--config.init_from={source}',
        )
        assert_plain(rc, stderr, f"config.init_from is '{source}', which is not the workdir of a run")
    assert not (tmp_path / 'nothing').exists()  # the checkpoint manager did not create it


def test_debug_shows_the_traceback(tmp_path):
    # An error found while parsing the flags (the config file's get_config raises it; --debug comes after) ...
    rc, stderr = train(tmp_path, 'configs/easy_vqa.py:fusion=nope', '--debug')
    assert rc != 0
    assert 'Traceback (most recent call last)' in stderr and 'fusion=nope' in stderr, stderr
    # ... and one raised in main.
    rc, stderr = train(tmp_path, 'configs/easy_vqa.py:tiny', '--config.data.name=nope', '--debug')
    assert rc != 0
    assert 'Traceback (most recent call last)' in stderr, stderr
    assert "ValueError: config.data.name='nope'" in stderr, stderr


PROGRAM = """
from absl import app
from refnet_jax import cli

def main(argv):
    raise {error}('what went wrong')

cli.run(main)
"""


@pytest.mark.parametrize(
    'error, plain',
    [
        ('ValueError', True),
        ('FileNotFoundError', True),
        ('PermissionError', True),  # an OSError: a workdir that cannot be written
        ('FloatingPointError', True),  # trainer.NonFiniteLossError is one
        ('app.UsageError', True),
        ('RuntimeError', False),
        ('KeyError', False),
        ('TypeError', False),
    ],
)
def test_only_a_users_mistake_loses_its_traceback(error, plain):
    rc, stderr = run('-c', PROGRAM.format(error=error))
    if plain:
        assert_plain(rc, stderr, 'what went wrong')
    else:
        assert rc == 1
        assert 'Traceback (most recent call last)' in stderr and f'{error}: ' in stderr, stderr
        assert 'error: ' not in stderr


def test_ctrl_c_stops_without_a_traceback():
    rc, stderr = run('-c', PROGRAM.format(error='KeyboardInterrupt'))
    assert rc == 130, stderr
    assert stderr.strip().splitlines()[-1] == 'stopped: interrupted (Ctrl-C)' and 'Traceback' not in stderr, (
        stderr
    )


@pytest.mark.parametrize('how', ['flag', 'environment'])
def test_debug_shows_the_traceback_of_a_users_mistake(how):
    rc, stderr = run(
        '-c',
        PROGRAM.format(error='ValueError'),
        *(['--debug'] if how == 'flag' else []),
        debug_env=how == 'environment',
    )
    assert rc == 1
    assert 'Traceback (most recent call last)' in stderr and 'ValueError: what went wrong' in stderr, stderr
    assert 'error: ' not in stderr


@pytest.mark.slow
def test_a_non_finite_loss_through_train_py_is_one_plain_line(tmp_path, easy_vqa_dir):
    rc, stderr = run(
        'train.py',
        '--config',
        'configs/easy_vqa.py:tiny',
        '--workdir',
        str(tmp_path / 'run'),
        f'--config.data.data_dir={easy_vqa_dir}',
        '--config.train.num_steps=8',
        '--config.train.learning_rate=1e38',
        '--config.train.grad_clip_norm=0.0',
    )
    assert_plain(rc, stderr, 'loss is', 'The last good checkpoint (step 2)')
    assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()  # kept, as the message says
