"""One writer per output folder: a lock file taken before anything is written.

Two commands writing one run folder (two ``train`` started a second apart, ``calibrate`` while the run is
still training, two searches of one name) would mix their files: one run's checkpoints beside the other's
``config.yaml``. Every command that writes a folder (``train``, ``train --workers``, ``compare``, ``tune``,
``calibrate``) or a file (``predict --output``) holds a :class:`FolderLock` on it for as long as it writes.

The lock is a file created with ``O_EXCL`` (atomic on local filesystems and NFSv3+) holding the holder's
pid, host, command and start time. A second writer gets :class:`FolderBusy` (one line naming the holder).
A lock left by a process that died (same host, pid no longer alive, or the pid reused by a process that
started later) is stale: it is replaced, with a note. A lock held by this very process (a comparison's run
inside the comparison, a run's ensemble members) is re-entrant.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from polar_vbll.errors import UserInputError

LOCK_NAME = ".polar-vbll.lock"


class FolderBusy(UserInputError):
    """Another process is writing the folder; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _process_start(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch; Linux /proc), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _stale(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder is known to be gone: on this host, its pid is dead or belongs to a process
    that started after the lock was taken. A holder on another host is never presumed dead."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return True
    started = _process_start(pid)
    return started is not None and started > float(holder.get("time", 0)) + 1.0


class FolderLock:
    """The lock of ``target`` (a folder: ``<folder>/.polar-vbll.lock``; a file: ``<file>.lock`` beside it).
    Use as a context manager; ``what`` names the command in the lock for a second writer to read."""

    def __init__(self, target: str | Path, what: str | None = None, *, is_file: bool = False) -> None:
        target = Path(target).expanduser()
        self.target = target
        self.path = target.with_name(target.name + ".lock") if is_file else target / LOCK_NAME
        self.what = what or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:3])
        self.held = False
        self.created: Path | None = None  # the folder this lock created (removed again if left empty)

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderBusy` naming the holder. Creates the folder if needed (and
        removes it on release if the command left it empty: a refused run writes nothing)."""
        if not self.path.parent.exists():
            self.created = self.path.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what, "time": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return self  # this process holds it already (re-entrant; the outer holder releases)
                if not holder:  # being written this instant, or an empty file left by a crash
                    time.sleep(0.2)
                    holder = self._read()
                    if not holder and self.path.exists() and time.time() - self.path.stat().st_mtime > 5:
                        self.path.unlink(missing_ok=True)
                    continue
                if _stale(holder):
                    print(f"note: replacing a stale lock on {self.target} (pid {holder.get('pid')} on "
                          f"{holder.get('host')} is gone)", flush=True)  # fmt: skip
                    self.path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("time", 0))))
                raise FolderBusy(
                    f"{self.target} is being written by another process ({holder.get('command', '?')}, pid "
                    f"{holder.get('pid')} on {holder.get('host')}, since {since}); wait for it to finish, or "
                    f"choose another name (if that process is gone, delete {self.path})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FolderBusy(f"could not take the lock {self.path}; delete it if no other process writes {self.target}")

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
            if self.created is not None:
                with contextlib.suppress(OSError):  # only when nothing else was written into it
                    self.created.rmdir()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
