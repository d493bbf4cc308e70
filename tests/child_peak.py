"""Run ``polar-vbll`` in a child process and read the child's own peak resident memory.

``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (and the child's own ``RUSAGE_SELF``) is no measure of a
command's memory under pytest: Linux keeps a process's high-water mark across ``exec``, so a child forked
from a large pytest process starts with the parent's resident size as its maximum. The child here prints
its ``VmHWM`` (the peak of its own address space, which ``exec`` replaces) when the command ends, with the
peaks before the command's own resets folded in (``polar_vbll.peak.lifetime_resident_peak``: a run resets
``VmHWM`` to measure its test prediction's peak, so the bare ``VmHWM`` at the end missed all before it).
"""

from __future__ import annotations

import subprocess
import sys

_CODE = (
    "import sys\n"
    "from polar_vbll_cli.app import app\n"
    "try:\n"
    "    app(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code or 0\n"
    "else:\n"
    "    code = 0\n"
    "from polar_vbll.peak import lifetime_resident_peak\n"
    "print('\\nPEAK_BYTES', lifetime_resident_peak())\n"
    "sys.exit(code)\n"
)


def run_cli_measured(args: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, int]:
    """``polar-vbll ARGS`` in a child (``subprocess.run`` keyword arguments pass through; output captured as
    text); returns the completed process (the PEAK line removed from its stdout) and its peak RSS in bytes."""
    proc = subprocess.run([sys.executable, "-c", _CODE, *args], capture_output=True, text=True, **kwargs)
    out, _, peak = proc.stdout.rpartition("\nPEAK_BYTES ")
    proc.stdout = out
    return proc, int(peak.strip() or 0)
