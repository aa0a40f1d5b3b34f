"""The examples in the docstrings of the losses, refiner, metrics and report modules run and print what they
say."""

import doctest

import pytest

from refnet_jax import losses
from refnet_jax.analysis import report
from refnet_jax.models import refiner
from refnet_jax.train import metrics


@pytest.mark.parametrize('module', [losses, refiner, metrics, report], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    # testmod prints each failing example (expected and got) to stdout, which pytest shows on failure.
    failed, attempted = doctest.testmod(module, verbose=False)
    assert attempted > 0, f'{module.__name__} has no docstring example'
    assert failed == 0, f'{failed} of {attempted} docstring examples of {module.__name__} failed'
