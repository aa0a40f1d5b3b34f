"""Frozen features once: run encoders over a dataset and write their outputs as an own-data directory.

A frozen (pretrained) tower computes the same outputs every epoch; computing them once and training on them
is the cheap way to train the rest. `write_features(config, output, encode=...)` runs the encoders of the
modalities in `encode` over every split of `config`'s dataset (the run's parameters: `config.model.*.init_from`
or a trained workdir's) and writes `train.npz`, `validation.npz` and `test.npz`: each encoded modality as its
pooled output, a `features` array (N, D), or with `tokens_out` its tokens, a `series` (N, T, D); every other
modality as it is (a shared modality's rows repeated per example); and `label`. The directory is what
`configs/custom.py` reads (`:kinds=image:features+question:tokens` names the modalities and their kinds).
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from refnet_jax.data import contract, input_pipeline
from refnet_jax.models import layers

SPLITS = ('train', 'validation', 'test')


def write_features(
    config: ml_collections.ConfigDict,
    params: Any,
    model: Any,
    info: contract.DatasetInfo,
    output: str,
    encode: Sequence[str],
    *,
    tokens_out: bool = False,
) -> dict[str, str]:
    """Writes the own-data directory `output` (see the module docstring); returns {modality: kind} of it.

    Args:
      config: the config whose data are read (every split, in stored order).
      params: the network's parameters (those of `model`).
      model: the `ReFNet` of `config`; its encoders run, nothing else.
      info: the dataset's description.
      output: the directory written.
      encode: the modalities replaced by their encoder's output.
      tokens_out: write token outputs (B, T, D) as `series` instead of pooling them to `features`.
    """
    unknown = [m for m in encode if m not in info.modalities]
    if unknown:
        raise ValueError(f'modalities {unknown} to encode are not among {sorted(info.modalities)}')
    encoders = dict(model.encoders)

    @jax.jit
    def run(params, batch):
        out = {}
        for m in encode:
            e = encoders[m].apply({'params': params['encoders'][m]}, batch[m])
            out[m] = (e.tokens if tokens_out else layers.pooled(e)) if isinstance(e, layers.Tokens) else e
        return out

    kinds = {
        m: ('series' if tokens_out else 'features') if m in encode else mi.kind
        for m, mi in info.modalities.items()
    }
    os.makedirs(output, exist_ok=True)
    for split in SPLITS:
        arrays: dict[str, list[np.ndarray]] = {m: [] for m in info.modalities} | {'label': []}
        for batch in input_pipeline.eval_batches(config, split):
            real = np.asarray(batch['mask'], bool)
            encoded = jax.device_get(run(params, {m: batch[m] for m in encode}))
            for m, mi in info.modalities.items():
                x = encoded[m] if m in encode else batch[m]
                if mi.shared:
                    x = np.take(x, batch[contract.index_key(m)], axis=0)
                arrays[m].append(np.asarray(x)[real])
            arrays['label'].append(np.asarray(batch['label'])[real])
        stacked = {k: np.concatenate(v) for k, v in arrays.items()}
        for m in encode:
            stacked[m] = stacked[m].astype(np.float32)
        np.savez(os.path.join(output, f'{split}.npz'), **stacked)
        logging.info(
            '%s: %d examples -> %s', split, len(stacked['label']), os.path.join(output, f'{split}.npz')
        )
    with open(os.path.join(output, 'kinds.json'), 'w') as f:
        json.dump({'kinds': kinds, 'class_names': list(info.class_names)}, f, indent=2)
    return kinds
