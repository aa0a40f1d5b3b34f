"""Profiling a training run: a `jax.profiler` trace of some steps, and device memory for the step metrics.

`config.train.profile = (first_step, num_steps)` traces steps first_step .. first_step + num_steps - 1 into
`<workdir>/profile` (open it with TensorBoard's profile plugin or Perfetto); each step is annotated
(`StepTraceAnnotation`), so the trace viewer shows step boundaries. An empty tuple (the default) traces
nothing.
"""

import os
from typing import Any

import jax
import ml_collections
from absl import logging


class StepProfiler:
    """Starts and stops the trace around the configured steps; `annotate(step)` wraps one step."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        window = tuple(config.train.get('profile', ()))
        if window and (
            len(window) != 2 or any(not isinstance(v, int) or v < 0 for v in window) or window[1] < 1
        ):
            raise ValueError(
                f'config.train.profile is {window}; expected (first_step, num_steps), two integers with '
                'first_step >= 0 and num_steps >= 1, or () for no trace'
            )
        self.first, self.count = window if window else (None, 0)
        self.directory = os.path.join(str(workdir), 'profile')
        self.active = False

    def annotate(self, step: int):
        """A context for the work of `step`: starts the trace at the first traced step."""
        if self.first is not None and step == self.first and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True
        return jax.profiler.StepTraceAnnotation('train', step_num=step)

    def after(self, step: int, outputs: Any) -> None:
        """Stops the trace after its last step (waiting for the step's `outputs`)."""
        if self.active and step + 1 >= self.first + self.count:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info(
                'Profile of steps %d-%d written to %s.',
                self.first,
                self.first + self.count - 1,
                self.directory,
            )


def device_memory() -> dict[str, float]:
    """This process's first device's memory in bytes (in use, peak), where the backend reports it (GPU,
    TPU); {} on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {}
    for key in ('bytes_in_use', 'peak_bytes_in_use'):
        if key in stats:
            out[f'device_{key}'] = float(stats[key])
    return out
