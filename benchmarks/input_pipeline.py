r"""The input pipeline's rate against what the train step consumes.

  python benchmarks/input_pipeline.py [--config configs/easy_vqa.py] [--batches 200] [--json PATH]

Three processes, one after another, on the same configuration (default: easy-VQA, its default lowrank refnet):

  pipeline        examples/s that `input_pipeline.make_train_iterator(config, seed=0)` delivers: `next()` on
                  the iterator alone, `--windows` windows of `--batches` batches after `--warmup-batches`
                  (grain's reader threads and prefetch included; nothing else runs in the process).
  step            examples/s the train step consumes on prefetched device batches (benchmarks/train_step.py's
                  worker): the demand the pipeline has to meet.
  step, live      the train step fed by the iterator, batch checks and sharding included, as in `trainer`:
                  the rate training gets when the pipeline and the step share the CPUs.

The ratio pipeline / step is the headroom: at 1 the pipeline would just keep up with the step, here it must be
>= 3. Live / step shows what feeding costs in practice (1.0: nothing). Data are prepared in
`config.data.data_dir` (TFDS's default, ~/tensorflow_datasets) on first use, before any timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import benchlib
import train_step

from refnet_jax.analysis import report

MIN_HEADROOM = 3.0  # the target for pipeline / step


def worker(args) -> dict:
    from refnet_jax.data import input_pipeline

    config = benchlib.load_config(args.config)
    input_pipeline.get_dataset_info(config.data)  # prepares the data on first use (not timed)
    start = time.perf_counter()
    iterator = input_pipeline.make_train_iterator(config, seed=0)
    batch = next(iterator)
    first_batch_s = time.perf_counter() - start
    for _ in range(args.warmup_batches):
        batch = next(iterator)
    examples = len(batch['label'])
    windows = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        windows.append(time.perf_counter() - start)
    rates = [args.batches * examples / t for t in windows]
    return {
        'config': args.config,
        'batch_size': examples,
        'first_batch_s': first_batch_s,
        'window_s': windows,
        'examples_per_s': statistics.median(rates),
        'examples_per_s_min': min(rates),
        'examples_per_s_max': max(rates),
    }


def rate_cell(r: dict) -> str:
    if 'error' in r:
        return f'error: {r["error"]}'
    return f'{r["examples_per_s"]:,.0f} ({r["examples_per_s_min"]:,.0f}–{r["examples_per_s_max"]:,.0f})'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--config', default='configs/easy_vqa.py', help='configs/<name>.py[:arg]')
    parser.add_argument('--batches', type=int, default=200, help='pipeline batches per timed window')
    parser.add_argument(
        '--warmup-batches', type=int, default=20, help='untimed pipeline batches after the first'
    )
    train_step.add_step_flags(parser)  # --windows is shared by the pipeline and the step
    benchlib.add_run_flags(parser, timeout=1800.0)
    args = parser.parse_args(argv)

    if args.worker:
        benchlib.emit_result(worker(args))
        return

    run = benchlib.Run.start(
        'input_pipeline', ['jax', 'jaxlib', 'grain', 'tensorflow-datasets', 'array_record']
    )
    here = os.path.dirname(os.path.abspath(__file__))
    step_flags = [f'--config={args.config}', *train_step.step_worker_flags(args)]
    print('pipeline ...', file=sys.stderr, flush=True)
    pipeline = benchlib.run_worker(
        os.path.join(here, 'input_pipeline.py'),
        [
            f'--config={args.config}',
            f'--batches={args.batches}',
            f'--warmup-batches={args.warmup_batches}',
            f'--windows={args.windows}',
        ],
        timeout=args.timeout,
    )
    steps = {}
    for feed in train_step.FEEDS:
        print(f'step ({feed}) ...', file=sys.stderr, flush=True)
        steps[feed] = benchlib.run_worker(
            os.path.join(here, 'train_step.py'), [*step_flags, f'--feed={feed}'], timeout=args.timeout
        )
    run.finish()

    ok = all('error' not in r for r in (pipeline, *steps.values()))
    headroom = pipeline['examples_per_s'] / steps['prefetched']['examples_per_s'] if ok else None
    live = steps['live']['examples_per_s'] / steps['prefetched']['examples_per_s'] if ok else None
    print(run.header())
    print(
        f'\nExamples/s, median of {args.windows} windows (min–max): pipeline alone over {args.batches} batches, '
        f'train step over {args.steps} steps; each in its own process.\n'
    )
    print(
        report.markdown_table(
            [
                'config',
                'batch',
                'pipeline examples/s',
                'step examples/s (prefetched)',
                'pipeline / step',
                'step examples/s (live)',
                'live / prefetched',
            ],
            [
                [
                    f'`{args.config}`',
                    pipeline.get('batch_size', '–'),
                    rate_cell(pipeline),
                    rate_cell(steps['prefetched']),
                    f'{headroom:.1f}×' if ok else '–',
                    rate_cell(steps['live']),
                    f'{live:.2f}' if ok else '–',
                ]
            ],
        )
    )
    if ok:
        met = 'met' if headroom >= MIN_HEADROOM else 'NOT met'
        print(f"\nTarget: pipeline ≥ {MIN_HEADROOM:g}× the step's consumption: {headroom:.1f}× ({met}).")
        print(f'First batch after creating the iterator: {pipeline["first_batch_s"]:.2f} s.')
    if args.json:
        results = {'pipeline': pipeline, 'step': steps, 'pipeline_over_step': headroom}
        run.write_json(args.json, args, results)


if __name__ == '__main__':
    main()
