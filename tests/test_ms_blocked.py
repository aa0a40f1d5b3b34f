"""The blocked (row-tiled, rematerialized) Multi-Similarity loss: equal to the dense one, and its memory.

Memory figures come from compiling only (`.lower(...).compile().memory_analysis()`), so the large batches cost
seconds and no memory. Run with `-s` to see them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from refnet_jax import losses

GIB = 2**30


def clustered_batch(b: int, d: int, label_kind: str, seed: int):
    """Embeddings clustered by label, so that mining keeps some pairs and drops others; labels; a where mask."""
    rng = np.random.default_rng(seed)
    num_classes = max(2, b // 4)
    ids = rng.integers(0, num_classes, size=b)
    if label_kind == 'int':
        labels = ids.astype(np.int32)
        member = np.eye(num_classes)[ids]
    else:
        member = np.eye(num_classes)[ids] + (rng.random((b, num_classes)) < 0.05)
        member = np.minimum(member, 1.0)
        member[0] = 0.0  # An example with no label at all.
        labels = member.astype(np.int32)
    centers = rng.normal(size=(num_classes, d))
    emb = rng.normal(size=(b, d)) + 1.5 * member @ centers
    emb *= rng.uniform(0.1, 10.0, size=(b, 1))
    where = rng.random(b) < 0.8
    return emb.astype(np.float32), labels, where


@functools.cache
def loss_and_grad(block_size: int | None, mining: bool):
    return jax.jit(
        jax.value_and_grad(
            lambda e, y, w: losses.multi_similarity_loss(e, y, where=w, mining=mining, block_size=block_size)
        )
    )


B, D = 37, 5  # A prime batch: no block size below divides it.


@pytest.mark.parametrize('label_kind', ['int', pytest.param('multi_hot', marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    'mining', [False, pytest.param(True, marks=pytest.mark.slow)], ids=['all_pairs', 'mined']
)
def test_blocked_equals_dense(mining, label_kind):
    emb, labels, where = clustered_batch(B, D, label_kind, 0)
    padded = emb.copy()
    padded[~where] = np.nan  # Masked rows may hold anything.
    cases = [(emb, np.ones(B, bool)), (padded, where)]
    for block_size in (10, 36):  # 4 blocks of 10 and 2 of 36, the last one padded.
        for x, w in cases:
            want_loss, want_grad = loss_and_grad(0, mining)(x, labels, w)
            got_loss, got_grad = loss_and_grad(block_size, mining)(x, labels, w)
            assert want_loss > 0.05 and np.isfinite(want_grad).all()
            np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5, err_msg=f'{block_size}')
            np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5, err_msg=f'{block_size}')
            np.testing.assert_array_equal(got_grad[~w], 0.0)


def test_test_batches_exercise_mining():
    """Guards the comparison above: on these batches mining changes the loss."""
    for label_kind in ('int', 'multi_hot'):
        emb, labels, _ = clustered_batch(B, D, label_kind, 0)
        where = np.ones(B, bool)
        mined, _ = loss_and_grad(0, True)(emb, labels, where)
        everything, _ = loss_and_grad(0, False)(emb, labels, where)
        assert abs(mined - everything) > 1e-3


def test_blocked_degenerate_batches():
    emb, labels, _ = clustered_batch(B, D, 'int', 0)
    want_loss, want_grad = loss_and_grad(0, True)(emb, labels, np.ones(B, bool))
    got_loss, got_grad = loss_and_grad(1, True)(emb, labels, np.ones(B, bool))  # 37 blocks of one row.
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    for where in (np.zeros(B, bool), np.eye(1, B, 3, dtype=bool)[0]):  # Nothing valid; one valid example.
        loss, grad = loss_and_grad(1, True)(emb, labels, where)
        assert loss == 0.0
        np.testing.assert_array_equal(grad, 0.0)
    loss, grad = loss_and_grad(10, True)(
        emb, np.zeros(B, np.int32), np.ones(B, bool)
    )  # One class: mining keeps nothing.
    assert loss == 0.0 and np.isfinite(grad).all()


def test_block_size_rule():
    auto = losses.ms_block_size
    assert [auto(b) for b in (1, 256, 4096)] == [0, 0, 0]  # Dense up to B = 4096.
    assert [auto(b) for b in (4097, 8192, 32768, 65536, 2**20, 2**24)] == [4088, 2048, 512, 256, 16, 8]
    for b in (4097, 5000, 8192, 12345, 32768, 65536, 2**20):
        assert auto(b) * b <= losses.MS_BLOCK_ELEMENTS and auto(b) % 8 == 0
    assert auto(100, 0) == 0 and auto(10**6, 0) == 0  # 0 forces dense.
    assert (
        auto(100, 7) == 7 and auto(100, 100) == 0 and auto(100, 1000) == 0
    )  # A block of >= B rows is dense.
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r'`block_size`.*None \(automatic\), 0 \(dense\)'):
            losses.multi_similarity_loss(np.ones((4, 2)), np.zeros(4, np.int32), block_size=bad)


def _scan_lengths(b: int, block_size=None) -> list[int]:
    """The lengths of the loops in the traced loss (none: dense)."""
    jaxpr = jax.make_jaxpr(lambda e, y: losses.multi_similarity_loss(e, y, block_size=block_size))(
        jax.ShapeDtypeStruct((b, 4), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32)
    )
    return [eqn.params['length'] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == 'scan']


def test_automatic_choice_is_what_the_loss_does():
    assert _scan_lengths(4096) == []
    assert _scan_lengths(4097) == [2]  # 4088 rows a block: 2 blocks, the second padded.
    assert _scan_lengths(8192) == [4]
    assert _scan_lengths(8192, block_size=0) == []
    assert _scan_lengths(100, block_size=30) == [4]


@pytest.mark.slow
def test_automatic_blocking_above_4096_equals_dense():
    emb, labels, where = clustered_batch(4100, 4, 'int', 3)
    want_loss, want_grad = loss_and_grad(0, True)(emb, labels, where)
    got_loss, got_grad = loss_and_grad(None, True)(emb, labels, where)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def _mesh():
    assert jax.device_count() == 8, 'tests/conftest.py sets 8 CPU devices'
    return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.slow
def test_blocked_sharded_over_8_devices_matches_dense():
    mesh = _mesh()
    emb, labels, where = clustered_batch(96, D, 'multi_hot', 4)  # 10-row blocks: 10 blocks, the last padded.
    want_loss, want_grad = loss_and_grad(0, True)(emb, labels, where)
    sharded = [jax.device_put(x, NamedSharding(mesh, P('data'))) for x in (emb, labels, where)]
    with jax.set_mesh(mesh):
        got_loss, got_grad = loss_and_grad(10, True)(*sharded)
    assert len(got_grad.sharding.device_set) == 8
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def temp_bytes(b: int, d: int, block_size=None, mesh=None) -> int:
    """Temporary memory (per device) of the compiled forward and backward pass; nothing is run."""
    fn = jax.jit(jax.value_and_grad(lambda e, y: losses.multi_similarity_loss(e, y, block_size=block_size)))
    sharding = None if mesh is None else NamedSharding(mesh, P('data'))
    args = (
        jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=sharding),
        jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding),
    )
    if mesh is None:
        compiled = fn.lower(*args).compile()
    else:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('b', [32768, pytest.param(65536, marks=pytest.mark.slow)])
def test_blocked_memory_at_large_batches(b):
    blocked = temp_bytes(b, 256)
    dense = temp_bytes(b, 256, block_size=0)
    print(
        f'MS loss fwd+bwd, B={b}, D=256, one device: blocked {blocked / 2**20:,.0f} MiB, '
        f'dense {dense / 2**20:,.0f} MiB temporary'
    )
    assert blocked < 2 * GIB
    assert dense > 4 * b * b  # The dense one holds at least one B x B float32 matrix.


@pytest.mark.slow
def test_blocked_loss_sharded_on_8_devices_splits_every_block():
    """Each block has rows on every device (strided blocks), so the per-device memory drops with the mesh."""
    unsharded = temp_bytes(32768, 256)
    sharded = temp_bytes(32768, 256, mesh=_mesh())
    print(
        f'blocked MS loss fwd+bwd, B=32768, D=256: unsharded {unsharded / 2**20:,.0f} MiB, '
        f'sharded on 8 devices {sharded / 2**20:,.0f} MiB per device'
    )
    assert sharded <= unsharded / 4


def test_dense_loss_sharded_on_8_devices_needs_a_quarter_of_the_memory():
    unsharded = temp_bytes(8192, 256, block_size=0)
    sharded = temp_bytes(8192, 256, block_size=0, mesh=_mesh())
    print(
        f'dense MS loss fwd+bwd, B=8192, D=256: unsharded {unsharded / 2**20:,.0f} MiB, '
        f'sharded on 8 devices {sharded / 2**20:,.0f} MiB per device'
    )
    assert sharded <= unsharded / 4
