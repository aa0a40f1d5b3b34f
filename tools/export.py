r"""Export a trained ReFNet for serving.

  python tools/export.py --workdir runs/easy_vqa --output runs/easy_vqa/export [--platforms=cpu,cuda]

Reads the run's `config.json` and latest checkpoint and writes `inference.jaxexport`, `params.npz` and
`signature.json` (see `refnet_jax/export/serving.py`). Load them with `refnet_jax.export.load(dir)`, which needs only
jax and numpy.
"""

from absl import app, flags, logging

from refnet_jax import cli, export

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The workdir of a training run (holds config.json and checkpoints/).')
flags.DEFINE_string('output', None, 'Directory the export is written to.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
flags.DEFINE_list('platforms', [], "Platforms to lower for, e.g. cpu,cuda (default: this machine's backend).")
flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.INFO)
    exported = export.export_workdir(
        FLAGS.workdir, FLAGS.output, step=FLAGS.step, platforms=FLAGS.platforms or None
    )
    logging.info('Exported %s for %s to %s.', exported.fun_name, ', '.join(exported.platforms), FLAGS.output)


if __name__ == '__main__':
    cli.run(main)
