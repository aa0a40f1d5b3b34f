r"""The robustness study: test accuracy when one modality is corrupted or missing, with and without the refiner
and modality dropout.

  python experiments/robustness.py hapt                    # every missing cell, one at a time; then the report
  python experiments/robustness.py easy_vqa --seeds 0      # a part of the grid
  python experiments/robustness.py uci_mfeat --variants refnet      # modality dropout against none, ReFNet only
  python experiments/robustness.py hapt --report           # only the report, from results/robustness/

Grid: dataset x variant {baseline, refiner (+refiner), refnet (+refiner+MS)} x modality dropout {0, 0.3 on
every modality} x seeds {0, 1, 2}. Each cell trains the dataset's default config (`train.py`, the variant
argument plus `--config.train.modality_dropout.<m>=p`), then evaluates its last checkpoint on the test split:
clean; each modality under Gaussian noise at 5 levels (0.25 to 2 x that modality's standard deviation over the
split), under random masking of 10% to 90% of its positions (pixels, time steps, features or tokens), and
absent; and each modality alone (every other one absent). The corruption draws are seeded by the cell's seed,
the corruption and the batch, so a rerun gives the same figures (`refnet_jax/data/corruption.py`).

Each cell's record (command, wall time, machine, load, train.py's results and the accuracies above) goes to
results/robustness/<dataset>/<variant>-drop<p>-seed<k>.json; a cell whose record exists is not run again
(a cell killed after training is only evaluated again, from its workdir). The report writes
docs/robustness_<dataset>.md and .png with MultiBench's summaries, relative to the cell's clean accuracy:
relative robustness, the area under the accuracy-against-level curve (levels on [0, 1], clean at 0), and
effective robustness, the summed gain over the baseline without dropout once the curves start at the same
clean accuracy (MultiBench compares with late fusion; here with the plain fusion baseline).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from refnet_jax import config_lib
from refnet_jax.analysis import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ('easy_vqa', 'hapt', 'uci_mfeat')
VARIANTS = ('baseline', 'refiner', 'refnet')
DROPOUTS = (0.0, 0.3)
SEEDS = (0, 1, 2)
OUT = os.path.join(ROOT, 'results', 'robustness')


def cell_name(variant: str, dropout: float, seed: int) -> str:
    return f'{variant}-drop{dropout:g}-seed{seed}'


def modalities(dataset: str) -> tuple[str, ...]:
    """The modalities of the dataset's default config."""
    return tuple(config_lib.load_file(os.path.join(ROOT, 'configs', f'{dataset}.py')).data.modalities)


def cell_command(dataset: str, variant: str, dropout: float, seed: int, runs_dir: str) -> list[str]:
    cmd = [
        'python',
        'train.py',
        '--config',
        f'configs/{dataset}.py:variant={variant}',
        '--workdir',
        os.path.join(runs_dir, dataset, cell_name(variant, dropout, seed)),
        f'--config.seed={seed}',
        "--config.train.decay_mask=('.*',)",  # as when the first cells were recorded (before decay masks)
    ]
    if dropout:
        cmd += [f'--config.train.modality_dropout.{m}={dropout:g}' for m in modalities(dataset)]
    return cmd


def evaluate_corruptions(workdir: str, seed: int) -> dict:
    """The test accuracies of the run in `workdir` (its latest checkpoint): clean, and per modality under
    each corruption and level, absent, and alone."""
    import jax

    from refnet_jax.data import corruption, input_pipeline
    from refnet_jax.train import inference, trainer

    loaded = inference.load_run(workdir)
    config, run = loaded.config, loaded.run
    state = trainer.TrainState.create(apply_fn=run.model.apply, params=loaded.params, tx=run.tx)
    names = sorted(run.info.modalities)

    def accuracy(batches, absent=()):
        with jax.set_mesh(run.mesh):
            metrics = trainer.evaluate(state, batches, run.objective, run.info, run.mesh, absent=absent)
        return metrics['accuracy']

    def test_batches():
        return input_pipeline.eval_batches(config, 'test')

    out = {'clean': accuracy(test_batches()), 'corrupted': {}, 'alone': {}}
    for k, m in enumerate(names):
        info = run.info.modalities[m]
        std = corruption.modality_std(test_batches(), m)
        out['corrupted'][m] = {'std': std}
        for j, kind in enumerate(corruption.KINDS):
            if corruption.applies(kind, info):
                out['corrupted'][m][kind] = [
                    accuracy(
                        corruption.corrupt(
                            b, m, info, kind, level, np.random.default_rng((seed, k, j, li, i)), std
                        )
                        for i, b in enumerate(test_batches())
                    )
                    for li, level in enumerate(corruption.levels(kind))
                ]
        out['alone'][m] = accuracy(test_batches(), absent=tuple(o for o in names if o != m))
        print(f'  {m}: {json.dumps(out["corrupted"][m])}, alone {out["alone"][m]:.4f}', flush=True)
    return out


def run_cell(dataset: str, variant: str, dropout: float, seed: int, runs_dir: str) -> None:
    path = os.path.join(OUT, dataset, cell_name(variant, dropout, seed) + '.json')
    record = report_lib.load_record(path)
    if record is not None and 'robustness' in record:
        return
    cmd = cell_command(dataset, variant, dropout, seed, runs_dir)
    workdir = cmd[cmd.index('--workdir') + 1]
    if record is None:
        record = report_lib.run_and_record(cmd, workdir, path, root=ROOT)
        print(f'  trained: test accuracy {record["results"]["test"]["accuracy"]:.4f}', flush=True)
    start = time.time()
    record['robustness'] = evaluate_corruptions(os.path.join(ROOT, workdir), seed)
    record['robustness_seconds'] = time.time() - start
    report_lib.write_json(path, record)


# ----------------------------------------------------------------------------------------------- report


def load_cells(dataset: str) -> dict[tuple[str, float], list[dict]]:
    """{(variant, dropout): [robustness of each recorded seed]}."""
    cells = {}
    for variant in VARIANTS:
        for dropout in DROPOUTS:
            recs = [
                report_lib.load_record(os.path.join(OUT, dataset, cell_name(variant, dropout, s) + '.json'))
                for s in SEEDS
            ]
            found = [r['robustness'] for r in recs if r is not None and 'robustness' in r]
            if found:
                cells[(variant, dropout)] = found
    return cells


def curve(rob: dict, m: str, kind: str) -> np.ndarray:
    """Accuracy against level, clean first."""
    return np.array([rob['clean'], *rob['corrupted'][m][kind]])


def relative_robustness(accs: np.ndarray) -> float:
    """Area under accuracy against level, the levels spread evenly over [0, 1] (MultiBench)."""
    x = np.linspace(0.0, 1.0, len(accs))
    return float(np.sum((accs[1:] + accs[:-1]) / 2 * np.diff(x)))


def effective_robustness(accs: np.ndarray, reference: np.ndarray) -> float:
    """Sum over levels of accuracy above the reference curve shifted to the same clean accuracy
    (MultiBench's, with the plain fusion baseline as the reference)."""
    return float(np.sum(accs - (reference + accs[0] - reference[0])))


def report(dataset: str) -> str:
    cells = load_cells(dataset)
    if not cells:
        return f'no robustness records for {dataset} yet'
    names = sorted(next(iter(cells.values()))[0]['corrupted'])
    kinds = [
        k
        for k in ('noise', 'mask')
        if any(k in v for v in next(iter(cells.values()))[0]['corrupted'].values())
    ]
    reference = cells.get(('baseline', 0.0))
    headers = ['variant', 'dropout', 'seeds', 'clean']
    headers += [f'{m} absent' for m in names] + [f'{m} alone' for m in names]
    headers += (
        [f'{m} {k} rel.' for m in names for k in kinds if k in reference[0]['corrupted'][m]]
        if reference
        else []
    )
    headers += (
        [f'{m} {k} eff.' for m in names for k in kinds if k in reference[0]['corrupted'][m]]
        if reference
        else []
    )
    rows = []
    for (variant, dropout), robs in cells.items():
        row = [variant, f'{dropout:g}', len(robs), report_lib.mean_std([r['clean'] for r in robs])]
        row += [report_lib.mean_std([r['corrupted'][m]['absent'][0] for r in robs]) for m in names]
        row += [report_lib.mean_std([r['alone'][m] for r in robs]) for m in names]
        if reference:
            pairs = [(m, k) for m in names for k in kinds if k in reference[0]['corrupted'][m]]
            row += [
                report_lib.mean_std([relative_robustness(curve(r, m, k)) for r in robs]) for m, k in pairs
            ]
            ref = {(m, k): np.mean([curve(r, m, k) for r in reference], 0) for m, k in pairs}
            row += [
                report_lib.mean_std([effective_robustness(curve(r, m, k), ref[(m, k)]) for r in robs])
                for m, k in pairs
            ]
        rows.append(row)
    return report_lib.markdown_table(headers, rows)


def _versus(a, b) -> str:
    return f'{report_lib.mean_std(a)} vs {report_lib.mean_std(b)} ({np.mean(a) - np.mean(b):+.4f})'


def dropout_table(dataset: str) -> str:
    """Issue 16's first claim: with modality dropout, each modality alone against its own unimodal baseline
    (`only=<m>` rows of the tables in docs/results.md, results/<dataset>/<m>-only-seed*.json), and every
    modality present against the same variant trained without dropout."""
    cells = load_cells(dataset)
    rows = []
    for variant in VARIANTS:
        drop, plain = cells.get((variant, DROPOUTS[1])), cells.get((variant, 0.0))
        if not drop:
            continue
        names = sorted(drop[0]['alone'])
        row = [variant, len(drop)]
        if plain:
            row.append(_versus([r['clean'] for r in drop], [r['clean'] for r in plain]))
        else:
            row.append('-')
        for m in names:
            only = [
                report_lib.load_record(os.path.join(ROOT, 'results', dataset, f'{m}-only-seed{s}.json'))
                for s in SEEDS
            ]
            only = [r['results']['test']['accuracy'] for r in only if r is not None]
            alone = [r['alone'][m] for r in drop]
            row.append(_versus(alone, only) if only else report_lib.mean_std(alone))
        rows.append(row)
    if not rows:
        return ''
    names = sorted(next(v for k, v in cells.items() if k[1] == DROPOUTS[1])[0]['alone'])
    headers = ['variant', 'seeds', f'all present: dropout {DROPOUTS[1]:g} vs none']
    headers += [f'{m} alone vs only={m}' for m in names]
    return report_lib.markdown_table(headers, rows)


def plot(dataset: str, path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from refnet_jax.data import corruption

    cells = load_cells(dataset)
    names = sorted(next(iter(cells.values()))[0]['corrupted'])
    panels = [
        (m, k) for m in names for k in ('noise', 'mask') if k in next(iter(cells.values()))[0]['corrupted'][m]
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (m, kind) in zip(axes[0], panels, strict=True):
        x = [0.0, *corruption.levels(kind)]
        for (variant, dropout), robs in cells.items():
            ys = np.array([curve(r, m, kind) for r in robs])
            style = '-' if dropout else '--'
            ax.errorbar(
                x,
                ys.mean(0),
                yerr=ys.std(0),
                linestyle=style,
                marker='.',
                capsize=2,
                label=f'{variant}, dropout {dropout:g}',
            )
        ax.set_title(f'{dataset}: {m}, {kind}')
        ax.set_xlabel('noise std / modality std' if kind == 'noise' else 'share of positions masked')
        ax.set_ylabel('test accuracy')
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(dataset: str) -> str:
    table = report(dataset)
    doc = os.path.join(ROOT, 'docs', f'robustness_{dataset}.md')
    text = (
        f'# Robustness on {dataset}\n\n'
        f'Written by `python experiments/robustness.py {dataset} --report` from results/robustness/{dataset}/ '
        "(see the script's docstring for the grid and the summaries). Test accuracy, mean ± std over seeds; "
        '"absent": that modality missing in every example; "alone": every other modality missing; "rel.": '
        'relative robustness (area under the accuracy curve); "eff.": effective robustness against the baseline '
        'without dropout.\n\n' + table + '\n'
    )
    dropout = dropout_table(dataset)
    if dropout:
        text += (
            f'\n## Modality dropout {DROPOUTS[1]:g}: one modality alone, and all present\n\n'
            'Test accuracy, mean ± std over seeds, with the difference of the means: each modality alone (every '
            'other one absent) against its own unimodal baseline (`only=<m>`, the tables in docs/results.md), '
            'and every modality present against the same variant trained without dropout.\n\n'
            + dropout
            + '\n'
        )
    report_lib.write_doc(
        doc, text, lambda path: plot(dataset, path), os.path.join(ROOT, 'docs', f'robustness_{dataset}.png')
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('dataset', choices=DATASETS)
    parser.add_argument('--report', action='store_true', help='only write the report')
    parser.add_argument('--variants', default=','.join(VARIANTS), help='comma-separated variants')
    parser.add_argument(
        '--dropouts', default=','.join(f'{d:g}' for d in DROPOUTS), help='modality dropout rates'
    )
    parser.add_argument('--seeds', default=','.join(map(str, SEEDS)), help='comma-separated seeds')
    parser.add_argument(
        '--runs_dir', default=os.path.join('runs', 'robustness'), help='workdirs of the cells'
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(',') if v]
    dropouts = [float(d) for d in args.dropouts.split(',') if d]
    bad = [v for v in variants if v not in VARIANTS] + [d for d in dropouts if d not in DROPOUTS]
    if bad:
        parser.error(f'{bad} not in the grid: variants {VARIANTS}, dropouts {DROPOUTS}')
    if not args.report:
        for seed in (int(s) for s in args.seeds.split(',') if s):
            for variant in variants:
                for dropout in dropouts:
                    print(f'{args.dataset}: {cell_name(variant, dropout, seed)}', flush=True)
                    run_cell(args.dataset, variant, dropout, seed, args.runs_dir)
    print(write_report(args.dataset))


if __name__ == '__main__':
    sys.exit(main())
