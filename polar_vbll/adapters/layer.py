"""``PolarLinear``: a frozen ``nn.Linear`` (or transformers' ``Conv1D``) plus the PoLAR update ``s * U Theta V^T``.

The layer owns only ``polar_theta`` (the free ``r x r`` core, a Euclidean parameter). Its Stiefel factors
U (out x r) and V (in x r) live in a :class:`~polar_vbll.adapters.bank.StiefelBank` that the layer reads
through a plain Python reference: the bank is deliberately *not* a child module, so the model's
``parameters()`` / ``state_dict()`` (what DeepSpeed or any engine sees) hold Theta but never U or V.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from polar_vbll.adapters.bank import StiefelBank
from polar_vbll.architecture import is_linear, linear_dims, transposed


class _BankRef:
    """A non-Module holder for the bank, so ``nn.Module.__setattr__`` does not register it as a child
    (which would put U, V back under the model and into DeepSpeed's hands)."""

    __slots__ = ("bank",)

    def __init__(self, bank: StiefelBank) -> None:
        self.bank = bank

    def __deepcopy__(self, memo: dict) -> _BankRef:
        # Deep-copying a whole PolarModel copies the bank once (via memo) and every layer points at the copy.
        return _BankRef(copy.deepcopy(self.bank, memo))


class PolarLinear(nn.Module):
    """``y = base(x) + s * ((x V) Theta^T) U^T`` with ``s = alpha / r``; ``U Theta V^T`` is never formed
    in the forward pass (it would cost ``out * in`` memory per layer per step).

    Precision: the low-rank path always runs in float32 (the input is cast up, the delta is cast back to
    the base output dtype). With a bf16 backbone this keeps the factors and Theta in fp32 end to end, so
    their gradients are fp32 too; the extra cost is an ``(tokens, r)`` fp32 intermediate, negligible at
    small r. A bf16 path would round ``x V`` to 8 bits of mantissa and make Theta's small early updates
    invisible.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        bank: StiefelBank,
        u_slot: str,
        v_slot: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"PolarLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        in_f, out_f = linear_dims(base_layer)
        for slot, n in ((u_slot, out_f), (v_slot, in_f)):
            shape = tuple(bank.factor(slot).shape)
            if shape != (n, r):
                raise ValueError(f"bank slot {slot!r} has shape {shape}, the layer needs {(n, r)}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = in_f
        self.out_features = out_f
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        # Theta = 0 at init, so the adapted model starts exactly at W0 while U, V are already orthonormal.
        self.polar_theta = nn.Parameter(
            torch.zeros(r, r, dtype=torch.float32, device=base_layer.weight.device)
        )
        self.polar_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.u_slot = u_slot
        self.v_slot = v_slot
        object.__setattr__(self, "_bank_ref", _BankRef(bank))
        self.merged = False
        self._merge_versions: tuple[int, ...] | None = None

    # ------------------------------------------------------------------------------------------ factors
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (``W0``, or ``W0 + delta`` while merged), for model code that reads a
        linear layer's ``.weight`` (its dtype, device or values), as peft's layers expose it too."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def bank(self) -> StiefelBank:
        """The bank this layer reads U, V from (not a submodule; see the module docstring)."""
        return self._bank_ref.bank

    def set_bank(self, bank: StiefelBank) -> None:
        """Point the layer at another bank holding the same slots (e.g. after a deep copy of the bank)."""
        for slot, n in ((self.u_slot, self.out_features), (self.v_slot, self.in_features)):
            if tuple(bank.factor(slot).shape) != (n, self.r):
                raise ValueError(f"bank slot {slot!r} has the wrong shape for this layer")
        self._bank_ref.bank = bank

    @property
    def U(self) -> torch.Tensor:  # noqa: N802  (the method's own notation)
        """``(out, r)`` left factor (a view into the bank)."""
        return self.bank.factor(self.u_slot)

    @property
    def V(self) -> torch.Tensor:  # noqa: N802
        """``(in, r)`` right factor (a view into the bank)."""
        return self.bank.factor(self.v_slot)

    def delta_weight(self) -> torch.Tensor:
        """``s * U Theta V^T`` as an ``(out, in)`` float32 matrix (for merging, export and diagnostics;
        the forward pass never builds it)."""
        return self.scaling * (self.U @ self.polar_theta.float()) @ self.V.T

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        h = self.polar_dropout(x).to(torch.float32)
        # F.linear with V^T made contiguous: `h @ V` on an (in, r) row-major V is 1.6-1.7x slower forward +
        # backward on CPU (bench/polar_fixes.py); the scale is folded into the r x r core, sparing one pass
        # over the (tokens x out) output forward and backward
        hv = F.linear(h, self.V.T.contiguous())
        delta = F.linear(F.linear(hv, self.scaling * self.polar_theta.float()), self.U)
        return result + delta.to(result.dtype)

    # -------------------------------------------------------------------------------------- merge/unmerge
    def _versions(self) -> tuple[int, ...]:
        # In-place updates (optimizer steps, retractions, load_state_dict) bump a tensor's version counter.
        slots = self.bank.slots
        return (
            self.polar_theta._version,
            self.bank.polar_groups[slots[self.u_slot][0]]._version,
            self.bank.polar_groups[slots[self.v_slot][0]]._version,
        )

    def _stored(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (out, in) laid out as the base weight is stored: transposed for a ``Conv1D``."""
        return delta.T if transposed(self.base_layer) else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``s U Theta V^T`` into the base weight; forward then skips the adapter path.

        Idempotent: merging a merged layer is a no-op (the ``merged`` flag guards against adding the
        delta twice). With a bf16 base weight the sum is rounded to bf16, so merge + unmerge restores
        ``W0`` only up to bf16 rounding; in fp32 it is exact to ~1e-7.
        """
        if self.merged:
            return
        w = self.base_layer.weight
        w.add_(self._stored(self.delta_weight()).to(device=w.device, dtype=w.dtype))
        self.merged = True
        self._merge_versions = self._versions()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta merged by :meth:`merge` (no-op when not merged).

        Raises ``RuntimeError`` if Theta or the layer's factor groups were modified while merged: the
        current delta would then differ from the one added, and subtracting it would not restore ``W0``.
        """
        if not self.merged:
            return
        if self._merge_versions is not None and self._versions() != self._merge_versions:
            raise RuntimeError(
                f"PolarLinear(u_slot={self.u_slot!r}): Theta or the Stiefel factors changed while the layer "
                "was merged; unmerging would not restore the base weight. Unmerge before training."
            )
        w = self.base_layer.weight
        w.sub_(self._stored(self.delta_weight()).to(device=w.device, dtype=w.dtype))
        self.merged = False
        self._merge_versions = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}, u_slot={self.u_slot!r}, v_slot={self.v_slot!r}"
        )


def stable_rank(u: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> float:
    """Stable rank ``||dW||_F^2 / ||dW||_2^2`` of ``dW = U Theta V^T`` (the scale cancels).

    Computed from the actual factors, without forming ``dW``: with ``U = Q_u R_u`` and ``V = Q_v R_v``
    (thin QR), ``dW`` has the singular values of the ``r x r`` matrix ``R_u Theta R_v^T``. This stays
    honest when U, V have drifted off the manifold (landing steps). Returns 0.0 for ``dW = 0`` (no update
    yet, e.g. right after init).
    """
    u64, t64, v64 = (t.detach().to(torch.float64) for t in (u, theta, v))
    ru = torch.linalg.qr(u64, mode="r").R
    rv = torch.linalg.qr(v64, mode="r").R
    sv = torch.linalg.svdvals(ru @ t64 @ rv.T)
    top = sv.max().item() if sv.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((sv.square().sum() / (top * top)).item())
