"""Set-up shared by the tests: tiny easy-VQA configs and train.py commands, own-data configs, freshly
initialized train states, stored records, the code blocks of the docs."""

import os
import pathlib
import re

import numpy as np

from configs import easy_vqa
from refnet_jax import config_lib
from refnet_jax.data import input_pipeline
from refnet_jax.train import trainer

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'
CUSTOM = DOCS.parent / 'configs' / 'custom.py'
# XLA flags of a test's subprocess on one CPU device: the quick compilation of the test processes
# (tests/conftest.py), for the short runs that mostly compile; REFNET_TEST_OPTIMIZE=1 compiles as users do.
ONE_CPU_FLAGS = '' if os.environ.get('REFNET_TEST_OPTIMIZE') else '--xla_backend_optimization_level=0'


def one_cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a short subprocess (train.py, a tool) on one CPU device, compiled quickly."""
    return dict(os.environ, XLA_FLAGS=ONE_CPU_FLAGS, JAX_PLATFORMS='cpu', **extra)


def tiny_train_command(workdir, data_dir, *overrides: str) -> list[str]:
    """`train.py` on the tiny easy-VQA config, as a user types it (relative to the repository root), reading
    the data prepared in `data_dir`."""
    return [
        'train.py',
        '--config',
        'configs/easy_vqa.py:tiny',
        '--workdir',
        str(workdir),
        f'--config.data.data_dir={data_dir}',
        *overrides,
    ]


def custom_config(manual_dir, data_dir, arg: str, **data):
    """configs/custom.py with the modalities of its argument, as a user runs it (no code), reading
    `manual_dir` and preparing into `data_dir`; `data` sets further `config.data` fields."""
    config = config_lib.load_file(f'{CUSTOM}:{arg}')
    config.data.manual_dir, config.data.data_dir = str(manual_dir), str(data_dir)
    for k, v in data.items():
        config.data[k] = v
    return config


def doc_blocks(page: str, marker: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of the fenced code blocks of the docs page `page` (relative to docs/), in order; with
    `marker`, only those between its `<!-- marker:begin -->` and `<!-- marker:end -->` comments."""
    text = (DOCS / page).read_text()
    if marker is not None:
        begin, end = f'<!-- {marker}:begin -->', f'<!-- {marker}:end -->'
        assert text.count(begin) == 1 and text.count(end) == 1, f'docs/{page}: one {begin} ... {end} expected'
        text = text.split(begin)[1].split(end)[0]
    return re.findall(r'^```(\w+)\n(.*?)^```', text, flags=re.S | re.M)


def tiny_config(data_dir, arg: str = 'tiny', **train):
    """`configs/easy_vqa.py:<arg>` reading the prepared data in `data_dir`, with `train` fields overridden."""
    config = easy_vqa.get_config(arg)
    config.data.data_dir = str(data_dir)
    for k, v in train.items():
        config.train[k] = v
    return config


def fresh_state(config, devices=None, seed: int = 0):
    """(info, mesh, tx, schedule, state): what `trainer.build` sets up at the start of a run."""
    run = trainer.build(config, devices=devices, seed=seed)
    return run.info, run.mesh, run.tx, run.schedule, run.state


def stored_records(data_config) -> dict[str, dict[str, np.ndarray]]:
    """Every stored record of each split of the (prepared) dataset of `data_config`, stacked:
    {split: {feature: (N, ...)}}."""
    _, builder = input_pipeline._prepared_builder(data_config)
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        rows = [source[i] for i in range(len(source))]
        out[split] = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    return out


def run_readme_bash(code: str, cwd, *, tfds_dir=None, timeout: int = 900):
    """Runs a bash block of the docs as a new user would from the repository root: `python` is this interpreter,
    `train.py`, `configs/` and `tools/` are linked into `cwd`, one CPU device. Fails the test with the block's output
    when it fails; returns the finished process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ('train.py', 'configs', 'tools'):
        if not os.path.lexists(os.path.join(cwd, name)):
            os.symlink(os.path.join(root, name), os.path.join(cwd, name))
    env = dict(
        os.environ,
        PATH=f'{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}',  # `python` is this one
        JAX_PLATFORMS='cpu',
        XLA_FLAGS='',  # one device, for speed
    )
    if tfds_dir is not None:
        env['TFDS_DATA_DIR'] = str(tfds_dir)
    proc = subprocess.run(
        ['bash', '-eo', 'pipefail', '-c', code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f'{code}\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}'
    return proc
