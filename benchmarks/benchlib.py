"""What the benchmark scripts share: the machine header, worker subprocesses, memory readings and tables.

Every benchmark runs each measured side in its own child process (`python benchmarks/<name>.py --worker ...`),
so that sides neither share a heap nor warm each other's caches, and so that a child's peak memory is its own.
A worker prints one line `RESULT {json}` last; the parent collects these and prints markdown tables.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULT_PREFIX = 'RESULT '
MB = 1e6  # Memory is reported in MB (10^6 bytes), times in ms or s.


# ----------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ('unknown' where there is none)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.partition(':')[2].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask; os.cpu_count() where that is not available)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (the number of runnable processes, averaged)."""
    return os.getloadavg()[0]


def package_version(name: str) -> str:
    """The installed version of `name`, read without importing it ('not installed' when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def machine_info(packages: Sequence[str]) -> dict[str, Any]:
    """Date, command, machine and package versions, for the header line and the JSON output."""
    return {
        'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
        'command': ' '.join(['python', *sys.argv]),
        'platform': platform.platform(),
        'cpu_count': os.cpu_count(),
        'usable_cpus': usable_cpus(),
        'cpu_model': cpu_model(),
        'python': platform.python_version(),
        'versions': {p: package_version(p) for p in packages},
    }


def header_line(info: dict[str, Any], load_before: float, load_after: float) -> str:
    """One markdown line that says when, where and with what the figures were measured."""
    versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items())
    return (
        f'**{info["date"]}** · `{info["command"]}` · {info["platform"]}, {info["cpu_count"]} CPUs '
        f'({info["usable_cpus"]} usable), {info["cpu_model"]} · Python {info["python"]}, {versions} · '
        f'1-min load average {load_before:.2f} before, {load_after:.2f} after'
    )


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
    path, _, arg = spec.partition(':')
    if not path.endswith('.py') or not os.path.isfile(path):
        raise ValueError(
            f'config {spec!r}: expected an existing configs/<name>.py[:arg] file, from the repo root'
        )
    module_spec = importlib.util.spec_from_file_location('benchmark_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


# ----------------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers are right-aligned by the renderer, so cells are plain strings here."""
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, 'w') as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write('\n')
