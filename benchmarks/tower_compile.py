r"""Compile time of a tower's train step, blocks unrolled against blocks under `nn.scan`.

  python benchmarks/tower_compile.py [--depths 12,24] [--repeats 3]

A 64-wide image tower (`refnet_jax.models.towers.module.Tower`, 4 heads, MLP 256, 32x32 images in 8x8
patches, MAP pooling), batch 8: the jitted step (forward, backward, an Adam update) is lowered and compiled
for each depth, unrolled and scanned; each figure is the median of `--repeats` compiles (a fresh jit each,
so nothing is cached) on this machine's default device. Prints one line per depth and setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from refnet_jax.models.towers.module import Tower


def compile_seconds(depth: int, scan: bool) -> float:
    tower = Tower(
        modality='image', width=64, depth=depth, num_heads=4, mlp_dim=256, patch_size=8, image_size=32,
        pooling='map', scan=scan,
    )  # fmt: skip
    images = jnp.zeros((8, 32, 32, 3), jnp.float32)
    params = jax.jit(tower.init)(jax.random.key(0), images)['params']
    tx = optax.adam(1e-3)

    def step(params, opt_state, images):
        loss, grads = jax.value_and_grad(lambda p: tower.apply({'params': p}, images)['pooler_output'].sum())(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    lowered = jax.jit(step).lower(params, tx.init(params), images)
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--depths', default='12,24', help='comma-separated block counts')
    parser.add_argument('--repeats', type=int, default=3, help='compiles per figure (the median is shown)')
    args = parser.parse_args()
    print(f'device: {jax.devices()[0].device_kind}; median of {args.repeats} compiles')
    for depth in (int(d) for d in args.depths.split(',')):
        for scan in (False, True):
            seconds = statistics.median(compile_seconds(depth, scan) for _ in range(args.repeats))
            print(f'depth {depth:3d}  {"scan" if scan else "unrolled":8s}  compile {seconds:6.2f} s')


if __name__ == '__main__':
    main()
