"""Tests for refnet_jax.losses: slow NumPy references, golden values, gradients, masks, jit and sharding."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from refnet_jax import losses

B, D = 12, 6  # One batch shape for the reference comparisons, so each configuration compiles once.


def ms_reference(
    embeddings, labels, *, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, mining=True, where=None
) -> float:
    """The MS loss from its formula (docs/architecture.md, "The method"), one anchor and one pair at a time,
    in float64."""
    emb = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    valid = np.ones(len(emb), bool) if where is None else np.asarray(where, bool)
    unit = [e / max(math.sqrt(e @ e), 1e-12) for e in emb]

    def share_a_label(i, k):
        if labels.ndim == 1:
            return labels[i] == labels[k]
        return any(labels[i, c] and labels[k, c] for c in range(labels.shape[1]))

    anchors = [i for i in range(len(emb)) if valid[i]]
    total = 0.0
    for i in anchors:
        sim = {k: float(unit[i] @ unit[k]) for k in anchors if k != i}
        pos = [k for k in sim if share_a_label(i, k)]
        neg = [k for k in sim if not share_a_label(i, k)]
        if mining:
            if pos and neg:
                hardest_pos = min(sim[k] for k in pos)
                hardest_neg = max(sim[k] for k in neg)
                pos, neg = (
                    [k for k in pos if sim[k] < hardest_neg + epsilon],
                    [k for k in neg if sim[k] > hardest_pos - epsilon],
                )
            else:
                pos, neg = [], []
        if pos:
            total += math.log(1 + sum(math.exp(-alpha * (sim[k] - base)) for k in pos)) / alpha
        if neg:
            total += math.log(1 + sum(math.exp(beta * (sim[k] - base)) for k in neg)) / beta
    return total / len(anchors) if anchors else 0.0


def make_batch(batch_kind: str, label_kind: str, seed: int, b: int = B, d: int = D):
    """Embeddings clustered by label (so mining keeps some pairs and drops others), labels, and a where mask.

    batch_kind: 'mixed' (classes of several examples and of one, and for multi-hot an example with no label),
    'one_class' (every example shares a class) or 'distinct' (no two examples share a class).
    """
    rng = np.random.default_rng(seed)
    if batch_kind == 'mixed':
        ids = rng.permutation(
            np.r_[np.repeat([0, 1, 2], 3), np.arange(3, b - 6)]
        )  # Classes 3, 4, ...: one each.
        multi_hot = rng.random((b, b)) < 0.15
        multi_hot[:, -1] = False
        multi_hot[0] = False
        multi_hot[0, -1] = True  # A label nobody else has.
        multi_hot[1] = False  # No label at all.
    elif batch_kind == 'one_class':
        ids = np.zeros(b, int)
        multi_hot = rng.random((b, b)) < 0.2
        multi_hot[:, 0] = True
    elif batch_kind == 'distinct':
        ids = rng.permutation(b)
        multi_hot = np.eye(b, dtype=bool)[ids]
    else:
        raise ValueError(batch_kind)
    one_hot = np.eye(b)[ids] if label_kind == 'int' else multi_hot.astype(np.float64)
    centers = rng.normal(size=(b, d))
    emb = rng.normal(size=(b, d)) + 1.5 * one_hot @ centers
    emb *= rng.uniform(0.1, 10.0, size=(b, 1))  # The loss must not depend on the norms.
    labels = ids.astype(np.int32) if label_kind == 'int' else multi_hot.astype(np.int32)
    where = rng.random(b) < 0.7
    where[:2] = True
    return emb.astype(np.float32), labels, where


@functools.cache
def jitted_ms_loss(mining: bool):
    return jax.jit(functools.partial(losses.multi_similarity_loss, mining=mining))


@pytest.mark.parametrize('use_where', [False, True], ids=['all', 'where'])
@pytest.mark.parametrize('label_kind', ['int', 'multi_hot'])
@pytest.mark.parametrize('mining', [False, True], ids=['all_pairs', 'mined'])
def test_ms_loss_matches_numpy_reference(mining, label_kind, use_where):
    for batch_kind in ['mixed', 'one_class', 'distinct']:
        for seed in range(3):
            emb, labels, where = make_batch(batch_kind, label_kind, seed)
            where = where if use_where else None
            got = jitted_ms_loss(mining)(emb, labels, where=where)
            want = ms_reference(emb, labels, mining=mining, where=where)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f'{batch_kind}, seed {seed}')


def test_reference_batches_exercise_mining():
    """Guards the comparison above: mining must keep some pairs and drop others on these batches."""
    for label_kind in ['int', 'multi_hot']:
        changed = [
            abs(
                ms_reference(*make_batch('mixed', label_kind, seed)[:2], mining=True)
                - ms_reference(*make_batch('mixed', label_kind, seed)[:2], mining=False)
            )
            > 1e-3
            for seed in range(3)
        ]
        assert all(changed)
        mined = ms_reference(*make_batch('mixed', label_kind, 0)[:2], mining=True)
        assert mined > 0.0


def test_ms_loss_degenerate_batches_values():
    emb, labels, _ = make_batch('one_class', 'int', 0)
    assert jitted_ms_loss(True)(emb, labels) == 0.0  # No negatives: the miner keeps nothing.
    emb, labels, _ = make_batch('distinct', 'int', 0)
    assert jitted_ms_loss(True)(emb, labels) == 0.0  # No positives: idem.
    assert jitted_ms_loss(False)(emb, labels) > 0.0  # Without mining the negatives still count.


# Four unit vectors at 0, 53.13, 90 and 180 degrees; S = [[1, .6, 0, -1], [.6, 1, .8, -.6], [0, .8, 1, 0], ...].
GOLDEN_EMB = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
GOLDEN_LABELS = np.array([0, 0, 1, 1])


def test_ms_loss_golden_values():
    def l1pe(*xs):
        return math.log(1 + sum(math.exp(x) for x in xs))

    # Without mining (alpha=2, beta=50, base=0.5), anchor by anchor:
    all_pairs = [
        l1pe(-0.2) / 2 + l1pe(-25, -75) / 50,  # anchor 0: positive 1 (S=.6); negatives 2 (S=0), 3 (S=-1)
        l1pe(-0.2) / 2 + l1pe(15, -55) / 50,  # anchor 1: positive 0 (.6); negatives 2 (.8), 3 (-.6)
        l1pe(1.0) / 2 + l1pe(-25, 15) / 50,  # anchor 2: positive 3 (0); negatives 0 (0), 1 (.8)
        l1pe(1.0) / 2 + l1pe(-75, -55) / 50,  # anchor 3: positive 2 (0); negatives 0 (-1), 1 (-.6)
    ]
    # Mining: anchors 0 and 3 keep nothing (their negatives are far below their positive and vice versa);
    # anchor 1 drops negative 3 (-.6 <= .6 - .1).
    mined = [0.0, l1pe(-0.2) / 2 + l1pe(15) / 50, all_pairs[2], 0.0]
    assert np.mean(all_pairs) == pytest.approx(0.6278501422840459, abs=1e-12)
    assert np.mean(mined) == pytest.approx(0.38892507267149956, abs=1e-12)
    for mining, want in [(False, np.mean(all_pairs)), (True, np.mean(mined))]:
        got = losses.multi_similarity_loss(GOLDEN_EMB, GOLDEN_LABELS, mining=mining)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # The same classes as one-hot multi-hot labels give the same loss.
        got = losses.multi_similarity_loss(
            GOLDEN_EMB, np.eye(2, dtype=np.int32)[GOLDEN_LABELS], mining=mining
        )
        np.testing.assert_allclose(got, want, rtol=1e-6)


def mining_margin(emb, labels, epsilon=0.1):
    """How far the closest mining comparison is from flipping, and how many pairs mining keeps and drops."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    off_diagonal = ~np.eye(len(sim), dtype=bool)
    pos = (labels[:, None] == labels[None]) & off_diagonal
    neg = (labels[:, None] != labels[None]) & off_diagonal
    margin, kept, dropped = np.inf, 0, 0
    for i in range(len(sim)):
        if not pos[i].any():  # Nothing to mine: no comparison to flip.
            continue
        neg_gap = sim[i][neg[i]] + epsilon - sim[i][pos[i]].min()  # > 0: negative kept
        pos_gap = sim[i][pos[i]] - epsilon - sim[i][neg[i]].max()  # < 0: positive kept
        margin = min(margin, np.abs(neg_gap).min(), np.abs(pos_gap).min())
        kept += (neg_gap > 0).sum() + (pos_gap < 0).sum()
        dropped += (neg_gap < 0).sum() + (pos_gap > 0).sum()
    return margin, kept, dropped


@pytest.mark.parametrize('mining', [False, True], ids=['all_pairs', 'mined'])
def test_ms_loss_gradients_match_finite_differences(mining):
    labels = np.array([0, 0, 0, 1, 1, 2])
    emb = np.random.default_rng(111).normal(size=(6, 3))
    margin, kept, dropped = mining_margin(emb, labels)
    assert margin > 0.1 and kept > 0 and dropped > 0  # Mining matters, and no mask flips under perturbation.
    with jax.enable_x64(True):
        loss_fn = jax.jit(lambda e: losses.multi_similarity_loss(e, jnp.asarray(labels), mining=mining))
        check_grads(loss_fn, (jnp.asarray(emb, jnp.float64),), order=1, modes=['rev'], eps=1e-6)
        where = jnp.array([True, True, False, True, True, True])
        masked_fn = jax.jit(
            lambda e: losses.multi_similarity_loss(e, jnp.asarray(labels), mining=mining, where=where)
        )
        check_grads(masked_fn, (jnp.asarray(emb, jnp.float64),), order=1, modes=['rev'], eps=1e-6)
        np.testing.assert_array_equal(jax.grad(masked_fn)(jnp.asarray(emb))[2], 0.0)


def _degenerate_cases():
    emb, labels, _ = make_batch('mixed', 'int', 0)
    zero_row = emb.copy()
    zero_row[3] = 0.0
    nan_padding = emb.copy()
    nan_padding[-2:] = np.nan
    padding_mask = np.arange(B) < B - 2
    return {
        'one_class': (emb, np.zeros(B, np.int32), None),
        'one_class_multi_hot': (emb, np.ones((B, 3), np.int32), None),
        'all_distinct': (emb, np.arange(B, dtype=np.int32), None),
        'all_zero_vectors': (np.zeros_like(emb), labels, None),
        'one_zero_vector': (zero_row, labels, None),
        'all_masked': (emb, labels, np.zeros(B, bool)),
        'nan_in_masked_rows': (nan_padding, labels, padding_mask),
        'single_example': (emb[:1], labels[:1], None),
    }


@pytest.mark.parametrize('mining', [False, True], ids=['all_pairs', 'mined'])
@pytest.mark.parametrize('case', list(_degenerate_cases()))
def test_ms_loss_degenerate_batches_have_finite_gradients(case, mining):
    emb, labels, where = _degenerate_cases()[case]
    loss, grad = jax.jit(jax.value_and_grad(jitted_ms_loss(mining)))(emb, labels, where=where)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    if where is not None:
        np.testing.assert_array_equal(grad[~where], 0.0)
        clean = np.where(where[:, None], emb, 0.0)
        np.testing.assert_allclose(
            loss, ms_reference(clean, labels, mining=mining, where=where), rtol=1e-5, atol=1e-6
        )
    else:
        np.testing.assert_allclose(loss, ms_reference(emb, labels, mining=mining), rtol=1e-5, atol=1e-6)
    if case in ('all_masked', 'single_example'):
        assert loss == 0.0
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('label_kind', ['int', 'multi_hot'])
@pytest.mark.parametrize('mining', [False, True], ids=['all_pairs', 'mined'])
def test_ms_loss_jit_and_masking(mining, label_kind):
    emb, labels, where = make_batch('mixed', label_kind, 1)
    eager = losses.multi_similarity_loss(emb, labels, mining=mining, where=where)
    jitted = jitted_ms_loss(mining)(emb, labels, where=where)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    dropped = jitted_ms_loss(mining)(emb[where], labels[where])
    np.testing.assert_allclose(eager, dropped, rtol=1e-6)
    # Gradients too: masked rows get none, the others get the gradient of the smaller batch.
    grad_fn = jax.jit(jax.grad(jitted_ms_loss(mining)))
    grad = grad_fn(emb, labels, where=where)
    grad_dropped = grad_fn(emb[where], labels[where])
    np.testing.assert_array_equal(grad[~where], 0.0)
    np.testing.assert_allclose(grad[where], grad_dropped, rtol=1e-5, atol=1e-7)


def test_ms_loss_compiles_once_per_shape():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss_fn(emb, labels, where):
        return losses.multi_similarity_loss(emb, labels, where=where)

    values = set()
    for seed in range(4):
        for batch_kind in ['mixed', 'one_class', 'distinct']:
            values.add(float(loss_fn(*make_batch(batch_kind, 'int', seed))))
    assert len(values) > 4  # Different values through one trace.
    with pytest.raises(AssertionError):  # The counter does catch a retrace.
        loss_fn(*make_batch('mixed', 'int', 0, b=B + 1))


@pytest.mark.parametrize('label_kind', ['int', 'multi_hot'])
def test_ms_loss_sharded_over_8_devices_matches_unsharded(label_kind):
    assert jax.device_count() == 8, 'tests/conftest.py sets 8 CPU devices'
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    emb, labels, where = make_batch('mixed', label_kind, 2, b=16)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda e, y, w: losses.multi_similarity_loss(e, y, where=w)))
    want_loss, want_grad = loss_and_grad(emb, labels, where)
    sharded = [jax.device_put(x, NamedSharding(mesh, P('data'))) for x in (emb, labels, where)]
    assert len(sharded[0].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        got_loss, got_grad = loss_and_grad(*sharded)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_loss, ms_reference(emb, labels, where=where), rtol=1e-5)


def test_low_precision_and_integer_inputs_are_computed_in_float32():
    emb, labels, _ = make_batch('mixed', 'int', 0)
    emb_bf16 = jnp.asarray(emb, jnp.bfloat16)
    got = losses.multi_similarity_loss(emb_bf16, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ms_reference(np.asarray(emb_bf16, np.float32), labels), rtol=1e-5)
    image = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)  # An `input` target.
    recon = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    for kind in ('cosine', 'mse'):
        got = losses.refiner_loss(recon, image, kind=kind)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, _refiner_reference(recon, image.astype(np.float64), kind), rtol=1e-5)


def test_ms_loss_rejects_bad_shapes():
    emb, labels, where = make_batch('mixed', 'int', 0)
    with pytest.raises(ValueError, match=r'`labels`.*\(12,\).*\(11,\)'):
        losses.multi_similarity_loss(emb, labels[:-1])
    with pytest.raises(ValueError, match=r'`where`.*\(12,\).*\(11,\)'):
        losses.multi_similarity_loss(emb, labels, where=where[:-1])
    with pytest.raises(ValueError, match=r'`embeddings`.*\(12, 6, 1\)'):
        losses.multi_similarity_loss(emb[..., None], labels)


# Per-example losses.


def _refiner_reference(recon, target, kind):
    recon, target = recon.reshape(len(recon), -1).astype(np.float64), target.reshape(len(target), -1)
    if kind == 'mse':
        return ((recon - target) ** 2).mean(1)
    out = []
    for r, t in zip(recon, target, strict=True):
        out.append(1.0 - r @ t / (max(np.linalg.norm(r), 1e-12) * max(np.linalg.norm(t), 1e-12)))
    return np.array(out)


@pytest.mark.parametrize('kind', ['cosine', 'mse'])
def test_refiner_loss_matches_numpy(kind):
    rng = np.random.default_rng(0)
    recon = rng.normal(size=(5, 12)).astype(np.float32)
    target = rng.normal(size=(5, 3, 4)).astype(np.float32)  # Trailing dims are flattened.
    recon[1] = 0.0  # Cosine of a zero vector is 0: distance 1.
    got = losses.refiner_loss(recon, target, kind=kind)
    want = _refiner_reference(recon, target, kind)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if kind == 'cosine':
        np.testing.assert_allclose(got[1], 1.0)
        np.testing.assert_allclose(losses.refiner_loss(target, 3.0 * target, kind=kind), 0.0, atol=1e-6)

    where = np.array([True, False, True, True, False])
    recon_padded = recon.copy()
    recon_padded[~where] = np.nan  # Masked rows may be garbage.
    grad_fn = jax.value_and_grad(lambda r: losses.refiner_loss(r, target, kind=kind, where=where).sum())
    total, grad = grad_fn(recon_padded)
    np.testing.assert_allclose(total, want[where].sum(), rtol=1e-5)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[~where], 0.0)
    _, grad_zero = jax.value_and_grad(lambda r: losses.refiner_loss(r, target, kind=kind).sum())(recon)
    assert np.isfinite(grad_zero).all()  # Including the zero row.


@pytest.mark.parametrize('kind', ['cosine', 'mse'])
def test_refiner_loss_gradients(kind):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        recon, target = (jnp.asarray(rng.normal(size=(4, 5))) for _ in range(2))
        check_grads(
            lambda r, t: losses.refiner_loss(r, t, kind=kind), (recon, target), order=1, modes=['rev']
        )


def test_refiner_loss_rejects_bad_inputs():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"`kind`.*\('cosine', 'mse'\).*'huber'"):
        losses.refiner_loss(x, x, kind='huber')
    with pytest.raises(ValueError, match=r'\(2, 3\) and \(2, 4\)'):
        losses.refiner_loss(x, np.ones((2, 4), np.float32))


def test_softmax_cross_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=6)
    want = [np.log(np.exp(x.astype(np.float64)).sum()) - x[y] for x, y in zip(logits, labels, strict=True)]
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), want, rtol=1e-5)
    where = np.array([True, True, False, True, False, True])
    padded_logits, padded_labels = logits.copy(), labels.copy()
    padded_logits[~where], padded_labels[~where] = np.nan, -1  # Padding: garbage values.

    def fn(x):
        return losses.softmax_cross_entropy(x, padded_labels, where=where)

    got = fn(padded_logits)
    np.testing.assert_allclose(got, np.where(where, want, 0.0), rtol=1e-5)
    grad = jax.grad(lambda x: fn(x).sum())(padded_logits)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[~where], 0.0)


def test_sigmoid_cross_entropy_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 7)).astype(np.float32) * 3
    labels = (rng.random((5, 7)) < 0.3).astype(np.int32)
    x = logits.astype(np.float64)
    want = [
        np.mean(
            [
                -np.log(1 / (1 + np.exp(-v))) if y else -np.log(1 - 1 / (1 + np.exp(-v)))
                for v, y in zip(row, ys, strict=True)
            ]
        )
        for row, ys in zip(x, labels, strict=True)
    ]
    np.testing.assert_allclose(losses.sigmoid_cross_entropy(logits, labels), want, rtol=1e-5)
    where = np.array([False, True, True, False, True])
    padded = logits.copy()
    padded[~where] = np.nan
    got, grad = jax.value_and_grad(lambda x: losses.sigmoid_cross_entropy(x, labels, where=where).sum())(
        padded
    )
    np.testing.assert_allclose(got, np.sum(np.where(where, want, 0.0)), rtol=1e-5)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[~where], 0.0)


def test_masked_mean():
    values = jnp.array([1.0, 2.0, 3.0, 100.0])
    assert losses.masked_mean(values) == 26.5
    assert losses.masked_mean(values, jnp.array([True, True, True, False])) == 2.0
    none = jnp.zeros(4, bool)
    value, grad = jax.value_and_grad(losses.masked_mean)(values, none)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match=r'`where`.*\(4,\).*\(3,\)'):
        losses.masked_mean(values, jnp.ones(3, bool))
