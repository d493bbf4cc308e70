"""Where a run computes: the device of the backbone and the dtype it runs in, resolved once per process.

``model.device`` names the device (``auto``: the first CUDA device when this process sees one, else the
CPU; ``cpu``; ``cuda``; ``cuda:N``); ``model.dtype`` the backbone's compute dtype (``auto``: bfloat16 on a
CUDA device that supports it, float32 otherwise). Everything else follows the backbone's device: token ids
and masks, cached prefix states (moved per batch), features, the heads that train in the step (fp32). U, V,
Theta and every head stay fp32 whatever the backbone's dtype (``polar_vbll.adapters``, ``polar_vbll.heads``).

The full-batch float64 head fits (the eta-phase's L-BFGS, last-layer Laplace, the linear probe) run on the
CPU, on features copied there once per fit: ``docs/method-choices.md`` ("Where the head fits run") gives the
reasons and the measurements.

The resolution is the only place that asks torch which devices exist; nothing else in the method package
branches on a device. A device that is not there is a :class:`~polar_vbll.errors.ConfigError` (one line,
exit 2 on the command line) raised before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from polar_vbll.errors import ConfigError

if TYPE_CHECKING:
    from polar_vbll.config import ModelConfig, RunConfig

#: ``model.dtype`` names -> torch dtypes (``auto`` is resolved first, :func:`resolve_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: What ``model.device`` accepts.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def cuda_count() -> int:
    """CUDA devices this process sees (0 on a CPU-only build or machine)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` (``model.device``) names in this process. Raises :class:`ConfigError` for a CUDA
    device this process does not see, naming what it sees and what to set instead."""
    if not DEVICE_PATTERN.match(spec):
        raise ConfigError(f"model.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N")
    n = cuda_count()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if n else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if n == 0:
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"model.device={spec}, but {why} on this machine; use model.device=cpu (or auto)")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= n:
        raise ConfigError(f"model.device={spec}, but this process sees {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", index)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (CUDA compute capability 8.0 or newer)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(spec: str, device: torch.device) -> str:
    """The backbone dtype name ``spec`` (``model.dtype``) resolves to on ``device``: ``auto`` is bfloat16 on a
    CUDA device that supports it and float32 elsewhere; an explicit name is itself."""
    if spec != "auto":
        return spec
    return "bfloat16" if bf16_supported(device) else "float32"


@dataclass(frozen=True)
class Placement:
    """The resolved device of the backbone and its compute dtype (``dtype``: a :data:`DTYPES` name)."""

    device: torch.device
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def accelerated(self) -> bool:
        """Whether the backbone runs on an accelerator (pinned host memory, fused optimizers, deferred syncs)."""
        return self.device.type not in ("cpu", "meta")

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` (``placement``) and a run's params (``placement.*``) record."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return {"device": str(self.device), "device_name": name, "dtype": self.dtype,
                "adapter_dtype": "float32", "head_dtype": "float32", "head_fit_device": "cpu"}  # fmt: skip


def placement_for(model: ModelConfig, device: str | None = None) -> Placement:
    """Resolve ``model.device`` (or ``device``, an override such as ``eval --device``) and ``model.dtype`` in
    this process. Raises :class:`ConfigError` (see :func:`resolve_device`)."""
    dev = resolve_device(device or model.device)
    return Placement(dev, resolve_dtype(model.dtype, dev))


def effective_dtype(model: ModelConfig) -> str:
    """The dtype a backbone of ``model`` runs in here: ``model.dtype``, with ``auto`` resolved for this
    process's device (bfloat16 for a CUDA device this process does not see: what CUDA workers run). What a
    run's training settings compare (``polar_vbll.provenance``), so ``auto`` and what it resolved to agree."""
    if model.dtype != "auto":
        return model.dtype
    try:
        return resolve_dtype("auto", resolve_device(model.device))
    except ConfigError:
        return "bfloat16"


def resolved(cfg: RunConfig, placement: Placement | None = None) -> RunConfig:
    """``cfg`` with ``model.dtype`` resolved for ``placement`` (this process's by default): what a run records
    and resumes under, so ``auto`` never hides which precision trained a model. ``model.device`` stays as
    given (a run folder is evaluated on whatever device its reader has)."""
    placement = placement or placement_for(cfg.model)
    if cfg.model.dtype == placement.dtype:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": placement.dtype})})


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without stalling the host: on CUDA through pinned memory with an
    asynchronous copy (the copy is ordered on the stream, so a kernel reading it waits for it), elsewhere a
    plain ``.to``. A tensor already there is returned as is."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
