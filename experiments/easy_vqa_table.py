r"""The README's easy-VQA table: {lowrank (the default), concat, transformer} x {baseline, refiner, refnet} x seeds.

  python experiments/easy_vqa_table.py            # runs every missing cell, one at a time, then prints the table
  python experiments/easy_vqa_table.py --report   # only prints the table from results/easy_vqa/

Each cell is one `train.py` run; its results.json (plus the command, the wall time and the machine) is
written to results/easy_vqa/<fusion>-<variant>-seed<k>.json as soon as it finishes, and a cell whose file
exists is not run again, so an interrupted grid resumes where it was.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'results', 'easy_vqa')
FUSIONS = ('lowrank', 'concat', 'transformer')
VARIANTS = ('baseline', 'refiner', 'refnet')
SEEDS = (0, 1, 2)


def cell_command(fusion: str, variant: str, seed: int | str, workdir: str) -> list[str]:
    return [
        'python',
        'train.py',
        '--config',
        f'configs/easy_vqa.py:fusion={fusion},variant={variant}',
        '--workdir',
        workdir,
        f'--config.seed={seed}',
    ]


def machine() -> str:
    return f'{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, {platform.platform()}'


def run_missing(runs_dir: str) -> None:
    os.makedirs(OUT, exist_ok=True)
    for fusion in FUSIONS:
        for variant in VARIANTS:
            for seed in SEEDS:
                name = f'{fusion}-{variant}-seed{seed}'
                path = os.path.join(OUT, f'{name}.json')
                if os.path.exists(path):
                    continue
                workdir = os.path.join(runs_dir, name)
                cmd = cell_command(fusion, variant, seed, workdir)
                print(f'[{time.strftime("%H:%M:%S")}] {name}: {" ".join(cmd)}', flush=True)
                t, load_before = time.time(), os.getloadavg()[0]
                os.makedirs(os.path.join(ROOT, workdir), exist_ok=True)
                with open(os.path.join(ROOT, workdir, 'train.log'), 'a') as log:
                    # The recorded command says `python`; it runs with this interpreter.
                    subprocess.run(
                        [sys.executable, *cmd[1:]], cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT
                    )
                wall = time.time() - t
                with open(os.path.join(ROOT, workdir, 'results.json')) as f:
                    results = json.load(f)
                record = {
                    'command': ' '.join(cmd),
                    'wall_seconds': wall,
                    'machine': machine(),
                    # 1-minute load averages around the run: above 2 (the cores) other work slowed it.
                    'load_average': [load_before, os.getloadavg()[0]],
                    'date': time.strftime('%Y-%m-%d'),
                    'results': results,
                }
                with open(path + '.tmp', 'w') as f:
                    json.dump(record, f, indent=2, sort_keys=True)
                os.replace(path + '.tmp', path)
                print(f'  test accuracy {results["test"]["accuracy"]:.4f}, {wall:.0f} s', flush=True)


def report() -> str:
    lines = [
        '| fusion | variant | test accuracy | validation accuracy | wall time (s) | seeds | command (seed S) |',
        '|---|---|---|---|---|---|---|',
    ]
    for fusion in FUSIONS:
        for variant in VARIANTS:
            recs = []
            for seed in SEEDS:
                path = os.path.join(OUT, f'{fusion}-{variant}-seed{seed}.json')
                if os.path.exists(path):
                    with open(path) as f:
                        recs.append(json.load(f))
            if not recs:
                continue
            test = np.array([r['results']['test']['accuracy'] for r in recs])
            val = np.array([r['results']['val']['accuracy'] for r in recs])
            wall = np.array([r['wall_seconds'] for r in recs])
            seeds = ','.join(
                str(s) for s in SEEDS if os.path.exists(os.path.join(OUT, f'{fusion}-{variant}-seed{s}.json'))
            )
            cmd = ' '.join(cell_command(fusion, variant, 'S', f'runs/{fusion}-{variant}-S'))
            lines.append(
                f'| {fusion} | {variant} | {test.mean():.4f} ± {test.std():.4f} | '
                f'{val.mean():.4f} ± {val.std():.4f} | {wall.mean():.0f} ± {wall.std():.0f} | {seeds} | `{cmd}` |'
            )
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--report', action='store_true', help='only print the table')
    parser.add_argument(
        '--runs_dir',
        default=os.path.join('runs', 'easy_vqa_table'),
        help='where the cells keep their workdirs (relative to the repository root)',
    )
    args = parser.parse_args()
    if not args.report:
        run_missing(args.runs_dir)
    print(report())


if __name__ == '__main__':
    sys.exit(main())
