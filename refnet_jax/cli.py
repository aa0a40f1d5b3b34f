"""The entry points' command line: a user's mistake is one plain line, a bug keeps its traceback.

tools/export.py and tools/analyze.py call `run(main)` where absl's `app.run(main)` would go; train.py and pretrain.py
call `run_experiment` with the function they run. This package reports a wrong config value, data or
workdir as a ValueError, an OSError (FileNotFoundError: a missing file, a config file that does not load)
or a FloatingPointError (`trainer.NonFiniteLossError`); those, a flag that does not parse, an unknown
config field and an `app.UsageError` print `error: <message>` on stderr and exit with status 2. A run
stopped on purpose (SIGTERM: `preemption.Interrupted`, an exception with an `exit_code`) prints
`stopped: <message>` and exits with that code (143); Ctrl-C prints `stopped: interrupted (Ctrl-C)` and
exits with 130 (a training run resumes from its last checkpoint when started again). Any other exception
is a bug and shows its traceback; with `--debug` (or REFNET_DEBUG=1 in the environment) every one does.

What is logged (refnet_jax/console.py): this library's lines from INFO up, other libraries' (orbax, grain,
tensorflow_datasets, jax) from WARNING up. `--log_level=info` (or `debug`, `warning`, `error`), or
REFNET_LOG_LEVEL=info in the environment, sets the second threshold and brings back absl's detailed line
format; absl's `--verbosity` (`-v`) given on the command line sets both thresholds at once (`--verbosity=0`:
every INFO line, `1`: DEBUG too).
"""

import logging as py_logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from refnet_jax import console

USER_ERRORS = (ValueError, OSError, FloatingPointError, app.UsageError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
DEBUG_ENV = 'REFNET_DEBUG'
LOG_LEVEL_ENV = 'REFNET_LOG_LEVEL'

flags.DEFINE_bool(
    'debug',
    False,
    f'Show the traceback of every error, a mistake in the flags, config or data included ({DEBUG_ENV}=1 too).',
)


flags.DEFINE_enum(
    'log_level',
    None,
    ['debug', 'info', 'warning', 'error'],
    f'Show the log lines of other libraries (orbax, grain, TFDS, jax) from this level (default warning; '
    f'{LOG_LEVEL_ENV} in the environment too).',
)


def run(main: Callable[[list[str]], object]) -> None:
    """`app.run(main)`, with the errors of the module docstring printed as one `error: ...` line and the
    logging of the module docstring."""

    def plain_main(argv):
        try:
            configure_logging()
            return main(argv)
        except USER_ERRORS as e:
            if _debugging():
                raise
            _fail(str(e) or type(e).__name__)
        except KeyboardInterrupt:
            if _debugging():
                raise
            print('stopped: interrupted (Ctrl-C)', file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:
            code = getattr(e, 'exit_code', None)  # a run stopped on purpose (preemption.Interrupted)
            if code is None or _debugging():
                raise
            print(f'stopped: {e}', file=sys.stderr)
            sys.exit(code)

    for name in ('debug', 'log_level'):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --helpshort shows them
    app.run(plain_main, flags_parser=_parse_flags)


def configure_logging() -> None:
    """The logging of the module docstring, from `--log_level`, REFNET_LOG_LEVEL and `--verbosity`."""
    name = flags.FLAGS.log_level or os.environ.get(LOG_LEVEL_ENV, '')
    if name:
        what = '--log_level' if flags.FLAGS.log_level else LOG_LEVEL_ENV
        others = console.level_from_name(name, what)
        console.configure_logging(
            own=min(others, py_logging.INFO), others=others, detailed=others <= py_logging.INFO
        )
    elif flags.FLAGS['verbosity'].present:  # absl's --verbosity, on everything
        level = py_logging.root.level  # absl set it from the flag
        console.configure_logging(own=level, others=level, detailed=True)
    else:
        console.configure_logging()


def run_experiment(fn: Callable[[ml_collections.ConfigDict, str], object]) -> None:
    """The whole main of train.py and pretrain.py: `--config` (configs/*.py[:arg], with `--config.x.y=...`
    overrides) and `--workdir`, then `fn(config, workdir)` under `run`."""
    config_flags.DEFINE_config_file(
        'config', None, 'Experiment config file (configs/*.py[:arg]).', lock_config=True
    )
    flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results.json are written.')
    flags.mark_flags_as_required(['config', 'workdir'])
    for name in ('config', 'workdir'):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --helpshort shows them

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
        if not flags.FLAGS.workdir.strip():
            raise app.UsageError(
                '--workdir is empty; expected the directory of the run (new, or one to resume)'
            )
        counts = enable_compilation_cache(flags.FLAGS.config)
        try:
            results = fn(flags.FLAGS.config, flags.FLAGS.workdir)
        finally:
            if counts is not None and counts['hits'] + counts['misses']:
                logging.info(
                    'Compilation cache %s: %d program(s) read from it, %d compiled.',
                    counts['dir'],
                    counts['hits'],
                    counts['misses'],
                )
        import jax

        if isinstance(results, dict) and jax.process_index() == 0:
            print(console.run_summary(results, flags.FLAGS.workdir), flush=True)

    run(main)


def enable_compilation_cache(config: ml_collections.ConfigDict | None = None) -> dict | None:
    """Keeps compiled programs on disk, so that a second run of the same config does not compile again.

    The cache is `config.compilation_cache_dir` when set ('' turns the cache off), else the user's
    JAX_COMPILATION_CACHE_DIR (or `jax_compilation_cache_dir`), else `$XDG_CACHE_HOME/refnet_jax/jax`
    (default `~/.cache/refnet_jax/jax`). Programs that compiled in under a second are not kept
    (`jax_persistent_cache_min_compile_time_secs`).

    Returns:
      {'dir', 'hits', 'misses'}, counted as the run compiles (None with the cache off).
    """
    import jax

    chosen = None if config is None else config.get('compilation_cache_dir')
    if chosen == '':
        return None
    if chosen:
        jax.config.update('jax_compilation_cache_dir', chosen)
    elif not (os.environ.get('JAX_COMPILATION_CACHE_DIR') or jax.config.jax_compilation_cache_dir):
        base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        jax.config.update('jax_compilation_cache_dir', os.path.join(base, 'refnet_jax', 'jax'))
    counts = {'dir': jax.config.jax_compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR')}
    counts.update(hits=0, misses=0)

    def count(event, **kwargs):
        del kwargs
        if event == '/jax/compilation_cache/cache_hits':
            counts['hits'] += 1
        elif event == '/jax/compilation_cache/cache_misses':
            counts['misses'] += 1

    jax.monitoring.register_event_listener(count)
    return counts


def _parse_flags(argv: Sequence[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, OSError, AttributeError, KeyError) as e:
        message = _flag_error_message(e)
        if message is None or _debugging(argv):
            raise
        _fail(message)


def _flag_error_message(error: Exception) -> str | None:
    """The plain message of an error raised while parsing the flags; None for a bug (keep the traceback)."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(error, flags.Error):
        message = str(error)
        # config_flags puts the traceback of a config file's error into the message: keep the error.
        if 'Traceback (most recent call last)' in message:
            message = f'{message.split(": ", 1)[0]}: {chain[-1]}'
        return message
    if isinstance(error, OSError):  # a config file that does not load, read by a --config.x.y=... override
        return str(error)
    # ml_collections raises a KeyError (in an AttributeError) for a `--config.x.y=...` naming a field the
    # config lacks; raised elsewhere (a config file's own code), one is a bug.
    frames = traceback.extract_tb(chain[-1].__traceback__)
    if frames and f'{os.sep}ml_collections{os.sep}' in frames[-1].filename:
        first = next((e for e in chain if isinstance(e, KeyError)), chain[-1])  # it says "Did you mean"
        return f'no such config field: {first.args[0] if first.args else first}'
    return None


def _debugging(argv: Sequence[str] | None = None) -> bool:
    """--debug or REFNET_DEBUG=1. With `argv`, --debug is read from it: the flags did not parse."""
    if os.environ.get(DEBUG_ENV, '') not in ('', '0'):
        return True
    if argv is None:
        return flags.FLAGS.debug
    own = flags.FlagValues()
    flags.DEFINE_bool('debug', False, '', flag_values=own)
    try:
        own(list(argv), known_only=True)
    except flags.Error:  # --debug=maybe: reported as the error it is
        return False
    return own.debug


def _fail(message: str):
    sys.stderr.write(f'error: {message}\n')
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)
