"""polar-vbll's own JSON files, read back through one checked loader.

Every file a command wrote and a later command reads (a search's ``search.json``, a comparison's
``records.jsonl``, ...) may have been truncated by a full disk or a kill, or edited by hand. Read through
here, such a file is one line naming it and what to do (:class:`~polar_vbll.errors.CheckpointError`), never
a ``JSONDecodeError`` traceback. (Checkpoints, adapters, heads and readouts have their own checked loaders,
with content hashes: ``polar_vbll.checkpoint``, ``polar_vbll.adapters.state``, ``polar_vbll.readout``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from polar_vbll.errors import CheckpointError


def read_json(path: str | Path, what: str, fix: str, kind: type = dict) -> Any:
    """The JSON value of ``path`` (one of ours: ``what`` names it), which must be a ``kind``. Raises
    :class:`CheckpointError` for a file that cannot be read, is not JSON (truncated) or holds another kind
    of value (edited), saying ``fix``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is damaged or unreadable ({exc}); {fix}") from None
    if not isinstance(data, kind):
        got = type(data).__name__
        raise CheckpointError(f"{what} {path} holds a {got}, not a JSON {kind.__name__} (edited?); {fix}")
    return data


def read_records(path: str | Path, what: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file of ours that is a cache of finished work (a comparison's records):
    a damaged line (the last one cut by a kill or a full disk, or an edited one) is skipped with a warning
    naming it, so its work is done again instead of the command failing; the file is rewritten without it
    (atomically), so that records appended later start on a line of their own."""
    path = Path(path)
    out, bad = [], []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        if isinstance(record, dict):
            out.append(record)
        else:
            bad.append(lineno)
    if bad:
        warnings.warn(f"{what} {path}: line(s) {bad} damaged (cut by a kill or a full disk, or edited); their "
                      "runs are done again", stacklevel=2)  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in out))
        os.replace(tmp, path)
    return out


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: One folder name: no separator, no control character, not only whitespace.
_NAME_PART = re.compile(r"^(?=.*\S)[^/\\\x00-\x1f\x7f]+$")


def check_name(name: str, what: str | None = None, nested: bool = False) -> str:
    """A run, comparison or search name is a folder name under ``output_dir``: no ``/`` or ``\\``, no control
    character, never ``.`` or ``..``, never empty or absolute, so that nothing is written outside
    ``output_dir``. ``nested``: ``/``-separated parts are allowed (the names a comparison or an ensemble
    composes, ``<comparison>/<task>/<method>/seed0``); a name a user gives is one plain part. Raises
    ``ValueError`` saying what is wrong."""
    parts = name.split("/") if nested else [name]
    if any(not _NAME_PART.match(p) or p in (".", "..") for p in parts):
        subject = f"{what} {name!r} " if what else ""  # a config field's error names the field and value itself
        raise ValueError(
            f"{subject}must be a plain folder name under output_dir (no '/', '\\', '..', control characters or "
            "absolute path)"
        )
    return name
