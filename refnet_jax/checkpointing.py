"""Orbax checkpoints of the train state and the data iterator: restore-or-init, shape checks, export.

A checkpoint holds two items: `state` (step, params, opt_state) and `data_iter` (the grain iterator's
position), so that a killed run resumes exactly where it was. Restoring always goes against an abstract
target that carries the shardings of the current mesh, so a checkpoint written under one topology restores
under another.
"""

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class ShapeMismatchError(ValueError):
    """A checkpoint does not fit the model of the current config."""


def _as_dict(state) -> dict[str, Any]:
    return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state}


def abstract_like(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _path(keys) -> str:
    """'params/image/Conv_0/kernel': the same for a NamedTuple field and the dict orbax's metadata makes of it."""
    parts = []
    for k in keys:
        for attr in ('key', 'idx', 'name'):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return '/'.join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(saved: Any, expected: Any, what: str) -> None:
    """Raises ShapeMismatchError naming every parameter path whose shape differs, or that one side lacks."""
    saved_flat, want_flat = _shapes(saved), _shapes(expected)
    problems = []
    for path in sorted(set(saved_flat) | set(want_flat)):
        a, b = saved_flat.get(path), want_flat.get(path)
        if a != b:
            problems.append(
                f'  {path}: checkpoint {a if a is not None else "missing"}, '
                f'config {b if b is not None else "missing"}'
            )
    if problems:
        raise ShapeMismatchError(
            f'{what} does not fit the model of this config:\n'
            + '\n'.join(problems[:20])
            + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else '')
        )


class Checkpointer:
    """An orbax CheckpointManager for `state` and `data_iter`.

    Args:
      directory: where the step folders are written.
      max_to_keep: how many recent checkpoints are kept.
    """

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 2):
        directory = str(directory)
        # orbax wants absolute paths; a relative local workdir is relative to the current directory.
        self.directory = epath.Path(directory if '://' in directory else os.path.abspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                'state': ocp.StandardCheckpointHandler(),
                'data_iter': grain.checkpoint.CheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, data_iter: grain.DatasetIterator | None = None) -> None:
        """Saves at `state.step` (asynchronously; `wait()` or `close()` finishes it)."""
        items = {'state': ocp.args.StandardSave(_as_dict(state))}
        if data_iter is not None:
            items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(int(state.step), args=ocp.args.Composite(**items))

    def restore(self, state, data_iter: grain.DatasetIterator | None = None, step: int | None = None):
        """Restores `state` (and the iterator, in place) from `step` (default: the latest).

        `state` only provides the structure, shapes and shardings; its values are not used.
        """
        step = self.latest_step() if step is None else step
        target = abstract_like(_as_dict(state))
        saved = self.manager.item_metadata(step)['state']
        check_shapes(saved, target, f'the checkpoint at step {step} in {self.directory}')
        items = {'state': ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))['state']
        return state.replace(
            step=restored['step'], params=restored['params'], opt_state=restored['opt_state']
        )

    def restore_or_init(self, state, data_iter: grain.DatasetIterator | None = None):
        """The latest checkpoint if there is one, else `state` unchanged (a fresh start)."""
        step = self.latest_step()
        if step is None:
            logging.info('No checkpoint in %s: starting from step 0.', self.directory)
            return state
        logging.info('Restoring step %d from %s.', step, self.directory)
        return self.restore(state, data_iter, step)

    def restore_params(self, step: int | None = None) -> Any:
        """The parameters of a checkpoint as NumPy arrays, without a model (for export and inspection).

        Works in a process with another device count than the one that saved (an export on one CPU of a run
        trained on 8 devices): the target is built from the checkpoint's own metadata, every array on this
        process's first device.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            self.manager.item_metadata(step)['state'],
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return jax.tree.map(np.asarray, restored['state']['params'])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
