"""The Stiefel bank: the single store of every PoLAR factor U and V.

Why a bank instead of parameters inside each layer:

- Batched manifold steps. Factors of equal shape ``(n, r)`` live in one ``(G, n, r)`` parameter, so the
  optimizer projects, steps and retracts a whole group with one batched call (one Cholesky-QR for all
  q_proj U's, say) instead of hundreds of tiny ones.
- Distribution. DeepSpeed hands a client optimizer flattened 1-D partitions, which silently turns a
  Riemannian step into a Euclidean one (see docs/design.md). The distributed worker therefore keeps the
  bank *outside* the DeepSpeed engine and gives DeepSpeed only the model (with the Euclidean Theta's).
  The adapted layers read their factors through a plain Python reference to the bank, never as a child
  module, so ``model.parameters()`` does not contain U or V and the very same classes serve the
  single-process path and the distributed one.

Factors are always float32: a bf16 factor loses a 1e-4 step entirely and drifts off the manifold
(orthogonality error ~2e-3). The bank refuses any conversion to another floating dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from polar_vbll.errors import ConfigError
from polar_vbll.manifold import orthogonality_error, random_stiefel

#: Prefix of the bank's parameter container; every bank parameter name contains ``polar_``.
GROUPS_ATTR = "polar_groups"


@dataclass(frozen=True)
class SlotRequest:
    """One factor the bank must hold: a tall ``(n, r)`` orthonormal matrix known by ``name``."""

    name: str
    n: int
    r: int


def group_key(n: int, r: int) -> str:
    """Name of the group holding ``(n, r)`` factors, e.g. ``n576_r8`` (a valid ParameterDict key)."""
    return f"n{n}_r{r}"


def plan_slots(
    requests: Sequence[SlotRequest],
) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[int, int, int]]]:
    """The layout :meth:`StiefelBank.build` uses: slot -> (group key, index) in request order within each
    group, and group key -> (G, n, r). Pure, so a loader can check a saved layout before building."""
    counts: dict[str, int] = {}
    slots: dict[str, tuple[str, int]] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for q in requests:
        key = group_key(q.n, q.r)
        slots[q.name] = (key, counts.get(key, 0))
        counts[key] = counts.get(key, 0) + 1
        shapes[key] = (counts[key], q.n, q.r)
    return slots, shapes


def _refuse_dtype_change(fn: Callable[[torch.Tensor], torch.Tensor], where: str) -> None:
    """Raise before ``Module._apply(fn)`` would turn float32 factors into another dtype.

    ``nn.Module.to`` / ``.half()`` / ``.bfloat16()`` all reach ``_apply`` with an opaque closure; applying
    it to an empty fp32 probe tells what it would do to the factors, without touching them.
    """
    probe = fn(torch.empty(0, dtype=torch.float32))
    if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
        raise ConfigError(
            f"{where}: Stiefel factors must stay float32 (got a conversion to {probe.dtype}; in bf16 a "
            "1e-4 step vanishes and the factors drift off the manifold). Cast only the backbone, e.g. "
            "`polar_model.base_model.to(torch.bfloat16)`; the adapter computes in fp32 and casts its "
            "output back to the backbone dtype."
        )


class StiefelBank(nn.Module):
    """Every U and V, grouped by shape into ``(G, n, r)`` float32 parameters.

    ``slots`` maps a slot name (e.g. ``"model.layers.0.self_attn.q_proj.U"``) to ``(group key, index)``;
    ``factor(name)`` returns the ``(n, r)`` view of that slot, indexing the group parameter so that
    gradients flow into the group tensor the optimizer steps.
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], slots: dict[str, tuple[str, int]]) -> None:
        """Create zero-filled groups of the given ``(G, n, r)`` shapes; use :meth:`build` for random
        orthonormal factors. ``shapes`` and ``slots`` must agree (checked)."""
        super().__init__()
        self.polar_groups = nn.ParameterDict()
        for key in sorted(shapes):
            g, n, r = shapes[key]
            if key != group_key(n, r):
                raise ConfigError(f"StiefelBank: group key {key!r} does not match its shape (n={n}, r={r})")
            self.polar_groups[key] = nn.Parameter(torch.zeros(g, n, r, dtype=torch.float32))
        for name, (key, idx) in slots.items():
            if key not in shapes or not 0 <= idx < shapes[key][0]:
                raise ConfigError(f"StiefelBank: slot {name!r} points at ({key!r}, {idx}), which is absent")
        taken = [tuple(v) for v in slots.values()]
        if len(set(taken)) != len(taken):
            raise ConfigError("StiefelBank: two slots share one (group, index)")
        self._slots: dict[str, tuple[str, int]] = {k: (v[0], int(v[1])) for k, v in slots.items()}

    @classmethod
    def build(
        cls,
        requests: Sequence[SlotRequest | tuple[str, int, int]],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> StiefelBank:
        """A bank holding one random orthonormal factor per request.

        Factors are drawn one at a time in request order from ``generator``, so a slot's initial value
        depends only on the seed and on the requests before it (not on how shapes are grouped); within a
        group, slots keep request order.
        """
        reqs = [r if isinstance(r, SlotRequest) else SlotRequest(*r) for r in requests]
        names = [q.name for q in reqs]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"StiefelBank: duplicate slot names {dupes}")
        for q in reqs:
            if q.r <= 0 or q.n < q.r:
                raise ConfigError(f"StiefelBank: slot {q.name!r} needs n >= r > 0, got n={q.n}, r={q.r}")
        slots, shapes = plan_slots(reqs)
        bank = cls(shapes, slots)
        with torch.no_grad():
            for q in reqs:
                key, idx = slots[q.name]
                bank.polar_groups[key][idx].copy_(random_stiefel(n=q.n, r=q.r, generator=generator))
        if device is not None:
            bank.to(device)
        return bank

    # ----------------------------------------------------------------------------------------- access
    @property
    def slots(self) -> dict[str, tuple[str, int]]:
        """Slot name -> (group key, index) (a copy; the mapping is fixed at construction)."""
        return dict(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def factor(self, name: str) -> torch.Tensor:
        """The ``(n, r)`` factor of slot ``name``: a view into its group parameter (autograd flows into
        the group tensor; modifying the group changes what every reader sees).

        With autograd recording, the view is one of ``group.unbind(0)``, computed once per group and reused
        by every layer until the group changes (an optimizer step, a load, ``requires_grad``): the backward
        of an ``unbind`` stacks the G slices' gradients once, where ``group[idx]`` costs a zero ``(G, n, r)``
        gradient per factor, ``O(G^2 n r)`` per group per backward (bench/fixes.py, fix 2; issue #14).
        """
        try:
            key, idx = self._slots[name]
        except KeyError:
            raise KeyError(f"StiefelBank has no slot {name!r}") from None
        group = self.polar_groups[key]
        if not (torch.is_grad_enabled() and group.requires_grad):
            return group[idx]
        stamp = (group._version, group.data_ptr())
        views = self.__dict__.setdefault("_unbound", {})
        cached = views.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, group.unbind(0))
            views[key] = cached
        return cached[1][idx]

    def __getstate__(self) -> dict:
        # the cached views belong to this bank's autograd graph: never copied or pickled with it
        state = self.__dict__.copy()
        state.pop("_unbound", None)
        return state

    def groups(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(key, (G, n, r) parameter)`` for every shape group, in sorted key order (stable across
        ranks, which the distributed step relies on when it flattens all gradients into one buffer)."""
        for key in sorted(self.polar_groups.keys()):
            yield key, self.polar_groups[key]

    def orthogonality_errors(self) -> dict[str, torch.Tensor]:
        """Group key -> ``(G,)`` float64 tensor of ``||X^T X - I||_F`` per factor."""
        return {key: orthogonality_error(p) for key, p in self.groups()}

    def max_orthogonality_error(self) -> float:
        """The worst ``||X^T X - I||_F`` over every factor (0.0 for an empty bank)."""
        errs = [e.max().item() for e in self.orthogonality_errors().values() if e.numel()]
        return max(errs, default=0.0)

    # ---------------------------------------------------------------------------------------- dtype guard
    def _apply(self, fn, recurse=True):  # type: ignore[override]  # torch's signature is untyped
        _refuse_dtype_change(fn, "StiefelBank")
        out = super()._apply(fn, recurse)
        # QR factors are column-major; DeepSpeed broadcasts and flat all-reduces want plain row-major.
        for _, p in self.groups():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        return out
