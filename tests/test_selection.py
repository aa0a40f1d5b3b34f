"""Checkpoint selection by a validation metric and early stopping: the bookkeeping and the config checks."""

import math

import pytest
from helpers import tiny_config

from refnet_jax.train import selection as selection_lib


def test_selection_keeps_the_best_and_counts_validations_since():
    sel = selection_lib.Selection('accuracy', 'max', early_stop=2)
    assert [sel.update(s, {'accuracy': v}) for s, v in ((2, 0.5), (4, 0.7), (6, 0.7), (8, math.nan))] == [
        True,
        True,
        False,  # equal is not better: the earliest of equal values stays selected
        False,  # NaN is never the best
    ]
    assert (sel.best, sel.best_step, sel.since_best, sel.last_step) == (0.7, 4, 2, 8)
    assert sel.should_stop
    again = selection_lib.Selection('accuracy', 'max', early_stop=2)
    again.restore(sel.state())
    assert again == sel
    low = selection_lib.Selection('loss', 'min')
    assert [low.update(s, {'loss': v}) for s, v in ((1, 3.0), (2, 2.0), (3, 2.5))] == [True, True, False]
    assert low.best_step == 2 and not low.should_stop  # early_stop 0: never


def test_auto_mode_minimizes_losses_and_maximizes_the_rest(tmp_path):
    config = tiny_config(tmp_path, select='val/loss')
    assert selection_lib.Selection.from_config(config).mode == 'min'
    config.train.select = 'val/accuracy'
    assert selection_lib.Selection.from_config(config).mode == 'max'
    config.train.select = None
    assert selection_lib.Selection.from_config(config) is None


@pytest.mark.parametrize(
    'fields,message',
    [
        (
            dict(select='val/acuracy', eval_every_steps=2),
            r"config.train.select is 'val/acuracy'; expected one of 'val/accuracy'",
        ),
        (dict(select='test/accuracy', eval_every_steps=2), r"config.train.select is 'test/accuracy'"),
        (dict(select='val/accuracy'), r'config.train.eval_every_steps is 0'),
        (dict(early_stop=3), r'config.train.early_stop is 3, which needs a metric to watch'),
        (
            dict(select='val/loss', eval_every_steps=2, select_mode='best'),
            r"config.train.select_mode is 'best'",
        ),
    ],
)
def test_a_selection_that_cannot_work_is_named(tmp_path, fields, message):
    config = tiny_config(tmp_path, **fields)
    with pytest.raises(ValueError, match=message):
        selection_lib.check_config(config, ('accuracy', 'loss'))
