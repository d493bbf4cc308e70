"""The on-disk store of a file's token ids: written once, read back memory-mapped, checked before trusted.

An entry is a folder ``<root>/<key>/`` of raw little-endian arrays and a ``meta.json`` (no pickle, nothing
executable):

- ``ids.bin``: every row's token ids back to back, uint32 (``(T,)``);
- ``offsets.bin``: int64 ``(N + 1,)``, row ``r`` is ``ids[offsets[r]:offsets[r + 1]]``;
- ``flags.bin``: uint8 ``(N,)``, per row: which prompt parts were shortened to fit (``FLAG_BITS``), and
  ``TOO_LONG`` for a row whose prompt cannot fit (its error in ``meta.json``'s ``errors``, raised only when a
  split that holds the row is encoded, as before);
- ``meta.json``: the format, what the key was made of, the row and token counts, each array file's size and
  sha256.

``<key>`` is the sha256 of everything the ids depend on (:func:`entry_key`; ``polar_vbll.token_file`` names
the parts). An entry is written into a temporary folder and renamed into place, so a crash leaves none;
opening one checks every file's size and sha256 against ``meta.json`` and the offsets' shape, and a damaged
or truncated entry is removed and rebuilt, never read. ``<root>`` is ``$POLAR_VBLL_TOKEN_CACHE``, else
``$POLAR_VBLL_CACHE/tokens``, else ``~/.cache/polar-vbll/tokens``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from polar_vbll.files import sha256_file

FORMAT_VERSION = 1
ARRAYS = {"ids": np.dtype("<u4"), "offsets": np.dtype("<i8"), "flags": np.dtype("u1")}
#: Per-row flag bits: the prompt parts ``fit_prompt`` shortened (``tasks.SHORTENABLE``), and a row whose
#: prompt cannot fit in ``max_length`` at all.
FLAG_BITS = {"passage": 1, "choices": 2, "question": 4}
TOO_LONG = 8


def default_root() -> Path:
    """``$POLAR_VBLL_TOKEN_CACHE``, else ``$POLAR_VBLL_CACHE/tokens``, else ``~/.cache/polar-vbll/tokens``."""
    explicit = os.environ.get("POLAR_VBLL_TOKEN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("POLAR_VBLL_CACHE", Path.home() / ".cache" / "polar-vbll")).expanduser() / "tokens"


def entry_key(parts: dict[str, Any]) -> str:
    """The folder name of an entry: sha256 (40 hex digits) of ``parts`` (JSON, sorted keys) and the format."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:40]


class Entry:
    """An opened, checked entry: ``ids`` (``numpy.memmap`` uint32), ``offsets`` (int64), ``flags`` (uint8),
    each read-only, and ``meta`` (``meta.json``). ``folder``: where it lives."""

    def __init__(self, folder: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.folder, self.meta = folder, meta
        self.ids, self.offsets, self.flags = arrays["ids"], arrays["offsets"], arrays["flags"]

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_entry(folder: Path, verify: bool = True) -> Entry:
    """Open the entry in ``folder`` memory-mapped. Raises ``ValueError`` saying what is wrong when it is
    incomplete or damaged: a missing or unreadable ``meta.json``, another format, a file whose size or
    (``verify``) sha256 differs from ``meta.json``, offsets that do not run from 0 to the number of ids."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"meta.json unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, not {FORMAT_VERSION}")
    counts = {"ids": int(meta["tokens"]), "offsets": int(meta["rows"]) + 1, "flags": int(meta["rows"])}
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in ARRAYS.items():
        path = folder / f"{name}.bin"
        want = counts[name] * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != want:
            raise ValueError(f"{path.name} is {size} bytes, not {want}")
        if verify and sha256_file(path) != meta["sha256"][name]:
            raise ValueError(f"{path.name} does not match its sha256")
        arrays[name] = _map(path, dtype, counts[name])
    off = arrays["offsets"]
    if int(off[0]) != 0 or int(off[-1]) != counts["ids"] or (len(off) > 1 and bool((np.diff(off) < 0).any())):
        raise ValueError("offsets do not run from 0 to the number of ids")
    return Entry(folder, meta, arrays)


def write_entry(root: Path, key: str, parts: dict[str, Any], rows: Iterable[tuple[list[int], int]],
                errors: dict[int, str]) -> Path:  # fmt: skip
    """Write an entry from ``rows`` (each row's token ids and flag byte, in store order; consumed once,
    streamed to disk) into ``<root>/<key>`` atomically; ``errors``: filled while ``rows`` is consumed (row
    -> message of a ``TOO_LONG`` row). Returns the folder (an entry another process renamed into place
    first is kept, and this one dropped)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        offsets, flags, total = array("q", [0]), bytearray(), 0  # 8 and 1 bytes a row
        hashes = {name: hashlib.sha256() for name in ARRAYS}
        with open(tmp / "ids.bin", "wb") as fh:
            for ids, flag in rows:
                blob = np.asarray(ids, dtype=ARRAYS["ids"]).tobytes()
                fh.write(blob)
                hashes["ids"].update(blob)
                total += len(ids)
                offsets.append(total)
                flags.append(flag)
        for name, values in (("offsets", offsets), ("flags", flags)):
            blob = np.asarray(values, dtype=ARRAYS[name]).tobytes()
            (tmp / f"{name}.bin").write_bytes(blob)
            hashes[name].update(blob)
        meta = {"format": FORMAT_VERSION, "key": parts, "rows": len(flags), "tokens": total,
                "sha256": {name: h.hexdigest() for name, h in hashes.items()},
                "errors": {str(r): msg for r, msg in errors.items()}}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        target = root / key
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote the entry first: keep it
            if not (target / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise


def remove_entry(folder: Path) -> None:
    """Delete a damaged entry (a missing one is fine)."""
    shutil.rmtree(folder, ignore_errors=True)
