r"""Multi-Similarity loss forward+backward: time and peak memory against batch size, next to references.

  python benchmarks/ms_loss.py [--batches 256,1024,4096,8192,16384,32768,65536] [--repeats 5] [--json PATH]

For each batch size B (D = 256 by default) the same random L2-normalized float32 embeddings and integer labels
(NumPy, from `--seed`) go to every side, each run in its own process:

  jax-dense      refnet_jax.losses.multi_similarity_loss(block_size=0): one B x B similarity matrix.
  jax-blocked    the same with blocks of anchor rows, rematerialized in the backward pass: the library's
                 automatic blocks where it blocks (B > 4096), else B / 4 rows (4 blocks), or `--block-rows`.
  floor-dense    the bare similarity matmuls: value and gradient of 0.5 * sum((x @ x.T) ** 2), i.e. the
                 forward matmul and the two backward ones (dS @ x and dS.T @ x) that any MS loss also needs,
                 with a reduction that costs one multiply per pair. No MS loss can beat it.
  floor-blocked  the same in blocks of the jax-blocked rows, rematerialized (lax.map + checkpoint), so large B
                 has a floor too and the blocked loss is compared with a blocked floor.
  pml            pytorch-metric-learning: MultiSimilarityLoss(alpha, beta, base) on the pairs of
                 MultiSimilarityMiner(epsilon), then backward (torch.set_num_threads = usable CPUs).
                 Needs the `bench` extra (pip install -c constraints.txt -e '.[bench]').

JAX sides time `jit(value_and_grad(f))` until `block_until_ready`, compiled beforehand (lower + compile is
reported separately). Each worker makes `--warmup` untimed calls, then `--repeats` timed ones; the table shows
the median and the min-max spread. Peak memory is the worker's peak RSS (VmHWM) minus its RSS after imports and
compiler start-up, so it counts the inputs, XLA's compilation and every call; XLA temp is the compiled program's
scratch memory (`memory_analysis().temp_size_in_bytes`). A dense side whose estimated peak exceeds `--mem-cap-gb`
is skipped. JAX and pml must agree: the table gives the relative difference of the loss and of a gradient probe
(the gradient's dot product with a fixed random direction).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import benchlib
import numpy as np

from refnet_jax.analysis import report

SIDES = ('jax-dense', 'jax-blocked', 'floor-dense', 'floor-blocked', 'pml')
JAX_SIDES = ('jax-dense', 'jax-blocked')
FLOOR_SIDES = ('floor-dense', 'floor-blocked')
# Estimated peak bytes per entry of the B x B matrix for the dense sides, to skip sizes that would not fit in
# --mem-cap-gb: this script's peak MB at B = 4096 (jax-dense 335, floor-dense 112, pml 1324) over B^2, rounded
# up. Blocked sides hold (rows, B) tiles of at most 64 MiB and are never skipped.
BYTES_PER_PAIR = {'jax-dense': 24, 'floor-dense': 8, 'pml': 96}
# The library's defaults (refnet_jax/losses.py, multi_similarity_loss), also pml's.
ALPHA, BETA, BASE, EPSILON = 2.0, 50.0, 0.5, 0.1
# Targets (the issue): at these B the library's default MS loss must be >= 5x faster than pml and within 2x of
# the floor; the blocked loss's peak memory must stay under these MB.
SPEED_TARGET_BATCHES = (4096, 8192)
MIN_SPEEDUP_VS_PML, MAX_RATIO_TO_FLOOR = 5.0, 2.0
PEAK_MB_TARGETS = {32768: 2000.0, 65536: 4000.0}


def make_inputs(batch: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (B, D) float32 L2-normalized, labels (B,) int32, probe direction (B, D) float32)."""
    rng = np.random.default_rng([seed, batch, dim])
    x = rng.standard_normal((batch, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    probe = rng.standard_normal((batch, dim), dtype=np.float32)
    return x, labels, probe


# ----------------------------------------------------------------------------------------------- workers


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    from refnet_jax import losses

    jax.jit(lambda a: a + 1)(1.0).block_until_ready()  # XLA's start-up is not the loss's memory.
    baseline = benchlib.current_rss()

    batch = args.batch
    rows = args.block_rows or losses.ms_block_size(batch) or max(8, batch // 4 // 8 * 8)
    if args.side in ('jax-dense', 'floor-dense'):
        rows = 0
    default_rows = losses.ms_block_size(batch)
    ms = dict(alpha=ALPHA, beta=BETA, base=BASE, epsilon=EPSILON)

    def floor_dense(x, labels):
        del labels
        sim = x @ x.T  # (B, B)
        return 0.5 * jnp.sum(sim * sim)

    def floor_blocked(x, labels):
        del labels
        num_blocks = -(-batch // rows)
        tiles = jnp.pad(x, [(0, num_blocks * rows - batch), (0, 0)]).reshape(num_blocks, rows, x.shape[1])
        tile_fn = jax.checkpoint(lambda anchors: 0.5 * jnp.sum(jnp.square(anchors @ x.T)))  # (rows, B)
        return jnp.sum(jax.lax.map(tile_fn, tiles))

    fns = {
        'jax-dense': lambda x, labels: losses.multi_similarity_loss(x, labels, block_size=0, **ms),
        'jax-blocked': lambda x, labels: losses.multi_similarity_loss(x, labels, block_size=rows, **ms),
        'floor-dense': floor_dense,
        'floor-blocked': floor_blocked,
    }
    x_np, labels_np, probe = make_inputs(batch, args.dim, args.classes, args.seed)
    x, labels = jax.device_put(x_np), jax.device_put(labels_np)
    step = jax.jit(jax.value_and_grad(fns[args.side]))

    start = time.perf_counter()
    compiled = step.lower(x, labels).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def call():
        return jax.block_until_ready(compiled(x, labels))

    times, (value, grad) = benchlib.time_calls(call, warmup=args.warmup, repeats=args.repeats)
    peak = benchlib.peak_rss() - baseline
    return {
        'rows': rows,
        'library_default': rows == default_rows,
        'compile_s': compile_s,
        'times_s': times,
        'peak_mb': peak / benchlib.MB,
        'xla_temp_mb': memory.temp_size_in_bytes / benchlib.MB if memory else None,
        'loss': float(value),
        'grad_probe': float(np.vdot(np.asarray(grad, np.float64), probe)),
    }


def pml_worker(args) -> dict:
    import torch
    from pytorch_metric_learning import losses, miners

    threads = args.torch_threads or report.usable_cpus()
    torch.set_num_threads(threads)
    loss_fn = losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=BASE)
    miner = miners.MultiSimilarityMiner(epsilon=EPSILON)
    (torch.ones(2, requires_grad=True) * 2).sum().backward()  # autograd start-up is not the loss's memory.
    baseline = benchlib.current_rss()

    x_np, labels_np, probe = make_inputs(args.batch, args.dim, args.classes, args.seed)
    x = torch.from_numpy(x_np).requires_grad_()
    labels = torch.from_numpy(labels_np).long()

    def call():
        x.grad = None
        loss = loss_fn(x, labels, miner(x, labels))
        loss.backward()
        return loss

    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    times, value = benchlib.time_calls(call, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
    peak = benchlib.peak_rss() - baseline
    return {
        'rows': 0,
        'threads': threads,
        'first_call_s': first_s,
        'times_s': times,
        'peak_mb': peak / benchlib.MB,
        'loss': float(value.detach()),
        'grad_probe': float(np.vdot(x.grad.numpy().astype(np.float64), probe)),
    }


# ----------------------------------------------------------------------------------------------- parent


def skip_reason(side: str, batch: int, cap_gb: float) -> str | None:
    """Why `side` is not run at `batch` (estimated memory over the cap, or pml not installed), else None."""
    if side == 'pml':
        import importlib.util

        if importlib.util.find_spec('pytorch_metric_learning') is None:
            return "not installed: pip install -c constraints.txt -e '.[bench]'"
    per_pair = BYTES_PER_PAIR.get(side)
    if per_pair is None:
        return None
    estimate = per_pair * batch * batch / 1e9
    if estimate > cap_gb:
        return f'skipped (B² = {4 * batch * batch / 1e9:.3g} GB; est. peak {estimate:.3g} GB > {cap_gb:g} GB cap)'
    return None


def relative_diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def fmt(value, spec: str = '.1f', none: str = '–') -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def median_ms(result: dict | None) -> float | None:
    if not result or 'times_s' not in result:
        return None
    return benchlib.summary(result['times_s'])['median'] * 1e3


def tables(results: dict[int, dict[str, dict]]) -> str:
    detail_rows, summary_rows = [], []
    for batch, sides in results.items():
        pml = sides.get('pml', {})
        floors = [m for m in (median_ms(sides.get(s)) for s in FLOOR_SIDES) if m is not None]
        floor = min(floors) if floors else None
        for side, r in sides.items():
            if 'times_s' not in r:
                detail_rows.append([batch, side, *['–'] * 9, r.get('skipped') or f'error: {r.get("error")}'])
                continue
            s = benchlib.summary(r['times_s'])
            is_jax = side in JAX_SIDES
            detail_rows.append(
                [
                    batch,
                    side,
                    r['rows'] or 'dense',
                    fmt(r.get('compile_s'), '.2f') if 'compile_s' in r else f'({r["first_call_s"]:.2f} 1st)',
                    fmt(s['median'] * 1e3),
                    f'{s["min"] * 1e3:.1f}–{s["max"] * 1e3:.1f}',
                    fmt(r['peak_mb'], '.0f'),
                    fmt(r.get('xla_temp_mb'), '.0f'),
                    fmt(r['loss'], '.6g'),
                    fmt(relative_diff(r['loss'], pml.get('loss')), '.1e') if is_jax else '',
                    fmt(relative_diff(r['grad_probe'], pml.get('grad_probe')), '.1e') if is_jax else '',
                    'library default' if r.get('library_default') and is_jax else '',
                ]
            )
        dense, blocked, pml_ms = (median_ms(sides.get(s)) for s in ('jax-dense', 'jax-blocked', 'pml'))
        blocked_result = sides.get('jax-blocked', {})

        def ratio(a, b):
            return fmt(a / b, '.1f') + '×' if a is not None and b is not None else '–'

        summary_rows.append(
            [
                batch,
                fmt(dense),
                fmt(blocked),
                fmt(floor),
                fmt(pml_ms),
                ratio(pml_ms, dense),
                ratio(pml_ms, blocked),
                ratio(dense, floor),
                ratio(blocked, floor),
                fmt(blocked_result.get('peak_mb'), '.0f'),
            ]
        )
    detail = report.markdown_table(
        [
            'B',
            'side',
            'block rows',
            'compile s',
            'median ms',
            'min–max ms',
            'peak MB',
            'XLA temp MB',
            'loss',
            'loss vs pml',
            'grad vs pml',
            'note',
        ],
        detail_rows,
    )
    short = report.markdown_table(
        [
            'B',
            'jax-dense ms',
            'jax-blocked ms',
            'floor ms',
            'pml ms',
            'pml / dense',
            'pml / blocked',
            'dense / floor',
            'blocked / floor',
            'blocked peak MB',
        ],
        summary_rows,
    )
    return f'{short}\n\n{detail}'


def target_lines(results: dict[int, dict[str, dict]]) -> list[str]:
    """The issue's targets, checked on what was measured (the library's default side at each B)."""
    lines = []
    for batch in SPEED_TARGET_BATCHES:
        sides = results.get(batch, {})
        default = next((s for s in JAX_SIDES if sides.get(s, {}).get('library_default')), None)
        jax_ms = median_ms(sides.get(default)) if default else None
        pml_ms = median_ms(sides.get('pml'))
        floors = [m for m in (median_ms(sides.get(s)) for s in FLOOR_SIDES) if m is not None]
        if jax_ms is not None and pml_ms is not None:
            speedup = pml_ms / jax_ms
            ok = 'met' if speedup >= MIN_SPEEDUP_VS_PML else 'NOT met'
            lines.append(
                f'- B={batch}: {default} {speedup:.1f}× faster than pml (≥ {MIN_SPEEDUP_VS_PML:g}×: {ok})'
            )
        if jax_ms is not None and floors:
            r = jax_ms / min(floors)
            ok = 'met' if r <= MAX_RATIO_TO_FLOOR else 'NOT met'
            lines.append(
                f'- B={batch}: {default} {r:.2f}× the matmul floor (≤ {MAX_RATIO_TO_FLOOR:g}×: {ok})'
            )
    for batch, cap in PEAK_MB_TARGETS.items():
        peak = results.get(batch, {}).get('jax-blocked', {}).get('peak_mb')
        if peak is not None:
            ok = 'met' if peak < cap else 'NOT met'
            lines.append(f'- B={batch}: jax-blocked peak {peak:.0f} MB (< {cap:.0f} MB: {ok})')
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--batches', default='256,1024,4096,8192,16384,32768,65536', help='comma-separated B')
    parser.add_argument('--dim', type=int, default=256, help='embedding width D')
    parser.add_argument('--classes', type=int, default=100, help='labels are uniform in [0, classes)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--sides', default=','.join(SIDES), help=f'comma-separated, of {",".join(SIDES)}')
    parser.add_argument('--block-rows', type=int, default=0, help='rows per block (0: see the docstring)')
    parser.add_argument(
        '--torch-threads', type=int, default=0, help='torch.set_num_threads for pml (0: the usable CPUs)'
    )
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls per worker')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per worker (the median is shown)')
    parser.add_argument('--mem-cap-gb', type=float, default=8.0, help='skip dense sides estimated above this')
    benchlib.add_run_flags(parser, timeout=3600.0)
    parser.add_argument('--side', choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument('--batch', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        benchlib.emit_result(pml_worker(args) if args.side == 'pml' else jax_worker(args))
        return

    batches = [int(b) for b in args.batches.split(',') if b]
    sides = [s for s in args.sides.split(',') if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not batches or min(batches) < 2:
        parser.error(f'--sides {unknown} not among {SIDES}' if unknown else f'--batches {args.batches!r}')
    run = benchlib.Run.start('ms_loss', ['jax', 'jaxlib', 'torch', 'pytorch-metric-learning', 'numpy'])
    worker_flags = [
        f'--{k}={getattr(args, k.replace("-", "_"))}'
        for k in ('dim', 'classes', 'seed', 'block-rows', 'torch-threads', 'warmup', 'repeats')
    ]
    results: dict[int, dict[str, dict]] = {}
    for batch in batches:
        results[batch] = {}
        for side in sides:
            reason = skip_reason(side, batch, args.mem_cap_gb)
            if reason:
                results[batch][side] = {'skipped': reason}
                continue
            print(f'B={batch} {side} ...', file=sys.stderr, flush=True)
            results[batch][side] = benchlib.run_worker(
                os.path.abspath(__file__),
                [f'--side={side}', f'--batch={batch}', *worker_flags],
                timeout=args.timeout,
            )
    run.finish()

    print(run.header())
    print(
        f'\nMS loss forward+backward, D={args.dim}, {args.classes} classes, float32; median of {args.repeats} '
        f'calls after {args.warmup} warm-up, each side in its own process. "floor" is the faster of the dense '
        'and blocked bare matmuls. Peak MB: peak RSS over the RSS after imports.\n'
    )
    print(tables(results))
    lines = target_lines(results)
    if lines:
        print('\nTargets:\n' + '\n'.join(lines))
    if args.json:
        run.write_json(args.json, args, {str(b): r for b, r in results.items()}, hidden=('side', 'batch'))


if __name__ == '__main__':
    main()
