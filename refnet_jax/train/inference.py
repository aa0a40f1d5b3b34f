"""Finished runs loaded back: `load_run` (the one way to load a workdir: its config, model and checkpoint),
`load_network` (a ReFNet ready for inference on one device) and `collect` (its embeddings of a split).

`load_run` is what export, frozen features and the analysis tools call. `load_network` builds the network
of a config with `trainer.build` (the one set-up, so what is analysed is what trained) and takes the parameters
of a workdir's checkpoint, or keeps the initialization a run of the config starts from (the untrained baseline
of a linear probe). `collect` runs it over every real example of a split and returns the fused and unimodal
embeddings, the logits and the labels that `graph.analyze` scores.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from refnet_jax import config_lib
from refnet_jax.data import contract, input_pipeline
from refnet_jax.train import checkpointing, trainer


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A run loaded back from its workdir (`load_run`).

    Attributes:
      workdir: where it was read from.
      step: the step of the checkpoint its parameters come from.
      run: `trainer.build` of its config on one device (model, dataset info, objective, optimizer; no state).
      params: every parameter of that checkpoint (the refiner's too), as NumPy arrays.
    """

    workdir: str
    step: int
    run: trainer.Run
    params: Any

    @property
    def config(self):
        return self.run.config

    @property
    def info(self) -> contract.DatasetInfo:
        return self.run.info

    @property
    def model(self):
        return self.run.model


def load_run(workdir: str | pathlib.Path, *, step: int | None = None, config=None) -> FinishedRun:
    """The run in `workdir`: its `config.json` (or `config`), built on one device, and the parameters of its
    checkpoint at `step` (default: the latest).

    Works in a process with another device count than the run had (an export on one CPU of a run trained on 8
    devices). A workdir without `config.json` or without a checkpoint is a `ValueError` naming it.
    """
    workdir = pathlib.Path(workdir)
    config = _one_device(config_lib.load_workdir_config(workdir) if config is None else config)
    run = trainer.build(config, devices=jax.devices()[:1], init=False)
    ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f'workdir {str(workdir)!r} holds no checkpoint')
        params = ckpt.restore_params(step)
    finally:
        ckpt.close()
    return FinishedRun(str(workdir), step, run, params)


@dataclasses.dataclass(frozen=True)
class Network:
    """A ReFNet ready for inference on one device (`load_network`).

    Attributes:
      config: its config.
      workdir: the run its parameters come from; None for the random network.
      step: the checkpoint step; None for the random network.
      info: the dataset's `contract.DatasetInfo`.
      params: the parameters inference uses (no refiner).
      embed: jitted `(params, batch) -> {'logits', 'fused', 'embeddings'}`, without dropout or refiner.
    """

    config: Any
    workdir: str | None
    step: int | None
    info: Any
    params: Any
    embed: Callable[[Any, Mapping[str, Any]], dict[str, Any]]


def _one_device(config):
    """A resolved copy of `config` on a one-device mesh: the config a `Network` is built from and keeps."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data = 1
    return config


def load_network(config, workdir: str | pathlib.Path | None, *, step: int | None = None) -> Network:
    """The ReFNet of `config` with the parameters of `workdir`'s checkpoint at `step` (default: the latest).

    `workdir=None` gives the network a training run of `config` starts from: initialized from `config.seed`
    exactly as `trainer.train_and_evaluate` does, before any step (the random-network baseline of the linear
    probe). Only the parameters that inference uses are kept (no refiner), each shape-checked against the
    config's model.
    """
    config = _one_device(config)
    if workdir is None:  # the state exactly as a training run starts it (the random-network baseline)
        run = trainer.build(config, devices=jax.devices()[:1])
        params = jax.device_get(run.state.params)
        where = f'the initialization of seed {config.seed}'
    else:
        loaded = load_run(workdir, step=step, config=config)
        run, params, step = loaded.run, loaded.params, loaded.step
        where = f'the checkpoint at step {step} in {workdir}'
    info, model = run.info, run.model
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), contract.dummy_batch(info, 2), train=False, with_refiner=False)
    )['params']
    params = {k: v for k, v in params.items() if k in abstract}
    checkpointing.check_shapes(params, abstract, where)

    @jax.jit
    def embed(params, batch):
        logits, aux = model.apply({'params': params}, batch, train=False, with_refiner=False)
        return {'logits': logits, 'fused': aux['fused'], 'embeddings': aux['embeddings']}

    return Network(
        config=config,
        workdir=None if workdir is None else str(workdir),
        step=step,
        info=info,
        params=params,
        embed=embed,
    )


def collect(
    config,
    workdir: str | pathlib.Path | None,
    split: str,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    network: Network | None = None,
) -> dict[str, Any]:
    """The embeddings of a model on every real example of a split (or a seeded subsample of them).

    Runs on one device, in this process, over `input_pipeline.eval_batches` (padding rows dropped), with the
    model in inference mode (no dropout, no refiner).

    Args:
      config: the run's config (`config_lib.load_workdir_config(workdir)`).
      workdir: a training or pre-training run; its latest checkpoint is used. None: the randomly initialized
        network of `config` (`load_network`).
      split: 'train', 'validation', 'test', ... of `config.data`.
      max_examples: keep this many examples, drawn without replacement by `np.random.default_rng(seed)` and
        kept in split order; None: all of them.
      seed: seeds the subsample.
      batch_size: evaluation batch rows (default `config.eval.batch_size`).
      network: `load_network(config, workdir)`, when already loaded (to embed several splits with one load).

    Returns:
      {'fused': (N, D) float32, 'embeddings': {m: (N, D_m)}, 'logits': (N, C), 'labels': (N,) class ids or
      (N, C) multi-hot, 'index': (N,) position of each example among the split's examples, 'multi_label',
      'class_names', 'step' (of the checkpoint; None for the random network)}.
    """
    if max_examples is not None and (isinstance(max_examples, bool) or not int(max_examples) >= 1):
        raise ValueError(f'max_examples={max_examples!r}, expected a positive int or None')
    if network is None:
        network = load_network(config, workdir)
    elif network.workdir != (None if workdir is None else str(workdir)) or network.config != _one_device(
        config
    ):
        raise ValueError(
            f'network was loaded from workdir {network.workdir!r} and another config; collect was given '
            f'workdir {workdir!r}'
        )
    info = network.info
    parts = []
    for batch in input_pipeline.eval_batches(config, split, batch_size, process_index=0, process_count=1):
        contract.check_batch(batch, info)
        mask = np.asarray(batch['mask'], bool)
        if not mask.any():
            continue
        inputs = {k: v for k, v in batch.items() if k not in ('label', 'mask')}
        out = jax.device_get(network.embed(network.params, inputs))
        out['labels'] = batch['label']
        parts.append(jax.tree.map(lambda a, mask=mask: np.asarray(a)[mask], out))
    if not parts:
        raise ValueError(f'split {split!r} of {info.name!r} has no examples')
    data = jax.tree.map(lambda *a: np.concatenate(a), *parts)
    n = data['labels'].shape[0]
    data['index'] = np.arange(n)
    if max_examples is not None and max_examples < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=int(max_examples), replace=False))
        data = jax.tree.map(lambda a: a[keep], data)
    data['multi_label'] = info.multi_label
    data['class_names'] = tuple(info.class_names)
    data['step'] = network.step
    return data
