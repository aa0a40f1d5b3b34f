"""Token-level encoders and fusions: masks (padding may hold anything, NaN included), modality order, the
pooled <-> token adapters, and the `tokens` refiner target against a NumPy reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refnet_jax.models import encoders, fusions, layers, modules
from refnet_jax.models.fusions import coupled_mamba

TOKEN_FUSIONS = sorted(k for k, v in fusions.FUSIONS.items() if fusions.input_kind(v) == 'tokens')
POOLED_FUSIONS = sorted(k for k, v in fusions.FUSIONS.items() if fusions.input_kind(v) == 'pooled')
# Every fusion variant whose read-out differs: (kind, fields).
FUSION_CASES = [
    ('mmft', dict(readout='mean', readout_layer=1)),
    pytest.param('mmft', dict(readout='cls', readout_layer=1), marks=pytest.mark.slow),
    pytest.param('mmft', dict(readout='mean', readout_layer=2), marks=pytest.mark.slow),
    pytest.param('mbt', dict(fusion_layer=1), marks=pytest.mark.slow),
    pytest.param('mbt', dict(fusion_layer=0), marks=pytest.mark.slow),
    ('coupled_mamba', dict(state_size=4)),
]
assert {getattr(c, 'values', c)[0] for c in FUSION_CASES} == set(TOKEN_FUSIONS), (
    'a token fusion without a test case'
)


def token_inputs(seed=0, pad_value=0.0):
    """Two modalities of tokens with padding (set to `pad_value`) and one pooled modality."""
    rs = np.random.RandomState(seed)
    a = rs.randn(3, 5, 6).astype(np.float32)
    a_mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    b = rs.randn(3, 4, 7).astype(np.float32)
    b_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    a[~a_mask] = pad_value
    b[~b_mask] = pad_value
    return {
        'a': layers.Tokens(jnp.asarray(a), jnp.asarray(a_mask)),
        'b': layers.Tokens(jnp.asarray(b), jnp.asarray(b_mask)),
        'c': jnp.asarray(rs.randn(3, 4).astype(np.float32)),
    }


def make_fusion(kind, fields):
    cls = fusions.FUSIONS[kind]
    common = {
        k: v for k, v in dict(fused_dim=8, depth=2, num_heads=2).items() if k in modules.module_fields(cls)
    }
    return cls(**common, **fields)


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize('kind,fields', FUSION_CASES)
def test_token_fusion_ignores_padding_values_even_nan(kind, fields):
    module = make_fusion(kind, fields)
    clean, dirty = token_inputs(pad_value=0.0), token_inputs(pad_value=np.nan)
    params = jax.jit(module.init)(jax.random.key(0), clean)

    def loss(params, tokens, inputs):  # `tokens` replace the token arrays of `inputs`
        inputs = dict(inputs, **{m: layers.Tokens(t, inputs[m].mask) for m, t in tokens.items()})
        z, readouts = (out := module.apply(params, inputs)).z, out.readouts
        return (z**2).sum() + sum((r**3).sum() for r in readouts.values()), (z, readouts)

    # One compiled function gives the outputs and the gradients for the parameters and the token inputs.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    tokens = lambda inputs: {m: inputs[m].tokens for m in ('a', 'b')}  # noqa: E731
    (l0, out0), (g0, _) = value_and_grad(params, tokens(clean), clean)
    (l1, out1), (g1, grad_in) = value_and_grad(params, tokens(dirty), dirty)
    assert np.isfinite(l1)
    # (assert_array_equal takes NaN == NaN: the values must also be finite.)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves((out1, g1)))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), out0, out1)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), g0, g1)
    # And the gradient with respect to the padded inputs themselves is zero, finite.
    for m in ('a', 'b'):
        g = np.asarray(grad_in[m])
        assert np.isfinite(g).all() and not g[~np.asarray(dirty[m].mask)].any()


@pytest.mark.slow(seconds=4)
@pytest.mark.parametrize('kind,fields', FUSION_CASES)
def test_token_fusion_masks_padded_positions_inside(kind, fields):
    """More padded positions change nothing. Padding is zeroed on the way in (above), so this is what shows
    that the attention, the bottlenecks and the scan mask them: a zero token is still a key, a step."""
    module = make_fusion(kind, fields)
    inputs = token_inputs()
    a = inputs['a']
    longer = dict(
        inputs,
        a=layers.Tokens(
            jnp.concatenate([a.tokens, jnp.ones((3, 2, a.tokens.shape[2]))], 1),
            jnp.concatenate([a.mask, jnp.zeros((3, 2), bool)], 1),
        ),
    )
    params = jax.jit(module.init)(jax.random.key(0), inputs)
    # Both applications in one compiled program (the inputs are constants of it).
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        *jax.jit(lambda p: (module.apply(p, inputs), module.apply(p, longer)))(params),
    )


@pytest.mark.parametrize('kind,fields', FUSION_CASES)
def test_token_fusion_does_not_depend_on_modality_order(kind, fields):
    module = make_fusion(kind, fields)
    inputs = token_inputs()
    params = jax.jit(module.init)(jax.random.key(0), inputs)
    reverse = {m: inputs[m] for m in reversed(list(inputs))}
    # One compiled program; the dicts are closed over, not arguments (a jitted function's dict arguments
    # arrive with their keys sorted).
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(x, y),
        *jax.jit(lambda p: (module.apply(p, inputs), module.apply(p, reverse)))(params),
    )


@pytest.mark.slow(seconds=1)
@pytest.mark.parametrize('readout', ['mean', 'cls'])
def test_mmft_tokens_targets_equal_a_numpy_masked_mean_at_the_readout_layer(readout):
    module = make_fusion('mmft', dict(readout=readout, readout_layer=2))
    inputs = token_inputs(pad_value=np.nan)
    out, state = jax.jit(
        lambda key: module.apply(
            module.init(key, inputs), inputs, capture_intermediates=lambda mdl, _: mdl.name == 'readout_norm'
        )
    )(jax.random.key(0))
    z, readouts = out.z, out.readouts
    h = np.asarray(state['intermediates']['readout_norm']['__call__'][0], np.float64)  # (B, [1 +] T, D)
    # Sorted modalities a (5 tokens), b (4), c (1, pooled): their token slices in the concatenation, after
    # the class token with readout='cls'.
    masks = {m: np.asarray(inputs[m].mask) for m in ('a', 'b')} | {'c': np.ones((3, 1), bool)}
    start = int(readout == 'cls')
    all_rows = []
    for m in ('a', 'b', 'c'):
        size = masks[m].shape[1]
        seg = h[:, start : start + size]
        want = np.stack([seg[i][masks[m][i]].mean(0) for i in range(3)])
        np.testing.assert_allclose(readouts[m], want, rtol=1e-5, atol=1e-6)
        all_rows.append((seg, masks[m]))
        start += size
    assert h.shape[1] == start == 10 + (readout == 'cls')
    if readout == 'cls':
        np.testing.assert_allclose(z, h[:, 0], rtol=1e-6)
        return
    full = np.concatenate([s for s, _ in all_rows], 1)
    mask = np.concatenate([k for _, k in all_rows], 1)
    np.testing.assert_allclose(
        z, np.stack([full[i][mask[i]].mean(0) for i in range(3)]), rtol=1e-5, atol=1e-6
    )


def test_mmft_reads_out_at_layer_k_from_the_last():
    """readout_layer=2 of depth 2 is the output of the first block: a depth-1 MMFT with the same parameters."""
    inputs = token_inputs()
    deep = make_fusion('mmft', dict(readout='mean', readout_layer=2))
    params = jax.jit(deep.init)(jax.random.key(0), inputs)
    assert 'encoderblock_1' not in params['params']  # the blocks above the read-out are never built
    shallow = fusions.FUSIONS['mmft'](fused_dim=8, depth=1, num_heads=2, readout_layer=1)
    jax.tree.map(np.testing.assert_array_equal, deep.apply(params, inputs), shallow.apply(params, inputs))
    full = make_fusion('mmft', dict(readout='mean', readout_layer=1))
    p_full = jax.jit(full.init)(jax.random.key(0), inputs)
    assert not np.allclose(full.apply(p_full, inputs).z, shallow.apply(p_full, inputs).z)


@pytest.mark.slow(seconds=6)
def test_mbt_tokens_targets_equal_a_numpy_masked_mean_of_each_modality():
    module = make_fusion('mbt', dict(fusion_layer=1))
    inputs = token_inputs(pad_value=np.nan)
    out, state = jax.jit(
        lambda key: module.apply(
            module.init(key, inputs),
            inputs,
            capture_intermediates=lambda mdl, _: (mdl.name or '').endswith('_encoder_norm'),
        )
    )(jax.random.key(0))
    z, readouts = out.z, out.readouts
    masks = {m: np.asarray(inputs[m].mask) for m in ('a', 'b')} | {'c': np.ones((3, 1), bool)}
    for m, mask in masks.items():
        h = np.asarray(state['intermediates'][f'{m}_encoder_norm']['__call__'][0], np.float64)
        want = np.stack([h[i][mask[i]].mean(0) for i in range(3)])
        np.testing.assert_allclose(readouts[m], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z, np.mean([readouts[m] for m in masks], 0), rtol=1e-6)


@pytest.mark.parametrize(
    'fusion_layer,exchanged',
    [
        pytest.param(2, False, marks=pytest.mark.slow),
        pytest.param(1, False, marks=pytest.mark.slow),
        (0, True),
    ],
)
def test_mbt_modalities_exchange_information_through_two_fused_blocks(fusion_layer, exchanged):
    """b's tokens reach a's read-out only through a bottleneck written by one fused block and read by the
    next: none with no fused block (2 of depth 2) and none with one (1: the bottleneck it writes is unread)."""
    inputs = token_inputs()
    changed = dict(inputs, b=layers.Tokens(inputs['b'].tokens + 1.0, inputs['b'].mask))
    module = make_fusion('mbt', dict(fusion_layer=fusion_layer))

    def readouts(key):  # of both inputs, with the same parameters, in one compiled program
        params = module.init(key, inputs)
        return module.apply(params, inputs).readouts, module.apply(params, changed).readouts

    r0, r1 = jax.jit(readouts)(jax.random.key(0))
    assert np.array_equal(r0['a'], r1['a']) != exchanged


def test_pooled_and_token_adapters():
    t = token_inputs(pad_value=np.nan)['a']
    want = np.stack([np.asarray(t.tokens)[i][np.asarray(t.mask)[i]].mean(0) for i in range(3)])
    np.testing.assert_allclose(layers.pooled(t), want, rtol=1e-6)
    x = jnp.ones((3, 4))
    one = layers.as_tokens(x)
    assert one.tokens.shape == (3, 1, 4) and bool(one.mask.all())
    np.testing.assert_array_equal(layers.pooled(x), x)


# --- Token encoders ---

IMAGES = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
SERIES = np.random.RandomState(1).randn(2, 32, 3).astype(np.float32)
IDS = np.array([[3, 5, 2, 0, 0, 0], [7, 0, 0, 0, 0, 0]], np.int32)


@pytest.mark.slow(seconds=1)
@pytest.mark.parametrize(
    'module,x,tokens',
    [
        (encoders.ImageCNN(features=(4, 4), embed_dim=8, pooling='tokens'), IMAGES, 16),
        (encoders.ViT(patch_size=(4, 4), width=8, depth=1, num_heads=2), IMAGES, 16),
        (encoders.SeriesEncoder(features=(4, 4), embed_dim=8, pooling='tokens'), SERIES, 16),
        (encoders.TextTransformer(vocab_size=9, width=8, depth=2, num_heads=2), IDS, 6),
    ],
    ids=['cnn', 'vit', 'conv1d', 'text_transformer'],
)
def test_token_encoders_return_tokens_and_masks(module, x, tokens):
    out = jax.jit(lambda key: module.apply(module.init(key, x), x))(jax.random.key(0))
    assert isinstance(out, layers.Tokens)
    assert out.tokens.shape == (2, tokens, 8) and out.mask.shape == (2, tokens)
    want_mask = IDS != 0 if x is IDS else np.ones((2, tokens), bool)
    np.testing.assert_array_equal(out.mask, want_mask)


@pytest.mark.slow(seconds=2)
def test_text_transformer_never_reads_padding():
    """The padding id's embedding set to NaN changes neither the real tokens' outputs nor any gradient."""
    module = encoders.TextTransformer(vocab_size=9, width=8, depth=2, num_heads=2)
    params = jax.jit(module.init)(jax.random.key(0), IDS)
    poisoned = jax.tree.map(lambda x: x, params)
    poisoned['params']['Embed_0']['embedding'] = params['params']['Embed_0']['embedding'].at[0].set(jnp.nan)

    def loss(p):
        out = module.apply(p, IDS)
        return (layers.pooled(out) ** 2).sum(), out

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, out0), g0 = value_and_grad(params)
    (l1, out1), g1 = value_and_grad(poisoned)
    np.testing.assert_array_equal(l0, l1)
    np.testing.assert_array_equal(out0.tokens, out1.tokens)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_array_equal(a, b)
    # A real token's output does not depend on how long the padding is either.
    longer = np.pad(IDS, ((0, 0), (0, 3)))
    module_long = encoders.TextTransformer(vocab_size=9, width=8, depth=2, num_heads=2)
    p_long = jax.tree.map(lambda x: x, params)
    pos = params['params']['pos_embedding']
    p_long['params']['pos_embedding'] = jnp.concatenate([pos, jnp.zeros((1, 3, 8))], 1)
    out_long = jax.jit(lambda p: module_long.apply(p, longer))(p_long)
    np.testing.assert_allclose(out_long.tokens[:, :6], out0.tokens, rtol=1e-5, atol=1e-6)


@pytest.mark.slow(seconds=2)
@pytest.mark.parametrize('pooling', ['last', 'first', 'gap'])
def test_text_transformer_pooled_outputs_read_real_tokens(pooling):
    """'last' is each text's last real token (not a padded position), 'first' its first, 'gap' their mean."""
    tokens = encoders.TextTransformer(vocab_size=9, width=8, depth=2, num_heads=2)
    pooled = encoders.TextTransformer(vocab_size=9, width=8, depth=2, num_heads=2, pooling=pooling)

    def both(key):  # the token outputs and the pooled ones, of the same parameters
        params = tokens.init(key, IDS)
        return tokens.apply(params, IDS), pooled.apply(params, IDS)

    out, got = jax.jit(both)(jax.random.key(0))
    t, lengths = np.asarray(out.tokens), (IDS != 0).sum(1)
    want = {
        'last': t[np.arange(2), lengths - 1],
        'first': t[:, 0],
        'gap': np.stack([t[i, : lengths[i]].mean(0) for i in range(2)]),
    }[pooling]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(want).min(axis=1).max() > 0 and np.abs(got).sum(1).min() > 0


@pytest.mark.slow(seconds=1)
@pytest.mark.parametrize('pooling', ['gap', 'cls'])
def test_vit_pooled_outputs(pooling):
    module = encoders.ViT(patch_size=(8, 8), width=8, depth=1, num_heads=2, pooling=pooling, embed_dim=5)

    def init_and_apply(key):
        params = module.init(key, IMAGES)
        return params, module.apply(params, IMAGES)

    params, out = jax.jit(init_and_apply)(jax.random.key(0))
    assert out.shape == (2, 5)
    assert ('cls' in params['params']) == (pooling == 'cls')


@pytest.mark.parametrize('kind', POOLED_FUSIONS)
def test_pooled_fusion_does_not_depend_on_modality_order(kind):
    cls = fusions.FUSIONS[kind]
    fields = {
        k: v
        for k, v in dict(fused_dim=8, hidden=(8,), num_heads=2).items()
        if k in modules.module_fields(cls)
    }
    module = cls(**fields)
    rs = np.random.RandomState(0)
    inputs = {m: jnp.asarray(rs.randn(3, d), jnp.float32) for m, d in (('b', 5), ('a', 4), ('c', 6))}
    extra = {}
    if fusions.takes_encode(cls):  # a stand-in for the encoders: the context shifts every modality
        extra['encode'] = lambda context: {m: x + context.mean(-1, keepdims=True) for m, x in inputs.items()}
    params = jax.jit(lambda key, x: module.init(key, x, **extra))(jax.random.key(0), inputs)
    reverse = {m: inputs[m] for m in reversed(list(inputs))}
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(x, y),
        module.apply(params, inputs, **extra),
        module.apply(params, reverse, **extra),
    )


@pytest.mark.slow(seconds=2)
def test_coupled_mamba_scans_with_every_modality_mask(monkeypatch):
    """The chains' scan gets each modality's mask, padded to the longest (a padded step keeps a chain's state:
    tests/test_coupled_mamba.py), in every layer; and each readout is that modality's chain."""
    seen = []
    scan = coupled_mamba.coupled_scan
    monkeypatch.setattr(coupled_mamba, 'coupled_scan', lambda *a, **k: seen.append(a[3]) or scan(*a, **k))
    module = make_fusion('coupled_mamba', dict(state_size=4))
    inputs = token_inputs()

    def apply(key):  # one compiled program; it returns the masks the scans were given
        params = module.init(key, inputs)
        seen.clear()
        out = module.apply(params, inputs, capture_intermediates=lambda mdl, _: mdl.name == 'readout_norm')
        return out, list(seen)

    (out, state), masks = jax.jit(apply)(jax.random.key(0))
    z, readouts = out.z, out.readouts
    want = np.zeros((3, 5, 3), bool)  # (B, T_max, M): a (5 tokens), b (4), c (1, pooled)
    want[:, :5, 0], want[:, :4, 1], want[:, :1, 2] = inputs['a'].mask, inputs['b'].mask, True
    assert len(masks) == 2  # depth 2
    for mask in masks:
        np.testing.assert_array_equal(mask, want)
    h = np.asarray(state['intermediates']['readout_norm']['__call__'][0], np.float64)  # (B, T, M, D)
    for j, m in enumerate(('a', 'b', 'c')):
        expected = np.stack([h[i, want[i, :, j], j].mean(0) for i in range(3)])
        np.testing.assert_allclose(readouts[m], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z, np.mean([readouts[m] for m in 'abc'], 0), rtol=1e-6)


@pytest.mark.parametrize(
    'kind,fields,message',
    [
        ('mmft', dict(readout='max'), "MMFT.readout is 'max'; expected 'mean' or 'cls'"),
        ('mmft', dict(readout_layer=3), 'MMFT.readout_layer is 3; expected 1..depth (2)'),
        ('mmft', dict(readout_layer=0), 'MMFT.readout_layer is 0; expected 1..depth (2)'),
        ('mbt', dict(fusion_layer=3), 'MBT.fusion_layer is 3; expected 0..depth (2)'),
    ],
)
def test_token_fusion_fields_out_of_range_are_named(kind, fields, message):
    module = make_fusion(kind, fields)
    with pytest.raises(ValueError, match=re.escape(message)):
        module.init(jax.random.key(0), token_inputs())
