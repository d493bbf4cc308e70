"""The head's view of the backbone's features: standardised with training-set statistics and extended
by a constant 1 (the bias), so a head's prior means the same at every feature scale.

An LLM's final hidden state is far from the O(1), centred features a width-scaled prior assumes:
SmolLM2-135M's has norm about 44 and a large component common to every prompt, so a ``N(0, 2/d)`` prior on
raw features puts a prior logit variance of about 7 on every class. A :class:`FeatureMap` stores the
per-feature mean ``mu`` and standard deviation ``s`` of the training features and maps

    x = [ (phi - mu) / s , 1 ]      (B, d) -> (B, D),  D = d + 1 with the bias column, else d

identically in training and at prediction (the statistics are buffers of the head, saved with it).
Standardisation makes every head on ``x`` invariant to an affine rescaling of the features
``phi -> a * phi + c`` (per-feature ``a > 0``): ``x`` itself is unchanged. The bias column gives the
centred features back the class offsets that centring removes; it gets the same prior as the weights.

With ``standardize`` off, ``mu = 0`` and ``s = 1`` (only the bias column, if on, is added).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: A feature whose training standard deviation is below this fraction of the largest one is treated as
#: constant (its scale is set to 1, so it maps to 0 instead of amplifying round-off).
_CONSTANT_FEATURE = 1e-6


class FeatureMapConfig(BaseModel):
    """How every trainable head sees the features ([choice]s, ``head.features`` in a run config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    standardize: bool = Field(
        True,
        description="[choice] standardise each feature with the training set's mean and standard deviation "
        "(stored in the head) before the head, so its prior does not depend on the backbone's feature scale",
    )
    bias: bool = Field(
        True, description="[choice] append a constant 1 to the features: a per-class bias under the same prior"
    )


class FeatureMap(nn.Module):
    """``x = [(phi - shift) / scale, 1]`` (see the module docstring). ``shift`` and ``scale`` (d,) are
    buffers, identity until :meth:`fit`; ``fitted`` records whether statistics were set."""

    def __init__(self, in_features: int, config: FeatureMapConfig | None = None, dtype=torch.float32) -> None:
        super().__init__()
        self.config = config or FeatureMapConfig(standardize=False, bias=False)
        self.in_features = in_features
        self.register_buffer("shift", torch.zeros(in_features, dtype=dtype))
        self.register_buffer("scale", torch.ones(in_features, dtype=dtype))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def out_features(self) -> int:
        """D: ``d + 1`` with the bias column, else ``d``."""
        return self.in_features + int(self.config.bias)

    @property
    def standardizes(self) -> bool:
        return self.config.standardize

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, standardize={self.config.standardize}"

    @torch.no_grad()
    def statistics(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` (d,) of ``phi`` (N, d) computed in float64; constant features get std 1."""
        if phi.dim() != 2 or phi.shape[1] != self.in_features or phi.shape[0] < 2:
            raise ValueError(
                f"feature statistics need phi of shape (N >= 2, {self.in_features}), got {tuple(phi.shape)}"
            )
        x = phi.detach().to(torch.float64)
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        constant = std <= _CONSTANT_FEATURE * std.max().clamp_min(torch.finfo(torch.float64).tiny)
        return mean, torch.where(constant, torch.ones_like(std), std)

    @torch.no_grad()
    def fit(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the statistics from training features ``phi`` (N, d) (a no-op map without ``standardize``);
        returns the previous ``(shift, scale)`` so a caller can re-express weights in the new coordinates
        (:meth:`reexpress`)."""
        old = (self.shift.clone(), self.scale.clone())
        if self.config.standardize:
            mean, std = self.statistics(phi)
            self.shift.copy_(mean.to(self.shift.dtype))
            self.scale.copy_(std.to(self.scale.dtype))
        self.fitted.fill_(True)
        return old

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, D) in phi's dtype (at least fp32)."""
        dtype = torch.float64 if phi.dtype == torch.float64 else torch.float32
        x = phi.to(dtype)
        if self.config.standardize:
            x = (x - self.shift.to(dtype)) / self.scale.to(dtype)
        if self.config.bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=dtype, device=x.device)], dim=1)
        return x

    @torch.no_grad()
    def from_raw(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The (K, D) float64 weight on ``x`` that computes the same logits as ``weight @ phi + bias`` on raw
        features: ``W diag(scale)``, and ``W shift + b`` in the bias column. Without a bias column that
        offset cannot be represented and is dropped (the logits then differ by a per-class constant)."""
        w = weight.to(torch.float64)
        out = w * self.scale.to(w)
        if not self.config.bias:
            return out
        offset = w @ self.shift.to(w) + (bias.to(w) if bias is not None else 0.0)
        return torch.cat([out, offset.unsqueeze(1)], dim=1)

    @torch.no_grad()
    def to_raw(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`from_raw`: ``(W_raw (K, d), b (K,))`` with ``W_raw phi + b = weight @ x``."""
        w = weight.to(torch.float64)
        w_raw = w[:, : self.in_features] / self.scale.to(w)
        b = (w[:, self.in_features] if self.config.bias else torch.zeros(w.shape[0], dtype=w.dtype)) - (
            w_raw @ self.shift.to(w)
        )
        return w_raw, b

    @torch.no_grad()
    def reexpress(self, weight: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``weight`` (K, D), valid under the old statistics ``old = (shift, scale)``, re-expressed under the
        current ones so that the logits it computes do not change."""
        now = (self.shift.clone(), self.scale.clone())
        self.shift.copy_(old[0])
        self.scale.copy_(old[1])
        w_raw, b = self.to_raw(weight)
        self.shift.copy_(now[0])
        self.scale.copy_(now[1])
        return self.from_raw(w_raw, b).to(weight.dtype)
