r"""The result tables of docs/results.md, one `train.py` run per cell: rows (a config variant) x seeds, per dataset.

  python experiments/tables.py easy_vqa          # runs every missing cell, one at a time, then prints the table
  python experiments/tables.py hapt --report     # only prints the table from results/hapt/
  python experiments/tables.py uci_mfeat --rows fused-refnet --seeds 0   # a subset of the cells
  python experiments/tables.py easy_vqa hapt --rows 'mmft-*,mbt-*'       # the token-level fusions' tables
  python experiments/tables.py easy_vqa hapt --rows 'deq-*,progressive-*,coupled_mamba-*'   # the later ones

Tables:
  easy_vqa    {lowrank (the default), concat, transformer, mmft, mbt} fusion x {baseline, refiner, refnet};
              the later fusions {deq, progressive, coupled_mamba} x the same; the default config in
              bfloat16 (`lowrank-refnet-bf16`: --config.model.dtype=bfloat16); Coupled Mamba +refiner+MS
              trained twice as long (`coupled_mamba_4000steps-refnet`, seed 2 only)
  hapt        accelerometer alone, gyroscope alone, both fused: baseline, +refiner, +refiner+MS (concat);
              the token-level fusions mmft and mbt, and the later fusions, x {baseline, refiner, refnet}
  uci_mfeat   each of the six views alone, all six fused and the three weakest fused: baseline, +refiner,
              +refiner+MS (concat)

Each cell's results.json (plus the command, the wall time, the machine and its load) is written to
results/<dataset>/<row>-seed<k>.json as soon as it finishes; a cell whose file exists is not run again, so an
interrupted grid resumes where it was. Run it with `nice` when the machine is shared.
"""

import argparse
import fnmatch
import os
import sys
from typing import NamedTuple

from refnet_jax.analysis import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
# Weight decay on every parameter, as when the first cells were recorded (the default now skips biases, norm
# scales and embeddings), so that the cells of one table share one config.
PINNED = ("--config.train.decay_mask=('.*',)",)


class Row(NamedTuple):
    """A table row: the config argument (`configs/<dataset>.py:<arg>`), any further train.py flags, and the
    seeds it is run for (a check on one seed runs for that seed alone, whatever `--seeds` asks)."""

    arg: str
    flags: tuple[str, ...] = ()
    seeds: tuple[int, ...] = SEEDS

    def describe(self) -> str:
        return ' '.join((f'`{self.arg}`', *(f'`{f}`' for f in self.flags)))


LATER_FUSIONS = ('deq', 'progressive', 'coupled_mamba')  # issue 18: the fusions that came after ReFNet


def _fusion_rows(fusions: tuple[str, ...]) -> dict[str, Row]:
    """Each fusion as baseline, +refiner and +refiner+MS (token-level ones with `tokens` targets)."""
    return {
        f'{fusion}-{variant}': Row(f'fusion={fusion},variant={variant}')
        for fusion in fusions
        for variant in ('baseline', 'refiner', 'refnet')
    }


def _unimodal_and_fused_rows(modalities: tuple[str, ...]) -> dict[str, Row]:
    rows = {f'{m}-only': Row(f'only={m},variant=baseline') for m in modalities}
    rows.update({f'fused-{v}': Row(f'variant={v}') for v in ('baseline', 'refiner', 'refnet')})
    return rows


# dataset -> {row name: Row}; the row name is the results file's prefix.
TABLES = {
    'easy_vqa': {
        **_fusion_rows(('lowrank', 'concat', 'transformer', 'mmft', 'mbt', *LATER_FUSIONS)),
        'lowrank-refnet-bf16': Row('fusion=lowrank,variant=refnet', ('--config.model.dtype=bfloat16',)),
        # Coupled Mamba's slow seed (2) was still climbing at 2,000 steps with the refiner and MS loss: twice
        # the steps say whether it is slower or stuck (a check, outside the 'coupled_mamba-*' rows).
        'coupled_mamba_4000steps-refnet': Row(
            'fusion=coupled_mamba,variant=refnet', ('--config.train.num_steps=4000',), seeds=(2,)
        ),
    },
    'hapt': {
        **_unimodal_and_fused_rows(('acc', 'gyro')),
        **_fusion_rows(('mmft', 'mbt', *LATER_FUSIONS)),
    },
    'uci_mfeat': {
        **_unimodal_and_fused_rows(('fac', 'fou', 'kar', 'mor', 'pix', 'zer')),
        # The three weakest views alone (fou, mor, zer: 0.77-0.82 each) fused, away from the ceiling.
        **{f'weakest3-{v}': Row(f'only=fou+mor+zer,variant={v}') for v in ('baseline', 'refiner', 'refnet')},
    },
}


def cell_command(dataset: str, row: str, seed: int | str, workdir: str) -> list[str]:
    return [
        'python',
        'train.py',
        '--config',
        f'configs/{dataset}.py:{TABLES[dataset][row].arg}',
        '--workdir',
        workdir,
        f'--config.seed={seed}',
        *PINNED,
        *TABLES[dataset][row].flags,
    ]


def cell_path(dataset: str, row: str, seed: int) -> str:
    return os.path.join(ROOT, 'results', dataset, f'{row}-seed{seed}.json')


def run_missing(dataset: str, rows: list[str], seeds: list[int], runs_dir: str) -> None:
    cells = [
        (row, seed)
        for row in rows
        for seed in seeds
        if seed in TABLES[dataset][row].seeds and not os.path.exists(cell_path(dataset, row, seed))
    ]
    for i, (row, seed) in enumerate(cells):
        workdir = os.path.join(runs_dir, dataset, f'{row}-seed{seed}')
        print(f'cell {i + 1}/{len(cells)}: {row}, seed {seed}', flush=True)
        record = report_lib.run_and_record(
            cell_command(dataset, row, seed, workdir), workdir, cell_path(dataset, row, seed), root=ROOT
        )
        print(
            f'  test accuracy {record["results"]["test"]["accuracy"]:.4f}, {record["wall_seconds"]:.0f} s',
            flush=True,
        )


def report(dataset: str, rows: list[str] | None = None) -> str:
    """The table of `dataset` (`rows` of it; default all): per row, mean ± std over the seeds recorded so far."""
    lines = []
    for row in TABLES[dataset] if rows is None else rows:
        spec = TABLES[dataset][row]
        seeds = [s for s in spec.seeds if os.path.exists(cell_path(dataset, row, s))]
        if not seeds:
            continue
        recs = [report_lib.load_record(cell_path(dataset, row, seed)) for seed in seeds]
        lines.append(
            [
                row,
                spec.describe(),
                report_lib.mean_std([r['results']['test']['accuracy'] for r in recs]),
                report_lib.mean_std([r['results']['val']['accuracy'] for r in recs]),
                report_lib.mean_std([r['wall_seconds'] for r in recs], digits=0),
                ','.join(map(str, seeds)),
            ]
        )
    headers = ['row', 'config argument', 'test accuracy', 'validation accuracy', 'wall time (s)', 'seeds']
    note = (
        f'Each cell: `python train.py --config configs/{dataset}.py:<config argument> '
        f'--workdir runs/<row>-S --config.seed=S {report_lib.shell_join(PINNED)}` (plus the flags shown after the '
        'argument).'
    )
    return report_lib.markdown_table(headers, lines) + '\n\n' + note


def select_rows(datasets: list[str], patterns: list[str]) -> dict[str, list[str]]:
    """Each dataset's rows that match any of `patterns` (shell patterns: `mmft-*`; none: every row), in table
    order. A pattern that matches no row of any of the datasets is an error naming it."""
    selected = {
        d: [r for r in TABLES[d] if not patterns or any(fnmatch.fnmatchcase(r, p) for p in patterns)]
        for d in datasets
    }
    unmatched = [
        p for p in patterns if not any(fnmatch.fnmatchcase(r, p) for d in datasets for r in TABLES[d])
    ]
    if unmatched:
        raise ValueError(
            f'--rows {unmatched} match no row of {datasets}: '
            + '; '.join(f'{d}: {list(TABLES[d])}' for d in datasets)
        )
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('datasets', nargs='+', choices=sorted(TABLES), metavar='dataset')
    parser.add_argument('--report', action='store_true', help='only print the tables')
    parser.add_argument(
        '--rows', default='', help="comma-separated row names or shell patterns ('mmft-*'; default: all)"
    )
    parser.add_argument('--seeds', default=','.join(map(str, SEEDS)), help='comma-separated seeds')
    parser.add_argument(
        '--runs_dir',
        default=os.path.join('runs', 'tables'),
        help='where the cells keep their workdirs (relative to the repository root)',
    )
    args = parser.parse_args()
    try:
        selected = select_rows(args.datasets, [r for r in args.rows.split(',') if r])
    except ValueError as e:
        parser.error(str(e))
    seeds = [int(s) for s in args.seeds.split(',') if s]
    if not args.report:
        for dataset, rows in selected.items():
            run_missing(dataset, rows, seeds, args.runs_dir)
    for dataset, rows in selected.items():
        print(f'## {dataset}\n\n{report(dataset, rows)}\n')


if __name__ == '__main__':
    sys.exit(main())
