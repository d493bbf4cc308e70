"""Measured peak memory of one phase of a run (the test split's prediction: the paper's Table 3 column).

:class:`PeakMemory` resets the peak at the start of the phase and reads it at the end:

- on a CUDA device: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (``kind``
  ``cuda_max_allocated``: the tensors torch allocated, not the allocator's reserved pool);
- on the CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``) after writing ``5`` to
  ``/proc/self/clear_refs``, which resets it to the current resident set (Linux 4.0+; ``kind`` ``rss_peak``).
  Where that reset is refused the reading is the process's lifetime peak (``getrusage``'s ``ru_maxrss``;
  ``kind`` ``rss_process_peak``): in a comparison, the largest of every run so far, so not one method's.

Either way it is the whole process's (or device's) memory at its peak in the phase: the backbone's weights,
the cached features and the predictive's working set, not the predictive's increment alone.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def resident_peak() -> int | None:
    """This process's peak resident set in bytes (``VmHWM``), None where /proc is not readable."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


#: The largest ``VmHWM`` this process had before any reset made here (``_reset_rss_peak``), in bytes.
_BEFORE_RESETS = 0


def lifetime_resident_peak() -> int | None:
    """This process's peak resident set since it started, in bytes: ``VmHWM`` with the peaks before each of
    this module's resets folded in (a run resets ``VmHWM`` to measure a phase, :class:`PeakMemory`,
    :class:`PhasePeaks`; read alone at the end, ``VmHWM`` would be the peak since the last reset only). None
    where /proc is not readable. What a command's whole-run peak is read from (``tests/child_peak.py``)."""
    now = resident_peak()
    return None if now is None else max(now, _BEFORE_RESETS)


def _reset_rss_peak() -> bool:
    global _BEFORE_RESETS
    before = resident_peak()
    if before is not None:
        _BEFORE_RESETS = max(_BEFORE_RESETS, before)
    try:
        _CLEAR.write_text("5")
    except OSError:
        return False
    return resident_peak() is not None


def _process_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``, then ``peak.report()``: ``{"bytes": int, "kind": str,
    "device": str}`` for the code inside the block (see the module docstring for the kinds)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.kind = ""
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "rss_peak" if _reset_rss_peak() else "rss_process_peak"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            hwm = resident_peak() if self.kind == "rss_peak" else None
            self.bytes = hwm if hwm is not None else _process_peak()

    def report(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "kind": self.kind, "device": str(self.device)}


class PhasePeaks:
    """Peak resident memory (bytes) of successive phases of this process, for the breakdown of a worker's
    peak (bench/zero_memory.py): ``mark(name)`` ends the phase that began at the previous mark (or at
    construction), records its peak (``VmHWM``) and resets the peak for the next one (``/proc/self/clear_refs``).
    Where the reset is refused each reading is the peak so far (phases then only grow), and ``resettable``
    is False. ``peak`` is the largest reading: the process's peak over all phases marked so far."""

    def __init__(self) -> None:
        self.resettable = _reset_rss_peak()
        self.phases: dict[str, int] = {}

    def mark(self, name: str) -> int:
        hwm = resident_peak()
        value = hwm if hwm is not None else _process_peak()
        self.phases[name] = value
        if self.resettable:
            _reset_rss_peak()
        return value

    @property
    def peak(self) -> int:
        return max(self.phases.values(), default=0)
