"""The deterministic head: LM-head rows of the answer-letter tokens applied to phi (the MLE baseline).

Knows nothing of any trainer: it maps features to logits and probabilities and computes its loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_logits(logits: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
    """Set the logits of letters beyond each question's number of choices to -inf (questions of one task
    may have 3, 4 or 5 choices; K is the maximum)."""
    k = logits.shape[-1]
    valid = torch.arange(k, device=logits.device).unsqueeze(0) < n_choices.unsqueeze(1)
    return logits.masked_fill(~valid, float("-inf"))


class DeterministicHead(nn.Module):
    """``z = W phi + b`` with W the answer-token rows of the LM head. Frozen by default: PoLAR-MLE trains
    the adapters only, so the head stays the model's own next-token head restricted to the letters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, trainable: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone(), requires_grad=trainable)
        self.bias = (
            nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=trainable)
            if bias is not None
            else None
        )

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def logits(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        z = phi.to(torch.float32) @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        return masked_logits(z, n_choices)

    def loss(self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch."""
        return F.cross_entropy(self.logits(phi, n_choices), labels)

    @torch.no_grad()
    def predict_proba(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(phi, n_choices), dim=-1)
