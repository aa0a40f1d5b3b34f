"""What a person sees (refnet_jax/console.py): this library's lines but not other libraries' INFO, one progress
bar that log lines never tear, and a short aligned summary at the end; in a real terminal (a pseudo-terminal)
for a 40-step tiny run."""

import fcntl
import io
import json
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from helpers import one_cpu_env, tiny_train_command

from refnet_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_CPU = one_cpu_env()
ONE_CPU.pop('REFNET_LOG_LEVEL', None)


@pytest.fixture
def root_logger():
    """The root logger with one handler writing into a StringIO, put back as it was afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    root.handlers = [logging.StreamHandler(out)]
    yield out
    root.handlers, level = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def record(name: str, level: int, pathname: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_other_libraries_info_is_hidden_and_their_warnings_shown(root_logger):
    console.configure_logging()
    ours = os.path.join(console.PACKAGE_DIR, 'train', 'trainer.py')
    orbax = os.path.join('site-packages', 'orbax', 'checkpoint', 'checkpoint_manager.py')
    for rec in (
        record('absl', logging.INFO, ours, 'own info'),  # absl's logger, from a refnet_jax module
        record('refnet_jax.data', logging.INFO, 'x.py', 'own logger info'),
        record('absl', logging.INFO, orbax, 'orbax info'),  # orbax logs through absl too
        record('jax._src.xla_bridge', logging.INFO, 'xla_bridge.py', "Unable to initialize backend 'tpu'"),
        record('absl', logging.WARNING, orbax, 'orbax warning'),
        record('absl', logging.DEBUG, ours, 'own debug'),
    ):
        logging.getLogger(rec.name).handle(rec)
    lines = root_logger.getvalue().splitlines()
    assert [re.sub(r'^\d\d:\d\d:\d\d ', '', line) for line in lines] == [
        'own info',
        'own logger info',
        'WARNING: orbax warning',
    ]


def test_asking_for_other_libraries_info_brings_it_back(root_logger):
    console.configure_logging(own=logging.INFO, others=logging.INFO, detailed=True)
    orbax = os.path.join('site-packages', 'orbax', 'checkpoint', 'checkpoint_manager.py')
    logging.getLogger('absl').handle(record('absl', logging.INFO, orbax, 'orbax info'))
    assert 'orbax info' in root_logger.getvalue()
    # Configuring again replaces the filter rather than adding a second one.
    console.configure_logging()
    assert len(logging.getLogger().handlers[0].filters) == 1


def test_levels_are_read_by_name_and_a_wrong_one_is_named():
    assert console.level_from_name('INFO', '--log_level') == logging.INFO
    with pytest.raises(
        ValueError, match="REFNET_LOG_LEVEL is 'loud'; expected one of debug, info, warning, error"
    ):
        console.level_from_name('loud', 'REFNET_LOG_LEVEL')


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_go_above_the_bar_and_the_stream_is_put_back(monkeypatch, root_logger):
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().handlers = [handler]
    console.configure_logging()
    with console.progress(10, desc='train') as bar:
        assert not bar.disable
        bar.update(3)
        logging.getLogger('refnet_jax.test').info('a milestone')
        bar.update(3)
    assert handler.stream is terminal
    out = terminal.getvalue()
    # The message is on a line of its own: the bar was cleared (\r) before it and redrawn after it.
    line = next(segment for segment in re.split(r'[\r\n]', out) if 'a milestone' in segment)
    assert re.fullmatch(r'\d\d:\d\d:\d\d a milestone', line), repr(out)
    assert out.index('a milestone') < out.rindex('train:  60%')


def test_no_bar_without_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    with console.progress(10) as bar:
        bar.update(10)
        assert bar.disable
    assert sys.stderr.getvalue() == ''


RESULTS = {
    'step': 300,
    'train': {'loss': 0.794, 'accuracy': 0.77, 'examples_per_second': 542.1},
    'val': {'num_examples': 3822.0, 'loss': 0.7412, 'accuracy': 0.7017},
    'test': {'num_examples': 9673.0, 'loss': 0.7465, 'accuracy': 0.6946},
    'wall_seconds': 48.0,
    'first_step_seconds': 12.0,
}


def test_the_summary_names_the_metrics_and_where_the_files_are():
    text = console.run_summary(RESULTS, 'runs/x')
    lines = text.splitlines()
    assert lines[0] == 'Finished at step 300 in 48 s, 542 examples/s.'
    assert '  test         accuracy 0.6946  loss 0.7465   (step 300)' in lines
    assert '  validation   accuracy 0.7017  loss 0.7412   (step 300)' in lines
    for path in ('runs/x/results.json', 'runs/x/metrics.jsonl', 'runs/x/tensorboard', 'runs/x/checkpoints'):
        assert path in text
    # One column of values.
    assert len({len(re.match(r'  (\S+( \S+)*\s+)', line).group(1)) for line in lines[1:]}) == 1


def test_the_summary_of_a_selecting_run_reports_the_selected_checkpoint():
    selected = {'metric': 'val/loss', 'mode': 'min', 'step': 150, 'stopped_early': True}
    selected |= {'val': {'accuracy': 0.71}, 'test': {'accuracy': 0.70}}
    text = console.run_summary({**RESULTS, 'selected': selected}, 'runs/x')
    assert 'selected         step 150 by val/loss (min), stopped early' in text
    assert 'best validation  accuracy 0.7100   (step 150)' in text
    assert 'test             accuracy 0.7000   (step 150)' in text
    assert 'last test        accuracy 0.6946  loss 0.7465   (step 300)' in text
    assert 'runs/x/best' in text


def test_metrics_show_the_headline_first_and_counts_as_integers():
    assert console.format_metrics({'loss': 0.5, 'zeta': 2.0, 'accuracy': 0.9, 'num_examples': 10.0}) == (
        'accuracy 0.9000  loss 0.5000  zeta 2.0000'
    )
    assert (
        console.format_metrics({f'm{i}': 1234.0 for i in range(8)}, limit=2)
        == 'm0 1,234  m1 1,234  (+6 more)'
    )


# ----------------------------------------------------------------------------------------------- terminal

BAR = re.compile(r'^train:\s+\d+%\|')
ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')


def run_in_terminal(args, timeout=600):
    """(exit status, the lines a person sees besides the bar, every drawing of the bar) of `python args` in
    a pseudo-terminal of 200 x 50."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 50, 200, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=ONE_CPU,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    rc = proc.wait(timeout=timeout)
    text = ANSI.sub('', b''.join(chunks).decode(errors='replace'))
    lines, bars = [], []
    for line in text.replace('\r\n', '\n').split('\n'):
        # A line holds the bar's drawings, each after a \r, and the log line written over them.
        for segment in line.split('\r'):
            if BAR.match(segment):
                bars.append(segment.rstrip())
            elif segment.strip():
                lines.append(segment.rstrip())
    return rc, lines, bars


@pytest.mark.slow(seconds=16)
def test_a_run_in_a_terminal_shows_a_bar_a_few_lines_and_the_summary(tmp_path, easy_vqa_dir):
    workdir = tmp_path / 'x'
    # 40 steps: 20 checkpoints, and orbax's chatter with them (several lines each: far more than the 40 lines
    # allowed below), were it shown.
    steps = 40
    rc, lines, bars = run_in_terminal(
        tiny_train_command(workdir, easy_vqa_dir, f'--config.train.num_steps={steps}')
    )
    shown = '\n'.join(lines)
    assert rc == 0, shown
    assert len(lines) <= 40, shown
    assert max(len(line) for line in lines) <= 300, shown
    for chatter in ('orbax', 'checkpoint_manager', 'atomicity', 'libtpu', 'dataset_info'):
        assert chatter not in shown, shown
    assert not [line for line in lines if re.match(r'[IWE]\d{4} ', line)], shown  # absl's detailed lines
    # Nothing was written into the bar: every drawing of it is whole, the last at 40/40 with the loss
    # and examples/s in its postfix.
    assert all(re.fullmatch(rf'train:\s+\d+%\|[^|]*\| *\d+/{steps} \[[^\]]*\]', bar) for bar in bars), bars[
        -3:
    ]
    assert re.search(rf'{steps}/{steps} .*loss \d\.\d{{4}}.*[\d,]+ examples/s', bars[-1]), bars[-1]
    # The summary ends the output: the test accuracy of results.json and the workdir's files.
    summary = lines[
        lines.index(next(line for line in lines if line.startswith(f'Finished at step {steps}'))) :
    ]
    results = json.loads((workdir / 'results.json').read_text())
    assert f'accuracy {results["test"]["accuracy"]:.4f}' in next(line for line in summary if 'test' in line)
    assert any(str(workdir / 'results.json') in line for line in summary)
    assert summary[-1].strip().startswith('checkpoints') and str(workdir) in summary[-1]


def run_plain(tmp_path, easy_vqa_dir, *flags, env=None):
    cmd = [sys.executable, *tiny_train_command(tmp_path / 'run', easy_vqa_dir, *flags)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(ONE_CPU, **(env or {})), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


@pytest.mark.slow(seconds=7)
@pytest.mark.parametrize(
    'flags, env',
    [
        ((), None),
        (('--verbosity=0',), None),
        (('--log_level=info',), None),
        ((), {'REFNET_LOG_LEVEL': 'info'}),
    ],
    ids=['default', 'verbosity', 'log_level', 'environment'],
)
def test_verbosity_log_level_or_the_environment_bring_library_logs_back(tmp_path, easy_vqa_dir, flags, env):
    stdout, stderr = run_plain(tmp_path, easy_vqa_dir, *flags, env=env)
    # Without a terminal: plain periodic lines instead of the bar, and the summary on stdout.
    assert re.search(r'step 4/4: loss \d\.\d{4}, accuracy \d\.\d{4}, [\d,]+ examples/s', stderr), stderr
    assert stdout.startswith('Finished at step 4') and 'test ' in stdout
    library = stderr.count('checkpoint_manager.py')
    if flags or env:
        assert library > 0, stderr
    else:
        assert library == 0 and 'orbax' not in stderr, stderr
