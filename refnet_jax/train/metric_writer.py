"""Scalars of a run to `metrics.jsonl` (one JSON object per line) and TensorBoard event files."""

import json
from collections.abc import Mapping

import jax
from etils import epath


class MetricWriter:
    """Writes scalars with their step from process 0 (the others write nothing); `close` when done."""

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            import tensorboardX  # imported here: only process 0 writes

            self._jsonl = (workdir / 'metrics.jsonl').open('a')
            self._tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = '') -> None:
        """One row of `scalars`, each name prefixed by `prefix` (e.g. 'val/'), at `step`; flushed at once."""
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
