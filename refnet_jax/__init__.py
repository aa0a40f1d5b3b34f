"""refnet_jax: Refiner Fusion Networks (ReFNet) in JAX/Flax.

The public API is what `__all__` names: the losses, the modules a ReFNet is made of (encoders, fusions, the
refiner, `ReFNet` itself), the data contract, and the functions that train, load and export a run. Use them in
your own model and training loop (docs/how-to/own-training-loop.md shows one in about 50 lines). Everything
else lives in the subpackages and may move between releases:

- `refnet_jax.models`: layers, encoders, fusions, the refiner, `ReFNet` and `create_model`.
- `refnet_jax.data`: the data contract, the input pipeline, splits, corruption, the dataset builders.
- `refnet_jax.train`: state, steps, loop, optimizer, accumulation, sharding, checkpoints, selection.
- `refnet_jax.analysis`: latent-graph metrics and probes, their plots, results tables.
- `refnet_jax.export`: serving export and its numpy-only loader; frozen features.

Names are imported when first used, so `import refnet_jax.losses` does not pull in the training stack.
"""

import importlib

__version__ = '0.1.0'

# public name -> the module that defines it ('module:name' where the name there differs)
_API = {
    # losses (pure functions; optax style)
    'multi_similarity_loss': 'refnet_jax.losses',
    'refiner_loss': 'refnet_jax.losses',
    'softmax_cross_entropy': 'refnet_jax.losses',
    'sigmoid_cross_entropy': 'refnet_jax.losses',
    # the refiner and its targets
    'Refiner': 'refnet_jax.models.refiner',
    'RefinerDecoder': 'refnet_jax.models.refiner',
    'refiner_targets': 'refnet_jax.models.refiner',
    # token sequences with their mask, as token encoders return them
    'Tokens': 'refnet_jax.models.layers',
    # encoders
    'ImageCNN': 'refnet_jax.models.encoders',
    'ViT': 'refnet_jax.models.encoders',
    'TextTransformer': 'refnet_jax.models.encoders',
    'TokenEncoder': 'refnet_jax.models.encoders',
    'SeriesEncoder': 'refnet_jax.models.encoders',
    'FeatureMLP': 'refnet_jax.models.encoders',
    # fusions: what they return, their base class and registry, and the built-in ones
    'FusionOutput': 'refnet_jax.models.fusions',
    'Fusion': 'refnet_jax.models.fusions',
    'FUSIONS': 'refnet_jax.models.fusions',
    'ConcatMLP': 'refnet_jax.models.fusions.concat',
    'TransformerFusion': 'refnet_jax.models.fusions.transformer',
    'LowRankTensorFusion': 'refnet_jax.models.fusions.lowrank',
    'GatedFusion': 'refnet_jax.models.fusions.gated',
    'MMFT': 'refnet_jax.models.fusions.mmft',
    'MBT': 'refnet_jax.models.fusions.mbt',
    'ProgressiveFusion': 'refnet_jax.models.fusions.progressive',
    'DEQFusion': 'refnet_jax.models.fusions.deq',
    'CoupledMamba': 'refnet_jax.models.fusions.coupled_mamba',
    # the network
    'ReFNet': 'refnet_jax.models.model',
    'create_model': 'refnet_jax.models.model',
    # the data contract
    'ModalityInfo': 'refnet_jax.data.contract',
    'DatasetInfo': 'refnet_jax.data.contract',
    'DatasetModule': 'refnet_jax.data.contract',
    'PerRecordDataset': 'refnet_jax.data.input_pipeline',
    # runs
    'load_config': 'refnet_jax.config_lib:load_file',
    'build': 'refnet_jax.train.trainer',
    'train_and_evaluate': 'refnet_jax.train.trainer',
    'pretrain': 'refnet_jax.train.trainer',
    'load_run': 'refnet_jax.train.inference',
    'export_workdir': 'refnet_jax.export.serving',
    'load_export': 'refnet_jax.export.serving:load',
    'load_tower': 'refnet_jax.models.towers',
    'save_tower': 'refnet_jax.train.pretrained',
}

__all__ = sorted(_API)


def __getattr__(name: str):
    where = _API.get(name)
    if where is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    module, _, attr = where.partition(':')
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
