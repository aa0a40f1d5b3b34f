"""One run per workdir: a run claims its workdir when it starts and releases the claim when it ends.

Two runs writing one workdir would interleave their metrics and race on checkpoints, so a run first creates
`<workdir>/claim.json` (host, process id, start time, command) atomically: written to a file of its own, then
hard-linked to the claim's name, which fails when a claim is there. A second run on a claimed workdir stops
with `WorkdirInUseError` before it writes anything. In a multi-process run, process 0 claims for all.

A claim whose holder is gone is taken over with a warning:
- on the same host, when its process no longer exists (killed with SIGKILL, out of memory);
- from another host (a shared filesystem), when the claim has not been refreshed for `STALE_SECONDS`: the
  holder touches it every `HEARTBEAT_SECONDS` from a background thread while it runs.
"""

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CLAIM_FILE = 'claim.json'
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0  # ten missed heartbeats: a claim from another host is then taken over
TAKEOVER_SECONDS = 60.0  # a takeover lock this old was left by a run that died while taking over


class WorkdirInUseError(ValueError):
    """Another run holds the workdir (a user's mistake: one plain line at the command line)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a claim: the contents of `claim.json`.

    Attributes:
      host: the host name of the holding process.
      pid: its process id.
      started: when it claimed, seconds since the epoch.
      command: its command line.
      pid_start: the process's start time in clock ticks after boot (Linux), which tells a reused pid from the
        holder; None elsewhere.
    """

    host: str
    pid: int
    started: float
    command: str
    pid_start: int | None = None

    @classmethod
    def this_process(cls) -> 'Holder':
        pid = os.getpid()
        return cls(socket.gethostname(), pid, time.time(), ' '.join(sys.argv), _pid_start(pid))

    def describe(self) -> str:
        """'process 123 on host h, started 2026-12-08 00:46:30' (the command is in the claim file)."""
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))
        return f'process {self.pid} on host {self.host}, started {when}'


def _pid_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks after boot (Linux /proc), or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ('Z', 'X'):  # a zombie has ended: it only waits for its parent to read its status
        return None
    return int(fields[19])


def _process_exists(holder: Holder) -> bool:
    """Whether `holder`'s process (on this host) still runs: its pid exists, and is the same process."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    if holder.pid_start is None:
        return True
    return _pid_start(holder.pid) == holder.pid_start


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Writes `text` to `path` if there is no such file, atomically; whether it did."""
    if '://' in str(path):  # object stores have no links: check, then write (a small race)
        if path.exists():
            return False
        path.write_text(text)
        return True
    own = f'{path}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}'
    with open(own, 'w') as f:
        f.write(text)
    try:
        os.link(own, path)  # fails if `path` exists; the file appears whole
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: create exclusively, then write
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        return True
    finally:
        os.unlink(own)


class Claim:
    """The claim of one workdir by this process: `acquire`, then `release` (or `with Claim(workdir):`)."""

    def __init__(self, workdir: epath.PathLike):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / CLAIM_FILE
        self.holder = Holder.this_process()
        self._text = json.dumps(dataclasses.asdict(self.holder), indent=2)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> 'Claim':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> 'Claim':
        """Claims the workdir, taking over a stale claim with a warning.

        Raises:
          WorkdirInUseError: another run holds it; the message names the workdir and the holder.
        """
        for _ in range(50):  # a claim may be released or taken over between our looks at it
            if _create_exclusive(self.path, self._text):
                self._start_heartbeat()
                return self
            held = self._read()
            if held is not None:
                why = self._stale(held)
                if why is None:
                    raise WorkdirInUseError(
                        f'workdir {self.workdir} is in use by another run: {held.describe()}. Wait for it to '
                        f'end, stop it, or use another --workdir (its claim: {self.path})'
                    )
                if self._take_over(held):
                    logging.warning('Taking over %s from %s: %s.', self.path, held.describe(), why)
                    continue
            time.sleep(0.1)  # released, being written or being taken over meanwhile: look again
        raise WorkdirInUseError(
            f'workdir {self.workdir}: could not claim {self.path}; other runs are starting'
        )

    def release(self) -> None:
        """Removes the claim if it is still this process's; stops the heartbeat."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        with contextlib.suppress(OSError):
            if self.path.exists() and self.path.read_text() == self._text:
                self.path.unlink()

    def _read(self) -> Holder | None:
        """The holder of the claim; None when there is none, or it is still being written."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError) as e:  # not a claim this code wrote, or half written: never taken over
            raise WorkdirInUseError(
                f'workdir {self.workdir} holds {self.path}, which cannot be read ({e}); if no run uses the '
                'workdir, delete the file'
            ) from e

    def _stale(self, held: Holder) -> str | None:
        """Why `held`'s claim is stale (its holder is gone), or None while it holds."""
        if held.host == self.holder.host:
            return None if _process_exists(held) else 'that process no longer exists'
        try:
            age = time.time() - self.path.stat().mtime
        except FileNotFoundError:
            return 'it was released'
        if age > STALE_SECONDS:
            return f'not refreshed for {age:.0f} s (a run refreshes it every {HEARTBEAT_SECONDS:.0f} s)'
        return None

    def _take_over(self, held: Holder) -> bool:
        """Removes `held`'s stale claim; whether it did. One run at a time takes over (it holds
        `claim.json.takeover` meanwhile), so that two runs that judged the same claim stale cannot both
        remove it, the second removing the first's fresh claim."""
        lock = epath.Path(f'{self.path}.takeover')
        if not _create_exclusive(lock, self._text):
            with contextlib.suppress(OSError):  # left by a run that died while taking over
                if time.time() - lock.stat().mtime > TAKEOVER_SECONDS:
                    lock.unlink()
            return False
        try:
            if self._read() != held:
                return False
            self.path.unlink()
            return True
        finally:
            lock.unlink()

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name='workdir-claim-heartbeat', daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if self.path.read_text() != self._text:
                    logging.warning('%s was taken over by another run; this run goes on.', self.path)
                    return
                if '://' in str(self.path):
                    self.path.write_text(self._text)
                else:
                    os.utime(self.path)
            except OSError as e:
                logging.warning('Could not refresh %s: %s', self.path, e)


@contextlib.contextmanager
def claimed(workdir: epath.PathLike) -> Iterator[None]:
    """Holds the claim of `workdir` for the block: process 0 claims, every process stops if it cannot.

    Raises:
      WorkdirInUseError: another run holds the workdir (in every process; process 0's message names the
        holder). Process 0 raises whatever else stopped its claim (an unwritable workdir); the others then
        raise WorkdirInUseError.
    """
    if jax.process_count() == 1:
        with Claim(workdir):
            yield
        return
    claim, error = None, None
    if jax.process_index() == 0:
        try:
            claim = Claim(workdir).acquire()
        except Exception as e:  # noqa: BLE001 - any failure (an unwritable workdir too) must reach every process
            error = e
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok:
        raise error or WorkdirInUseError(
            f'workdir {workdir}: process 0 could not claim it (its log says why)'
        )
    try:
        yield
    finally:
        if claim is not None:
            claim.release()
