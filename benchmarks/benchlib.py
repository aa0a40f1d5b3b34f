"""What the benchmark scripts share: worker subprocesses, memory readings, timing and the run's record.

Every benchmark runs each measured side in its own child process (`python benchmarks/<name>.py --worker ...`),
so that sides neither share a heap nor warm each other's caches, and so that a child's peak memory is its own.
A worker prints one line `RESULT {json}` last; the parent collects these and prints markdown tables
(`refnet_jax.analysis.report`, which also describes the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from refnet_jax import config_lib
from refnet_jax.analysis import report

RESULT_PREFIX = 'RESULT '
MB = 1e6  # Memory is reported in MB (10^6 bytes), times in ms or s.


# ----------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """This process's resident set size in bytes (VmRSS; the peak so far where /proc is missing)."""
    kb = _status_kb('VmRSS')
    return kb * 1024 if kb is not None else peak_rss()


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM, else getrusage's ru_maxrss)."""
    kb = _status_kb('VmHWM')
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024


# ----------------------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int) -> tuple[list[float], Any]:
    """Seconds per call of `fn` (which must block until its work is done), after `warmup` calls.

    Returns the `repeats` timings and the last call's output.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, minimum and maximum of timings (the median is the figure; min-max shows the noise)."""
    return {'median': statistics.median(times), 'min': min(times), 'max': max(times)}


# ----------------------------------------------------------------------------------------------- workers


def emit_result(result: dict[str, Any]) -> None:
    """Prints a worker's result as the line its parent reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, args: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """Runs `python script --worker args...` and returns its result, or {'error': why} when it failed."""
    cmd = [sys.executable, script, '--worker', *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {'error': f'timed out after {timeout:.0f} s'}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    if proc.returncode < 0:
        tail = f'killed by signal {-proc.returncode} (out of memory?); {tail}'
    print(f'worker failed: {" ".join(cmd)}\n{proc.stderr[-4000:]}', file=sys.stderr)
    return {'error': tail[:200]}


# ----------------------------------------------------------------------------------------------- configs


def load_config(spec: str):
    """The ConfigDict of `path/to/config.py[:arg]`, as train.py's --config reads it (path from the cwd)."""
    return config_lib.load_file(spec)


# ----------------------------------------------------------------------------------------------- runs


def add_run_flags(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    """The flags every benchmark takes: --timeout (seconds per worker), --json, and the workers' --worker."""
    parser.add_argument('--timeout', type=float, default=timeout, help='seconds per worker')
    parser.add_argument('--json', help='also write the figures to this JSON file')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)


@dataclasses.dataclass
class Run:
    """Where one benchmark ran: the machine (`report.machine`) and the load average before and after it.

    Attributes:
      name: the benchmark, as its JSON output names it.
      info: `report.machine(packages)`.
      load_before: the 1-minute load average when it started.
      load_after: the same when its workers were done (`finish`).
    """

    name: str
    info: dict[str, Any]
    load_before: float
    load_after: float | None = None

    @classmethod
    def start(cls, name: str, packages: Sequence[str]) -> Run:
        return cls(name, report.machine(packages), report.load_average())

    def finish(self) -> None:
        self.load_after = report.load_average()

    def header(self) -> str:
        """The markdown line printed above the figures: date, command, machine, versions, load."""
        return report.header_line(self.info, self.load_before, self.load_after)

    def write_json(
        self, path: str, args: argparse.Namespace, results: Any, hidden: Sequence[str] = ()
    ) -> None:
        """Writes the figures with their settings (`args` but the flags in `hidden`), machine and load."""
        settings = {k: v for k, v in vars(args).items() if k not in ('worker', 'json', *hidden)}
        report.write_json(
            path,
            {
                'benchmark': self.name,
                'machine': self.info,
                'load_average_1min': {'before': self.load_before, 'after': self.load_after},
                'settings': settings,
                'results': results,
            },
        )
