"""Training and evaluation: TrainState, the jitted train and eval steps, and `train_and_evaluate`.

`train_and_evaluate(config, workdir)` is the whole supervised run (`pretrain` the self-supervised one; the
two differ only in their `objective`): it prepares the data, restores the latest checkpoint of `workdir` or
initializes, trains with one jitted step sharded over the data mesh, checkpoints (state and data-iterator
position), logs scalars to `metrics.jsonl` and TensorBoard, and writes `results.json` with the validation
and test metrics at the end.
"""

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils

from refnet_jax import config_lib, console
from refnet_jax.data import contract, input_pipeline
from refnet_jax.models import model as model_lib
from refnet_jax.train import accumulation, checkpointing, optim, preemption, pretrained, profiling, sharding
from refnet_jax.train import objective as objective_lib
from refnet_jax.train import selection as selection_lib
from refnet_jax.train import workdir as workdir_lib
from refnet_jax.train.metric_writer import MetricWriter

TrainState = train_state.TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------- config


def init_rngs(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(parameter init key, train-step key), both from `config.seed`."""
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    return init_rng, step_rng


# ----------------------------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run is made of, built from its config by `build`.

    Attributes:
      config: the experiment config.
      info: the dataset's description.
      mesh: the device mesh (batch sharded on `data`).
      model: the ReFNet of the config.
      tx: the optimizer.
      schedule: its learning-rate schedule.
      objective: what the train step minimizes and how `evaluate` scores a split.
      state: parameters and optimizer state as a training run starts, on the mesh (None without `init`).
      train_step: the jitted, donating `(state, batch, rng) -> (state, metrics)` (None without `init`).
    """

    config: ml_collections.ConfigDict
    info: contract.DatasetInfo
    mesh: jax.sharding.Mesh
    model: model_lib.ReFNet
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    objective: objective_lib.Objective
    state: TrainState | None
    train_step: Callable | None


def build(
    config: ml_collections.ConfigDict,
    *,
    pretraining: bool = False,
    info: contract.DatasetInfo | None = None,
    devices: Sequence[jax.Device] | None = None,
    init: bool = True,
    seed: int | None = None,
) -> Run:
    """The one way to set up a run: dataset info -> mesh -> model -> optimizer, objective -> state -> step.

    Training, pre-training, export, analysis, the benchmarks and the tests all call this, so what they use is
    what trains.

    Args:
      config: the experiment config.
      pretraining: the `objective.Pretraining` objective (the refiner loss alone, no labels) instead of
        `objective.Supervised`.
      info: the dataset's description; default: read (and, the first time, prepared) from `config.data`.
      devices: the devices of the mesh; default: all (`config.mesh.data` of them).
      init: also initialize the state (from `config.seed`, or `seed`) and jit the train step.
      seed: overrides the initialization seed (default: `config.seed`, as a training run).
    """
    config_lib.check_ranges(config)
    if not pretraining:
        objective_lib.check_config(config)  # the task and its losses agree, before the data are read
    mesh = sharding.make_mesh(config, devices=devices)
    sharding.check_batch_divisibility(config, mesh)  # before the data is read (and maybe prepared)
    info = input_pipeline.get_dataset_info(config.data) if info is None else info
    model = model_lib.create_model(config, info)
    tx, schedule = optim.create_optimizer(config)
    if pretraining:
        objective = objective_lib.Pretraining(config)
    else:
        objective = objective_lib.Supervised(config, multi_label=info.multi_label)
    state = step = None
    if init:
        init_rng = init_rngs(config)[0] if seed is None else jax.random.key(seed)
        with jax.set_mesh(mesh):
            rules = tuple(config.mesh.get('shard_params', ('.*',)))
            state = create_train_state(model, tx, info, init_rng, mesh, rules)
            step = make_train_step(objective, schedule, mesh, state)
    return Run(config, info, mesh, model, tx, schedule, objective, state, step)


def create_train_state(
    model: model_lib.ReFNet,
    tx: optax.GradientTransformation,
    info: contract.DatasetInfo,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    rules: Sequence[str] = ('.*',),
) -> TrainState:
    """Initializes parameters and optimizer state on the mesh: sharded over its `fsdp` axis by `rules`
    (`sharding.param_shardings`), replicated when the axis has size 1."""
    batch = contract.dummy_batch(info, 2)

    def init(rng):
        params = model.init({'params': rng, 'dropout': rng}, batch)['params']
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    abstract = jax.eval_shape(init, rng)
    shardings = sharding.param_shardings(abstract, mesh, rules)
    return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------- steps


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    objective: objective_lib.Objective,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch, minimising `objective.loss`; pure, jitted once by
    `make_train_step`. Modality dropout (`config.train.modality_dropout`) is drawn here, over the global
    batch, from the step's key. With `config.train.accumulation_steps` k > 1 the gradient is that of the
    whole batch, computed k micro-batches at a time (`accumulation.cached_gradients`)."""
    rng = jax.random.fold_in(rng, state.step)
    rates = objective.config.train.get('modality_dropout', {})
    if any(rates.values()):
        batch = contract.drop_modalities(batch, rates, jax.random.fold_in(rng, 1))

    frozen = optim.frozen_mask(objective.config, state.params)

    def forward(params, batch, rng):
        # No gradient into frozen parameters: XLA drops the backward pass of a wholly frozen module.
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        return state.apply_fn({'params': params}, batch, train=True, rngs={'dropout': rng})

    steps = objective.config.train.get('accumulation_steps', 1)
    if steps > 1:  # GradCache: exact for losses that pair examples (accumulation.py)
        loss = functools.partial(objective.loss, batch=batch)
        grads, metrics = accumulation.cached_gradients(forward, loss, state.params, batch, rng, steps)
    else:
        grads, metrics = jax.grad(lambda p: objective.loss(*forward(p, batch, rng), batch), has_aux=True)(
            state.params
        )
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['param_norm'] = optax.tree.norm(state.params)
    metrics['learning_rate'] = schedule(state.step)
    return state.apply_gradients(grads=grads), metrics


def make_train_step(
    objective: objective_lib.Objective, schedule: optax.Schedule, mesh: jax.sharding.Mesh, state: TrainState
) -> Callable:
    """The jitted train step: the state donated and kept in its shardings, the batch sharded over the mesh."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        functools.partial(train_step, objective=objective, schedule=schedule),
        donate_argnums=(0,),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
    )


@functools.partial(jax.jit, static_argnames='objective')
def eval_step(
    state: TrainState, batch: Mapping[str, jax.Array], objective: objective_lib.Objective
) -> dict[str, Any]:
    """`objective.eval_outputs` of a sharded batch: per-example outputs, every leaf (B, ...)."""
    logits, aux = state.apply_fn(
        {'params': state.params}, batch, train=False, with_refiner=objective.eval_with_refiner
    )
    return objective.eval_outputs(logits, aux, batch)


def evaluate(
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    objective: objective_lib.Objective,
    info: contract.DatasetInfo,
    mesh: jax.sharding.Mesh,
    absent: Sequence[str] = (),
) -> dict[str, float]:
    """`objective.split_metrics` over a whole split: every real example once.

    Args:
      batches: the host batches of the split, each with its `mask` of real rows (padding rows are dropped), as
        `input_pipeline.eval_batches` yields them.
      absent: modalities marked absent in every example (their values are not read).
    """
    gathered = []
    for batch in batches:
        if absent:  # every example of the split lacks these modalities
            n = len(batch['mask'])
            batch = dict(batch, **{contract.present_key(m): np.zeros((n,), bool) for m in absent})
        batch = _checked_and_sharded(batch, objective, info, mesh)
        out = {'outputs': eval_step(state, batch, objective), 'mask': batch['mask']}
        gathered.append(multihost_utils.process_allgather(out, tiled=True))
    mask = np.concatenate([g['mask'] for g in gathered]).astype(bool)
    outputs = jax.tree.map(lambda *xs: np.concatenate(xs)[mask], *[g['outputs'] for g in gathered])
    return objective.split_metrics(outputs)


def _checked_and_sharded(batch, objective, info, mesh):
    """The part of a host batch `objective` reads, checked against the dataset and sharded over the mesh."""
    batch = objective.inputs(batch)
    contract.check_batch(batch, info, labeled=objective.labeled)
    return sharding.shard_batch(batch, mesh)


# ----------------------------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ReFNet as `config` says, resuming from `workdir` if it holds a checkpoint.

    With `config.init_from` set to a pre-training workdir, a fresh run starts from that run's encoders,
    fusion, refiner and stand-ins, the head left new (see `pretrained.init_modules`).

    Returns:
      The contents of `workdir/results.json`: the final step, the last training metrics, validation and
      test metrics.
    """
    return _run(config, workdir, pretraining=False)


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Self-supervised pre-training with the refiner loss alone on every training input; labels are
    never read. The same checkpointing, resumption and logging as `train_and_evaluate`.

    Returns:
      The contents of `workdir/results.json`: the final step, the last training metrics, and the refiner
      losses and fused-embedding spread on the validation and test inputs.
    """
    objective_lib.Pretraining(config)  # refuses a config it cannot pre-train, before the workdir is made
    return _run(config, workdir, pretraining=True)


def _run(config: ml_collections.ConfigDict, workdir: str, *, pretraining: bool) -> dict[str, Any]:
    """A run in its steps: the workdir, the run's parts, restore-or-init, the loop, the final results."""
    t_start = time.time()
    workdir = _prepare_workdir(config, workdir)
    with workdir_lib.claimed(workdir):  # one run per workdir; a second stops here, having written nothing
        config_lib.check_workdir_config(config, workdir)
        run = build(config, pretraining=pretraining)
        _log_run(run)
        with jax.set_mesh(run.mesh):
            state, session = _restore_or_init(run, workdir)
            logging.info(
                'Training steps %d to %d, %d examples each, into %s.',
                int(state.step),
                config.train.num_steps,
                config.train.batch_size,
                workdir,
            )
            try:
                loop = _Loop(run, session, t_start)
                state = loop.train(state)
                results = _final_results(run, session, state, loop)
            finally:  # the writer's files and the checkpoint managers are closed however the run ends
                session.close()
        if jax.process_index() == 0:
            (workdir / 'results.json').write_text(json.dumps(results, indent=2, sort_keys=True))
        logging.info('Wrote %s.', workdir / 'results.json')
    return results


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
    """Checks the config and starts multi-process JAX (when asked) before the workdir is made."""
    config_lib.check_ranges(config)  # before the workdir records the config
    sharding.maybe_initialize_distributed(config)
    workdir = epath.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(
            f'workdir {workdir} is a file; expected a directory (a new one, or the workdir of a run)'
        )
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


@dataclasses.dataclass
class _Session:
    """What a run opens in its workdir, closed by `close` however it ends.

    Attributes:
      workdir: the run's workdir.
      train_iter: the training data iterator, at the position of the restored checkpoint.
      ckpt: the manager of `<workdir>/checkpoints`.
      selection: the checkpoint selection of `config.train.select` (None without).
      best: the manager of `<workdir>/best`, the selected checkpoint (None without selection).
      writer: metrics.jsonl and TensorBoard.
      sigterm: records SIGTERM while training runs.
    """

    workdir: epath.Path
    train_iter: Any
    ckpt: checkpointing.Checkpointer
    selection: selection_lib.Selection | None
    best: checkpointing.Checkpointer | None
    writer: MetricWriter
    sigterm: preemption.SigtermFlag

    def consider(self, state: TrainState, val: Mapping[str, float]) -> None:
        """Records a validation for selection; saves the best checkpoint when it improves."""
        step = int(state.step)
        if self.selection.update(step, val) and step not in self.best.all_steps():
            self.best.save(state, value=self.selection.best)  # a rerun after a kill finds it saved already
        self.writer.write(step, {'best': self.selection.best}, f'val/{self.selection.metric}_')

    def close(self) -> None:
        self.sigterm.restore()
        self.writer.close()
        self.ckpt.close()
        if self.best is not None:
            self.best.close()


def _restore_or_init(run: Run, workdir: epath.Path) -> tuple[TrainState, _Session]:
    """The state to start from (the latest checkpoint, else `init_from` and pretrained modules, else the
    initialization), with the iterator and selection restored to the same step."""
    config, state = run.config, run.state
    selection_lib.check_config(config, run.objective.metric_names(run.info.num_classes))
    selection = selection_lib.Selection.from_config(config)
    train_iter = input_pipeline.make_train_iterator(config, seed=config.seed, labeled=run.objective.labeled)
    ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
    best = None
    try:
        if selection is not None:
            best = checkpointing.Checkpointer(workdir / 'best', best_mode=selection.mode)
            saved = ckpt.restore_selection()
            if saved is not None:
                selection.restore(saved)
        if ckpt.latest_step() is None:  # a fresh run: config.init_from and the modules' own init_from
            state = pretrained.init_modules(state, config, run.tx)
        state = ckpt.restore_or_init(state, train_iter)
    except BaseException:
        for manager in (ckpt, best):
            if manager is not None:
                manager.close()
        raise
    writer = MetricWriter(workdir)
    session = _Session(workdir, train_iter, ckpt, selection, best, writer, preemption.SigtermFlag().install())
    return state, session


def _log_run(run: Run) -> None:
    """What a person wants to know as a run starts: the data, the model's size, the devices."""
    info = run.info
    counts = ' / '.join(f'{n:,} {split}' for split, n in info.num_examples.items())
    logging.info('Data: %s, %s examples.', info.name, counts)
    logging.info(
        'Model: %s parameters, %s fusion, %s objective; %d %s device(s).',
        f'{sum(x.size for x in jax.tree.leaves(run.state.params)):,}',
        run.config.model.fusion.kind,
        type(run.objective).__name__,
        run.mesh.devices.size,
        jax.default_backend(),
    )


class _Loop:
    """The training loop, and what its steps share: the metrics not yet logged, timings, the last save."""

    def __init__(self, run: Run, session: _Session, t_start: float):
        self.run, self.session, self.config = run, session, run.config
        self.t_start = t_start
        self.last_train: dict[str, float] = {}
        self.first_step_seconds: float | None = None  # None: no step run (the run had finished)
        self.last_saved = session.ckpt.latest_step()
        self.pending: list[dict[str, jax.Array]] = []
        self.t_log, self.n_log = time.time(), 0
        self.bar: tqdm.tqdm | None = None  # while `train` runs

    def train(self, state: TrainState) -> TrainState:
        """Steps from `state.step` to `config.train.num_steps` (or an early stop), logging, validating and
        checkpointing on the way; raises `preemption.Interrupted` after saving when SIGTERM came."""
        run, session, num_steps = self.run, self.session, self.config.train.num_steps
        start = int(state.step)
        step_rng = init_rngs(self.config)[1]
        profiler = profiling.StepProfiler(self.config, session.workdir)
        with console.progress(num_steps, initial=start, desc='train') as bar:
            self.bar = bar
            try:
                for step in range(start, num_steps):
                    if session.selection is not None and session.selection.should_stop:
                        break  # a resumed run that had stopped early
                    batch = _checked_and_sharded(next(session.train_iter), run.objective, run.info, run.mesh)
                    with profiler.annotate(step):
                        state, metrics = run.train_step(state, batch, step_rng)
                    profiler.after(step, metrics)
                    if step == start:  # compilation included (none when the compilation cache has it)
                        jax.block_until_ready(metrics)
                        self.first_step_seconds = time.time() - self.t_start
                        logging.info(
                            'First step done %.1f s after the start of the run.', self.first_step_seconds
                        )
                    self.pending.append(metrics)
                    self.n_log += self.config.train.batch_size
                    bar.update(1)
                    self._after_step(state, step + 1)
            finally:
                # Also when a step fails (a non-finite loss): the checkpoint in flight is the last good one.
                profiler.stop()
                session.ckpt.wait()
        return state

    def _after_step(self, state: TrainState, done: int) -> None:
        """Logs, validates, saves and stops on SIGTERM as the step `done` asks."""
        train = self.config.train
        log_now = done % train.log_every_steps == 0 or done == train.num_steps
        save_now = done % train.checkpoint_every_steps == 0 or done == train.num_steps
        if log_now or save_now:
            self._flush(done, log_now)
        if train.eval_every_steps and done % train.eval_every_steps == 0 and done != train.num_steps:
            # Before the checkpoint, which then holds the selection state after this validation.
            save_now |= self._validate(state, done)
        # Every step on one process; at log and save steps on several, which must agree.
        stop = (jax.process_count() == 1 or log_now or save_now) and self.session.sigterm.any_process()
        if save_now or stop:
            selection = self.session.selection
            self.session.ckpt.save(
                state, self.session.train_iter, selection=None if selection is None else selection.state()
            )
            self.last_saved = done
        if stop:
            raise preemption.Interrupted(
                f'SIGTERM at step {done} of {train.num_steps}; its checkpoint is in '
                f'{self.session.ckpt.directory}: the same command resumes there'
            )

    def _flush(self, done: int, log_now: bool) -> None:
        """Fetches the pending step metrics, stops on a non-finite loss, and at log steps writes their mean."""
        rows = jax.device_get(self.pending)
        self.pending = []
        for i, row in enumerate(rows):
            if not math.isfinite(float(row['loss'])):
                raise NonFiniteLossError(
                    f'loss is {float(row["loss"])} at step {done - len(rows) + i + 1}; stopping. '
                    f'The last good checkpoint (step {self.last_saved}) in {self.session.ckpt.directory} is kept.'
                )
        self.last_train = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
        if not log_now:
            return
        elapsed = time.time() - self.t_log
        train = self.last_train
        train['examples_per_second'] = self.n_log / elapsed
        train['step_seconds'] = elapsed * self.config.train.batch_size / self.n_log
        train.update(profiling.device_memory())
        self.t_log, self.n_log = time.time(), 0
        self.session.writer.write(done, train, 'train/')
        shown = ', '.join(f'{k} {train[k]:.4f}' for k in ('loss', 'accuracy') if k in train)
        speed = f'{train["examples_per_second"]:,.0f} examples/s'
        self.bar.set_postfix_str(f'{shown}, {speed}')
        if self.bar.disable:  # no terminal: a plain line instead of the bar
            logging.info('step %d/%d: %s, %s', done, self.config.train.num_steps, shown, speed)

    def _validate(self, state: TrainState, done: int) -> bool:
        """Validation during training (and selection); whether the run stops early here."""
        val = _evaluate_split(self.run, state, 'validation')
        self.session.writer.write(done, val, 'val/')
        logging.info('step %d: validation %s', done, console.format_metrics(val))
        selection = self.session.selection
        if selection is None:
            return False
        self.session.consider(state, val)
        if selection.should_stop:
            logging.info(
                'Stopping early at step %d: %d validations without a better %s than %s (step %d).',
                done,
                selection.since_best,
                self.config.train.select,
                selection.best,
                selection.best_step,
            )
        return selection.should_stop


def _evaluate_split(run: Run, state: TrainState, split: str, absent: Sequence[str] = ()) -> dict[str, float]:
    batches = input_pipeline.eval_batches(run.config, split)
    return evaluate(state, batches, run.objective, run.info, run.mesh, absent=absent)


def _evaluate_all(run: Run, state: TrainState) -> dict[str, dict[str, float]]:
    """val, test, and each without a modality of `config.eval.without`."""
    out = {}
    for key, split in (('val', 'validation'), ('test', 'test')):
        out[key] = _evaluate_split(run, state, split)
        for m in run.config.eval.get('without', ()):
            out[f'{key}_without_{m}'] = _evaluate_split(run, state, split, absent=(m,))
    return out


def _final_results(run: Run, session: _Session, state: TrainState, loop: _Loop) -> dict[str, Any]:
    """The contents of results.json: the last training metrics, the evaluations of the last step and, when
    the run selects a checkpoint, of the selected one."""
    logging.info('Evaluating step %d on the validation and test splits.', int(state.step))
    results = {'step': int(state.step), 'train': loop.last_train}
    results.update(_evaluate_all(run, state))
    for key, values in results.items():
        if key.startswith(('val', 'test')):
            session.writer.write(int(state.step), values, f'{key}/')
    selection = session.selection
    if selection is not None:
        if int(state.step) != selection.last_step:  # the last step's validation is a candidate too
            session.consider(state, results['val'])
        session.best.wait()
        chosen = session.best.restore(state, step=selection.best_step)
        results['selected'] = {
            'metric': run.config.train.select,
            'mode': selection.mode,
            'step': selection.best_step,
            'stopped_early': selection.should_stop,
            **_evaluate_all(run, chosen),
        }
    results['wall_seconds'] = time.time() - loop.t_start
    results['first_step_seconds'] = loop.first_step_seconds
    return results
