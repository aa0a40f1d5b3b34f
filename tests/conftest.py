"""Test set-up: 8 CPU devices for sharding tests, absl flags parsed for grain."""

import os

# Must be set before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def easy_vqa_dir(tmp_path_factory):
    """The real easy_vqa TFDS builder prepared once (array_record) into a session temp dir."""
    import ml_collections

    from refnet_jax import input_pipeline

    data_dir = tmp_path_factory.mktemp('tfds')
    input_pipeline.get_dataset_info(
        ml_collections.ConfigDict({'name': 'easy_vqa', 'data_dir': str(data_dir)})
    )
    return data_dir
