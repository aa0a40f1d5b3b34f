"""Set-up shared by the tests: tiny easy-VQA configs, freshly initialized train states, stored records."""

import numpy as np

from configs import easy_vqa
from refnet_jax import input_pipeline, train_lib


def tiny_config(data_dir, arg: str = 'tiny', **train):
    """`configs/easy_vqa.py:<arg>` reading the prepared data in `data_dir`, with `train` fields overridden."""
    config = easy_vqa.get_config(arg)
    config.data.data_dir = str(data_dir)
    for k, v in train.items():
        config.train[k] = v
    return config


def fresh_state(config, devices=None, seed: int = 0):
    """(info, mesh, tx, schedule, state): what `train_lib.build` sets up at the start of a run."""
    run = train_lib.build(config, devices=devices, seed=seed)
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
