"""Where published figures come from, and how they are printed: the machine, run records, markdown tables.

The experiment grids (experiments/) and the benchmarks (benchmarks/) both record what they measure with the
machine, the date and the 1-minute load average, and both print markdown tables. This is their one home. It
lives in the package, not beside the scripts, so that a script run by path (`python experiments/tables.py`,
a benchmark's worker process) imports it as the installed `refnet_jax.analysis.report`, with no change to `sys.path`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# ----------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (`platform.processor()` or 'unknown' where there is none)."""
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
    """The 1-minute load average (runnable processes, averaged): above the core count, other work competed."""
    return os.getloadavg()[0]


def package_version(name: str) -> str:
    """The installed version of `name`, read without importing it ('not installed' when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def machine(packages: Sequence[str] = ()) -> dict[str, Any]:
    """When, how and where figures are measured: date, command, machine and the versions of `packages`."""
    return {
        'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
        'command': ' '.join(['python', *sys.argv]),
        'platform': platform.platform(),
        'arch': platform.machine(),
        'cpu_count': os.cpu_count(),
        'usable_cpus': usable_cpus(),
        'cpu_model': cpu_model(),
        'python': platform.python_version(),
        'versions': {p: package_version(p) for p in packages},
    }


def machine_summary(info: dict[str, Any] | None = None) -> str:
    """The machine in one line, as run records keep it: 'x86_64, 2 cores, 3.11.9, Linux-...'."""
    info = machine() if info is None else info
    return f'{info["arch"]}, {info["cpu_count"]} cores, {info["python"]}, {info["platform"]}'


def header_line(info: dict[str, Any], load_before: float, load_after: float) -> str:
    """One markdown line that says when, where and with what figures were measured (`machine`'s `info`)."""
    versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items())
    return (
        f'**{info["date"]}** · `{info["command"]}` · {info["platform"]}, {info["cpu_count"]} CPUs '
        f'({info["usable_cpus"]} usable), {info["cpu_model"]} · Python {info["python"]}, {versions} · '
        f'1-min load average {load_before:.2f} before, {load_after:.2f} after'
    )


# ----------------------------------------------------------------------------------------------- records


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes `payload` as indented JSON with sorted keys, atomically (a reader never sees half a file)."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(path + '.tmp', path)


def load_record(path: str | os.PathLike) -> dict | None:
    """The JSON record at `path`, or None where there is none yet."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def shell_join(cmd: Sequence[str]) -> str:
    """`cmd` as one line a POSIX shell reads back as the same words: an argument with shell characters is
    double-quoted where that is enough (`"--config.train.decay_mask=('.*',)"`), else `shlex.quote`d."""

    def quote(arg: str) -> str:
        if shlex.quote(arg) == arg:
            return arg
        return f'"{arg}"' if not any(c in arg for c in '"$`\\!') else shlex.quote(arg)

    return ' '.join(quote(a) for a in cmd)


def run_and_record(
    cmd: list[str], workdir: str, record_path: str, *, root: str, results_file: str = 'results.json'
) -> dict:
    """Runs `cmd` (['python', script, ...]) from `root` and writes its record to `record_path`.

    The record holds the command, the wall time, the machine (`machine_summary`), the 1-minute load averages
    before and after, the date, and the run's `root/workdir/results_file`. It is written after the run,
    atomically, so that a cell whose record exists is finished and is never run again; a run that fails
    leaves none. The run's output goes to `root/workdir/train.log`.

    Returns:
      The record.
    """
    print(f'[{time.strftime("%H:%M:%S")}] {shell_join(cmd)}', flush=True)
    start, load_before = time.time(), load_average()
    os.makedirs(os.path.join(root, workdir), exist_ok=True)
    with open(os.path.join(root, workdir, 'train.log'), 'a') as log:
        # The recorded command says `python`; it runs with this interpreter.
        subprocess.run([sys.executable, *cmd[1:]], cwd=root, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    with open(os.path.join(root, workdir, results_file)) as f:
        results = json.load(f)
    record = {
        'command': shell_join(cmd),
        'wall_seconds': wall,
        'machine': machine_summary(),
        # 1-minute load averages around the run: above the core count, other work slowed it.
        'load_average': [load_before, load_average()],
        'date': time.strftime('%Y-%m-%d'),
        'results': results,
    }
    write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------------------------- tables


def mean_std(values: ArrayLike, digits: int = 4) -> str:
    """'0.9990 ± 0.0004': the mean and the population standard deviation of `values`, to `digits` places."""
    x = np.asarray(values, np.float64)
    return f'{x.mean():.{digits}f} ± {x.std():.{digits}f}'


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table of `rows` under `headers`; cells are written with `str`.

    Args:
      headers: the column titles.
      rows: one sequence of cells per row, each as long as `headers`.
      align: one letter per column, 'l' (the renderer's default) or 'r' (right-aligned); None: all 'l'.

    >>> print(markdown_table(['model', 'N'], [['a', 3]], align='lr'))
    | model | N |
    |---|---:|
    | a | 3 |
    """
    align = 'l' * len(headers) if align is None else align
    if len(align) != len(headers) or set(align) - {'l', 'r'}:
        raise ValueError(f'align={align!r}: expected one of l, r per column ({len(headers)} columns)')
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f'a row of {len(row)} cells under {len(headers)} headers: {list(row)}')
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + ''.join('---|' if a == 'l' else '---:|' for a in align)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_doc(
    path: str, text: str, plot: Callable[[str], None] | None = None, plot_path: str | None = None
) -> None:
    """Writes a markdown report to `path` and, when given, draws `plot(plot_path)`; without matplotlib (the
    `analysis` extra) the plot is skipped with a line on stderr."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    if plot is None:
        return
    try:
        plot(plot_path)
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[analysis]"): no plot.', file=sys.stderr)
