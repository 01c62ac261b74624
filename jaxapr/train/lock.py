"""One writer per directory: an exclusive lock held while a run (or gen_data) writes there.

Protocol. ``<dir>/.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds
the holder's record, JSON ``{"pid", "host", "started"}``.

- A second run while the holder lives cannot lock the file and fails at once with
  :class:`LockedError`, one line naming the holder's pid and host.
- The kernel drops a lock when its process exits in any way (kill -9 included), so the lock
  of a dead process is free: the next run takes it. A clean release deletes the file, so a
  record found by the one that takes the lock over names a holder that died without
  releasing it; :attr:`WorkdirLock.stale` keeps that record, and the run says so.
- Release deletes the file while still holding the lock. An acquirer checks after locking
  that the path still names the file it locked (if not, a holder released and deleted it in
  between) and tries again, so two processes never hold locks on different files of one path.

With several processes (``jaxapr.distributed``) only process 0 takes the lock (the others
share its file system and its outcome: :func:`hold` fails every process alike).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class LockedError(ValueError):
    """The directory is locked by another living process."""


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _read(fd: int, wait_s: float = 1.0) -> dict:
    """The record in the lock file (a holder writes it right after locking: wait a moment
    for it); {} when there is none."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = os.pread(fd, 4096, 0)
        try:
            record = json.loads(raw.decode()) if raw else {}
            if isinstance(record, dict):
                return record
        except (UnicodeDecodeError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)


class WorkdirLock:
    """The lock of ``directory`` (see the module docstring); ``acquire`` / ``release`` or
    ``with WorkdirLock(d):``."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.stale: dict | None = None  # the record of a dead holder whose lock this one took over
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(
                    f"cannot create the lock file {self.path!r} ({e.strerror}): expected a writable directory"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise LockedError(
                    f"{self.directory!r} is in use by another run (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, since {holder.get('started', '?')}): expected one "
                    "writer per directory; wait for it to finish or use another directory"
                ) from None
            except OSError as e:
                os.close(fd)
                raise ValueError(
                    f"cannot lock {self.path!r} ({e.strerror}): expected a file system with file locks"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # released and deleted (or replaced) between our open and our lock
                os.close(fd)
                continue
            previous = _read(fd, wait_s=0)
            self.stale = previous or None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_record()).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise RuntimeError(f"could not lock {self.path!r}: the lock file kept changing under this process")

    def release(self) -> None:
        """Delete the lock file, then unlock it (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_stale(lock: WorkdirLock) -> str:
    """The line a run logs when it took over a dead holder's lock."""
    s = lock.stale or {}
    return (
        f"took over the lock of {lock.directory!r} from pid {s.get('pid', '?')} on host {s.get('host', '?')} "
        f"(since {s.get('started', '?')}), which stopped without releasing it"
    )


@contextlib.contextmanager
def hold(directory: str, log=print):
    """Hold ``directory``'s lock for the ``with`` block: process 0 takes it, and with several
    processes every process raises when it could not (so none writes, and none waits in a
    collective for the others)."""
    from jaxapr import distributed

    lock = distributed.run_on_main(lambda: WorkdirLock(directory).acquire())
    if lock is not None and lock.stale:
        log(describe_stale(lock))
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
