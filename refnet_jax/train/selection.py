"""Choosing a checkpoint by a validation metric, and stopping when it no longer improves.

`config.train.select = 'val/accuracy'` (any metric of the validation split, `config.train.select_mode` 'max'
or 'min'; 'auto' is 'min' for a loss and the regression errors `mae` and `mse`, and 'max' otherwise) keeps,
besides the latest checkpoints, the one with the best value in `<workdir>/best` (an orbax manager with
`best_fn`, one checkpoint kept), and the run reports its test metrics at that checkpoint as well as at the last
step. `config.train.early_stop = N` stops training after N validations in a row without improvement.

`Selection` is the bookkeeping, a small JSON-able state saved with every latest checkpoint, so that a run
killed and restarted selects and stops exactly as an uninterrupted one would.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

MODES = ('auto', 'max', 'min')
LOWER_IS_BETTER = ('mae', 'mse')  # besides losses: what 'auto' selects by its minimum


def check_config(config: ml_collections.ConfigDict, metric_names: tuple[str, ...]) -> None:
    """Raises ValueError naming the field for a selection config that cannot work, before training.

    Args:
      config: the experiment config.
      metric_names: the metrics the run's validation reports (`Objective.metric_names`).
    """
    t = config.train
    select, early_stop = t.get('select'), t.get('early_stop', 0)
    if select is None:
        if early_stop:
            raise ValueError(
                f'config.train.early_stop is {early_stop}, which needs a metric to watch: set '
                f"config.train.select (e.g. 'val/{metric_names[0]}')"
            )
        return
    prefix, _, name = select.partition('/')
    if prefix != 'val' or name not in metric_names:
        raise ValueError(
            f'config.train.select is {select!r}; expected one of '
            f'{", ".join(repr("val/" + n) for n in metric_names)}'
        )
    if t.get('select_mode', 'auto') not in MODES:
        raise ValueError(f'config.train.select_mode is {t.select_mode!r}; expected one of {MODES}')
    if not t.eval_every_steps:
        raise ValueError(
            f'config.train.select is {select!r}, which needs validations during training: '
            'config.train.eval_every_steps is 0; set it to a positive number of steps'
        )


@dataclasses.dataclass
class Selection:
    """The best value of the selected metric so far, where it was reached, and the validations since.

    Attributes:
      metric: the validation metric, without its 'val/' prefix (e.g. 'accuracy').
      mode: 'max' or 'min'.
      early_stop: stop after this many validations in a row without improvement; 0: never.
      best: the best value so far (None before the first validation).
      best_step: the step at which it was reached.
      since_best: validations since the best one.
      last_step: the step of the latest validation.
    """

    metric: str
    mode: str
    early_stop: int = 0
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0
    last_step: int | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> 'Selection | None':
        """The selection of `config.train.select`; None when it is unset."""
        select = config.train.get('select')
        if select is None:
            return None
        metric = select.partition('/')[2]
        mode = config.train.get('select_mode', 'auto')
        if mode == 'auto':
            mode = 'min' if 'loss' in metric or metric in LOWER_IS_BETTER else 'max'
        return cls(metric, mode, int(config.train.get('early_stop', 0)))

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Records the validation `metrics` of `step`; True when they are the best so far (strictly better,
        so that the earliest of equal values stays selected). A NaN value is never the best."""
        self.last_step = step
        value = float(metrics[self.metric])
        better = math.isfinite(value) and (
            self.best is None or (value > self.best if self.mode == 'max' else value < self.best)
        )
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        """Whether `early_stop` validations in a row have brought no improvement."""
        return bool(self.early_stop) and self.since_best >= self.early_stop

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return dataclasses.asdict(self)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Takes up the `state()` saved with a checkpoint."""
        if (state['metric'], state['mode']) != (self.metric, self.mode):
            raise ValueError(
                f'the checkpoint selected by {state["mode"]} val/{state["metric"]}; this config by '
                f'{self.mode} val/{self.metric}: start a new workdir to select by another metric'
            )
        self.best, self.best_step = state['best'], state['best_step']
        self.since_best, self.last_step = state['since_best'], state['last_step']
