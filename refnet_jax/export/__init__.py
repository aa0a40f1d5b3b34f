"""Taking a trained network out of the library.

- `serving`: `jax.export` of the inference function with its parameters, and `load`, which needs only jax and
  numpy to run it.
- `features`: frozen features once: a dataset's modalities encoded by (frozen) encoders, written as own data.
"""

from refnet_jax.export.serving import export_model, export_workdir, load

__all__ = ['export_model', 'export_workdir', 'load']
