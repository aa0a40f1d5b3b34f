"""Device mesh, shardings and multi-host start-up.

The mesh has two axes, `data` and `fsdp`. The batch is sharded over both; parameters and optimizer state
are sharded over `fsdp` by regex rules (`config.mesh.shard_params`), replicated when `config.mesh.fsdp` is
1 (the default: data parallelism). The mesh axes are `Auto` on purpose (docs/architecture.md, "Traps"):
XLA's partitioner then row-shards pairwise losses such as the MS loss by itself, gathers sharded parameters
where a layer needs them, and eager slicing of sharded arrays keeps working.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from refnet_jax.data import contract
from refnet_jax.train import paths


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts multi-process JAX when `config.mesh.distributed` asks for it.

    On Cloud TPU pods and under SLURM, `jax.distributed.initialize()` finds the coordinator, the number of
    processes and this process's id by itself; elsewhere (several processes on one machine, with gloo CPU
    collectives) `config.mesh.coordinator_address`, `num_processes` and `process_id` give them.
    """
    if not config.mesh.distributed or jax.distributed.is_initialized():
        return
    given = {k: config.mesh.get(k) for k in ('coordinator_address', 'num_processes', 'process_id')}
    given = {k: v for k, v in given.items() if v is not None}
    logging.info('jax.distributed.initialize(%s)', ', '.join(f'{k}={v!r}' for k, v in given.items()))
    jax.distributed.initialize(**given)
    logging.info(
        'Process %d of %d; %d local devices.',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )


BATCH_AXES = ('data', 'fsdp')  # the batch is sharded over both mesh axes


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """A 2-D mesh (`data`, `fsdp`) of `config.mesh.data` x `config.mesh.fsdp` devices.

    `config.mesh.data` -1 takes every device (of all processes) that the `fsdp` axis leaves. Parameters and
    optimizer state are sharded over `fsdp` (`param_shardings`), the batch over both axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    fsdp = config.mesh.get('fsdp', 1)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f'config.mesh.fsdp is {fsdp}; expected a divisor of the {len(devices)} devices')
    n = config.mesh.data
    if n == -1:
        n = len(devices) // fsdp
    if not 1 <= n * fsdp <= len(devices):
        raise ValueError(
            f'config.mesh.data is {config.mesh.data} with config.mesh.fsdp {fsdp}; expected -1 or 1..'
            f'{len(devices) // fsdp} (data x fsdp devices of the {len(devices)})'
        )
    return jax.make_mesh(
        (n, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: n * fsdp]
    )


def param_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Sequence[str] = ('.*',)) -> Any:
    """A NamedSharding for each leaf of `tree` (parameters, optimizer state, a whole train state).

    A leaf whose '/'-joined path matches one of the regexes `rules` (`re.search`) is sharded over the `fsdp`
    axis on its largest dimension that the axis size divides (big_vision's `fsdp` strategy); anything else,
    and every leaf when the axis has size 1, is replicated. Optimizer moments have their parameter's path
    inside theirs, so they are sharded as their parameter is.
    """
    size = mesh.shape['fsdp']
    patterns = [re.compile(r) for r in rules]

    def choose(path, leaf):
        shape = tuple(getattr(leaf, 'shape', ()))
        name = paths.path_str(path)
        spec = [None] * len(shape)
        if size > 1 and any(p.search(name) for p in patterns):
            dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % size == 0]
            if dims:
                spec[dims[0]] = 'fsdp'
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(choose, tree)


def check_batch_divisibility(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly across processes and devices (and each micro-batch across the
    devices)."""
    n = mesh.devices.size
    for field in ('train.batch_size', 'eval.batch_size'):
        section, key = field.split('.')
        value = config[section][key]
        if value % n or value % jax.process_count():
            raise ValueError(
                f'config.{field} is {value}; expected a multiple of the {n} devices of the mesh '
                f'and of the {jax.process_count()} processes'
            )
    k = config.train.get('accumulation_steps', 1)
    if config.train.batch_size % (n * k):
        raise ValueError(
            f'config.train.batch_size is {config.train.batch_size}; with config.train.accumulation_steps {k} '
            f'it must be a multiple of {n * k} (each of the {k} micro-batches spread over the {n} devices)'
        )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension over every device of the mesh: the `data` and `fsdp` axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's part of the batch -> global arrays sharded on `data`.

    A shared modality m (one with an index key, `contract.index_key(m)`) may have any number of rows: they
    are padded with zero rows, which no example indexes, to a multiple of this process's devices (32
    questions on 4 images split over 8 devices). Index keys point into this process's rows of m; they are
    offset by the (padded) rows the processes before this one hold, so that they index the global array.
    """
    sharding = batch_sharding(mesh)
    local_devices = mesh.devices.size // jax.process_count()
    batch = {k: np.asarray(v) for k, v in batch.items()}
    for m in [k for k in batch if contract.index_key(k) in batch]:
        pad = -batch[m].shape[0] % local_devices
        if pad:
            batch[m] = np.concatenate([batch[m], np.zeros((pad, *batch[m].shape[1:]), batch[m].dtype)])
    out = {}
    for k, v in batch.items():
        if k.endswith('_index') and jax.process_count() > 1:
            v = v + jax.process_index() * batch[k.removesuffix('_index')].shape[0]
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
