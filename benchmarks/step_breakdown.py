r"""Where the default easy-VQA train step spends its time, on one device: the whole step, the loss forward and
forward + backward, the image CNN alone, and each of its convolutions (forward, kernel gradient, input
gradient), each jitted and timed on its own.

  python benchmarks/step_breakdown.py [--config configs/easy_vqa.py] [--repeats 20] [--json PATH]

Each figure is the median of 5 windows of `--repeats` calls after one untimed window, each ending with
`block_until_ready`. The step and the loss use a real training batch (`input_pipeline.make_train_iterator`);
the convolutions random inputs of the shapes the CNN sees (its images: batch_size / questions_per_image).
The loss here is a plain `jax.value_and_grad`: the step adds the optimizer update and the metrics.
"""

from __future__ import annotations

import argparse
import statistics

import benchlib
import jax
import numpy as np

from refnet_jax.analysis import report
from refnet_jax.data import input_pipeline
from refnet_jax.models import encoders
from refnet_jax.train import sharding, trainer


def window_ms(run_window, repeats: int) -> float:
    """Median ms per call over 5 timed windows, after one untimed window: `run_window()` makes `repeats`
    calls and returns their outputs (blocked on before the clock stops)."""
    times, _ = benchlib.time_calls(lambda: jax.block_until_ready(run_window()), warmup=1, repeats=5)
    return statistics.median(times) / repeats * 1e3


def timed(fn, *args, repeats: int) -> float:
    """Median ms per call of `fn(*args)`."""
    return window_ms(lambda: [fn(*args) for _ in range(repeats)], repeats)


def conv_rows(image_shape, features, repeats: int) -> list[list]:
    """Each 3x3 'SAME' convolution of the CNN at the shapes it sees: forward, kernel and input gradients."""
    rs = np.random.RandomState(0)
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    rows = []
    b, h, w, c = image_shape
    for i, f in enumerate(features):
        x = rs.randn(b, h, w, c).astype(np.float32)
        k = rs.randn(3, 3, c, f).astype(np.float32)
        g = rs.randn(b, h, w, f).astype(np.float32)  # a cotangent, passed in: nothing folds to a constant
        fwd = timed(jax.jit(conv), x, k, repeats=repeats)
        dk = timed(jax.jit(jax.grad(lambda k, x, g: (conv(x, k) * g).sum())), k, x, g, repeats=repeats)
        dx = timed(jax.jit(jax.grad(lambda x, k, g: (conv(x, k) * g).sum())), x, k, g, repeats=repeats)
        rows.append([f'Conv_{i}: {h}x{w}, {c} -> {f}', f'{fwd:.2f}', f'{dk:.2f}', f'{dx:.2f}'])
        h, w, c = h // 2, w // 2, f
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--config', default='configs/easy_vqa.py')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--json', help='also write the figures to this JSON file')
    args = parser.parse_args(argv)
    run_info = benchlib.Run.start('step_breakdown', ['jax', 'jaxlib', 'flax', 'optax'])

    config = benchlib.load_config(args.config)
    config.mesh.data = 1
    run = trainer.build(config, devices=jax.devices()[:1])
    _, rng = trainer.init_rngs(config)
    with jax.set_mesh(run.mesh):
        batch = sharding.shard_batch(next(input_pipeline.make_train_iterator(config, seed=0)), run.mesh)
        step = run.train_step.lower(run.state, batch, rng).compile()
        state = run.state

        def steps():
            nonlocal state
            for _ in range(args.repeats):
                state, metrics = step(state, batch, rng)
            return state, metrics

        step_ms = window_ms(steps, args.repeats)
        params = state.params

        def loss(p):
            logits, aux = run.model.apply({'params': p}, batch, train=True, rngs={'dropout': rng})
            return run.objective.loss(logits, aux, batch)[0]

        image_cfg = {k: v for k, v in config.model.encoders.image.items() if k not in ('module', 'init_from')}
        cnn = encoders.ImageCNN(**image_cfg)
        images = batch['image']
        cnn_params = {'params': params['encoders']['image']}
        cnn_out = lambda p, x: cnn.apply(p, x).sum()  # noqa: E731
        rows = [
            [
                'train step (jitted, donating; optimizer and metrics included)',
                f'{step_ms:.2f}',
            ],
            ['loss forward', f'{timed(jax.jit(loss), params, repeats=args.repeats):.2f}'],
            [
                'loss forward + backward',
                f'{timed(jax.jit(jax.value_and_grad(loss)), params, repeats=args.repeats):.2f}',
            ],
            [
                f'image CNN forward ({images.shape[0]} images)',
                f'{timed(jax.jit(cnn_out), cnn_params, images, repeats=args.repeats):.2f}',
            ],
            [
                'image CNN forward + backward',
                f'{timed(jax.jit(jax.value_and_grad(cnn_out)), cnn_params, images, repeats=args.repeats):.2f}',
            ],
        ]
        convs = conv_rows(images.shape, image_cfg.get('features', (16, 32, 32, 32)), args.repeats)
    run_info.finish()
    print(run_info.header(), '\n')
    print(report.markdown_table(['part', 'ms'], rows), '\n')
    print(
        report.markdown_table(['convolution', 'forward ms', 'kernel gradient ms', 'input gradient ms'], convs)
    )
    if args.json:
        run_info.write_json(args.json, args, {'parts': rows, 'convolutions': convs})


if __name__ == '__main__':
    main()
