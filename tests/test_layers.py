"""layers.max_pool against flax's nn.max_pool: values always, gradients where no window holds a tie."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from refnet_jax.models import layers


@pytest.mark.parametrize(
    'shape,window',
    [
        ((2, 8, 8, 3), (2, 2)),
        ((2, 9, 7, 3), (2, 2)),
        ((3, 10, 4), (2,)),
        ((3, 11, 4), (3,)),
        ((1, 6, 6, 2), (3, 2)),
    ],
)
def test_max_pool_equals_flax_max_pool_in_values_and_gradients(shape, window):
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)  # continuous: no ties
    weights = np.random.RandomState(1).randn(*nn.max_pool(x, window, strides=window).shape).astype(np.float32)
    ours = lambda x: (layers.max_pool(x, window) * weights).sum()  # noqa: E731
    flax = lambda x: (nn.max_pool(x, window, strides=window) * weights).sum()  # noqa: E731
    np.testing.assert_array_equal(layers.max_pool(x, window), nn.max_pool(x, window, strides=window))
    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(flax)(x))


def test_max_pool_shares_the_gradient_of_a_tie_as_autodiff_of_the_max_would():
    x = np.array([[[[1.0], [3.0]], [[3.0], [0.0]]]], np.float32)  # (1, 2, 2, 1): the maximum twice
    grad = jax.grad(lambda x: layers.max_pool(x, (2, 2)).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 0.5], [0.5, 0.0]])
    np.testing.assert_array_equal(grad, jax.grad(lambda x: x.reshape(1, 4).max(axis=1).sum())(x))


def test_max_pool_names_a_window_that_does_not_fit():
    with pytest.raises(ValueError, match=r'max_pool window \(2, 2\) for 1 spatial axes'):
        layers.max_pool(np.zeros((2, 8, 3), np.float32), (2, 2))
