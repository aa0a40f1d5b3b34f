"""What a person sees in a terminal: this library's own log lines, one progress bar that stays whole, and a
short aligned summary at the end of a command.

Other libraries (orbax, grain, tensorflow_datasets, jax) log their internals at INFO: hundreds of lines per
run. `configure_logging` lets a record through when it is this library's (a module of the `refnet_jax`
package or the script being run) at INFO and up, and another library's at WARNING and up; the entry points
lower the second threshold on request (`--log_level`, `REFNET_LOG_LEVEL`, absl's `--verbosity`:
refnet_jax/cli.py). `progress` draws a tqdm bar on a terminal and writes log lines above it meanwhile.
"""

import contextlib
import io
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tqdm
from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Metrics shown first in a summary line, in this order (the headline of each objective, then its loss).
HEADLINE = ('accuracy', 'micro_f1', 'macro_f1', 'auroc', 'loss', 'fused_spread')


# ----------------------------------------------------------------------------------------------- logging


class _Threshold(logging.Filter):
    """Passes this library's records from `own` up and the others' from `others` up."""

    def __init__(self, own: int, others: int, main_file: str | None):
        super().__init__()
        self.own, self.others, self.main_file = own, others, main_file

    def is_own(self, record: logging.LogRecord) -> bool:
        if record.name.split('.', 1)[0] == 'refnet_jax':
            return True
        path = os.path.abspath(record.pathname)  # absl's records carry the file that logged them
        return path.startswith(PACKAGE_DIR + os.sep) or path == self.main_file

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (self.own if self.is_own(record) else self.others)


class _ShortFormatter(logging.Formatter):
    """`HH:MM:SS message` (`HH:MM:SS WARNING: message` from warnings up): a line for a person."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime('%H:%M:%S', time.localtime(record.created))
        level = f'{record.levelname}: ' if record.levelno >= logging.WARNING else ''
        text = f'{when} {level}{record.getMessage()}'
        if record.exc_info:
            text += '\n' + self.formatException(record.exc_info)
        return text


def _handlers() -> list[logging.Handler]:
    """The handlers a record of any logger reaches by default: the root logger's (absl's among them)."""
    return list(logging.getLogger().handlers)


def configure_logging(
    *, own: int = logging.INFO, others: int = logging.WARNING, detailed: bool = False
) -> None:
    """Shows this library's log records from level `own` up and other libraries' from `others` up.

    Applies to the handlers of the root logger (absl's, under `absl.app.run`); Python warnings are logged
    too, so that they also pass above a progress bar. Calling it again replaces the earlier setting.

    Args:
      own: the lowest level shown of records logged by `refnet_jax` and by the script being run.
      others: the lowest level shown of every other record (orbax, grain, tensorflow_datasets, jax, ...).
      detailed: absl's line format (level, date, thread, file:line); else `HH:MM:SS message`.
    """
    main = getattr(sys.modules.get('__main__'), '__file__', None)
    threshold = _Threshold(own, others, os.path.abspath(main) if main else None)
    root = logging.getLogger()
    level = min(own, others)
    if absl_logging.get_absl_handler() in root.handlers:  # absl.app.run: absl's verbosity is the root's level
        absl_logging.set_verbosity(absl_logging.converter.standard_to_absl(level))
    root.setLevel(level)
    for handler in _handlers():
        for old in [f for f in handler.filters if isinstance(f, _Threshold)]:
            handler.removeFilter(old)
        handler.addFilter(threshold)
        if detailed:
            if isinstance(handler, absl_logging.ABSLHandler):
                handler.setFormatter(absl_logging.PythonFormatter())
        else:
            handler.setFormatter(_ShortFormatter())
    logging.captureWarnings(True)


def level_from_name(name: str, what: str) -> int:
    """The `logging` level of 'debug', 'info', 'warning' or 'error' (any case); `what` names the setting in
    the error."""
    levels = {
        'debug': logging.DEBUG,
        'info': logging.INFO,
        'warning': logging.WARNING,
        'error': logging.ERROR,
    }
    if name.lower() not in levels:
        raise ValueError(f'{what} is {name!r}; expected one of {", ".join(levels)}')
    return levels[name.lower()]


# ----------------------------------------------------------------------------------------------- progress


class _AboveBars(io.TextIOBase):
    """A text stream that writes above the open tqdm bars of stderr, which are redrawn below it."""

    def write(self, text: str) -> int:
        tqdm.tqdm.write(text, file=sys.stderr, end='')
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _console_streams() -> list[logging.StreamHandler]:
    """The stream handlers that write log records to the terminal (absl's writes through its python_handler)."""
    out = []
    for handler in _handlers():
        handler = getattr(handler, 'python_handler', handler)
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
            out.append(handler)
    return out


@contextlib.contextmanager
def progress(total: int, *, initial: int = 0, desc: str = '', unit: str = 'step') -> Iterator[tqdm.tqdm]:
    """A tqdm bar on stderr when it is a terminal (disabled, drawing nothing, otherwise).

    While it is open, log records go above it through `tqdm.write`, so that the bar is never torn; it is
    closed and the log streams put back however the block ends.
    """
    bar = tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    moved = [] if bar.disable else _console_streams()
    previous = [h.setStream(_AboveBars()) for h in moved]
    try:
        yield bar
    finally:
        bar.close()
        for handler, stream in zip(moved, previous, strict=True):
            handler.setStream(stream)


# ----------------------------------------------------------------------------------------------- summary


def aligned(rows: Sequence[tuple[str, str]], indent: str = '  ') -> str:
    """`label   text` lines with the texts in one column."""
    width = max((len(label) for label, _ in rows), default=0)
    return '\n'.join(f'{indent}{label:<{width}}  {text}'.rstrip() for label, text in rows)


def format_value(value: float) -> str:
    """A metric as a person reads it: 4 decimals, or a grouped integer for counts."""
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer() and abs(value) >= 100):
        return f'{int(value):,}'
    return f'{value:.4f}'


def format_metrics(metrics: Mapping[str, float], limit: int = 6) -> str:
    """'accuracy 0.9712  loss 0.0941  ...': the headline metrics first, then the others by name; at most
    `limit` (the rest are in results.json). `num_examples` is left out."""
    names = [k for k in metrics if k != 'num_examples']
    names.sort(key=lambda k: (HEADLINE.index(k) if k in HEADLINE else len(HEADLINE), k))
    shown = '  '.join(f'{k} {format_value(metrics[k])}' for k in names[:limit])
    return shown + (f'  (+{len(names) - limit} more)' if len(names) > limit else '')


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f'{seconds} s'
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f'{minutes} min {seconds:02d} s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes:02d} min'


def run_summary(results: Mapping[str, Any], workdir: str) -> str:
    """The end of a training or pre-training run: what it reached and where its files are.

    Args:
      results: what `trainer.train_and_evaluate` or `trainer.pretrain` returned (results.json).
      workdir: the run's workdir, as the user named it.
    """
    train = results.get('train', {})
    speed = train.get('examples_per_second')
    head = f'Finished at step {results["step"]:,}'
    if results.get('wall_seconds') is not None:
        head += f' in {_duration(results["wall_seconds"])}'
    if speed:
        head += f', {speed:,.0f} examples/s'
    rows = []
    selected = results.get('selected')
    if selected:  # the selected checkpoint is the one reported; the last step's follow
        how = f'{selected["metric"]} ({selected["mode"]})' + (
            ', stopped early' if selected.get('stopped_early') else ''
        )
        rows.append(('selected', f'step {selected["step"]:,} by {how}'))
        rows += _evaluation_rows(selected, selected['step'], prefix={'val': 'best '})
    last = {'val': 'last ', 'test': 'last '} if selected else {}
    rows += _evaluation_rows(results, results['step'], prefix=last)
    if 'loss' in train:
        rows.append(('train loss', f'{format_value(train["loss"])}   (last logged steps)'))
    join = os.path.join
    rows += [
        ('results', join(workdir, 'results.json')),
        ('metrics', join(workdir, 'metrics.jsonl')),
        ('TensorBoard', f'tensorboard --logdir {join(workdir, "tensorboard")}'),
        ('checkpoints', join(workdir, 'checkpoints')),
    ]
    if selected:
        rows.append(('best checkpoint', join(workdir, 'best')))
    return f'{head}.\n{aligned(rows)}'


def _evaluation_rows(
    results: Mapping[str, Any], step: int, prefix: Mapping[str, str]
) -> list[tuple[str, str]]:
    """A row per evaluation of `results` ('val', 'test', 'test_without_image', ...), labelled
    'validation', 'test', 'test without image', each split's label after its `prefix`."""
    rows = []
    for key, metrics in results.items():
        if not (key.startswith(('val', 'test')) and isinstance(metrics, Mapping)):
            continue
        split, _, without = key.partition('_without_')
        label = prefix.get(split, '') + {'val': 'validation'}.get(split, split)
        label += f' without {without}' if without else ''
        rows.append((label, f'{format_metrics(metrics)}   (step {step:,})'))
    return rows
