r"""The latent-graph analysis of docs/CLAIMS.md, and the linear probes of pre-training, as one command.

  python experiments/graph_analysis.py                 # trains what is missing, then analyses; prints the tables
  python experiments/graph_analysis.py --parts probe    # only the linear probes of pre-training
  python experiments/graph_analysis.py --parts probe --probe_seeds 0,1
  python experiments/graph_analysis.py --parts graph --graph_datasets easy_vqa --graph_seeds 1,2

Models (each trained by `train.py` if its workdir has no results.json yet):
  easy_vqa   the default config (low-rank fusion) as baseline, +refiner, +refiner+MS, seeds 0, 1, 2:
             runs/graph/easy_vqa/<variant> (seed 0), runs/graph/easy_vqa/<variant>-seed<k>
  hapt       the fused runs of the HAPT table (docs/results.md), seeds 0, 1, 2: runs/tables/hapt/fused-<variant>-seed<k>
             (what `python experiments/tables.py hapt` leaves behind)
Probes, seeds 0, 1, 2: the label-efficiency study's pre-training runs (runs/label_efficiency/<dataset>/
pretrain-seed<k>, run here with the study's command if missing) against the same network untrained (RANDOM,
the same config and seed).

Writes docs/graph/<name>.json and .png through tools/analyze.py (see its docstring for the metrics), and the
mean ± std over seeds: docs/graph/graphs.md (graph metrics) and docs/graph/probes.md (probes).
"""

import argparse
import json
import os
import subprocess
import sys

import label_efficiency  # its sibling: this script runs by path (`python experiments/graph_analysis.py`)

from refnet_jax.analysis import report

ROOT = label_efficiency.ROOT
VARIANTS = ('baseline', 'refiner', 'refnet')
GRAPH_DATASETS = ('easy_vqa', 'hapt')
SEEDS = (0, 1, 2)
PROBED = ('pretrained', 'random')


def ensure_trained(workdir: str, config: str, seed: int) -> None:
    if os.path.exists(os.path.join(ROOT, workdir, 'results.json')):
        return
    cmd = [sys.executable, 'train.py', '--config', config, '--workdir', workdir, f'--config.seed={seed}']
    print('training:', ' '.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_pretrained(dataset: str, seed: int) -> str:
    """The study's pre-training run of `dataset` and `seed`, run now if missing; returns its workdir."""
    runs_dir = os.path.join('runs', 'label_efficiency')
    workdir = label_efficiency.pretrain_workdir(runs_dir, dataset, seed)
    results = os.path.join(ROOT, workdir, 'results.json')
    if os.path.exists(results):
        return workdir
    cmd = label_efficiency.pretrain_command(dataset, seed, runs_dir)
    print('pre-training:', ' '.join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True)
    # Run again after the study recorded it: say whether it came out the same.
    recorded = report.load_record(label_efficiency.record_path(dataset, f'pretrain-seed{seed}'))
    if recorded is not None:
        with open(results) as f:
            now = json.load(f)['test']['fused_spread']
        print(
            f'  fused spread {now:.6f}; the study recorded {recorded["results"]["test"]["fused_spread"]:.6f}'
        )
    return workdir


def graph_output(dataset: str, seed: int) -> str:
    return dataset if seed == 0 else f'{dataset}-seed{seed}'


def load_scores(output: str) -> dict[str, dict[str, float]] | None:
    """{model: metrics} of docs/graph/<output>.json, or None if it has not been written."""
    path = os.path.join(ROOT, 'docs', 'graph', output + '.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {name: model['metrics'] for name, model in json.load(f)['models'].items()}


def graph_summary() -> str:
    """docs/graph/graphs.md: every graph metric of the three models, mean ± std over the seeds analysed."""
    lines = [
        '# Latent graph of the fused embeddings, over seeds',
        '',
        'Produced by `python experiments/graph_analysis.py --parts graph` from docs/graph/<dataset>[-seed<k>].json '
        '(see tools/analyze.py for the metrics). Mean ± std over seeds (population std), per seed in brackets.',
        '',
    ]
    for dataset in GRAPH_DATASETS:
        runs = [(seed, scores) for seed in SEEDS if (scores := load_scores(graph_output(dataset, seed)))]
        if not runs:
            continue
        keys = ['accuracy', 'knn_accuracy', 'homophily', 'silhouette']
        keys += sorted(k for k in runs[0][1][VARIANTS[0]] if k.startswith('responsibility/'))
        rows = []
        for variant in VARIANTS:
            values = [[scores[variant][key] for _, scores in runs] for key in keys]
            rows.append(
                [
                    variant,
                    *(report.mean_std(x) + ' [' + ', '.join(f'{v:.3f}' for v in x) + ']' for x in values),
                ]
            )
        seeds = ', '.join(str(seed) for seed, _ in runs)
        lines += [f'## {dataset} (seeds {seeds})', '', report.markdown_table(['model', *keys], rows), '']
    text = '\n'.join(lines)
    with open(os.path.join(ROOT, 'docs', 'graph', 'graphs.md'), 'w') as f:
        f.write(text)
    return text


def probe_output(dataset: str, seed: int) -> str:
    return f'probe-{dataset}' if seed == 0 else f'probe-{dataset}-seed{seed}'


def probe_summary() -> str:
    """docs/graph/probes.md: probe and k-NN accuracy, mean ± std over the seeds probed so far."""
    lines = [
        '# Linear probes of pre-training',
        '',
        'Produced by `python experiments/graph_analysis.py --parts probe`: per seed, the pre-training run of the '
        'label-efficiency study against the same network untrained (same config and seed); a logistic-regression '
        'probe fitted on the fused embeddings of 5,000 training examples, scored on the whole test split. '
        'Mean ± std over seeds (population std); per-seed figures in probe-<dataset>[-seed<k>].json.',
        '',
    ]
    rows = []
    for dataset in label_efficiency.DATASETS:
        runs = [(seed, scores) for seed in SEEDS if (scores := load_scores(probe_output(dataset, seed)))]
        if not runs:
            continue
        seeds = ', '.join(str(seed) for seed, _ in runs)
        for name in PROBED:
            probe = [scores[name]['probe_accuracy'] for _, scores in runs]
            knn = [scores[name]['knn_accuracy'] for _, scores in runs]
            each = ', '.join(f'{p:.3f}' for p in probe)
            rows.append([dataset, name, seeds, report.mean_std(probe, 3), report.mean_std(knn, 3), each])
    headers = ['dataset', 'network', 'seeds', 'probe accuracy', 'k-NN accuracy', 'per seed (probe)']
    lines.append(report.markdown_table(headers, rows))
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(ROOT, 'docs', 'graph', 'probes.md'), 'w') as f:
        f.write(text)
    return text


def analyze(output: str, sources: dict[str, str], *extra: str) -> None:
    workdirs = ','.join(f'{name}={source}' for name, source in sources.items())
    cmd = [
        sys.executable,
        'tools/analyze.py',
        f'--workdirs={workdirs}',
        f'--output=docs/graph/{output}',
        *extra,
    ]
    print(' '.join(['python', *cmd[1:]]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def graph_workdir(dataset: str, variant: str, seed: int) -> str:
    if dataset == 'hapt':  # the HAPT table's runs (docs/results.md)
        return f'runs/tables/hapt/fused-{variant}-seed{seed}'
    return f'runs/graph/{dataset}/{variant}' + (f'-seed{seed}' if seed else '')


def graphs(datasets, seeds) -> None:
    for seed in seeds:
        for dataset in datasets:
            workdirs = {v: graph_workdir(dataset, v, seed) for v in VARIANTS}
            for v, workdir in workdirs.items():
                ensure_trained(workdir, f'configs/{dataset}.py:variant={v}', seed=seed)
            # The picture is seed 0's; the other seeds add their numbers.
            analyze(graph_output(dataset, seed), workdirs, *(['--noplot'] if seed else []))
    print(graph_summary())


def probes(seeds) -> None:
    for seed in seeds:
        for dataset in label_efficiency.DATASETS:
            pretrained = ensure_pretrained(dataset, seed)
            analyze(
                probe_output(dataset, seed),
                {'pretrained': pretrained, 'random': 'RANDOM'},
                '--probe',
                f'--config=configs/{dataset}.py:variant=pretrain',
                f'--config.seed={seed}',
                '--probe_examples=5000',
                *(['--noplot'] if seed else []),
            )
    print(probe_summary())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--parts', default='graph,probe', help='some of graph,probe')
    parser.add_argument('--probe_seeds', default=','.join(map(str, SEEDS)), help='the seeds probed')
    parser.add_argument(
        '--graph_datasets', default=','.join(GRAPH_DATASETS), help='the datasets of the graph part'
    )
    parser.add_argument(
        '--graph_seeds', default=','.join(map(str, SEEDS)), help='the seeds of the graph part'
    )
    args = parser.parse_args()
    parts = [p for p in args.parts.split(',') if p]
    if unknown := sorted(set(parts) - {'graph', 'probe'}):
        parser.error(f'--parts {unknown}: expected some of graph, probe')
    seeds = {}
    for name in ('probe_seeds', 'graph_seeds'):
        seeds[name] = [int(s) for s in getattr(args, name).split(',') if s]
        if unknown := sorted(set(seeds[name]) - set(SEEDS)):
            parser.error(f'--{name} {unknown}: expected some of {SEEDS}')
    datasets = [d for d in args.graph_datasets.split(',') if d]
    if unknown := sorted(set(datasets) - set(GRAPH_DATASETS)):
        parser.error(f'--graph_datasets {unknown}: expected some of {GRAPH_DATASETS}')
    if 'graph' in parts:
        graphs(datasets, seeds['graph_seeds'])
    if 'probe' in parts:
        probes(seeds['probe_seeds'])


if __name__ == '__main__':
    sys.exit(main())
