r"""The latent-graph analysis of docs/CLAIMS.md, and the linear probes of pre-training, as one command.

  python experiments/graph_analysis.py           # trains what is missing, then analyses; prints the tables

Models (each trained by `train.py` if its workdir has no results.json yet):
  easy_vqa   the default config (low-rank fusion) as baseline, +refiner, +refiner+MS, seed 0:
             runs/graph/easy_vqa/<variant>
  hapt       the README table's fused runs, seeds 0, 1, 2: runs/tables/hapt/fused-<variant>-seed<k>
             (what `python experiments/tables.py hapt` leaves behind)
Probes: the label-efficiency study's pre-training runs (runs/label_efficiency/<dataset>/pretrain-seed0, made by
`python experiments/label_efficiency.py`) against the same network untrained (RANDOM).

Writes docs/graph/<name>.json and .png through analyze.py (see its docstring for the metrics).
"""

import os
import subprocess
import sys

from common import ROOT

VARIANTS = ('baseline', 'refiner', 'refnet')


def ensure_trained(workdir: str, config: str, seed: int) -> None:
    if os.path.exists(os.path.join(ROOT, workdir, 'results.json')):
        return
    cmd = [sys.executable, 'train.py', '--config', config, '--workdir', workdir, f'--config.seed={seed}']
    print('training:', ' '.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def analyze(output: str, sources: dict[str, str], *extra: str) -> None:
    workdirs = ','.join(f'{name}={source}' for name, source in sources.items())
    cmd = [sys.executable, 'analyze.py', f'--workdirs={workdirs}', f'--output=docs/graph/{output}', *extra]
    print(' '.join(['python', *cmd[1:]]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> None:
    easy = {v: f'runs/graph/easy_vqa/{v}' for v in VARIANTS}
    for v, workdir in easy.items():
        ensure_trained(workdir, f'configs/easy_vqa.py:variant={v}', seed=0)
    analyze('easy_vqa', easy)
    for seed in (0, 1, 2):
        hapt = {v: f'runs/tables/hapt/fused-{v}-seed{seed}' for v in VARIANTS}
        for v, workdir in hapt.items():
            ensure_trained(workdir, f'configs/hapt.py:variant={v}', seed=seed)
        analyze('hapt' if seed == 0 else f'hapt-seed{seed}', hapt, *(['--noplot'] if seed else []))
    for dataset in ('easy_vqa', 'hapt'):
        pretrained = f'runs/label_efficiency/{dataset}/pretrain-seed0'
        if not os.path.exists(os.path.join(ROOT, pretrained, 'results.json')):
            print(f'{pretrained} missing: run experiments/label_efficiency.py first; no probe for {dataset}')
            continue
        analyze(
            f'probe-{dataset}',
            {'pretrained': pretrained, 'random': 'RANDOM'},
            '--probe',
            f'--config=configs/{dataset}.py:variant=pretrain',
            '--probe_examples=5000',
        )


if __name__ == '__main__':
    sys.exit(main())
