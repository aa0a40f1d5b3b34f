"""The built-in datasets: one TFDS builder module per dataset, named by `config.data.name`.

Each module defines `DATASET` (a `refnet_jax.data.contract.DatasetModule`) and nothing here is anything else:
the code the builders share lives one level up, in `refnet_jax.data`. Data are prepared offline as
array_record files and read without TensorFlow.
"""
