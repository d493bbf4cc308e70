"""The backbone as a feature extractor: ``phi(x)``, the final post-norm hidden state at the last *real*
prompt token, read from the decoder body only (the full-vocabulary LM head is never applied to every
position); the LM-head rows of the answer letters (the zero-shot head); and :class:`SplitDecoder`, the
frozen-prefix / adapted-suffix views of the cheap path."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from polar_vbll.architecture import blocks_path, decoder_of
from polar_vbll.errors import UserInputError


def decoder_inputs(decoder: nn.Module, attention_mask: torch.Tensor) -> dict:
    """The keyword arguments every decoder call here gets beside the tokens: the mask, ``use_cache=False``,
    and positions that count real tokens only (:func:`position_ids_from_mask`) where the decoder takes
    them (ALiBi decoders such as BLOOM's derive positions from the mask themselves)."""
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if _takes_positions(type(decoder)):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return kwargs


@functools.cache
def _takes_positions(cls: type) -> bool:
    return "position_ids" in inspect.signature(cls.forward).parameters


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
    decoder = decoder_of(model)
    out = decoder(input_ids=input_ids, **decoder_inputs(decoder, attention_mask))
    return gather_last(out.last_hidden_state, attention_mask)


@torch.no_grad()
def padding_invariance(model: nn.Module, pad_id: int) -> float:
    """The largest relative change of ``phi`` of a short prompt when it is left-padded beside a longer one
    (0 for a decoder that honours the attention mask, up to rounding): batching relies on it. A random
    probe of 5 and 9 tokens; no RNG state is touched."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = pad_id, 0
    alone = last_token_features(model, ids[1:, 4:].to(device), mask[1:, 4:].to(device)).float()
    batched = last_token_features(model, ids.to(device), mask.to(device))[1:].float()
    return ((batched - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item()


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


class _Stage(nn.Module):
    """A stand-in for one decoder block inside a :class:`SplitDecoder` view. ``skip`` returns its input
    unchanged (the block does not run); ``capture`` also keeps it (the hidden states entering the block);
    ``inject`` runs the real block on the states set beforehand instead of its input. Attributes the
    decoder's loop reads from a block (``attention_type``...) fall through to the real block."""

    def __init__(self, block: nn.Module, mode: str) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a child: the view owns no parameters of its own
        self.mode = mode
        self.value: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.mode == "capture":
            self.value = hidden
        if self.mode != "inject":
            return hidden
        states, self.value = self.value, None
        if args:
            args = (states, *args[1:])
        else:
            kwargs["hidden_states"] = states
        return self._block(*args, **kwargs)


class SplitDecoder:
    """Views of one decoder as a frozen *prefix* (blocks below ``split``) and a trainable *suffix* (blocks
    from ``split`` on, then whatever the decoder does after its blocks: the final norm...), sharing the
    original modules.

    When only the top blocks carry adapters, the prefix's output never changes during training, so it is
    computed once per example (no grad) and the suffix alone runs each step: the cost of a step falls with
    the share of blocks adapted. Both views are the decoder itself (its own forward: masks, positions,
    rotary or ALiBi biases, per-block attention types) with its block list swapped for one of the same
    length in which stand-ins (:class:`_Stage`) replace the blocks that do not run: the prefix view records
    the hidden states entering block ``split`` and skips the rest; the suffix view skips the blocks below
    ``split`` and hands block ``split`` the cached states in place of whatever the decoder computed before
    it. Nothing depends on the names of an architecture's parts, and the suffix computes exactly what the
    full model computes (checked per model by :meth:`matches_full_path`).
    """

    def __init__(self, model: nn.Module, split: int):
        decoder = decoder_of(model)
        path = blocks_path(model)
        blocks = decoder.get_submodule(path)
        n = len(blocks)
        if not 0 <= split < n:
            raise UserInputError(f"split block {split} is outside 0..{n - 1}")
        self.split = split
        self.model = model
        self._capture = _Stage(blocks[split], "capture")
        self._inject = _Stage(blocks[split], "inject")
        prefix = [*blocks[:split], self._capture, *(_Stage(b, "skip") for b in blocks[split + 1 :])]
        suffix = [*(_Stage(b, "skip") for b in blocks[:split]), self._inject, *blocks[split + 1 :]]
        self.prefix = _view(decoder, path, prefix)
        self.suffix = _view(decoder, path, suffix)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        #: the prefix view's attribute holding the token embedding (swapped under ZeRO-3: distributed.embedding)
        self.embedding_attr = next((k for k, m in decoder._modules.items() if m is embeddings), None)

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block ``split`` for a padded batch, ``(B, T, d)``."""
        return self._run_prefix(input_ids, attention_mask)

    def _run_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.prefix(input_ids=input_ids, **decoder_inputs(self.prefix, attention_mask))
        states, self._capture.value = self._capture.value, None
        if states is None:
            raise UserInputError(f"{type(self.prefix).__name__} never ran block {self.split}")
        return states

    def features(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` from cached prefix states (gradients flow into the suffix's adapters)."""
        self._inject.value = states
        try:
            out = self.suffix(inputs_embeds=states, **decoder_inputs(self.suffix, attention_mask))
        finally:
            self._inject.value = None
        return gather_last(out.last_hidden_state, attention_mask)

    @torch.no_grad()
    def matches_full_path(self, pad_id: int) -> tuple[bool, float]:
        """Whether prefix then suffix give the full forward's features on a small left-padded probe batch;
        returns ``(ok, max relative difference)``: within 1e-4 in float32, 3e-2 in a half-precision
        compute dtype (the storage dtype's range is checked on the real states). Every module runs in
        eval mode for the check and gets its mode back."""
        device = next(self.model.parameters()).device
        vocab = self.model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 7), generator=gen)
        mask = torch.ones_like(ids)
        ids[1, :3], mask[1, :3] = pad_id, 0
        ids, mask = ids.to(device), mask.to(device)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            full = last_token_features(self.model, ids, mask).float()
            states = self._run_prefix(ids, mask)
            cheap = self.features(states, mask).float()
        finally:
            for m, mode in modes.items():
                m.training = mode
        diff = ((cheap - full).abs().max() / full.abs().max().clamp(min=1e-6)).item()
        exact = states.dtype == torch.float32
        return diff <= (1e-4 if exact else 3e-2), diff


def _view(decoder: nn.Module, path: str, blocks: list[nn.Module]) -> nn.Module:
    """A shallow copy of ``decoder`` whose block list at ``path`` is ``blocks`` (every module on the way is
    copied too, so the decoder itself never changes)."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    parent, *rest = path.split(".")
    if rest:
        view._modules[parent] = _view(decoder._modules[parent], ".".join(rest), blocks)
    else:
        view._modules[parent] = nn.ModuleList(blocks)
    return view
