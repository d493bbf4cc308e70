"""Candidate library fixes found by the benchmarks, applied to *one model instance* by monkeypatching inside
the benchmark process (the library files are not touched). ``bench/polar_fixes.py`` measures them and
checks that they compute the same thing; ``bench/gpu.py`` measures them on the GPU.

1. ``fold``: ``PolarLinear.forward`` multiplies the ``(tokens, out)`` delta by ``s = alpha / r``;
   folding ``s`` into the ``r x r`` core instead (``(h V) (s Theta)^T U^T``) removes one full elementwise
   pass over ``(tokens, out)`` per adapted layer in the forward and one in the backward.
2. ``unbind``: ``StiefelBank.factor`` returns ``group[idx]``; every such ``select`` has a backward
   that allocates a zero ``(G, n, r)`` gradient for the whole group and adds it into the group's gradient,
   so one backward costs ``O(G^2 n r)`` per shape group (G = factors of that shape: 132 for the n = 2048
   group of a 22-layer model with q, k, v, up, down adapted). Unbinding each group once per forward
   (``group.unbind(0)``, whose backward stacks the G slices once) makes it ``O(G n r)``.
3. ``vt``: the first product ``h @ V`` with V stored ``(in, r)`` row-major is 1.6-1.7x slower on CPU
   (MKL, fp32, N = r = 8) forward + backward than the same product with V laid out as LoRA's A
   (``(r, in)`` row-major, i.e. ``F.linear(h, V.T.contiguous())``); the copy of V costs ``in x r``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _make_forward(fold: bool, vt: bool):
    """``PolarLinear.forward`` with fix 1 (``fold``) and/or fix 3 (``vt``); same maths, same precision
    policy as the library's (the low-rank path in fp32, cast back to the base output dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        h = self.polar_dropout(x).to(torch.float32)
        hv = F.linear(h, self.V.T.contiguous()) if vt else h @ self.V
        if fold:
            delta = (hv @ (self.scaling * self.polar_theta.float()).T) @ self.U.T
            return result + delta.to(result.dtype)
        delta = (hv @ self.polar_theta.float().T) @ self.U.T
        return result + (self.scaling * delta).to(result.dtype)

    return forward


def patch_forward(polar: nn.Module, fold: bool, vt: bool) -> int:
    """Patch every ``PolarLinear`` of ``polar`` (a ``PolarModel``); returns how many."""
    fwd = _make_forward(fold, vt)
    n = 0
    for _, layer in polar.polar_layers():
        layer.forward = types.MethodType(fwd, layer)
        n += 1
    return n


def _factor_from_views(self, name: str) -> torch.Tensor:
    """``StiefelBank.factor`` reading the per-forward unbound views when a forward is running."""
    key, idx = self._slots[name]
    views = self.__dict__.get("_bench_views")
    if views is not None:
        return views[key][idx]
    return self.polar_groups[key][idx]


def unbind_views(polar: nn.Module) -> None:
    """Make ``polar``'s bank hand out views of ``group.unbind(0)``, computed once per forward of the decoder
    (a forward pre-hook) and dropped after it (a forward hook); outside a decoder forward the library's
    behaviour is unchanged."""
    from polar_vbll.backbone import decoder_of

    bank = polar.polar_bank
    bank.factor = types.MethodType(_factor_from_views, bank)
    decoder = decoder_of(polar.base_model)

    def pre(_module, _args):
        bank.__dict__["_bench_views"] = {k: p.unbind(0) for k, p in bank.groups()}

    def post(_module, _args, _out):
        bank.__dict__["_bench_views"] = None

    decoder.register_forward_pre_hook(pre)
    decoder.register_forward_hook(post)


FIXES = ("fold", "unbind", "vt")


def apply(polar: nn.Module, which: str) -> None:
    """``which``: fixes joined by "+", e.g. "fold+vt" (see the module docstring); "library": none."""
    parts = set(which.split("+")) - {"library"}
    if not parts <= set(FIXES):
        raise ValueError(f"unknown fix in {which!r}; known: {FIXES}")
    if parts & {"fold", "vt"}:
        patch_forward(polar, fold="fold" in parts, vt="vt" in parts)
    if "unbind" in parts:
        unbind_views(polar)
