"""A worker's memory budget (``dist.worker_memory_mb``), enforced on its own resident memory.

Ray's ``memory`` resource only schedules: a worker that reserved 4 GiB may use 40, until the kernel's OOM
killer ends it (or, on a shared node, another process) without a word. With a budget set, every worker runs
a :class:`MemoryGuard`: a daemon thread reads the process's peak resident set (Linux ``VmHWM``, which never
misses a peak between two readings) every ``interval_s`` seconds; the first reading over the budget records
the failure with the head coordinator (so the driver prints it in one line and no restart repeats it) and
ends the worker at once, as the OOM killer would, but with the rank, the phase, the peak and the setting.

Why not a kernel limit: ``RLIMIT_DATA`` and ``RLIMIT_AS`` count address space, not memory (a ZeRO-3 CPU worker
of bench/zero_memory.py: ``VmData`` 5.0 GB at a resident 2.8 GB), and a cgroup's limit reclaims the
memory-mapped weights of a ZeRO-0 worker (clean file pages) instead of refusing them, so neither tells a
budget that fits from one that does not.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from polar_vbll.peak import resident_peak

MIB = 2**20


def over_budget_message(rank: int, peak: int, budget: int, phase: str) -> str:
    """The one line a worker over its budget ends the run with (sizes in MiB)."""
    return (
        f"WorkerMemoryExceeded: rank {rank} reached {peak / MIB:,.0f} MiB resident during {phase}, over "
        f"dist.worker_memory_mb={budget // MIB}; raise it, or hold less per worker: --zero-stage 3 (the backbone "
        "partitioned over the workers), more workers, a smaller train.eval_batch_size"
    )


class MemoryGuard:
    """Watch this process's peak resident memory against ``budget`` bytes (see the module docstring).

    ``on_exceed(message)`` runs once, in the guard's thread, when the peak passes the budget (the worker
    records the failure there); then the process is killed (``SIGKILL``) unless ``kill=False`` (tests).
    ``phase`` names what the worker is doing, for the message. Use as a context manager or call
    :meth:`start` / :meth:`stop`."""

    def __init__(
        self, budget: int, rank: int, on_exceed: Callable[[str], None], interval_s: float = 0.02, kill: bool = True
    ) -> None:
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget, self.rank, self.on_exceed = budget, rank, on_exceed
        self.interval_s, self.kill = interval_s, kill
        self.phase = "start-up"
        self.exceeded: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="polar-vbll-memory-guard", daemon=True)

    def start(self) -> MemoryGuard:
        self.check()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> MemoryGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check(self, peak: int | None = None) -> bool:
        """One reading (or ``peak``, bytes, a phase's peak read elsewhere); True (and the failure handled)
        when it is over the budget."""
        if self.exceeded is not None:
            return True
        peak = resident_peak() if peak is None else peak
        if peak is None or peak <= self.budget:
            return False
        self.exceeded = over_budget_message(self.rank, peak, self.budget, self.phase)
        try:
            self.on_exceed(self.exceeded)
        finally:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.check():
                return
