"""The backbone as a feature extractor: ``phi(x)``, the final post-norm hidden state at the last *real*
prompt token, read from the decoder body only (the full-vocabulary LM head is never applied to every
position); the LM-head rows of the answer letters (the zero-shot head); and :class:`SplitDecoder`, the
frozen-prefix / adapted-suffix views of the cheap path."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from polar_vbll.errors import UserInputError


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder body (embeddings, blocks, final norm) of a causal LM, without its LM head."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise UserInputError(f"cannot find the decoder blocks of {type(model).__name__}")
    return decoder


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a prompt gets the same positions under any padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: -1 under left padding is only right by accident under
    right padding, so compute it from the mask."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def gather_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    idx = last_token_index(mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def last_token_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``phi(x)``: final post-norm hidden state at the last real token, ``(B, d)``, via the decoder only."""
    out = decoder_of(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return gather_last(out.last_hidden_state, attention_mask)


def answer_head_weight(
    model: nn.Module, answer_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM-head rows of the answer tokens (fp32 copies): the deterministic class-logit head."""
    head = model.get_output_embeddings()
    rows = torch.tensor(list(answer_ids), dtype=torch.long).to(head.weight.device)
    weight = head.weight[rows].detach().to(torch.float32).clone()
    bias = head.bias[rows].detach().to(torch.float32).clone() if head.bias is not None else None
    return weight, bias


# --------------------------------------------------------------------------------------------------------
# The cheap path: cache the frozen prefix, run only the adapted top blocks


class SplitDecoder:
    """Views of one decoder as a frozen *prefix* (blocks below ``split``, no final norm) and a trainable
    *suffix* (blocks from ``split`` on, plus the final norm), sharing the original modules.

    When only the top blocks carry adapters, the prefix's output never changes during training, so it is
    computed once per example (no grad) and the suffix alone runs each step: the cost of a step falls with
    the share of blocks adapted. The views reuse the decoder's own forward (masking, rotary embeddings), so
    the suffix computes exactly what the full model computes.
    """

    def __init__(self, model: nn.Module, split: int):
        decoder = decoder_of(model)
        n = len(decoder.layers)
        if not 0 <= split <= n:
            raise UserInputError(f"split block {split} is outside 0..{n}")
        if not hasattr(decoder, "norm"):
            raise UserInputError(
                f"{type(decoder).__name__} has no final `norm`; the cached-prefix path needs one"
            )
        self.split = split
        self.prefix = self._view(decoder, decoder.layers[:split], nn.Identity())
        self.suffix = self._view(decoder, decoder.layers[split:], decoder.norm)

    @staticmethod
    def _view(decoder: nn.Module, layers: nn.ModuleList, norm: nn.Module) -> nn.Module:
        view = copy.copy(decoder)
        view._modules = dict(decoder._modules)
        view.layers = nn.ModuleList(list(layers))
        view.norm = norm
        return view

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block ``split`` for a padded batch, ``(B, T, d)``."""
        out = self.prefix(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def features(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` from cached prefix states (gradients flow into the suffix's adapters)."""
        out = self.suffix(
            inputs_embeds=states,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return gather_last(out.last_hidden_state, attention_mask)
