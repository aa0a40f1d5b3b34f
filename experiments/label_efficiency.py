r"""The label-efficiency study: test accuracy against the share of labeled training examples.

  python experiments/label_efficiency.py                 # every missing cell, one at a time; then the report
  python experiments/label_efficiency.py --report        # only the tables and the plot, from results/
  python experiments/label_efficiency.py --datasets hapt --seeds 0   # a part of the grid
  python experiments/label_efficiency.py --rerun hapt/pretrain-f0.01-seed0   # a cell again, from scratch
  python experiments/label_efficiency.py --datasets easy_vqa --methods refnet_input --fractions 0.05,0.25

Grid: datasets {easy_vqa, hapt} x label fractions {1%, 5%, 10%, 25%, 100%} x methods x seeds {0, 1, 2}:
  baseline   the fused network alone (no refiner, no MS loss)
  refnet     + refiner (embedding targets) + MS loss, from scratch
  pretrain   ReFNet started from a refiner-only pre-training run on every training input (labels never read;
             `input` targets, which pre-training needs, kept for fine-tuning so the refiner is restored too)
A control, run only when asked for with --methods:
  refnet_input  ReFNet from scratch with the `input` refiner targets of `pretrain`: the same fine-tuning
                objective without the pre-trained start, to tell the two apart
The pre-training run is one per dataset and seed (`pretrain.py`), shared by that seed's fractions. The seed
also draws the labeled subset (`config.data.label_fraction`, stratified), so the spread over seeds includes
the choice of labels. Every run is shorter than the datasets' default training (STEPS) to fit the grid in a
few hours on 2 cores; all methods get the same number of steps.

Cells run seed by seed (all of seed 0 first), each as its own process; its record (command, wall time,
machine, load, results) goes to results/label_efficiency/<dataset>/<method>-f<fraction>-seed<k>.json as soon
as it finishes, and a cell whose record exists is not run again. The report writes
docs/label_efficiency.md and docs/label_efficiency.png.

--rerun checks that the table is reproducible: it runs the named cells again from nothing, in another runs
directory (runs/label_efficiency_rerun; a `pretrain` cell's pre-training included), records them under
results/label_efficiency/reruns/, and the report sets each rerun beside its first run (same seed) and the
std over seeds of its cell: the difference between the two runs must stay below that spread.
"""

import argparse
import os
import re
import sys

import numpy as np

from refnet_jax.analysis import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ('easy_vqa', 'hapt')
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
METHODS = ('baseline', 'refnet', 'pretrain')
CONTROLS = ('refnet_input',)
SEEDS = (0, 1, 2)
STEPS = {'easy_vqa': 1000, 'hapt': 750}  # optimizer steps of every run, pre-training included
OUT = os.path.join(ROOT, 'results', 'label_efficiency')
RERUN_OUT = os.path.join(OUT, 'reruns')
RERUN_RUNS_DIR = os.path.join('runs', 'label_efficiency_rerun')
CELL = re.compile(r'(?P<dataset>\w+)/(?P<method>\w+)-f(?P<fraction>[0-9.]+)-seed(?P<seed>\d+)')


def pretrain_workdir(runs_dir: str, dataset: str, seed: int | str) -> str:
    return os.path.join(runs_dir, dataset, f'pretrain-seed{seed}')


def pretrain_command(dataset: str, seed: int | str, runs_dir: str) -> list[str]:
    return [
        'python',
        'pretrain.py',
        '--config',
        f'configs/{dataset}.py:variant=pretrain',
        '--workdir',
        pretrain_workdir(runs_dir, dataset, seed),
        f'--config.seed={seed}',
        f'--config.train.num_steps={STEPS[dataset]}',
    ]


def cell_command(dataset: str, method: str, fraction: float, seed: int | str, runs_dir: str) -> list[str]:
    variant = 'baseline' if method == 'baseline' else 'refnet'
    cmd = [
        'python',
        'train.py',
        '--config',
        f'configs/{dataset}.py:variant={variant}',
        '--workdir',
        os.path.join(runs_dir, dataset, f'{method}-f{fraction}-seed{seed}'),
        f'--config.seed={seed}',
        f'--config.train.num_steps={STEPS[dataset]}',
        f'--config.data.label_fraction={fraction}',
    ]
    if method in ('pretrain', 'refnet_input'):
        cmd.append('--config.model.refiner.target=input')
    if method == 'pretrain':
        cmd.append(f'--config.init_from={pretrain_workdir(runs_dir, dataset, seed)}')
    return cmd


def record_path(dataset: str, name: str, out: str | None = None) -> str:
    """Where the record of run `name` goes: under `out`, by default the study's results/label_efficiency."""
    return os.path.join(OUT if out is None else out, dataset, f'{name}.json')


def run_pretraining(dataset: str, seed: int, runs_dir: str, out: str | None = None) -> None:
    """The pre-training run of `dataset` and `seed`, unless its record exists under `out`."""
    path = record_path(dataset, f'pretrain-seed{seed}', out)
    if os.path.exists(path):
        return
    cmd = pretrain_command(dataset, seed, runs_dir)
    record = report_lib.run_and_record(cmd, pretrain_workdir(runs_dir, dataset, seed), path, root=ROOT)
    spread = record['results']['test']['fused_spread']
    print(f'  pre-trained: fused spread {spread:.3f}, {record["wall_seconds"]:.0f} s', flush=True)


def run_one(
    dataset: str, method: str, fraction: float, seed: int, runs_dir: str, out: str | None = None
) -> dict | None:
    """One cell, unless its record exists under `out`; returns the new record (None: already recorded)."""
    path = record_path(dataset, f'{method}-f{fraction}-seed{seed}', out)
    if os.path.exists(path):
        return None
    cmd = cell_command(dataset, method, fraction, seed, runs_dir)
    record = report_lib.run_and_record(cmd, cmd[cmd.index('--workdir') + 1], path, root=ROOT)
    accuracy = record['results']['test']['accuracy']
    print(f'  test accuracy {accuracy:.4f}, {record["wall_seconds"]:.0f} s', flush=True)
    return record


def run_missing(datasets, seeds, runs_dir: str, methods=METHODS, fractions=FRACTIONS) -> None:
    for seed in seeds:
        for dataset in datasets:
            if 'pretrain' in methods:
                run_pretraining(dataset, seed, runs_dir)
            for fraction in fractions:
                for method in methods:
                    run_one(dataset, method, fraction, seed, runs_dir)


def parse_cell(cell: str) -> tuple[str, str, float, int]:
    """'hapt/pretrain-f0.01-seed0' -> ('hapt', 'pretrain', 0.01, 0), checked against the grid."""
    match = CELL.fullmatch(cell)
    expected = '<dataset>/<method>-f<fraction>-seed<k>, e.g. hapt/pretrain-f0.01-seed0'
    if match is None:
        raise ValueError(f'--rerun {cell!r}: expected {expected}')
    dataset, method = match['dataset'], match['method']
    fraction, seed = float(match['fraction']), int(match['seed'])
    for field, value, allowed in (
        ('dataset', dataset, DATASETS),
        ('method', method, METHODS + CONTROLS),
        ('fraction', fraction, FRACTIONS),
    ):
        if value not in allowed:
            raise ValueError(f'--rerun {cell!r}: {field} {value!r} is not one of {allowed}')
    return dataset, method, fraction, seed


def rerun(cells: list[str]) -> None:
    """Runs each cell again from nothing (its pre-training too) and records it under results/.../reruns/."""
    for cell in cells:
        dataset, method, fraction, seed = parse_cell(cell)
        if method == 'pretrain':
            run_pretraining(dataset, seed, RERUN_RUNS_DIR, RERUN_OUT)
        if run_one(dataset, method, fraction, seed, RERUN_RUNS_DIR, RERUN_OUT) is None:
            print(f'{cell}: rerun already recorded under {os.path.relpath(RERUN_OUT, ROOT)}', flush=True)


def rerun_table() -> str:
    """The reruns beside their first runs (same seed) and the spread over seeds the report gives their cells."""
    rows = []
    for dataset in DATASETS:
        folder = os.path.join(RERUN_OUT, dataset)
        names = sorted(n[: -len('.json')] for n in os.listdir(folder)) if os.path.isdir(folder) else []
        cells = collect(dataset)
        for name in names:
            if name.startswith('pretrain-seed'):
                continue
            _, method, fraction, _ = parse_cell(f'{dataset}/{name}')
            first = report_lib.load_record(record_path(dataset, name))
            again = report_lib.load_record(os.path.join(folder, f'{name}.json'))
            if first is None:
                continue
            acc = accuracies(cells[method, fraction])
            a, b = first['results']['test']['accuracy'], again['results']['test']['accuracy']
            # The rerun repeats the first run's seed: what it measures is the noise of the procedure itself,
            # which must stay below the spread over seeds the table reports.
            within = abs(b - a) <= acc.std()
            spread = f'{report_lib.mean_std(acc)} (n={len(acc)})'
            rows.append(
                [
                    f'{dataset}/{name}',
                    f'{a:.4f}',
                    f'{b:.4f}',
                    f'{b - a:+.4f}',
                    spread,
                    'yes' if within else 'no',
                ]
            )
    headers = [
        'cell',
        'first run',
        'rerun',
        'difference',
        'reported mean ± std over seeds (n)',
        'difference ≤ std',
    ]
    return report_lib.markdown_table(headers, rows) if rows else ''


def collect(dataset: str) -> dict[tuple[str, float], list[dict]]:
    """{(method, fraction): the records of the seeds finished} of `dataset`."""
    out = {}
    for method in METHODS + CONTROLS:
        for fraction in FRACTIONS:
            names = [f'{method}-f{fraction}-seed{s}' for s in SEEDS]
            records = [report_lib.load_record(record_path(dataset, name)) for name in names]
            out[method, fraction] = [r for r in records if r is not None]
    return out


def accuracies(records: list[dict]) -> np.ndarray:
    """The test accuracy of each record."""
    return np.array([r['results']['test']['accuracy'] for r in records])


def table(dataset: str) -> str:
    cells = collect(dataset)
    rows = []
    for method in METHODS + CONTROLS:
        if method in CONTROLS and not any(cells[method, f] for f in FRACTIONS):
            continue
        row = [method]
        for fraction in FRACTIONS:
            acc = accuracies(cells[method, fraction])
            if len(acc) > 1:
                row.append(f'{report_lib.mean_std(acc)} (n={len(acc)})')
            else:
                row.append(f'{acc[0]:.4f} (n=1)' if len(acc) else '–')
        rows.append(row)
    walls = [r['wall_seconds'] for rs in cells.values() for r in rs]
    pre = [report_lib.load_record(record_path(dataset, f'pretrain-seed{s}')) for s in SEEDS]
    pre = [r for r in pre if r is not None]
    notes = [
        f'Test accuracy, mean ± std over seeds (n = seeds finished), {STEPS[dataset]} steps per run. '
        f'Wall time per fine-tuning or training run: {report_lib.mean_std(walls, digits=0)} s '
        f'over {len(walls)} runs.'
        if walls
        else 'No cells finished yet.'
    ]
    if pre:
        spreads = ', '.join(f'{r["results"]["test"]["fused_spread"]:.3f}' for r in pre)
        pre_walls = np.array([r['wall_seconds'] for r in pre])
        notes.append(
            f'Pre-training: fused-embedding spread on test {spreads} ({len(pre)} seed(s); 0 would be collapse), '
            f'{pre_walls.mean():.0f} s per run.'
        )
    headers = ['method', *(f'{f:.0%} labels' for f in FRACTIONS)]
    return report_lib.markdown_table(headers, rows) + '\n\n' + ' '.join(notes)


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(5.5 * len(DATASETS), 4), squeeze=False)
    for ax, dataset in zip(axes[0], DATASETS, strict=True):
        cells = collect(dataset)
        for method in METHODS + CONTROLS:
            xs, means, stds = [], [], []
            for fraction in FRACTIONS:
                acc = accuracies(cells[method, fraction])
                if len(acc):
                    xs.append(fraction * 100)
                    means.append(acc.mean())
                    stds.append(acc.std())
            if xs:
                # A control has only some fractions: points, not a line across the gaps.
                control = method in CONTROLS
                ax.errorbar(
                    xs,
                    means,
                    yerr=stds,
                    marker='s' if control else 'o',
                    linestyle='none' if control else '-',
                    capsize=3,
                    label=f'{method} (control)' if control else method,
                )
        ax.set_xscale('log')
        ax.set_xticks([f * 100 for f in FRACTIONS], [f'{f:.0%}' for f in FRACTIONS])
        ax.set_xlabel('labeled training examples')
        ax.set_ylabel('test accuracy')
        ax.set_title(f'{dataset} ({STEPS[dataset]} steps per run)')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report() -> str:
    records = [r for d in DATASETS for rs in collect(d).values() for r in rs]
    machines = sorted({r['machine'] for r in records})
    dates = sorted({r['date'] for r in records})
    parts = [
        '# Label efficiency',
        '',
        "Produced by `python experiments/label_efficiency.py`; see its docstring. Each cell's command, seed, "
        'wall time and load average are in its record under results/label_efficiency/.',
        f'Machine: {"; ".join(machines) or "-"} (CPU only). Dates: {", ".join(dates) or "-"}.',
        '',
    ]
    for dataset in DATASETS:
        parts += [f'## {dataset}', '', table(dataset), '']
    if reruns := rerun_table():
        parts += [
            '## Reruns',
            '',
            'Cells run again from nothing (`--rerun`; pre-training included), in another runs directory, '
            'on the same machine.',
            '',
            reruns,
            '',
        ]
    text = '\n'.join(parts)
    docs = os.path.join(ROOT, 'docs')
    report_lib.write_doc(
        os.path.join(docs, 'label_efficiency.md'), text, plot, os.path.join(docs, 'label_efficiency.png')
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--report', action='store_true', help='only write the tables and the plot')
    parser.add_argument('--datasets', default=','.join(DATASETS))
    parser.add_argument('--seeds', default=','.join(map(str, SEEDS)))
    parser.add_argument('--runs_dir', default=os.path.join('runs', 'label_efficiency'))
    parser.add_argument('--methods', default=','.join(METHODS), help=f'some of {METHODS + CONTROLS}')
    parser.add_argument('--fractions', default=','.join(map(str, FRACTIONS)))
    parser.add_argument(
        '--rerun', nargs='+', default=[], metavar='CELL', help='e.g. hapt/pretrain-f0.01-seed0'
    )
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(',') if d]
    if unknown := [d for d in datasets if d not in DATASETS]:
        parser.error(f'--datasets {unknown}: expected some of {DATASETS}')
    methods = [m for m in args.methods.split(',') if m]
    if unknown := [m for m in methods if m not in METHODS + CONTROLS]:
        parser.error(f'--methods {unknown}: expected some of {METHODS + CONTROLS}')
    try:
        fractions = [float(f) for f in args.fractions.split(',') if f]
    except ValueError:
        parser.error(f'--fractions {args.fractions!r}: expected numbers, some of {FRACTIONS}')
    if unknown := [f for f in fractions if f not in FRACTIONS]:
        parser.error(f'--fractions {unknown}: expected some of {FRACTIONS}')
    for cell in args.rerun:  # every cell checked before any runs
        try:
            parse_cell(cell)
        except ValueError as e:
            parser.error(str(e))
    if args.rerun:
        rerun(args.rerun)
    elif not args.report:
        seeds = [int(s) for s in args.seeds.split(',') if s]
        run_missing(datasets, seeds, args.runs_dir, methods, fractions)
    print(report())


if __name__ == '__main__':
    sys.exit(main())
