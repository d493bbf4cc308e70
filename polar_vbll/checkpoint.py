"""Checkpoints that resume exactly and cannot be silently corrupted.

A checkpoint is a directory holding ``state.safetensors`` (every tensor: adapter, head, optimizer moments,
RNG states) and ``meta.json`` (everything else: step, config, the non-tensor skeleton of optimizer state
dicts, and the sha256 of the safetensors file). Nothing is pickled, so loading a checkpoint cannot run
code. Writing goes to a temporary directory that is renamed into place, so an interrupted run leaves its
last complete checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polar_vbll.errors import CheckpointError
from polar_vbll.files import sha256_file

FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_TENSOR_TAG = "__tensor__"


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference, collecting tensors by name, so that an
    optimizer ``state_dict`` becomes JSON plus a flat safetensors dict."""
    if isinstance(obj, torch.Tensor):
        name = prefix.rstrip("/")
        tensors[name] = obj.detach().cpu().contiguous()
        return {_TENSOR_TAG: name}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), split_tensors(v, f"{prefix}{k}/", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [split_tensors(v, f"{prefix}{i}/", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def _key(k: Any) -> Any:
    if isinstance(k, (int, str)):
        return k
    raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__}")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if _TENSOR_TAG in obj:
            return tensors[obj[_TENSOR_TAG]]
        if "__dict__" in obj:
            return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states (torch's as a tensor; with CUDA, every visible device's generator
    too: adapter dropout on a GPU draws from it)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states; the CUDA generators only where the same number of devices is
    visible (a run resumed on another machine continues with its own CUDA streams of random numbers)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) atomically to ``directory``."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors(state, "", tensors)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        save_file(tensors, str(tmp / STATE_FILE))
        meta = {"format_version": FORMAT_VERSION, "sha256": sha256_file(tmp / STATE_FILE), "state": skeleton}
        (tmp / META_FILE).write_text(json.dumps(meta))
        if final.exists():
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint, verifying its content hash first; any damage raises CheckpointError."""
    d = Path(directory)
    meta_path, state_path = d / META_FILE, d / STATE_FILE
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist")
    for p in (meta_path, state_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d} is incomplete: {p.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {meta_path} is damaged: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {d} has format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    digest = sha256_file(state_path)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {state_path} is truncated or altered (sha256 {digest[:12]}... does not match "
            f"the recorded {str(meta.get('sha256'))[:12]}...)"
        )
    try:
        tensors = load_file(str(state_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file {state_path} cannot be read: {exc}") from None
    return join_tensors(meta["state"], tensors)


def newest_intact(candidates: list[Any], load) -> dict[str, Any] | None:
    """The state of the newest candidate that ``load`` reads without a :class:`CheckpointError`
    (``candidates`` oldest first); a damaged newer one is skipped with a warning naming it (an interrupted
    copy or a full disk must not block a resume that an older checkpoint can serve). None without
    candidates; the newest one's error when every one is damaged. One rule for one process and workers."""
    import warnings

    damaged: list[CheckpointError] = []
    for candidate in reversed(candidates):
        try:
            state = load(candidate)
        except CheckpointError as exc:
            damaged.append(exc)
            continue
        if damaged:
            warnings.warn(f"{damaged[0]}; resuming from the older intact {candidate} instead", stacklevel=2)
        return state
    if damaged:
        raise damaged[0]
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints ``checkpoint-<step>`` of a run written in one process, oldest first (what
    :func:`prune_checkpoints` prunes; :func:`run_checkpoints` lists the workers' ones too)."""
    run = Path(run_dir)
    found = []
    for p in run.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / META_FILE).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


#: What Ray Train keeps of a run in its storage folder besides its ``checkpoint_<time>`` folders: its resume
#: state (a fresh start removes it with the checkpoints, or Ray would hand the new run an old checkpoint).
RAY_STATE_FILES = ("checkpoint_manager_snapshot.json", ".validate_storage_marker")
_RAY_STATE_PREFIXES = ("experiment_state", "trainer_state", "run_state")


def saved_step(directory: Path) -> float:
    """The step recorded in a checkpoint's ``meta.json`` (JSON only, the tensors are not read); infinity
    when it cannot be read, so that a damaged checkpoint is tried first and skipped with a warning."""
    try:
        skeleton = json.loads((directory / META_FILE).read_text())["state"]
        return float(dict(skeleton["__dict__"])["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("inf")


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every checkpoint of a run folder, whichever entry point wrote it, oldest first: one process's
    ``checkpoint-<step>/`` and the workers' ``checkpoint_<time>/state/`` (Ray Train's folders), ordered by
    the step they hold, then by when they were written. The last intact one is where a rerun resumes, in one
    process or on any number of workers (docs/distributed.md, "Resuming on another number of workers")."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = list_checkpoints(run) + [p / "state" for p in run.glob("checkpoint_*") if (p / "state").is_dir()]

    def order(p: Path) -> tuple[float, float]:
        try:
            written = (p / META_FILE).stat().st_mtime
        except OSError:
            written = float("inf")
        return saved_step(p), written

    return sorted(found, key=order)


def clear_run_checkpoints(run_dir: str | Path) -> int:
    """Remove every checkpoint of a run folder (both kinds, see :func:`run_checkpoints`) and Ray Train's
    resume state: a fresh start (``--no-resume``), in one process or on workers. Returns how many there
    were."""
    run = Path(run_dir)
    if not run.is_dir():
        return 0
    found = [p for p in run.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    found += [p for p in run.glob("checkpoint_*") if p.is_dir()]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    for name in RAY_STATE_FILES:
        (run / name).unlink(missing_ok=True)
    for p in run.glob("*.json"):  # Ray Train's own state files (ours are named otherwise)
        if p.name.startswith(_RAY_STATE_PREFIXES):
            p.unlink(missing_ok=True)
    return len(found)
