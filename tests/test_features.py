"""Frozen features once: tools/features.py encodes a modality over every split, configs/custom.py trains on them."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import one_cpu_env, tiny_config

from refnet_jax.data import input_pipeline
from refnet_jax.export import features
from refnet_jax.models import layers
from refnet_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_CPU = one_cpu_env()


@pytest.mark.slow(seconds=30)
def test_features_py_writes_an_own_data_directory_that_custom_py_trains_on(tmp_path, easy_vqa_dir):
    out = tmp_path / 'feats'
    cmd = [
        sys.executable,
        'tools/features.py',
        '--config',
        'configs/easy_vqa.py:tiny',
        '--encode',
        'image',
        '--output',
        str(out),
        f'--config.data.data_dir={easy_vqa_dir}',
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ONE_CPU, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    train_cmd = proc.stdout.strip().splitlines()[-1].split()
    assert train_cmd[:3] == ['python', 'train.py', '--config'] and train_cmd[3].endswith(
        ':kinds=image:features+question:tokens'
    )
    # The features are the encoder's pooled output on each example's image; the rest is as stored.
    config = tiny_config(easy_vqa_dir)
    run = trainer.build(config, devices=jax.devices()[:1])
    batch = next(iter(input_pipeline.eval_batches(config, 'test')))
    encoder = dict(run.model.encoders)['image']
    want = layers.pooled(encoder.apply({'params': run.state.params['encoders']['image']}, batch['image']))
    want = np.asarray(want)[batch['image_index']][np.asarray(batch['mask'], bool)]
    with np.load(out / 'test.npz') as test:
        np.testing.assert_allclose(test['image'][: len(want)], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            test['question'][: len(want)], batch['question'][np.asarray(batch['mask'], bool)]
        )
        assert len(test['label']) == run.info.num_examples['test']
    train = [
        *train_cmd[1:],
        f'--config.data.data_dir={tmp_path / "tfds"}',
        '--config.train.num_steps=4',
    ]
    train[train.index('--workdir') + 1] = str(tmp_path / 'run')
    proc = subprocess.run(
        [sys.executable, *train], cwd=ROOT, env=ONE_CPU, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'run' / 'results.json').exists()


def test_an_unknown_modality_to_encode_is_named(easy_vqa_dir, tmp_path):
    config = tiny_config(easy_vqa_dir)
    run = trainer.build(config, devices=jax.devices()[:1], init=False)
    with pytest.raises(
        ValueError, match=r"modalities \['imag'\] to encode are not among \['image', 'question'\]"
    ):
        features.write_features(config, {}, run.model, run.info, str(tmp_path / 'x'), ['imag'])
