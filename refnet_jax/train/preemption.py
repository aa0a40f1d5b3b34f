"""Preemption: SIGTERM (a preempted VM, a scheduler's time limit) makes training save a checkpoint of the step
it reached and stop, with `Interrupted`; the same command then resumes there."""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Interrupted(Exception):
    """SIGTERM (a preemption, a scheduler's time limit) stopped training after saving a checkpoint of the
    step it had reached; the same command resumes there. `exit_code`: what the command line exits with."""

    exit_code = 128 + signal.SIGTERM


class SigtermFlag:
    """Records SIGTERM instead of dying of it, while training runs (in the main thread only)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def install(self) -> 'SigtermFlag':
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning('SIGTERM: saving a checkpoint at the next step, then stopping.')
        self.received = True

    def restore(self) -> None:
        """Puts back the handler that was there before `install`."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def any_process(self) -> bool:
        """Whether some process received it (all processes must stop at the same step)."""
        if jax.process_count() == 1:
            return self.received
        return bool(multihost_utils.process_allgather(np.asarray(self.received)).any())
