r"""Latent-graph analysis of the fused embeddings of trained models, side by side (refnet_jax/analysis/graph.py).

  python tools/analyze.py --workdirs baseline=runs/a,refiner=runs/b,refnet=runs/c --split test --k 10 \
      --output docs/graph/easy_vqa

prints a markdown table with, per model, the accuracy of its own head, the k-NN accuracy, label homophily (and
its chance level) and silhouette of the fused embeddings, and each modality's responsibility (R²), and writes
`<output>.json` (the same numbers, and what produced them) and `<output>.png` (per model, a 2-D projection of
the fused embeddings coloured by label above their similarity matrix sorted by label, drawn by
refnet_jax/analysis/plots.py; needs matplotlib, the `analysis` extra).

  python tools/analyze.py --probe --workdirs pretrained=runs/vqa_pretrain,random=RANDOM \
      --config configs/easy_vqa.py:variant=pretrain --probe_examples 5000 --output docs/graph/probe

adds `probe_accuracy`: a linear probe (logistic regression) fitted on the fused embeddings of `--probe_split`
(a seeded subsample of `--probe_examples` of them) and scored on `--split`.

Flags:
  --workdirs       NAME=SOURCE,... in the order of the table and the picture. SOURCE is a workdir of
                   train.py or pretrain.py (its `config.json` and latest checkpoint), or RANDOM: the network a
                   run of `--config` starts from (initialized from its `seed`, no training).
  --config         the config file of the RANDOM sources (configs/*.py[:arg], with --config.x.y=... overrides);
                   required with RANDOM, refused without.
  --split          the split analysed (default test).
  --max_examples   a seeded subsample of that many examples of --split (default: all).
  --k              neighbours in the k-NN graph (default 10).
  --seed           seeds the subsamples and the fitting/scoring halves of the responsibility (default 0).
  --ridge          relative ridge strength of the responsibility's linear maps (default 1e-3).
  --probe          also fit and score the linear probe; --probe_split (default train), --probe_examples
                   (default 5000; 0: all), --probe_l2 (default 1e-3) set it.
  --output         path prefix of the .json and .png written (folders are created).
  --[no]plot       draw the .png (default on); --plot_examples examples in each similarity matrix (600).

All the models must see the same examples (the same dataset and split): their labels are compared.
"""

import json
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from refnet_jax import cli, config_lib, console
from refnet_jax.analysis import graph, report
from refnet_jax.train import inference

RANDOM = 'RANDOM'

FLAGS = flags.FLAGS
flags.DEFINE_list('workdirs', None, 'NAME=WORKDIR or NAME=RANDOM pairs, comma-separated.')
config_flags.DEFINE_config_file(
    'config', None, 'Config file of the RANDOM sources (configs/*.py[:arg]).', lock_config=True
)
flags.DEFINE_string('split', 'test', 'The split analysed.')
flags.DEFINE_integer('max_examples', None, 'Analyse a seeded subsample of this many examples (default: all).')
flags.DEFINE_integer('k', 10, 'Neighbours in the k-NN graph.')
flags.DEFINE_integer('seed', 0, 'Seeds the subsamples and the split of the responsibility fit.')
flags.DEFINE_float('ridge', 1e-3, 'Relative ridge strength of the modality-responsibility maps.')
flags.DEFINE_bool('probe', False, 'Also fit a linear probe on --probe_split and score it on --split.')
flags.DEFINE_string('probe_split', 'train', 'The split the linear probe is fitted on.')
flags.DEFINE_integer('probe_examples', 5000, 'Seeded subsample of --probe_split for the probe (0: all).')
flags.DEFINE_float('probe_l2', 1e-3, 'L2 penalty of the linear probe (on the mean cross-entropy).')
flags.DEFINE_string('output', None, 'Path prefix of the <output>.json and <output>.png written.')
flags.DEFINE_bool('plot', True, 'Draw <output>.png (needs matplotlib).')
flags.DEFINE_integer('plot_examples', 600, 'Examples in each similarity matrix of the picture.')
flags.mark_flags_as_required(['workdirs', 'output'])

COLUMNS = (
    ('accuracy', 'head acc'),
    ('knn_accuracy', 'kNN acc'),
    ('homophily', 'homophily'),
    ('chance_homophily', 'chance'),
    ('silhouette', 'silhouette'),
    ('probe_accuracy', 'probe acc'),
)


def parse_sources(entries: list[str], config) -> dict[str, tuple[str, object]]:
    """['baseline=runs/a', 'random=RANDOM'] -> {name: (source, its config)}, checked."""
    sources = {}
    for entry in entries:
        name, sep, source = entry.partition('=')
        if not sep or not name or not source:
            raise app.UsageError(f'--workdirs entry {entry!r}: expected NAME=WORKDIR or NAME={RANDOM}')
        if name in sources:
            raise app.UsageError(f'--workdirs names {name!r} twice')
        sources[name] = source
    has_random = RANDOM in sources.values()
    if has_random and config is None:
        raise app.UsageError(f'--workdirs has a {RANDOM} source, and a {RANDOM} source needs --config')
    if config is not None and not has_random:
        raise app.UsageError(
            f'--config is only read for {RANDOM} sources, and --workdirs has none (a workdir brings its own '
            'config.json)'
        )
    return {
        name: (source, config if source == RANDOM else config_lib.load_workdir_config(source))
        for name, source in sources.items()
    }


def markdown_table(scores: dict[str, dict[str, float]]) -> str:
    """A markdown table: a row per model, a column per metric present in any model."""
    modalities = sorted(
        {k.split('/', 1)[1] for s in scores.values() for k in s if k.startswith('responsibility/')}
    )
    columns = [(key, title) for key, title in COLUMNS if any(key in s for s in scores.values())]
    columns += [(f'responsibility/{m}', f'R² {m}') for m in modalities]
    rows = [
        [name, int(s['num_examples']), *(f'{s[key]:.3f}' if key in s else '–' for key, _ in columns)]
        for name, s in scores.items()
    ]
    headers = ['model', 'N', *(title for _, title in columns)]
    return report.markdown_table(headers, rows, align='l' + 'r' * (len(headers) - 1))


def import_plots():
    """refnet_jax.analysis.plots, which needs matplotlib: checked before any model is loaded."""
    try:
        from refnet_jax.analysis import plots as graph_plots
    except ModuleNotFoundError as e:
        if e.name != 'matplotlib':
            raise
        raise app.UsageError(
            'the picture needs matplotlib: pip install -c constraints.txt -e ".[analysis]", or pass --noplot'
        ) from e
    return graph_plots


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    sources = parse_sources(FLAGS.workdirs, FLAGS.config)
    plots = import_plots() if FLAGS.plot else None
    output = pathlib.Path(FLAGS.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    collected, scores, models = {}, {}, {}
    for name, (source, config) in sources.items():
        workdir = None if source == RANDOM else source
        logging.info('%s: collecting %s of %s.', name, FLAGS.split, source)
        network = inference.load_network(config, workdir)
        if FLAGS.plot and network.info.multi_label:
            raise app.UsageError(
                f'{network.info.name} is multi-label and the picture needs one label per example; pass --noplot'
            )
        data = inference.collect(
            config, workdir, FLAGS.split, max_examples=FLAGS.max_examples, seed=FLAGS.seed, network=network
        )
        first = next(iter(collected.values()), None)
        if first is not None and (
            first['labels'].shape != data['labels'].shape or (first['labels'] != data['labels']).any()
        ):
            raise ValueError(
                f'{name} ({source}) and {next(iter(collected))} saw other examples of {FLAGS.split!r}: '
                'the models must be of the same dataset'
            )
        probe_train = None
        if FLAGS.probe:
            logging.info('%s: collecting %s for the linear probe.', name, FLAGS.probe_split)
            probe_train = inference.collect(
                config,
                workdir,
                FLAGS.probe_split,
                max_examples=FLAGS.probe_examples or None,
                seed=FLAGS.seed,
                network=network,
            )
        scores[name] = graph.analyze(
            data,
            k=FLAGS.k,
            seed=FLAGS.seed,
            ridge=FLAGS.ridge,
            probe_train=probe_train,
            probe_l2=FLAGS.probe_l2,
        )
        collected[name] = data
        models[name] = {'source': source, 'step': data['step'], 'metrics': scores[name]}
        logging.info('%s: %s', name, console.format_metrics(scores[name], limit=12))

    table = markdown_table(scores)
    print(table)
    settings = {
        'split': FLAGS.split,
        'max_examples': FLAGS.max_examples,
        'k': FLAGS.k,
        'seed': FLAGS.seed,
        'ridge': FLAGS.ridge,
        'probe': {'split': FLAGS.probe_split, 'examples': FLAGS.probe_examples, 'l2': FLAGS.probe_l2}
        if FLAGS.probe
        else None,
    }
    if any(source == RANDOM for source, _ in sources.values()):
        settings['config'] = json.loads(FLAGS.config.to_json_best_effort())
    json_path = output.with_name(output.name + '.json')
    json_path.write_text(json.dumps({**settings, 'models': models, 'table': table}, indent=2))
    written = [('numbers', str(json_path))]

    if FLAGS.plot:
        png_path = output.with_name(output.name + '.png')
        plots.plot_models(
            collected, png_path, scores=scores, k=FLAGS.k, num_similarity=FLAGS.plot_examples, seed=FLAGS.seed
        )
        written.append(('picture', str(png_path)))
    print(f'\nAnalysed {len(models)} model(s) on {FLAGS.split} (k={FLAGS.k}).\n{console.aligned(written)}')


if __name__ == '__main__':
    cli.run(main)
