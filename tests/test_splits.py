"""Stratified splits: by counts or fractions, rounding, the rest, multi-hot labels, the stored draws."""

import numpy as np
import pytest

from refnet_jax.data import splits


def test_stratified_split_by_counts():
    labels = np.repeat([2, 0, 1], 10)
    rows = splits.stratified_split(labels, 0, counts={'train': 6, 'validation': 1, 'test': 3})
    assert list(rows) == ['train', 'validation', 'test']
    for split, n in {'train': 6, 'validation': 1, 'test': 3}.items():
        assert np.bincount(labels[rows[split]], minlength=3).tolist() == [n] * 3
        assert (np.diff(rows[split]) > 0).all()
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(30))


def test_stratified_split_rounding_minimum_and_rest():
    labels = np.repeat([0, 1, 2], [5, 3, 1])  # shares of 0.5: 2.5, 1.5, 0.5
    half_up = splits.stratified_split(labels, 0, fractions={'a': 0.5}, rest='b')
    assert list(half_up) == ['b', 'a']  # the rest first
    assert np.bincount(labels[half_up['a']], minlength=3).tolist() == [3, 2, 1]
    assert sorted(np.concatenate(list(half_up.values())).tolist()) == list(range(9))
    half_even = splits.stratified_split(labels, 0, fractions={'a': 0.5}, rounding='half_even')
    assert np.bincount(labels[half_even['a']], minlength=3).tolist() == [2, 2, 0]
    at_least = splits.stratified_split(labels, 0, fractions={'a': 0.1}, at_least=1)
    assert np.bincount(labels[at_least['a']], minlength=3).tolist() == [1, 1, 1]


def test_stratified_split_multi_hot_is_one_stratum():
    multi_hot = np.eye(4, dtype=np.int32)[np.arange(40) % 4]
    rows = splits.stratified_split(multi_hot, 0, fractions={'validation': 0.25}, rest='train')
    assert {k: len(v) for k, v in rows.items()} == {'train': 30, 'validation': 10}


def test_stratified_split_draws_are_the_stored_ones():
    """Golden: the rows these draws pick are what prepared datasets and label-efficiency subsets hold, so a
    change here changes results (config.data.split of custom data, config.data.label_fraction)."""
    labels = np.array([0, 1, 2, 0, 1, 0, 2, 0, 1, 0])
    rows = splits.stratified_split(labels, 0, fractions={'validation': 0.2, 'test': 0.2}, rest='train')
    assert {k: v.tolist() for k, v in rows.items()} == {
        'train': [0, 2, 3, 4, 6, 7],
        'validation': [5, 8],
        'test': [1, 9],
    }
    picked = splits.stratified_split(
        labels, 0, fractions={'subset': 0.5}, rounding='half_even', at_least=1, draw='choice'
    )
    assert picked['subset'].tolist() == [1, 2, 7, 8, 9]


def test_stratified_split_choice_is_rng_choice_per_class():
    labels = np.random.default_rng(3).integers(0, 5, 300)
    picked = splits.stratified_split(labels, 7, fractions={'s': 0.3}, draw='choice')['s']
    rng = np.random.default_rng(7)
    reference = [
        rng.choice(np.flatnonzero(labels == c), int(0.3 * (labels == c).sum() + 0.5), replace=False)
        for c in range(5)
    ]
    np.testing.assert_array_equal(picked, np.sort(np.concatenate(reference)))
    other = splits.stratified_split(labels, 7, fractions={'s': 0.3})[
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
        splits.stratified_split(np.arange(10) % 2, 0, **kwargs)
