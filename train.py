r"""Supervised ReFNet training.

  python train.py --config configs/easy_vqa.py --workdir runs/easy_vqa [--config.train.num_steps=...]

Everything happens in `refnet_jax.train_lib.train_and_evaluate`; this file only parses flags.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from refnet_jax import cli, train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py[:arg]).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results.json are written.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.INFO)
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
    cli.run(main)
