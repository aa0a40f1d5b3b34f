"""Test set-up: 8 CPU devices for sharding tests, XLA's quick compilation, a compilation cache per test process,
absl flags parsed for grain."""

import atexit
import os
import shutil
import tempfile

# Must be set before jax is imported anywhere. The test processes, and the short train.py runs they start (which
# inherit the environment), compile with XLA's backend optimization level 0: the same programs, compiled in about
# half the CPU time and run more slowly, which is the right trade for tests that compile many tiny models and run
# them a few steps. The docs' worked examples (`helpers.run_readme_bash`), which train hundreds of steps, run as a
# user runs them. REFNET_TEST_OPTIMIZE=1 compiles everything as users do.
_flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
if not os.environ.get('REFNET_TEST_OPTIMIZE') and 'xla_backend_optimization_level' not in _flags:
    _flags += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# A persistent compilation cache per test process (the pytest-xdist workers each have one), shared with the
# `train.py` subprocesses it starts (they inherit the environment): the many tests that compile the same tiny
# configs compile them once. It starts empty, so every computation is still compiled for real in each session;
# JAX keys its entries by the program, the devices and the flags. A cache the user set is left alone.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ or os.environ.get('REFNET_TEST_CACHE'):
    _cache_dir = tempfile.mkdtemp(prefix='refnet-jax-test-compilation-cache-')
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ['REFNET_TEST_CACHE'] = '1'  # an xdist worker (it inherits this) makes its own
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'  # not the many small op-by-op programs
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def easy_vqa_dir(tmp_path_factory):
    """The real easy_vqa TFDS builder prepared once (array_record) into a session temp dir."""
    import ml_collections

    from refnet_jax.data import input_pipeline

    data_dir = tmp_path_factory.mktemp('tfds')
    input_pipeline.get_dataset_info(
        ml_collections.ConfigDict({'name': 'easy_vqa', 'data_dir': str(data_dir)})
    )
    return data_dir


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the longest (`@pytest.mark.slow(seconds=...)`, alone on 2 cores) at the head:
    the pytest-xdist workers start the long runs at once and end together on short tests, rather than one
    worker finishing a 3-minute run alone. Otherwise the order stays."""

    def key(item):
        slow = item.get_closest_marker('slow')
        return (slow is None, -(slow.kwargs.get('seconds', 0) if slow else 0))

    items.sort(key=key)
