"""Orbax checkpoints of the train state and the data iterator: restore-or-init, shape checks, export.

A checkpoint holds two items: `state` (step, params, opt_state) and `data_iter` (the grain iterator's
position), so that a killed run resumes exactly where it was. Restoring always goes against an abstract
target that carries the shardings of the current mesh, and the iterator positions of all processes are the
same (batch k of every process is its share of global batch k: `input_pipeline.make_train_iterator`), so a
checkpoint written under one topology (2 processes x 4 devices) restores under another (1 process x 8).
"""

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from refnet_jax.train import paths


class ShapeMismatchError(ValueError):
    """A checkpoint does not fit the model of the current config."""


def _as_dict(state) -> dict[str, Any]:
    return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state}


def abstract_like(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {paths.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


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


class IteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator handler (one `process_<i>-of-<n>.json` per process), restoring under any process count.

    When the checkpoint was written by another number of processes, the position is taken from the files of
    the processes that wrote it, which must all agree (they read in lockstep).
    """

    def restore(self, directory: epath.Path, item=None, args=None):
        item = item or args.item
        own = directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
        if own.exists():
            return super().restore(directory, item=item)
        files = sorted(directory.glob('process_*-of-*.json'))
        states = {f.name: json.loads(f.read_text()) for f in files}
        if not states or any(s != next(iter(states.values())) for s in states.values()):
            raise ValueError(
                f'cannot restore the data iterator from {directory} under {jax.process_count()} process(es): '
                f'expected {own.name} or agreeing files of another process count; found {states or "none"}'
            )
        logging.info('Data iterator position from %s (written by another process count).', sorted(states))
        item.set_state(next(iter(states.values())))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    """An orbax CheckpointManager for `state`, `data_iter` and, when a run selects a checkpoint, `selection`
    (the JSON state of `selection.Selection`).

    Args:
      directory: where the step folders are written.
      max_to_keep: how many recent checkpoints are kept.
      best_mode: 'max' or 'min' makes this the manager of the best checkpoint (`<workdir>/best`): orbax's
        `best_fn` keeps the one checkpoint whose `metrics['value']` is best.
    """

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 2, best_mode: str | None = None):
        directory = str(directory)
        # orbax wants absolute paths; a relative local workdir is relative to the current directory.
        self.directory = epath.Path(directory if '://' in directory else os.path.abspath(directory))
        best = {}
        if best_mode is not None:  # one checkpoint, the best by metrics['value']
            max_to_keep = 1
            best = dict(
                best_fn=lambda m: m['value'], best_mode=best_mode, keep_checkpoints_without_metrics=False
            )
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, **best)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                'state': ocp.StandardCheckpointHandler(),
                'data_iter': IteratorHandler(),
                'selection': ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        state,
        data_iter: grain.DatasetIterator | None = None,
        *,
        selection: dict[str, Any] | None = None,
        value: float | None = None,
    ) -> None:
        """Saves at `state.step` (asynchronously; `wait()` or `close()` finishes it).

        Args:
          state: the train state.
          data_iter: the training iterator, whose position is saved with it.
          selection: the `Selection.state()` of a run that selects a checkpoint.
          value: the selected metric's value (the best manager's `best_fn` reads it).
        """
        items = {'state': ocp.args.StandardSave(_as_dict(state))}
        if data_iter is not None:
            items['data_iter'] = IteratorSave(data_iter)
        if selection is not None:
            items['selection'] = ocp.args.JsonSave(selection)
        metrics = None if value is None else {'value': value}
        self.manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics)

    def restore_selection(self, step: int | None = None) -> dict[str, Any] | None:
        """The `selection` item of a checkpoint (default: the latest); None when it has none."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / 'selection').exists():
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(selection=ocp.args.JsonRestore()))
        return dict(restored['selection'])

    def all_steps(self) -> tuple[int, ...]:
        return tuple(self.manager.all_steps())

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
            items['data_iter'] = IteratorRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))['state']
        return state.replace(
            step=restored['step'], params=restored['params'], opt_state=restored['opt_state']
        )

    def restore_or_init(self, state, data_iter: grain.DatasetIterator | None = None):
        """The newest intact checkpoint if there is one, else `state` unchanged (a fresh start).

        A checkpoint that cannot be read (files truncated or missing, as a preemption or a full disk leaves
        them) is moved aside to `<directory>_damaged/<step>`, with a warning, and the next older one is
        tried; when every checkpoint is damaged the run stops with an error rather than start afresh. A
        checkpoint that does not fit the config (`ShapeMismatchError`) is an error, not damage.
        """
        if self.latest_step() is None:
            logging.info('No checkpoint in %s: starting from step 0.', self.directory)
            return state
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            logging.info('Restoring step %d from %s.', step, self.directory)
            try:
                return self.restore(state, data_iter, step)
            except ShapeMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever a damaged file raises
                aside = self.move_aside(step)
                logging.warning(
                    'The checkpoint at step %d is damaged (%s: %s); moved to %s.',
                    step,
                    type(e).__name__,
                    e,
                    aside,
                )
                damaged.append(f'step {step} ({type(e).__name__}: {str(e)[:200]})')
        raise ValueError(
            f'every checkpoint in {self.directory} is damaged: {"; ".join(damaged)}; they were moved to '
            f'{self.directory}_damaged. Start a new --workdir, or restore the files.'
        )

    def move_aside(self, step: int) -> epath.Path:
        """Moves the folder of `step` to `<directory>_damaged/<step>` (out of the manager's sight)."""
        aside = epath.Path(f'{self.directory}_damaged') / str(step)
        if aside.exists():
            aside = aside.parent / f'{step}-{len(list(aside.parent.iterdir()))}'
        if jax.process_index() == 0:  # every process finds the same damage; one moves it
            aside.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
        self.manager.reload()
        return aside

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
