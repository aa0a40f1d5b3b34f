r"""Frozen features once: encode a dataset's modalities with (frozen, pretrained) encoders and write an own-data
directory, then train on it with configs/custom.py.

  python tools/features.py --config configs/easy_vqa.py --encode image --output feats/easy_vqa \
      [--config.model.encoders.image.module=vit --config.model.encoders.image.init_from=vit.npz:img]
  python tools/features.py --workdir runs/easy_vqa --encode image --output feats/easy_vqa   # a trained run's encoder
  python train.py --config configs/custom.py:kinds=image:features+question:tokens --workdir runs/on_feats \
      --config.data.manual_dir feats/easy_vqa

The command prints the second one for the directory it wrote (refnet_jax/export/features.py).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from refnet_jax import cli, console
from refnet_jax.export import features
from refnet_jax.train import inference, pretrained, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py[:arg]) of the data and encoders.', lock_config=True
)
flags.DEFINE_string('workdir', None, "A trained run whose config and latest checkpoint's encoders are used.")
flags.DEFINE_list('encode', None, 'The modalities to replace by their encoder outputs.')
flags.DEFINE_string('output', None, 'The own-data directory written (train.npz, validation.npz, test.npz).')
flags.DEFINE_bool('tokens', False, "Write token encoders' tokens (series) instead of their pooled output.")
flags.mark_flags_as_required(['encode', 'output'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if (FLAGS.config is None) == (FLAGS.workdir is None):
        raise app.UsageError('give one of --config and --workdir')
    if FLAGS.workdir:
        loaded = inference.load_run(FLAGS.workdir)
        config, run, params = loaded.config, loaded.run, loaded.params
    else:
        config = FLAGS.config
        run = trainer.build(config)
        params = pretrained.load_into(run.state.params, config)
    kinds = features.write_features(
        config, params, run.model, run.info, FLAGS.output, FLAGS.encode, tokens_out=FLAGS.tokens
    )
    spec = '+'.join(f'{m}:{k}' for m, k in kinds.items())
    rows = [(split, os.path.join(FLAGS.output, f'{split}.npz')) for split in features.SPLITS]
    rows.append(
        (
            'kinds',
            f'{os.path.join(FLAGS.output, "kinds.json")} ({", ".join(f"{m}: {k}" for m, k in kinds.items())})',
        )
    )
    print(f'Wrote {FLAGS.output}.\n{console.aligned(rows)}')
    print(  # the last line: the command (tests and scripts read it)
        f'Train on it:\n  python train.py --config configs/custom.py:kinds={spec} '
        f'--workdir runs/on_features --config.data.manual_dir {FLAGS.output}'
    )


if __name__ == '__main__':
    cli.run(main)
