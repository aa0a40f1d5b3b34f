"""The fusion registry and contract: a fusion is one class in one file of `refnet_jax.models.fusions`, found
by the package (registry, config argument, help, docs list); every fusion returns a `FusionOutput`."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refnet_jax import config_lib
from refnet_jax.models import fusions

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The kinds recorded results and checkpoints name: they must not change.
RECORDED_KINDS = {
    'concat',
    'transformer',
    'lowrank',
    'gated',
    'mmft',
    'mbt',
    'progressive',
    'deq',
    'coupled_mamba',
}

NEW_FUSION = '''
"""A fusion written by tests/test_fusions.py for one test, and removed after it."""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from refnet_jax.models.fusions.base import Fusion, FusionOutput


class MeanOfProjections(Fusion):
    """The mean of the modalities' projections (a fusion a test adds and removes).

    Attributes:
      fused_dim: size of z.
    """

    kind: ClassVar[str] = '{kind}'
    fused_dim: int = 8

    @nn.compact
    def __call__(self, embeddings, *, train=False):
        h = [nn.Dense(self.fused_dim, name=f'proj_{{m}}')(embeddings[m]) for m in sorted(embeddings)]
        return FusionOutput(jnp.mean(jnp.stack(h), axis=0))
'''

# Run in a fresh interpreter, so that the package finds its modules again.
PROBE = """
import json
import jax
from configs import easy_vqa
from refnet_jax import config_lib
from refnet_jax.data import contract
from refnet_jax.models import fusions, model
import numpy as np

kind = {kind!r}
config = easy_vqa.get_config(f'tiny,fusion={{kind}}')
info = contract.DatasetInfo(
    name='toy',
    modalities={{
        'image': contract.ModalityInfo(kind='image', shape=(16, 16, 3), dtype=np.uint8, shared=True),
        'question': contract.ModalityInfo(kind='tokens', shape=(6,), dtype=np.int32, vocab_size=11),
    }},
    num_classes=5,
    multi_label=False,
    class_names=tuple('abcde'),
    num_examples={{'train': 8}},
)
net = model.create_model(config, info)
batch = {{
    'image': np.zeros((4, 16, 16, 3), np.uint8),
    'image_index': np.repeat(np.arange(4), 2).astype(np.int32),
    'question': np.ones((8, 6), np.int32),
}}
params = jax.eval_shape(net.init, jax.random.key(0), batch)['params']
print(json.dumps({{
    'registry': list(fusions.FUSIONS),
    'help': config_lib.ARG_HELP,
    'describe': [list(row) for row in fusions.describe()],
    'fused_dim': config.model.fusion.fused_dim,
    'fusion_params': sorted(params['fusion']),
}}))
"""


def test_a_fusion_added_as_one_file_is_in_the_registry_the_help_the_docs_list_and_a_config():
    """Adding a fusion is one class in one new file of the package: in a fresh process it is registered,
    listed in the config argument's help and in `describe()` (the docs' list), and `fusion=<kind>` builds it
    with its fields' defaults (the tiny config's fused_dim)."""
    kind = f'written_by_test_{os.getpid()}'
    path = ROOT / 'refnet_jax' / 'models' / 'fusions' / f'{kind}.py'
    assert not path.exists()
    try:
        path.write_text(NEW_FUSION.format(kind=kind))
        proc = subprocess.run(
            [sys.executable, '-c', textwrap.dedent(PROBE.format(kind=kind))],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE='1', JAX_PLATFORMS='cpu'),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        path.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kind in seen['registry'] and RECORDED_KINDS <= set(seen['registry'])
    assert kind in seen['help']
    assert [
        kind,
        f'refnet_jax.models.fusions.{kind}.MeanOfProjections',
        "The mean of the modalities' projections (a fusion a test adds and removes).",
        'pooled',
    ] in seen['describe']
    assert seen['fused_dim'] == 16 and seen['fusion_params'] == ['proj_image', 'proj_question']
    assert kind not in fusions.FUSIONS  # this process imported the package before the file existed


def test_the_registry_holds_the_recorded_kinds_and_describe_lists_it():
    assert set(fusions.FUSIONS) == RECORDED_KINDS
    rows = fusions.describe()
    assert [r.kind for r in rows] == list(fusions.FUSIONS)
    for row in rows:
        cls = fusions.FUSIONS[row.kind]
        assert cls.kind == row.kind and issubclass(cls, fusions.Fusion)
        assert row.path == f'{cls.__module__}.{cls.__qualname__}'
        # one file per fusion, named by its kind
        assert cls.__module__ == f'refnet_jax.models.fusions.{row.kind}'
        assert row.description and '\n' not in row.description
        assert row.inputs == fusions.input_kind(cls)
    assert {r.kind for r in rows if r.inputs == 'tokens'} == {'mmft', 'mbt', 'coupled_mamba'}


def test_the_help_and_the_error_of_the_config_argument_name_every_fusion():
    for kind in fusions.FUSIONS:
        assert kind in config_lib.ARG_HELP
    with pytest.raises(ValueError, match='fusion=' + '[|]'.join(sorted(fusions.FUSIONS))):
        config_lib.parse_arg('fusion=nope', default_fusion='concat')


def test_a_bare_array_is_a_fusion_output_and_anything_else_is_refused():
    z = jnp.ones((3, 4))
    out = fusions.as_output(z, fusions.Fusion)
    assert isinstance(out, fusions.FusionOutput) and out.z is z and out.readouts is None and out.stats is None
    same = fusions.FusionOutput(z, {'a': z})
    assert fusions.as_output(same, fusions.Fusion) is same
    # A pytree: it goes through jit and tree maps as (z, readouts, stats).
    doubled = jax.jit(lambda o: jax.tree.map(lambda x: 2 * x, o))(same)
    np.testing.assert_array_equal(doubled.readouts['a'], 2 * z)
    for bad, what in (((z, {}), 'a tuple'), (jnp.ones((3,)), 'an array of shape (3,)')):
        with pytest.raises(ValueError, match=re.escape(f'Fusion returned {what}; expected a FusionOutput')):
            fusions.as_output(bad, fusions.Fusion)


def test_inputs_other_than_pooled_or_tokens_are_refused():
    class Odd(fusions.Fusion):
        inputs = 'images'

    with pytest.raises(
        ValueError, match=r"config.model.fusion.kind: Odd.inputs is 'images'; expected one of"
    ):
        fusions.check_class(Odd, 'config.model.fusion.kind')
