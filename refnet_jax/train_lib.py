"""Training and evaluation: TrainState, the jitted train and eval steps, and `train_and_evaluate`.

`train_and_evaluate(config, workdir)` is the whole supervised run: it prepares the data, restores the
latest checkpoint of `workdir` or initialises, trains with one jitted step sharded over the data mesh,
checkpoints (state and data-iterator position), logs scalars to `metrics.jsonl` and TensorBoard, and
writes `results.json` with the validation and test metrics at the end.
"""

import dataclasses
import functools
import json
import math
import sys
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

from refnet_jax import checkpointing, contract, input_pipeline, losses, objective, refiner, sharding
from refnet_jax import metrics as metrics_lib
from refnet_jax import model as model_lib

TrainState = train_state.TrainState

# Config fields that may change between a run and its resumption: training longer, logging differently, or
# resuming on another topology (the global batch, and so the computation, stays the same).
RESUMABLE_FIELDS = (
    'train.num_steps',
    'train.log_every_steps',
    'train.checkpoint_every_steps',
    'train.eval_every_steps',
    'mesh.data',
    'mesh.distributed',
    'mesh.coordinator_address',
    'mesh.num_processes',
    'mesh.process_id',
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------- config


def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out


def load_workdir_config(workdir) -> ml_collections.ConfigDict:
    """The config a run saved in `workdir/config.json` (for export and analysis of a finished run)."""
    path = epath.Path(workdir) / 'config.json'
    if not path.exists():
        raise FileNotFoundError(f'{path} not found: expected the workdir of a training run')
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def init_rngs(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(parameter init key, train-step key), both from `config.seed`."""
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    return init_rng, step_rng


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Writes `config.json` into a new workdir; refuses to resume a workdir made with another config.

    Only the fields in RESUMABLE_FIELDS may differ (e.g. training longer); anything else would mix two
    experiments in one workdir.
    """
    path = workdir / 'config.json'
    current = json.loads(config.to_json_best_effort())
    if not path.exists():
        path.write_text(json.dumps(current, indent=2, sort_keys=True))
        return
    before, now = _flatten(json.loads(path.read_text())), _flatten(current)
    changed = sorted(
        k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_FIELDS
    )
    if changed:
        details = '\n'.join(f'  {k}: workdir {before.get(k)!r}, now {now.get(k)!r}' for k in changed)
        raise ValueError(
            f'{workdir} holds a run with another config; use a new --workdir, or the same config. '
            f'Differences:\n{details}'
        )


# ----------------------------------------------------------------------------------------------- state


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, after clipping by global norm (when > 0)."""
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.num_steps, t.warmup_steps + 1)
    )
    tx = optax.adamw(schedule, weight_decay=t.weight_decay)
    if t.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
    return tx, schedule


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
      state: parameters and optimizer state as a training run starts, on the mesh (None without `init`).
      train_step: the jitted, donating `(state, batch, rng) -> (state, metrics)` (None without `init`).
      pretraining: whether the objective is the refiner loss alone.
    """

    config: ml_collections.ConfigDict
    info: contract.DatasetInfo
    mesh: jax.sharding.Mesh
    model: model_lib.ReFNet
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState | None
    train_step: Callable | None
    pretraining: bool = False


def build(
    config: ml_collections.ConfigDict,
    *,
    pretraining: bool = False,
    info: contract.DatasetInfo | None = None,
    devices: Sequence[jax.Device] | None = None,
    init: bool = True,
    seed: int | None = None,
) -> Run:
    """The one way to set up a run: dataset info -> mesh -> model -> optimizer -> state -> step.

    Training, pre-training, export, analysis, the benchmarks and the tests all call this, so what they use is
    what trains.

    Args:
      config: the experiment config.
      pretraining: the refiner loss alone, no labels.
      info: the dataset's description; default: read (and, the first time, prepared) from `config.data`.
      devices: the devices of the mesh; default: all (`config.mesh.data` of them).
      init: also initialise the state (from `config.seed`, or `seed`) and jit the train step.
      seed: overrides the initialisation seed (default: `config.seed`, as a training run).
    """
    info = input_pipeline.get_dataset_info(config.data) if info is None else info
    mesh = sharding.make_mesh(config, devices=devices)
    sharding.check_batch_divisibility(config, mesh)
    model = model_lib.create_model(config, info)
    tx, schedule = create_optimizer(config)
    state = step = None
    if init:
        init_rng = init_rngs(config)[0] if seed is None else jax.random.key(seed)
        with jax.set_mesh(mesh):
            state = create_train_state(model, tx, info, init_rng, mesh)
            step = make_train_step(config, info.multi_label, schedule, mesh, state, pretraining)
    return Run(config, info, mesh, model, tx, schedule, state, step, pretraining)


def create_train_state(
    model: model_lib.ReFNet,
    tx: optax.GradientTransformation,
    info: contract.DatasetInfo,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """Initialises parameters and optimizer state, replicated over the mesh."""
    batch = contract.dummy_batch(info, 2)

    def init(rng):
        params = model.init({'params': rng, 'dropout': rng}, batch)['params']
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    abstract = jax.eval_shape(init, rng)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------- steps


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    multi_label: bool,
    schedule: optax.Schedule,
    pretraining: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch; pure, jitted once by `make_train_step`.

    With `pretraining`, the loss is the refiner loss alone and the batch holds no labels.
    """
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        logits, aux = state.apply_fn({'params': params}, batch, train=True, rngs={'dropout': rng})
        if pretraining:
            return objective.pretraining_loss(aux, batch, config)
        return objective.supervised_loss(logits, aux, batch, config, multi_label)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['param_norm'] = optax.tree.norm(state.params)
    metrics['learning_rate'] = schedule(state.step)
    return state.apply_gradients(grads=grads), metrics


def make_train_step(config, multi_label, schedule, mesh, state, pretraining=False):
    """The jitted train step: state replicated and donated, batch sharded on `data`."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    step = functools.partial(
        train_step, config=config, multi_label=multi_label, schedule=schedule, pretraining=pretraining
    )
    return jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
    )


@jax.jit
def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Logits for a sharded batch, without the refiner (it only matters in training)."""
    logits, _ = state.apply_fn({'params': state.params}, batch, train=False, with_refiner=False)
    return logits


@functools.partial(jax.jit, static_argnames='config')
def pretraining_eval_step(state: TrainState, batch, config) -> tuple[dict[str, jax.Array], jax.Array]:
    """Per-example refiner losses {m: (B,)} and the fused embeddings (B, D) of a sharded batch."""
    _, aux = state.apply_fn({'params': state.params}, batch, train=False)
    per_example = {
        m: losses.refiner_loss(r, aux['targets'][m], kind=config.loss.refiner_kind)
        for m, r in aux['reconstructions'].items()
    }
    return per_example, aux['fused']


def evaluate_pretraining(
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    info: contract.DatasetInfo,
    mesh: jax.sharding.Mesh,
    config: ml_collections.ConfigDict,
) -> dict[str, float]:
    """Refiner losses over a split, and the spread of the fused embeddings (0 means collapse).

    `fused_spread` is the mean over dimensions of the standard deviation across examples of the
    L2-normalised fused embeddings: a network whose fused embedding is constant scores 0.
    """
    gathered = []
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k != 'label'}
        contract.check_batch(batch, info, labeled=False)
        global_batch = sharding.shard_batch(batch, mesh)
        per_example, fused = pretraining_eval_step(
            state, global_batch, ml_collections.FrozenConfigDict(config)
        )
        out = {'losses': per_example, 'fused': fused, 'mask': global_batch['mask']}
        gathered.append(multihost_utils.process_allgather(out, tiled=True))
    mask = np.concatenate([g['mask'] for g in gathered]).astype(bool)
    fused = np.concatenate([g['fused'] for g in gathered])[mask].astype(np.float64)
    fused /= np.maximum(np.linalg.norm(fused, axis=-1, keepdims=True), 1e-12)
    out = {'num_examples': float(mask.sum()), 'fused_spread': float(fused.std(axis=0).mean()), 'loss': 0.0}
    for m in gathered[0]['losses']:
        value = float(np.concatenate([g['losses'][m] for g in gathered])[mask].mean())
        out[f'refiner_loss/{m}'] = value
        out['loss'] += config.loss.refiner_weights[m] * value
    return out


def evaluate(
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    info: contract.DatasetInfo,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Metrics over a whole split: every real example once (padding rows are masked out)."""
    gathered = []
    for batch in batches:
        contract.check_batch(batch, info)
        global_batch = sharding.shard_batch(batch, mesh)
        logits = eval_step(state, global_batch)
        out = {'logits': logits, 'label': global_batch['label'], 'mask': global_batch['mask']}
        gathered.append(multihost_utils.process_allgather(out, tiled=True))
    logits = np.concatenate([g['logits'] for g in gathered]).astype(np.float64)
    labels = np.concatenate([g['label'] for g in gathered])
    mask = np.concatenate([g['mask'] for g in gathered]).astype(bool)
    out = {'num_examples': int(mask.sum())}
    if info.multi_label:
        probs = 1.0 / (1.0 + np.exp(-logits))
        out.update({f'{k}_f1': v for k, v in metrics_lib.multilabel_f1(probs, labels, where=mask).items()})
        out['loss'] = float(
            np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))), axis=-1)[
                mask
            ].mean()
        )
    else:
        out['accuracy'] = metrics_lib.accuracy(logits, labels, where=mask)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        out['loss'] = float(-np.take_along_axis(logp, labels[:, None].clip(0, None), -1)[:, 0][mask].mean())
        if info.num_classes == 2:
            out['auroc'] = metrics_lib.roc_auc(logits[:, 1] - logits[:, 0], labels, where=mask)
    return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- logging


class MetricWriter:
    """Scalars to `metrics.jsonl` (one JSON object per line) and TensorBoard event files, from process 0."""

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            import tensorboardX  # imported here: only process 0 writes

            self._jsonl = (workdir / 'metrics.jsonl').open('a')
            self._tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = '') -> None:
        if not self.enabled:
            return
        row = {f'{prefix}{k}': float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({'step': step, **row}) + '\n')
        self._jsonl.flush()
        for k, v in row.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


# ----------------------------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ReFNet as `config` says, resuming from `workdir` if it holds a checkpoint.

    With `config.init_from` set to a pre-training workdir, a fresh run starts from that run's encoders,
    fusion and refiner (see `init_from_pretrained`).

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
    if not any(w > 0 for w in config.loss.refiner_weights.values()):
        raise ValueError(
            f'pre-training needs a refiner: config.loss.refiner_weights is {dict(config.loss.refiner_weights)}'
        )
    if config.model.refiner.target in refiner.COLLAPSIBLE:
        # A network whose encoders output a constant reconstructs a constant target perfectly.
        raise ValueError(
            f"config.model.refiner.target is {config.model.refiner.target!r}; pre-training needs 'input': "
            f'{" and ".join(map(repr, refiner.COLLAPSIBLE))} targets are made by the network itself, which can '
            'collapse to a constant that the refiner reconstructs perfectly'
        )
    return _run(config, workdir, pretraining=True)


def init_from_pretrained(state: TrainState, workdir: str, tx: optax.GradientTransformation) -> TrainState:
    """`state` with every parameter of the pre-training run in `workdir` except the task head.

    The head and the optimizer state start fresh. A parameter whose shape differs is an error naming its
    path and both shapes; parameters the pre-training run lacks (the head) keep their initialisation.
    """
    pretrained = checkpointing.Checkpointer(epath.Path(workdir) / 'checkpoints')
    step = pretrained.latest_step()
    if step is None:
        raise ValueError(f'config.init_from is {workdir!r}, which holds no checkpoint')
    source = {k: v for k, v in pretrained.restore_params(step).items() if k != 'head'}
    target = {k: v for k, v in state.params.items() if k in source}
    checkpointing.check_shapes(source, target, f'the pre-training checkpoint at step {step} in {workdir}')
    params = dict(state.params)
    for k, v in source.items():
        params[k] = jax.tree.map(
            lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), v, target[k]
        )
    logging.info('Initialised %s from step %d of %s; the head is new.', sorted(source), step, workdir)
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, state.opt_state))(params)
    return state.replace(params=params, opt_state=opt_state)


def _run(config: ml_collections.ConfigDict, workdir: str, *, pretraining: bool) -> dict[str, Any]:
    t_start = time.time()
    sharding.maybe_initialize_distributed(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_workdir_config(config, workdir)

    run = build(config, pretraining=pretraining)
    info, mesh, tx, state, train_step_fn = run.info, run.mesh, run.tx, run.state, run.train_step
    num_steps = config.train.num_steps
    logging.info(
        '%s on %s: %s examples; %d devices; %d steps of %d.',
        'Pre-training' if pretraining else 'Training',
        info.name,
        info.num_examples,
        mesh.devices.size,
        num_steps,
        config.train.batch_size,
    )

    def evaluate_split(state, split):
        batches = input_pipeline.eval_batches(config, split)
        if pretraining:
            return evaluate_pretraining(state, batches, info, mesh, config)
        return evaluate(state, batches, info, mesh)

    with jax.set_mesh(mesh):
        _, step_rng = init_rngs(config)
        logging.info('Parameters: %s', f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')
        train_iter = input_pipeline.make_train_iterator(config, seed=config.seed, labeled=not pretraining)
        ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
        if ckpt.latest_step() is None and config.get('init_from'):
            state = init_from_pretrained(state, config.init_from, tx)
        state = ckpt.restore_or_init(state, train_iter)
        start = int(state.step)
        writer = MetricWriter(workdir)
        try:
            last_train: dict[str, float] = {}
            last_saved = ckpt.latest_step()
            pending = []
            t_log, n_log = time.time(), 0
            bar = tqdm.tqdm(
                total=num_steps,
                initial=start,
                desc='train',
                disable=not sys.stderr.isatty(),
                dynamic_ncols=True,
            )
            try:
                for step in range(start, num_steps):
                    batch = next(train_iter)
                    if pretraining:
                        batch = {k: v for k, v in batch.items() if k != 'label'}
                    contract.check_batch(batch, info, labeled=not pretraining)
                    state, metrics = train_step_fn(state, sharding.shard_batch(batch, mesh), step_rng)
                    pending.append(metrics)
                    n_log += config.train.batch_size
                    bar.update(1)
                    done = step + 1
                    log_now = done % config.train.log_every_steps == 0 or done == num_steps
                    save_now = done % config.train.checkpoint_every_steps == 0 or done == num_steps
                    if log_now or save_now:
                        rows = jax.device_get(pending)
                        pending = []
                        for i, row in enumerate(rows):
                            if not math.isfinite(float(row['loss'])):
                                raise NonFiniteLossError(
                                    f'loss is {float(row["loss"])} at step {done - len(rows) + i + 1}; stopping. '
                                    f'The last good checkpoint (step {last_saved}) in {ckpt.directory} is kept.'
                                )
                        last_train = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
                        if log_now:
                            last_train['examples_per_second'] = n_log / (time.time() - t_log)
                            t_log, n_log = time.time(), 0
                            writer.write(done, last_train, 'train/')
                            shown = {k: last_train[k] for k in ('loss', 'accuracy') if k in last_train}
                            bar.set_postfix({k: f'{v:.4f}' for k, v in shown.items()})
                            if bar.disable:
                                logging.info(
                                    'step %d/%d: %s, %.0f examples/s',
                                    done,
                                    num_steps,
                                    ', '.join(f'{k} {v:.4f}' for k, v in shown.items()),
                                    last_train['examples_per_second'],
                                )
                    if save_now:
                        ckpt.save(state, train_iter)
                        last_saved = done
                    every = config.train.eval_every_steps
                    if every and done % every == 0 and done != num_steps:
                        val = evaluate_split(state, 'validation')
                        writer.write(done, val, 'val/')
                        logging.info('step %d: validation %s', done, val)
            finally:
                # Also when a step fails (a non-finite loss): the checkpoint in flight is the last good one.
                bar.close()
                ckpt.wait()

            results = {'step': int(state.step), 'train': last_train}
            for key, split in (('val', 'validation'), ('test', 'test')):
                results[key] = evaluate_split(state, split)
                writer.write(int(state.step), results[key], f'{key}/')
            results['wall_seconds'] = time.time() - t_start
        finally:  # the writer's files and the checkpoint manager are closed however the run ends
            writer.close()
            ckpt.close()
    if jax.process_index() == 0:
        (workdir / 'results.json').write_text(json.dumps(results, indent=2, sort_keys=True))
    logging.info('Results: %s', json.dumps(results))
    return results
