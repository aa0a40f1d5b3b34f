"""Every registered encoder (`encoders.ENCODERS`), alone, with every value of its `pooling` field.

The cases are generated from the registry: a new encoder is tested without editing this file when it is some
modality kind's default (`contract.KINDS`); otherwise `KIND_OF` must say which kind of input it takes, and the
test says so when it lacks the entry. Each case checks the output contract ((B, D), or `layers.Tokens` with
(B, T, D) tokens and a (B, T) bool mask), finite values, jit == no-jit, and non-zero gradients for every
parameter.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refnet_jax.data import contract
from refnet_jax.models import encoders, layers, modules

# The kind of input of each encoder that is no kind's default (those take their kind's input).
KIND_OF = {'vit': 'image', 'text_transformer': 'tokens', 'pretrained': 'image'}
# The values of each encoder's `pooling` field, as its __call__ checks them (ImageCNN keeps them in
# encoders.POOLINGS; the others in their error messages, which `test_pooling_values_are_complete` reads).
POOLINGS = {
    'cnn': encoders.POOLINGS,
    'vit': ('tokens', 'gap', 'cls'),
    'text_transformer': ('tokens', 'gap', 'first', 'last'),
    'conv1d': ('mean', 'tokens'),
    'pretrained': ('pooled', 'tokens'),
}
# Small widths, so that each case runs in about a second; an encoder not listed runs with its defaults.
TINY = {
    'cnn': dict(features=(4, 4), embed_dim=8),
    'vit': dict(patch_size=(4, 4), width=8, depth=1, num_heads=2),
    'bow': dict(embed_dim=8),
    'text_transformer': dict(width=8, depth=1, num_heads=2),
    'conv1d': dict(features=(4, 4), embed_dim=8),
    'mlp': dict(hidden=(8,), embed_dim=8),
    # a tiny SigLIP image tower (tests/test_towers.py); its position embeddings follow the input's grid
    'pretrained': dict(
        init_from=f'hf:{pathlib.Path(__file__).parent / "fixtures" / "towers" / "siglip"}', part='vision'
    ),
}
BATCH = 3
VOCAB_SIZE = 11


def example_input(kind: str) -> np.ndarray:
    """A small batch of `kind`'s items (`contract.KINDS` says what each kind holds)."""
    rng = np.random.default_rng(0)
    if kind == 'image':
        return rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8)
    if kind in (
        'tokens',
        'text',
    ):  # text: tokenized when prepared, ids like tokens (ModalityInfo.pad_id 0 here)
        ids = rng.integers(1, VOCAB_SIZE, (BATCH, 6)).astype(np.int32)
        ids[0, 3:] = 0  # padding at the end of one row
        return ids
    if kind == 'series':
        return rng.normal(size=(BATCH, 12, 3)).astype(np.float32)
    if kind == 'features':
        return rng.normal(size=(BATCH, 10)).astype(np.float32)
    pytest.fail(
        f'contract.KINDS has kind {kind!r}, for which tests/test_encoders.py example_input makes no input'
    )


def kind_of(name: str) -> str:
    defaults = {k.encoder: kind for kind, k in contract.KINDS.items()}
    if name in defaults:
        return defaults[name]
    if name not in KIND_OF:
        pytest.fail(
            f"encoders.ENCODERS[{name!r}] is no kind's default (contract.KINDS): add it to KIND_OF in "
            f'tests/test_encoders.py with the kind of input it takes ({", ".join(contract.KINDS)})'
        )
    return KIND_OF[name]


def poolings(name: str) -> tuple:
    """The values of encoder `name`'s `pooling` field; (None,) for an encoder that has none."""
    if 'pooling' not in modules.module_fields(encoders.ENCODERS[name]):
        return (None,)
    return POOLINGS.get(name, ())


def make(name: str, pooling: str | None):
    kind = kind_of(name)
    fields = dict(TINY.get(name, {}))
    if pooling is not None:
        fields['pooling'] = pooling
    vocab = VOCAB_SIZE if contract.KINDS[kind].needs_vocab else None
    module = modules.instantiate(
        encoders.ENCODERS[name], fields, f'encoders.ENCODERS[{name!r}]', vocab_size=vocab
    )
    return module, example_input(kind)


CASES = [(name, pooling) for name in encoders.ENCODERS for pooling in poolings(name)]


@pytest.mark.parametrize('name', list(encoders.ENCODERS))
def test_every_encoder_is_covered(name):
    kind_of(name)
    if 'pooling' in modules.module_fields(encoders.ENCODERS[name]):
        assert name in POOLINGS, (
            f'encoders.ENCODERS[{name!r}] has a `pooling` field: add its values to POOLINGS in '
            'tests/test_encoders.py'
        )


@pytest.mark.parametrize('name', [name for name in encoders.ENCODERS if name in POOLINGS])
def test_pooling_values_are_complete(name):
    """The listed values are exactly those the module's own check names when it refuses a pooling."""
    module, x = make(name, 'bogus')
    with pytest.raises(ValueError, match='pooling') as error:
        module.init(jax.random.key(0, impl='rbg'), x)
    named = set(re.findall(r"'(\w+)'", str(error.value))) - {'bogus'}
    assert named == set(POOLINGS[name]), f'{name}: the module names {sorted(named)}'


@pytest.mark.parametrize(('name', 'pooling'), CASES, ids=[f'{n}-{p}' for n, p in CASES])
def test_encoder_runs_alone(name, pooling):
    module, x = make(name, pooling)
    # Op by op, with rbg keys (threefry's compile far slower on CPU): the cases of one encoder share the
    # compiled ops. The parameters are moved off their initialization (a zero-initialized class token would
    # give its query no gradient).
    params = module.init(jax.random.key(0, impl='rbg'), x)['params']
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype), params)
    out = module.apply({'params': params}, x)  # op by op
    if isinstance(out, layers.Tokens):
        assert out.tokens.ndim == 3 and out.tokens.shape[0] == BATCH and out.tokens.shape[1] > 0
        assert out.mask.shape == out.tokens.shape[:2] and out.mask.dtype == jnp.bool_
        assert np.asarray(out.mask).any(axis=1).all(), 'an example without a real token'
        if pooling is not None:
            assert pooling == 'tokens', f'{name} returns tokens with pooling={pooling!r}'
    else:
        assert out.ndim == 2 and out.shape[0] == BATCH and out.shape[1] > 0, out.shape
        assert pooling != 'tokens', f'{name} returns {out.shape} with pooling=tokens'
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(out))

    # A fixed random read-out of the pooled output (a sum of squares would have no gradient after a
    # LayerNorm); one jitted function gives the output and the gradients.
    readout = rng.normal(size=layers.pooled(out).shape).astype(np.float32)

    def loss(p):
        y = module.apply({'params': p}, x)
        return jnp.sum(layers.pooled(y) * readout), y

    grads, jitted = jax.jit(jax.grad(loss, has_aux=True))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, jitted)
    # Attention key biases never get a gradient: the softmax is invariant to them.
    zero = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if not np.abs(np.asarray(g)).max() > 0 and jax.tree_util.keystr(path[-2:]) != "['key']['bias']"
    ]
    assert not zero, f'{name} (pooling={pooling}): parameters without gradient: {zero}'


@pytest.mark.parametrize('name', list(encoders.ENCODERS))
def test_every_encoder_takes_a_feedback_context_in_an_early_layer(name):
    """Progressive Fusion's backward connection: `context=` adds one projection (`context`) and changes the
    output; without it the encoder has no such parameter."""
    module, x = make(name, poolings(name)[0])
    key = jax.random.key(0, impl='rbg')
    context = np.random.default_rng(2).normal(size=(BATCH, 5)).astype(np.float32)
    plain = module.init(key, x)['params']
    fed = module.init(key, x, context=context)['params']
    assert 'context' not in plain and set(fed) == set(plain) | {'context'}
    without = layers.pooled(module.apply({'params': fed}, x))
    with_context = layers.pooled(module.apply({'params': fed}, x, context=context))
    assert not np.allclose(without, with_context)
    np.testing.assert_array_equal(without, layers.pooled(module.apply({'params': plain}, x)))
