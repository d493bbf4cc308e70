"""Adapter state shared by every adapter kind: strict loading of tensors, and switching the update off."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from polar_vbll.errors import CheckpointError


def names_preview(names: list[str], k: int = 8) -> str:
    """The first ``k`` names and how many more: error messages stay readable for big models."""
    return str(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def require_shapes(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, torch.Tensor], what: str
) -> None:
    """Check a file's tensor names and shapes against what the model needs, before anything is built, so
    a file for another architecture or config fails readably (``what`` names the file)."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != dict(expected):
        raise CheckpointError(
            f"{what}: tensor names or shapes differ (missing {names_preview(sorted(set(expected) - set(found)))}, "
            f"unexpected {names_preview(sorted(set(found) - set(expected)))}, or shapes differ)"
        )


@torch.no_grad()
def strict_copy_(
    params: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str
) -> None:
    """Copy ``state_dict`` into ``params``: every key present, no extra key, shapes equal, values finite.

    Everything is checked before anything is copied, so a bad file leaves the model as it was; the
    :class:`CheckpointError` lists every problem and names ``what`` (e.g. "adapter weights in <file>").
    """
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    problems = []
    if missing:
        problems.append(f"missing keys {names_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {names_preview(unexpected)}")
    for k in sorted(set(params) & set(state_dict)):
        t = state_dict[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            problems.append(f"{k}: not a floating-point tensor")
        elif tuple(t.shape) != tuple(params[k].shape):
            problems.append(f"{k}: shape {tuple(t.shape)} in file, {tuple(params[k].shape)} in model")
        elif not torch.isfinite(t).all():
            problems.append(f"{k}: contains NaN or inf")
    if problems:
        raise CheckpointError(f"{what} do not fit this model: " + "; ".join(problems))
    for k, p in params.items():
        p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))


@contextlib.contextmanager
def adapters_off(adapter) -> Iterator[None]:
    """Temporarily zero an adapter's ``update_parameters()`` (PoLAR's Theta, LoRA's B), so the adapted
    model computes exactly the base model; the values are restored on exit. One process only (a
    partitioned or engine-owned parameter must not be written behind its owner's back)."""
    params = list(adapter.update_parameters())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


#: The field of a saved adapter's JSON config that holds the digest of all its other fields.
CONFIG_DIGEST_KEY = "config_sha256"


def config_digest(fields: Mapping[str, Any]) -> str:
    """sha256 of a saved config's fields (its own digest field excluded), canonical JSON: any edit of a
    field a reload uses (alpha, rank, layers, the weights' hash) changes it."""
    body = {k: v for k, v in fields.items() if k != CONFIG_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_config_digest(fields: Mapping[str, Any], path: Any) -> None:
    """Refuse a saved adapter config whose fields were edited after it was written."""
    recorded = fields.get(CONFIG_DIGEST_KEY)
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: field {CONFIG_DIGEST_KEY!r} is missing")
    if config_digest(fields) != recorded:
        raise CheckpointError(
            f"{path} was altered after it was written (its content hash does not match): an edited field "
            "(alpha, r, layers, ...) would silently change what the adapter computes; restore the file or "
            "save the adapter again"
        )


def read_json_config(path: Any) -> dict[str, Any]:
    """A saved adapter's JSON config as a dict; a missing, unreadable or non-object file raises
    :class:`CheckpointError` naming it."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter config {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"adapter config {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"adapter config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Any, what: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (never a pickle); :class:`CheckpointError` naming ``what``
    and ``path`` when it is not a readable safetensors file (safetensors raises its own error types)."""
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as exc:  # safetensors' own error types: all mean an unreadable file
        raise CheckpointError(f"{what} {path} is not a readable safetensors file: {exc}") from None
