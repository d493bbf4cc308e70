"""A stand-in accelerator for device-consistency tests on a machine without one.

Tensors "on the accelerator" are :class:`OnAccelerator` wrappers that report torch's ``lazy`` device (a
device type this CPU build knows, with a device guard for autograd, and that torch does not special-case as
it does ``meta``) while holding real CPU values, so every computation runs and gives the real numbers.
:class:`FakeAccelerator` (a ``TorchDispatchMode``) sees every aten op and applies CUDA's rules:

- an op that mixes accelerator tensors with a CPU tensor of one or more dimensions raises
  :class:`DeviceMismatch` (CUDA raises "Expected all tensors to be on the same device"); 0-dim CPU tensors
  mix freely, as on CUDA; ``copy_`` crosses devices, as on CUDA;
- ``.to(ACCELERATOR)`` / a factory with that device puts values on the accelerator, ``.to("cpu")`` brings
  them back (counted in :attr:`FakeAccelerator.copies_to_host`);
- reading a value on the host (``.item()``, ``bool(t)``, ``.tolist()``: aten's ``_local_scalar_dense``) is
  a device sync: each one is recorded with the stack that asked for it (:attr:`FakeAccelerator.syncs`).

Outside the mode an accelerator tensor cannot be made or used: the tests load a model on the CPU, enter the
mode, then move it (``model.to(ACCELERATOR)``). Autograd works (the wrappers carry ``requires_grad``).
``torch.tensor(data, device=...)`` bypasses Python dispatch, so the code under test writes
``torch.tensor(data).to(device)`` (on CUDA the same host-to-device copy).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

#: The device the stand-in accelerator reports.
ACCELERATOR = torch.device("lazy")

_ACTIVE: list[FakeAccelerator] = []


class DeviceMismatch(RuntimeError):
    """An op mixed accelerator tensors with a CPU tensor (CUDA would refuse it)."""


class OnAccelerator(torch.Tensor):
    """A tensor on the stand-in accelerator: reports ``lazy``, holds real CPU values in ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=ACCELERATOR, requires_grad=elem.requires_grad,
        )  # fmt: skip
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"OnAccelerator({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if not _ACTIVE:
            raise RuntimeError("an accelerator tensor was used outside FakeAccelerator")
        return _ACTIVE[-1].__torch_dispatch__(func, types, args, kwargs)


def _unwrap(x):
    return x.elem if isinstance(x, OnAccelerator) else x


def _is_accelerator(device) -> bool:
    return device is not None and torch.device(device).type == ACCELERATOR.type


@dataclass
class Sync:
    """One host read of an accelerator value: the op and the frames of the Python stack that asked."""

    op: str
    stack: list[traceback.FrameSummary] = field(repr=False)

    def origin(self) -> str:
        """``file:line`` of the innermost frame outside torch itself: the code that read the value."""
        for f in reversed(self.stack):
            if "/site-packages/torch/" not in f.filename and "/fake_accelerator.py" not in f.filename:
                return f"{f.filename}:{f.lineno}"
        return "torch"

    def ours(self) -> bool:
        """Whether this project's code (``polar_vbll/``, ``distributed/``) read the value (not a library)."""
        origin = self.origin()
        return "site-packages" not in origin and ("/polar_vbll/" in origin or "/distributed/" in origin)


class FakeAccelerator(TorchDispatchMode):
    """The dispatch mode of the stand-in accelerator (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[Sync] = []
        self.copies_to_host = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_acc = any(isinstance(a, OnAccelerator) for a in tensors)
        if func is torch.ops.aten._to_copy.default:
            src, dev = args[0], kwargs.get("device")
            if _is_accelerator(dev) or (dev is None and isinstance(src, OnAccelerator)):  # onto, or within, the device
                return OnAccelerator(func(_unwrap(src), **{**kwargs, "device": torch.device("cpu")}))
            if isinstance(src, OnAccelerator):  # back to the host
                self.copies_to_host += 1
                return func(src.elem, **kwargs)
            return func(*args, **kwargs)
        if func is torch.ops.aten.copy_.default and on_acc:  # copy_ crosses devices on CUDA too
            dst, src = args[0], args[1]
            if isinstance(dst, OnAccelerator):
                dst.elem.copy_(_unwrap(src), *args[2:], **kwargs)
                return dst
            self.copies_to_host += 1
            return dst.copy_(src.elem, *args[2:], **kwargs)
        if on_acc:
            for a in tensors:
                if not isinstance(a, OnAccelerator) and a.dim() > 0 and a.device.type == "cpu":
                    raise DeviceMismatch(
                        f"{func.__name__}: a CPU tensor of shape {tuple(a.shape)} meets accelerator tensors"
                    )
        factory = _is_accelerator(kwargs.get("device"))
        if factory:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.ops.aten._local_scalar_dense.default and on_acc:
            self.syncs.append(Sync(func.__name__, traceback.extract_stack()[:-1]))
            return func(_unwrap(args[0]))
        args, kwargs = tree_map(_unwrap, (args, kwargs))
        out = func(*args, **kwargs)
        if on_acc or factory:
            return tree_map(lambda o: OnAccelerator(o) if isinstance(o, torch.Tensor) else o, out)
        return out

    def our_syncs(self) -> list[str]:
        """Where this project's code read accelerator values on the host (``file:line`` each)."""
        return [s.origin() for s in self.syncs if s.ours()]
