"""Training: everything between a config and a finished workdir.

- `trainer`: `build` (one way to make a run from a config), the jitted steps, `train_and_evaluate`, `pretrain`.
- `objective`, `metrics`: what a step minimizes and how a split is scored.
- `optim`, `accumulation`, `sharding`: the optimizer from config, exact gradient accumulation, the device mesh.
- `checkpointing`, `selection`, `preemption`, `pretrained`: orbax checkpoints and resume, best-checkpoint
  selection, preemption signals, parameters started from elsewhere (`config.init_from` and every module's).
- `workdir`: one run per workdir (an atomic claim, released at exit, a stale one taken over).
- `inference`: `load_run`, the one way to load a finished run; `metric_writer`, `profiling`, `paths`: support.
"""
