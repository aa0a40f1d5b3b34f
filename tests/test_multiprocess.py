"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) against 1 and 8 devices.

`train.py` is started twice with `--config.mesh.distributed` and an explicit coordinator, exactly as the
local multi-process command of docs/how-to/many-devices.md does. 20 steps of the tiny easy-VQA config must
give the same losses and final parameters as the same 20 steps on 1 device and on 8 devices in one process;
the 2-process checkpoint must then resume in one process on 8 devices, identically to the 8-device run
resumed the same way.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ONE_CPU_FLAGS, tiny_config

from refnet_jax.train import checkpointing, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def overrides(**fields) -> list[str]:
    return [f'--config.{k}={v}' for k, v in fields.items()]


COMMON = {'train.num_steps': STEPS, 'train.log_every_steps': 1, 'train.checkpoint_every_steps': STEPS}


def run_two_processes(workdir, data_dir):
    port = free_port()
    # 4 CPU devices a process, compiled as the test processes compile (helpers.ONE_CPU_FLAGS).
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=4 {ONE_CPU_FLAGS}'.strip())
    env['JAX_PLATFORMS'] = 'cpu'
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            'train.py',
            '--config',
            'configs/easy_vqa.py:tiny',
            '--workdir',
            str(workdir),
            *overrides(
                **{'data.data_dir': data_dir, **COMMON},
                **{
                    'mesh.distributed': True,
                    'mesh.coordinator_address': f'127.0.0.1:{port}',
                    'mesh.num_processes': 2,
                    'mesh.process_id': i,
                },
            ),
        ]
        log = open(workdir.parent / f'process{i}.log', 'w')  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for i, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=900)
        finally:
            log.close()
            for other, _ in procs:
                if other.poll() is None and proc.returncode not in (None, 0):
                    other.kill()
        assert rc == 0, (workdir.parent / f'process{i}.log').read_text()[-5000:]


def losses(workdir) -> np.ndarray:
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return np.array([r['train/loss'] for r in rows if 'train/loss' in r])


def params(workdir):
    ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
    try:
        return ckpt.restore_params()
    finally:
        ckpt.close()


def run_in_process(workdir, data_dir, mesh_data, **train):
    config = tiny_config(data_dir, **{k.removeprefix('train.'): v for k, v in {**COMMON, **train}.items()})
    config.mesh.data = mesh_data
    return trainer.train_and_evaluate(config, str(workdir))


@pytest.mark.slow(seconds=50)
def test_two_processes_train_like_one_and_eight_devices_and_resume_on_eight(tmp_path, easy_vqa_dir):
    assert len(jax.devices()) == 8
    two = tmp_path / 'two' / 'run'
    two.parent.mkdir()
    run_two_processes(two, easy_vqa_dir)
    results_two = json.loads((two / 'results.json').read_text())
    assert results_two['step'] == STEPS

    one, eight = tmp_path / 'one', tmp_path / 'eight'
    results_one = run_in_process(one, easy_vqa_dir, 1)
    results_eight = run_in_process(eight, easy_vqa_dir, -1)

    reference = losses(one)
    assert reference.shape == (STEPS,)
    np.testing.assert_allclose(losses(eight), reference, rtol=1e-5)
    np.testing.assert_allclose(losses(two), reference, rtol=1e-5)
    p_one = params(one)
    for other in (eight, two):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params(other), p_one
        )
    # Evaluation gathers every example once whatever the topology.
    for split in ('val', 'test'):
        assert results_two[split]['num_examples'] == results_one[split]['num_examples']
        np.testing.assert_allclose(results_two[split]['accuracy'], results_one[split]['accuracy'], atol=1e-3)
        np.testing.assert_allclose(results_eight[split]['loss'], results_one[split]['loss'], rtol=1e-4)

    # The 2 x 4 checkpoint (state and data position) resumes in one process on 8 devices.
    more = {'train.num_steps': STEPS + 4}
    run_in_process(two, easy_vqa_dir, -1, **more)
    run_in_process(eight, easy_vqa_dir, -1, **more)
    np.testing.assert_allclose(losses(two)[-4:], losses(eight)[-4:], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params(two), params(eight)
    )
