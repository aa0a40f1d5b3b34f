r"""Self-supervised ReFNet pre-training: the refiner loss alone, on every training input (no labels).

  python pretrain.py --config configs/easy_vqa.py:variant=pretrain --workdir runs/vqa_pretrain
  python train.py --config configs/easy_vqa.py --workdir runs/vqa_finetune \
      --config.model.refiner.target=input --config.init_from=runs/vqa_pretrain

Everything happens in `refnet_jax.train_lib.pretrain`; this file only parses flags.
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
    train_lib.pretrain(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
    cli.run(main)
