"""The report module the experiments and the benchmarks share: run records, the machine, markdown tables."""

import json
import os
import shlex

import pytest

from refnet_jax.analysis import report


def test_run_and_record_records_the_run_atomically(tmp_path):
    script = tmp_path / 'job.py'
    script.write_text(
        'import json, os, sys\n'
        'os.makedirs(sys.argv[1], exist_ok=True)\n'
        "json.dump({'test': {'accuracy': 0.75}}, open(os.path.join(sys.argv[1], 'results.json'), 'w'))\n"
        "print('ran')\n"
    )
    record_path = str(tmp_path / 'results' / 'cell.json')
    record = report.run_and_record(['python', str(script), 'work'], 'work', record_path, root=str(tmp_path))
    assert record['results'] == {'test': {'accuracy': 0.75}}
    assert record['command'] == f'python {script} work'
    assert record['wall_seconds'] > 0 and len(record['load_average']) == 2
    assert record['machine'] == report.machine_summary()
    assert report.load_record(record_path) == record
    assert not os.path.exists(record_path + '.tmp')
    assert (tmp_path / 'work' / 'train.log').read_text() == 'ran\n'
    assert report.load_record(str(tmp_path / 'missing.json')) is None

    # A run that fails leaves no record, so the grid runs it again next time.
    script.write_text('raise SystemExit(3)\n')
    with pytest.raises(Exception, match='exit status 3'):
        report.run_and_record(
            ['python', str(script), 'work'],
            'work',
            str(tmp_path / 'results' / 'failed.json'),
            root=str(tmp_path),
        )
    assert not os.path.exists(tmp_path / 'results' / 'failed.json')


def test_machine_summary_and_header_name_the_machine():
    info = report.machine(['numpy', 'no-such-package'])
    assert info['versions']['no-such-package'] == 'not installed'
    assert 1 <= info['usable_cpus'] <= info['cpu_count']
    summary = report.machine_summary(info)
    assert summary == f'{info["arch"]}, {info["cpu_count"]} cores, {info["python"]}, {info["platform"]}'
    header = report.header_line(info, 0.5, 1.25)
    assert f'numpy {info["versions"]["numpy"]}' in header
    assert header.endswith('1-min load average 0.50 before, 1.25 after')


def test_markdown_table_and_mean_std():
    table = report.markdown_table(['a', 'b', 'c'], [[1, 'x', 2.5], ['–', '', 0]], align='lrr')
    assert table.splitlines() == ['| a | b | c |', '|---|---:|---:|', '| 1 | x | 2.5 |', '| – |  | 0 |']
    assert report.markdown_table(['a'], []).splitlines() == ['| a |', '|---|']
    with pytest.raises(ValueError, match='a row of 1 cells under 2 headers'):
        report.markdown_table(['a', 'b'], [[1]])
    with pytest.raises(ValueError, match="align='lc'"):
        report.markdown_table(['a', 'b'], [], align='lc')
    assert report.mean_std([1.0, 2.0, 3.0]) == '2.0000 ± 0.8165'  # population std
    assert report.mean_std([250.4, 260.6], digits=0) == '256 ± 5'


def test_write_json_is_sorted_and_ends_with_a_newline(tmp_path):
    path = tmp_path / 'sub' / 'figures.json'
    report.write_json(path, {'b': 1, 'a': [1, 2]})
    text = path.read_text()
    assert text.endswith('}\n') and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {'a': [1, 2], 'b': 1}
    assert os.listdir(tmp_path / 'sub') == ['figures.json']


def test_shell_join_reads_back_as_the_same_words():
    cmd = ['python', 'train.py', "--config.train.decay_mask=('.*',)", 'a b', 'say "hi"', '$HOME', 'plain=1']
    line = report.shell_join(cmd)
    assert shlex.split(line) == cmd
    assert '"--config.train.decay_mask=(\'.*\',)"' in line  # readable: double quotes where they suffice
