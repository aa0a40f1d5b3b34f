r"""Preparing a large own-data table: rows/s and peak memory at N and 10·N rows.

  python benchmarks/prepare_table.py [--rows 50000] [--format parquet] [--json PATH]

Generates, in a scratch directory (`--dir`, default a temporary one, removed after), a table of `--rows` rows
and one of 10× as many (written in chunks, never whole in memory): a product review (raw text, about 12 words),
8 numbers, a 16×16 PNG image (a path to one of `--images` files, decoded for every row) and one of 5 labels.
Each table is then prepared through configs/custom.py:kinds=photo:image+review:text+meta:features (a
tokenizer trained on the review text, images decoded by worker processes, array_record shards written), in
a child process of its own, and the child reports:

  rows/s          rows prepared per second, the whole preparation (every pass, tokenizer training included).
  peak RSS        the child's peak resident memory (VmHWM).
  all processes   the peak of the summed resident memory of the child and its image workers (sampled every
                  0.2 s; pages the workers share with their fork server count once per process).

Target: preparing ten times the rows takes about ten times the time and no more memory: the peak at 10·N is
at most 1.3× the peak at N.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

import benchlib
import numpy as np
import psutil

from refnet_jax.analysis import report

MAX_PEAK_RATIO = 1.3
WORDS = (
    'great terrible blender toaster kettle works broke quickly slowly loud quiet value price cheap sturdy flimsy '
    'recommend return refund shipping arrived box manual easy hard clean handle lid button cord warranty daily '
    'coffee tea soup smoothie perfect awful decent okay love hate again never always months weeks days'
).split()
KINDS = 'kinds=photo:image+review:text+meta:features'


def write_table(root: pathlib.Path, rows: int, fmt: str, images: int, seed: int = 0) -> str:
    """Writes `images` PNG files and a table of `rows` rows into `root`; returns the table's name."""
    from PIL import Image

    (root / 'img').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'img' / f'{i}.png')
    name = f'table.{fmt}'
    chunk = 50_000
    if fmt == 'parquet':
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for start in range(0, rows, chunk):
            columns = _columns(rng, start, min(rows, start + chunk), images)
            table = pa.table(columns)
            writer = writer or pq.ParquetWriter(root / name, table.schema)
            writer.write_table(table)
        writer.close()
    else:
        import json

        with open(root / name, 'w') as f:
            for start in range(0, rows, chunk):
                columns = _columns(rng, start, min(rows, start + chunk), images)
                for i in range(len(columns['label'])):
                    f.write(json.dumps({k: v[i] for k, v in columns.items()}) + '\n')
    return name


def _columns(rng: np.random.Generator, start: int, stop: int, images: int) -> dict[str, list]:
    n = stop - start
    labels = rng.integers(0, 5, n)
    words = rng.integers(0, len(WORDS), (n, 12))
    columns = {
        'photo': [f'img/{i % images}.png' for i in range(start, stop)],
        'review': [
            f'{("bad", "poor", "fine", "good", "superb")[y]} ' + ' '.join(WORDS[w] for w in ws)
            for y, ws in zip(labels, words, strict=True)
        ],
        'label': [f'stars_{y + 1}' for y in labels],
    }
    meta = rng.normal(size=(n, 8)) + labels[:, None]
    columns.update({f'meta_{j}': meta[:, j].tolist() for j in range(8)})
    return columns


def worker(args: argparse.Namespace) -> dict:
    """Prepares the table in `args.dir` (a fresh data_dir) and reports the time and the peak memory."""
    from absl import logging

    from refnet_jax.data import input_pipeline

    logging.set_verbosity(logging.WARNING)
    config = benchlib.load_config(f'configs/custom.py:{KINDS}')
    config.data.manual_dir = args.dir
    config.data.data_dir = os.path.join(args.dir, 'tfds')
    config.data.table = args.table
    config.data.image_size = 16
    peak_all = [0]
    done = threading.Event()

    def sample():  # the summed RSS of this process and its descendants (the image workers)
        me = psutil.Process()
        while not done.wait(0.2):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak_all[0] = max(peak_all[0], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    info = input_pipeline.get_dataset_info(config.data)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    rows = sum(info.num_examples.values())
    return {
        'rows': rows,
        'seconds': seconds,
        'rows_per_s': rows / seconds,
        'peak_rss': benchlib.peak_rss(),
        'peak_rss_all_processes': peak_all[0],
        'max_tokens': info.modalities['review'].shape[0],
        'vocab_size': info.modalities['review'].vocab_size,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--rows', type=int, default=50_000, help='N: the smaller table (the larger has 10·N)')
    parser.add_argument(
        '--format', choices=('parquet', 'jsonl'), default='parquet', help="the tables' format"
    )
    parser.add_argument('--images', type=int, default=1000, help='distinct image files the rows point to')
    parser.add_argument('--dir', help='scratch directory (default: a temporary one, removed after)')
    parser.add_argument('--table', help=argparse.SUPPRESS)
    benchlib.add_run_flags(parser, timeout=3600.0)
    args = parser.parse_args(argv)
    if args.worker:
        benchlib.emit_result(worker(args))
        return

    run = benchlib.Run.start(
        'prepare_table', ['tensorflow-datasets', 'array_record', 'pyarrow', 'sentencepiece']
    )
    scratch = pathlib.Path(args.dir or tempfile.mkdtemp(prefix='prepare_table_'))
    results = {}
    try:
        for rows in (args.rows, 10 * args.rows):
            root = scratch / f'rows_{rows}'
            print(f'{rows:,} rows: writing the table ...', file=sys.stderr, flush=True)
            table = write_table(root, rows, args.format, args.images)
            print(f'{rows:,} rows: preparing ...', file=sys.stderr, flush=True)
            here = os.path.dirname(os.path.abspath(__file__))
            results[rows] = benchlib.run_worker(
                os.path.join(here, 'prepare_table.py'),
                [f'--dir={root}', f'--table={table}'],
                timeout=args.timeout,
            )
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    run.finish()

    print(run.header())
    print(
        f'\nPreparing a {args.format} table (review text, 8 numbers, a 16×16 PNG per row), each size in its own '
        'process.\n'
    )
    cells = []
    for rows, r in results.items():
        if 'error' in r:
            cells.append([f'{rows:,}', r['error'], '', '', ''])
            continue
        cells.append(
            [
                f'{rows:,}',
                f'{r["seconds"]:.0f} s',
                f'{r["rows_per_s"]:,.0f}',
                f'{r["peak_rss"] / benchlib.MB:,.0f} MB',
                f'{r["peak_rss_all_processes"] / benchlib.MB:,.0f} MB',
            ]
        )
    print(report.markdown_table(['rows', 'time', 'rows/s', 'peak RSS', 'peak RSS, all processes'], cells))
    small, large = (results[n] for n in (args.rows, 10 * args.rows))
    if 'error' not in small and 'error' not in large:
        ratio = large['peak_rss'] / small['peak_rss']
        met = 'met' if ratio <= MAX_PEAK_RATIO else 'NOT met'
        print(
            f'\nTarget: peak at 10·N ≤ {MAX_PEAK_RATIO:g}× the peak at N: {ratio:.2f}× ({met}); '
            f'time at 10·N / time at N: {large["seconds"] / small["seconds"]:.1f}.'
        )
    if args.json:
        run.write_json(args.json, args, {str(k): v for k, v in results.items()}, hidden=('dir', 'table'))


if __name__ == '__main__':
    main()
