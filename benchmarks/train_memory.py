r"""Per-device memory of the compiled train step: replicated against FSDP parameters, and gradient
accumulation (K micro-batches) against none. Nothing is run or allocated: each step is lowered against
abstract inputs and compiled, and XLA's memory analysis of the executable is read (bytes per device).

  python benchmarks/train_memory.py [--json PATH]

  fsdp      a ViT-B/16 image tower (width 768, depth 12, 12 heads; 86 M parameters) on easy-VQA's 64x64
            images, ReFNet (refiner + MS), batch 64, on 8 CPU devices: `config.mesh.fsdp` 1 (replicated) and
            8 (parameters and AdamW moments sharded). "state MB" is the parameters and optimizer state held
            per device (the executable's argument bytes less the batch's).
  accumulation
            HAPT with token fusion (mmft: the default config of that variant, time-step tokens of both
            sensors through a transformer), batch 256, on one device: `config.train.accumulation_steps` 1,
            2 and 4. "temp MB" is the step's temporary memory (activations kept for the backward pass, and
            work buffers). (Not easy-VQA: a shared modality's rows, its images, go whole into every
            micro-batch, so its image activations do not shrink with K.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import benchlib  # noqa: E402

from refnet_jax.analysis import report  # noqa: E402

MB = 2**20


def compiled_memory(config, devices) -> dict[str, float]:
    """Memory analysis (MB per device) of the train step of `config` on `devices`, compiled, not run."""
    import jax

    from refnet_jax.data import contract
    from refnet_jax.train import sharding, trainer

    run = trainer.build(config, devices=devices, init=False)
    model, tx, info, mesh = run.model, run.tx, run.info, run.mesh
    batch = contract.dummy_batch(info, config.train.batch_size)

    def init(rng):
        params = model.init({'params': rng, 'dropout': rng}, contract.dummy_batch(info, 2))['params']
        return trainer.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.param_shardings(abstract, mesh, tuple(config.mesh.shard_params))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    batch_spec = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in batch.items()
    }
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    with jax.set_mesh(mesh):
        step = trainer.make_train_step(run.objective, run.schedule, mesh, state)
        analysis = step.lower(state, batch_spec, rng).compile().memory_analysis()
    batch_bytes = sum(v.size * v.dtype.itemsize for v in batch.values()) / mesh.devices.size
    params = sum(x.size for x in jax.tree.leaves(abstract.params))
    return {
        'parameters': params,
        'argument MB': analysis.argument_size_in_bytes / MB,
        'state MB': (analysis.argument_size_in_bytes - batch_bytes) / MB,
        'temp MB': analysis.temp_size_in_bytes / MB,
        'output MB': analysis.output_size_in_bytes / MB,
    }


def vit_config(fsdp: int):
    config = benchlib.load_config('configs/easy_vqa.py:fusion=concat,variant=refnet')
    config.model.encoders.image = dict(
        module='vit', patch_size=(16, 16), width=768, depth=12, num_heads=12, pooling='gap', embed_dim=128
    )
    config.train.batch_size = 64
    config.eval.batch_size = 64
    config.mesh.fsdp = fsdp
    return config


def accumulation_config(k: int):
    config = benchlib.load_config('configs/hapt.py:fusion=mmft,variant=refnet')
    config.train.accumulation_steps = k
    config.mesh.data = 1
    return config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--json', help='also write the figures to this JSON file')
    args = parser.parse_args()
    import jax

    rows = {}
    for fsdp in (1, 8):
        rows[f'fsdp={fsdp} (8 devices)'] = compiled_memory(vit_config(fsdp), jax.devices())
        print(f'fsdp={fsdp}: {rows[f"fsdp={fsdp} (8 devices)"]}', flush=True)
    for k in (1, 2, 4):
        rows[f'accumulation_steps={k} (1 device)'] = compiled_memory(
            accumulation_config(k), jax.devices()[:1]
        )
        print(f'K={k}: {rows[f"accumulation_steps={k} (1 device)"]}', flush=True)
    headers = ['setting', 'parameters', 'state MB / device', 'argument MB', 'temp MB', 'output MB']
    table = [
        [
            name,
            f'{r["parameters"]:,}',
            f'{r["state MB"]:.1f}',
            f'{r["argument MB"]:.1f}',
            f'{r["temp MB"]:.1f}',
            f'{r["output MB"]:.1f}',
        ]
        for name, r in rows.items()
    ]
    print(report.machine_summary())
    print(report.markdown_table(headers, table))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': report.machine_summary(), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    sys.exit(main())
