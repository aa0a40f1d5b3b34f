"""Test-time corruption of one modality (refnet_jax/data/corruption.py) and the robustness study's summaries."""

import numpy as np
import pytest

from experiments import robustness
from refnet_jax.data import contract, corruption

IMAGE = contract.ModalityInfo(kind='image', shape=(8, 8, 3), dtype=np.uint8, shared=True)
SERIES = contract.ModalityInfo(kind='series', shape=(50, 2), dtype=np.float32)
TOKENS = contract.ModalityInfo(kind='tokens', shape=(10,), dtype=np.int32, vocab_size=30)


def batch(n=400, seed=0):
    rs = np.random.RandomState(seed)
    return {
        'image': rs.randint(1, 256, (n // 2, 8, 8, 3)).astype(np.uint8),  # 0 only where masked
        'image_index': np.repeat(np.arange(n // 2), 2).astype(np.int32),
        'series': rs.randn(n, 50, 2).astype(np.float32),
        'tokens': rs.randint(1, 30, (n, 10)).astype(np.int32),
        'mask': np.arange(n) < n - 10,  # the last 10 rows are padding
    }


def test_noise_has_the_asked_standard_deviation_and_keeps_pixels_in_range():
    b = batch()
    std = corruption.modality_std([b], 'series')
    assert std == pytest.approx(1.0, abs=0.02)
    noisy = corruption.corrupt(b, 'series', SERIES, 'noise', 0.5, np.random.default_rng(0), std)
    assert noisy['series'].dtype == np.float32
    assert np.std(noisy['series'] - b['series']) == pytest.approx(0.5, rel=0.02)
    image = corruption.corrupt(b, 'image', IMAGE, 'noise', 2.0, np.random.default_rng(0), 60.0)['image']
    assert image.dtype == np.uint8 and (image != b['image']).mean() > 0.9
    with pytest.raises(ValueError, match="'noise' corruption does not apply to 'tokens'"):
        corruption.corrupt(b, 'tokens', TOKENS, 'noise', 0.5, np.random.default_rng(0))


@pytest.mark.parametrize('name,info', [('image', IMAGE), ('series', SERIES), ('tokens', TOKENS)])
def test_masking_zeroes_the_asked_share_of_whole_positions(name, info):
    b = batch()
    masked = corruption.corrupt(b, name, info, 'mask', 0.3, np.random.default_rng(0))[name]
    x = b[name]
    zero = masked == 0
    if name == 'image':  # a pixel position: all its channels
        assert (zero.all(-1) == zero.any(-1)).all()
        share = zero.all(-1).mean()
    elif name == 'series':  # a time step: both channels
        assert (zero.all(-1) == zero.any(-1)).all()
        share = zero.all(-1).mean()
    else:  # a token becomes padding
        share = zero.mean()
    assert share == pytest.approx(0.3, abs=0.02)
    np.testing.assert_array_equal(masked[~zero], x[~zero])


def test_absent_marks_every_example_and_draws_are_reproducible():
    b = batch()
    out = corruption.corrupt(b, 'series', SERIES, 'absent', 1.0, np.random.default_rng(0))
    assert out['series_present'].shape == (400,) and not out['series_present'].any()
    one, two = (
        corruption.corrupt(b, 'series', SERIES, 'mask', 0.5, np.random.default_rng((1, 2)))['series']
        for _ in range(2)
    )
    np.testing.assert_array_equal(one, two)


def test_std_of_a_shared_modality_counts_the_rows_real_examples_use():
    b = batch()
    b['image'][-5:] = 255  # rows used only by padding examples (the last 10 rows = the last 5 images)
    want = b['image'][:-5].astype(np.float64).std()
    assert corruption.modality_std([b], 'image') == pytest.approx(want)


def test_multibench_summaries():
    flat = np.ones(6)
    assert robustness.relative_robustness(flat) == pytest.approx(1.0)
    assert robustness.relative_robustness(np.linspace(1, 0, 6)) == pytest.approx(0.5)
    ref = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.2])
    assert robustness.effective_robustness(ref, ref) == pytest.approx(0.0)
    assert robustness.effective_robustness(ref - 0.1, ref) == pytest.approx(0.0)  # the same drop, lower start
    assert robustness.effective_robustness(np.full(6, 0.9), ref) == pytest.approx(np.sum(0.9 - ref))
