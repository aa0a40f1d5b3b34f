"""config_lib.check_ranges: every numeric field is checked before any work, naming field, value and range."""

import importlib
import pathlib
import re

import pytest

from refnet_jax import config_lib
from refnet_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if not p.stem.startswith('_'))


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'tiny', 'variant=pretrain', 'fusion=mmft', 'fusion=mbt,tiny'])
def test_every_shipped_config_is_in_range(name, arg):
    config_lib.check_ranges(importlib.import_module(f'configs.{name}').get_config(arg))


def easy_vqa(**changes):
    config = importlib.import_module('configs.easy_vqa').get_config('tiny')
    for field, value in changes.items():
        *path, key = field.split('__')
        node = config
        for part in path:
            node = node[part]
        node[key] = value
    return config


@pytest.mark.parametrize(
    'changes,message',
    [
        (dict(train__learning_rate=-0.1), 'config.train.learning_rate is -0.1; expected a number >= 0'),
        (
            dict(train__learning_rate=float('nan')),
            'config.train.learning_rate is nan; expected a number >= 0',
        ),
        (dict(loss__ms__alpha=0.0), 'config.loss.ms.alpha is 0.0; expected a number > 0'),
        (dict(loss__ms__beta=-1.0), 'config.loss.ms.beta is -1.0; expected a number > 0'),
        (dict(loss__ms__epsilon=-0.1), 'config.loss.ms.epsilon is -0.1; expected a number >= 0'),
        (dict(loss__ms_weight=-1.0), 'config.loss.ms_weight is -1.0; expected a number >= 0'),
        (dict(loss__refiner_weights__image=-0.5), 'config.loss.refiner_weights.image is -0.5; expected'),
        (dict(train__batch_size=-3), 'config.train.batch_size is -3; expected an int >= 1'),
        (dict(train__num_steps=0), 'config.train.num_steps is 0; expected an int >= 1'),
        (dict(train__warmup_steps=-1), 'config.train.warmup_steps is -1; expected an int >= 0'),
        (dict(eval__batch_size=0), 'config.eval.batch_size is 0; expected an int >= 1'),
        (dict(data__label_fraction=0.0), 'config.data.label_fraction is 0.0; expected a number in (0, 1]'),
        (dict(model__fusion__dropout=1.0), 'config.model.fusion.dropout is 1.0; expected a number in [0, 1)'),
        (
            dict(model__refiner__hidden=(16, 0)),
            'config.model.refiner.hidden is (16, 0); expected an int >= 1',
        ),
        (dict(mesh__data=0), 'config.mesh.data is 0; expected an int >= 1 or -1'),
    ],
)
def test_a_value_out_of_range_is_named_with_its_range(changes, message):
    with pytest.raises(ValueError, match='^' + re.escape(message)):
        config_lib.check_ranges(easy_vqa(**changes))


def test_every_bad_field_is_named_at_once():
    config = easy_vqa(train__learning_rate=-1.0, loss__ms__alpha=0.0)
    with pytest.raises(ValueError) as error:
        config_lib.check_ranges(config)
    assert str(error.value).splitlines() == [
        'config.loss.ms.alpha is 0.0; expected a number > 0',
        'config.train.learning_rate is -1.0; expected a number >= 0',
    ]


def test_the_edges_of_the_ranges_are_accepted():
    config_lib.check_ranges(
        easy_vqa(
            train__learning_rate=0.0,
            train__warmup_steps=0,
            loss__ms_weight=0.0,
            loss__ms__epsilon=0.0,
            loss__ms__block_size=0,
            data__label_fraction=1.0,
            mesh__data=-1,
        )
    )


def test_build_refuses_before_reading_the_data(tmp_path):
    config = easy_vqa(train__learning_rate=-0.1)
    config.data.data_dir = str(tmp_path / 'tfds')
    with pytest.raises(ValueError, match='config.train.learning_rate'):
        trainer.build(config)
    assert not (tmp_path / 'tfds').exists()


def test_a_batch_that_does_not_divide_the_devices_is_refused_before_reading_the_data(tmp_path):
    config = easy_vqa(train__batch_size=60)  # 8 devices in the tests
    config.data.data_dir = str(tmp_path / 'tfds')
    with pytest.raises(
        ValueError, match='config.train.batch_size is 60; expected a multiple of the 8 devices'
    ):
        trainer.build(config)
    assert not (tmp_path / 'tfds').exists()
