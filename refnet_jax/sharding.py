"""Device mesh, shardings and multi-host start-up.

The batch is sharded over the mesh axis `data`; parameters and optimizer state are replicated. The mesh
axis is `Auto` on purpose (DESIGN.md §3): XLA's partitioner then row-shards pairwise losses such as the MS
loss by itself, and eager slicing of sharded arrays keeps working.
"""

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from refnet_jax import contract


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


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis `data` over `config.mesh.data` devices (-1: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    n = config.mesh.data
    if n == -1:
        n = len(devices)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f'config.mesh.data is {config.mesh.data}; expected -1 or 1..{len(devices)} '
            f'(the number of devices)'
        )
    return jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,), devices=devices[:n])


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
    return NamedSharding(mesh, P('data'))


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
