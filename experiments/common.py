"""What the experiment grids share: running one cell as its own process and recording it, resumably."""

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    return f'{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, {platform.platform()}'


def run_cell(cmd: list[str], workdir: str, record_path: str, results_file: str = 'results.json') -> dict:
    """Runs `cmd` (['python', script, ...], from the repository root) and writes its record to `record_path`.

    The record holds the command, the wall time, the machine, the 1-minute load averages before and after,
    the date, and the run's `workdir/results_file`. It is written atomically after the run, so that a cell
    whose record exists is finished and is never run again. The run's output goes to `workdir/train.log`.
    """
    print(f'[{time.strftime("%H:%M:%S")}] {" ".join(cmd)}', flush=True)
    t, load_before = time.time(), os.getloadavg()[0]
    os.makedirs(os.path.join(ROOT, workdir), exist_ok=True)
    with open(os.path.join(ROOT, workdir, 'train.log'), 'a') as log:
        # The recorded command says `python`; it runs with this interpreter.
        subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t
    with open(os.path.join(ROOT, workdir, results_file)) as f:
        results = json.load(f)
    record = {
        'command': ' '.join(cmd),
        'wall_seconds': wall,
        'machine': machine(),
        # 1-minute load averages around the run: above the core count, other work slowed it.
        'load_average': [load_before, os.getloadavg()[0]],
        'date': time.strftime('%Y-%m-%d'),
        'results': results,
    }
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    with open(record_path + '.tmp', 'w') as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(record_path + '.tmp', record_path)
    return record


def load_record(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
