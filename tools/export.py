r"""Export a trained ReFNet for serving.

  python tools/export.py --workdir runs/easy_vqa --output runs/easy_vqa/export [--platforms=cpu,cuda]

Reads the run's `config.json` and latest checkpoint and writes `inference.jaxexport`, `params.npz` and
`signature.json` (see `refnet_jax/export/serving.py`). Load them with `refnet_jax.export.load(dir)`, which needs only
jax and numpy.
"""

import os

from absl import app, flags

from refnet_jax import cli, console, export
from refnet_jax.export import serving

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # what jax.export lowers for

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The workdir of a training run (holds config.json and checkpoints/).')
flags.DEFINE_string('output', None, 'Directory the export is written to.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
flags.DEFINE_list('platforms', [], "Platforms to lower for, e.g. cpu,cuda (default: this machine's backend).")
flags.mark_flags_as_required(['workdir', 'output'])


def checked_step(workdir: str, step: int | None) -> int | None:
    """`step`, refused unless `workdir/checkpoints` holds it (None: the latest, found by the export)."""
    directory = os.path.join(workdir, 'checkpoints')
    if step is None or not os.path.isdir(directory):
        return step  # the export names a workdir without checkpoints itself
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    if step not in steps:
        raise app.UsageError(f'--step {step}: {directory} holds the checkpoints of steps {steps}')
    return step


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    unknown = [p for p in FLAGS.platforms if p not in PLATFORMS]
    if unknown:
        raise app.UsageError(
            f'--platforms {",".join(FLAGS.platforms)}: {unknown} unknown; expected some of {PLATFORMS}'
        )
    step = checked_step(FLAGS.workdir, FLAGS.step)
    exported = export.export_workdir(
        FLAGS.workdir, FLAGS.output, step=step, platforms=FLAGS.platforms or None
    )
    join = os.path.join
    rows = [
        ('program', join(FLAGS.output, serving.EXPORTED_FILE)),
        ('parameters', join(FLAGS.output, serving.PARAMS_FILE)),
        ('signature', join(FLAGS.output, serving.SIGNATURE_FILE)),
        ('load it', f'refnet_jax.export.load({FLAGS.output!r}) (needs only jax and numpy)'),
    ]
    which = 'the latest checkpoint' if step is None else f'the checkpoint of step {step}'
    print(
        f'Exported {which} of {FLAGS.workdir} for {", ".join(exported.platforms)}.\n{console.aligned(rows)}'
    )


if __name__ == '__main__':
    cli.run(main)
