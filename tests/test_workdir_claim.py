"""One run per workdir (refnet_jax/train/workdir.py): the claim is atomic, names its holder, is released at the
end, and a stale one (its process gone, or another host's not refreshed) is taken over with a warning."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from absl.testing import absltest

from refnet_jax.train import workdir as workdir_lib


def write_claim(workdir, **fields):
    """A claim file as another run would have written it."""
    holder = dataclasses.replace(workdir_lib.Holder.this_process(), command='train.py ...', **fields)
    path = workdir / workdir_lib.CLAIM_FILE
    path.write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_a_claim_records_its_holder_and_is_released(tmp_path):
    with workdir_lib.Claim(tmp_path) as claim:
        saved = json.loads((tmp_path / 'claim.json').read_text())
        assert saved['pid'] == os.getpid() and saved['host'] == claim.holder.host
        assert abs(saved['started'] - time.time()) < 60 and saved['command']
    assert not (tmp_path / 'claim.json').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


def test_a_held_workdir_is_refused_naming_the_workdir_and_the_holder(tmp_path):
    with workdir_lib.Claim(tmp_path):
        before = (tmp_path / 'claim.json').read_text()
        with pytest.raises(workdir_lib.WorkdirInUseError) as e:
            workdir_lib.Claim(tmp_path).acquire()
        message = str(e.value)
        assert f'workdir {tmp_path} is in use by another run' in message
        assert f'process {os.getpid()} on host' in message and '\n' not in message
        assert (tmp_path / 'claim.json').read_text() == before  # the holder's claim is untouched
    assert not (tmp_path / 'claim.json').exists()


def test_a_claim_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path):
    pid = dead_pid()
    write_claim(tmp_path, pid=pid)
    with absltest.mock.patch.object(workdir_lib.logging, 'warning') as warning:
        with workdir_lib.Claim(tmp_path):
            assert json.loads((tmp_path / 'claim.json').read_text())['pid'] == os.getpid()
    (message, *args), _ = warning.call_args
    assert 'Taking over' in message and f'process {pid}' in message % tuple(args)
    assert 'no longer exists' in message % tuple(args)
    assert not list(tmp_path.iterdir())


def test_a_reused_pid_is_not_the_holder(tmp_path):
    # The pid is alive (this process) but started at another time than the process that claimed.
    if workdir_lib._pid_start(os.getpid()) is None:
        pytest.skip('no /proc here')
    write_claim(tmp_path, pid_start=workdir_lib._pid_start(os.getpid()) - 1)
    with workdir_lib.Claim(tmp_path):
        pass


def test_another_hosts_claim_holds_until_it_is_not_refreshed(tmp_path):
    write_claim(tmp_path, host='elsewhere', pid=1)
    with pytest.raises(workdir_lib.WorkdirInUseError, match='process 1 on host elsewhere'):
        workdir_lib.Claim(tmp_path).acquire()
    old = time.time() - workdir_lib.STALE_SECONDS - 5
    os.utime(tmp_path / 'claim.json', (old, old))
    with workdir_lib.Claim(tmp_path):
        assert json.loads((tmp_path / 'claim.json').read_text())['host'] != 'elsewhere'


def test_the_heartbeat_keeps_the_claim_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 0.05)
    with workdir_lib.Claim(tmp_path):
        old = time.time() - 1000
        os.utime(tmp_path / 'claim.json', (old, old))
        time.sleep(0.5)
        assert time.time() - os.stat(tmp_path / 'claim.json').st_mtime < 100


def test_an_unreadable_claim_is_never_taken_over(tmp_path):
    (tmp_path / 'claim.json').write_text('not json')
    with pytest.raises(workdir_lib.WorkdirInUseError, match='cannot be read.*delete the file'):
        workdir_lib.Claim(tmp_path).acquire()
    assert (tmp_path / 'claim.json').read_text() == 'not json'


def test_of_many_runs_taking_over_one_stale_claim_one_wins(tmp_path, monkeypatch):
    stale = write_claim(tmp_path, pid=dead_pid())  # every contender finds the same stale claim
    # The contenders are threads posing as processes 1000.. of this host, alive while they run.
    monkeypatch.setattr(workdir_lib, '_process_exists', lambda holder: holder.pid != stale.pid)
    outcomes, start = [], threading.Barrier(8)

    def contend(i):
        claim = workdir_lib.Claim(tmp_path)
        claim.holder = dataclasses.replace(claim.holder, pid=1000 + i)
        claim._text = json.dumps(dataclasses.asdict(claim.holder))
        start.wait()
        try:
            outcomes.append(claim.acquire())
        except workdir_lib.WorkdirInUseError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in outcomes if isinstance(c, workdir_lib.Claim)]
    assert len(winners) == 1, outcomes
    assert all('is in use by another run: process 10' in c for c in outcomes if isinstance(c, str)), outcomes
    assert (tmp_path / 'claim.json').read_text() == winners[0]._text
    winners[0].release()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('index', [0, 1])
def test_in_a_multi_process_run_process_0_claims_for_all(tmp_path, monkeypatch, index):
    """Process 0 claims and tells the others (here: a stand-in for the broadcast) whether it could."""
    told = []

    def broadcast(ok):  # process 0's value reaches every process
        told.append(int(ok))
        return ok if index == 0 else np.int32(told_by_0[0])

    monkeypatch.setattr(workdir_lib.jax, 'process_count', lambda: 2)
    monkeypatch.setattr(workdir_lib.jax, 'process_index', lambda: index)
    monkeypatch.setattr(workdir_lib.multihost_utils, 'broadcast_one_to_all', broadcast)
    told_by_0 = [1]
    with workdir_lib.claimed(tmp_path):
        assert (tmp_path / 'claim.json').exists() == (index == 0)  # one claim, process 0's
    assert not (tmp_path / 'claim.json').exists()
    # The workdir is held by another run: every process stops.
    told_by_0 = [0]
    with workdir_lib.Claim(tmp_path), pytest.raises(workdir_lib.WorkdirInUseError) as e:
        with workdir_lib.claimed(tmp_path):
            pytest.fail('ran on a held workdir')
    expected = 'is in use by another run: process' if index == 0 else 'process 0 could not claim it'
    assert expected in str(e.value)
