"""Tokenization: prompts to unpadded token ids, batches to padded tensors, answer letters to token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polar_vbll.errors import UserInputError


@dataclass
class TokenizedPrompts:
    """Unpadded token ids of each prompt (padding happens per batch, after sorting by length)."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompts(
    tokenizer, prompts: Sequence[str | tuple[str, str, str]], max_length: int, add_bos: bool
) -> TokenizedPrompts:
    """Tokenize without special tokens and add BOS explicitly: transformers 4.x and 5.x disagree on whether
    this tokenizer prepends one.

    A prompt may be given as ``(prefix, context, suffix)``: when it is too long, the *context* (a BoolQ
    passage, say) is cut from its end, so the instruction, the question, the choices and "Answer:" all
    survive. A prompt still too long after that keeps its last ``max_length`` tokens.
    """
    out: list[list[int]] = []
    bos = tokenizer.bos_token_id
    if add_bos and bos is None:
        raise UserInputError("model.add_bos is true but the tokenizer has no BOS token")
    budget = max_length - (1 if add_bos else 0)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    for prompt in prompts:
        prefix, context, suffix = (prompt, "", "") if isinstance(prompt, str) else prompt
        ids = encode(prefix + context + suffix)
        if len(ids) > budget and context:
            head, tail = encode(prefix), encode(suffix)
            keep = budget - len(head) - len(tail)
            if keep > 0:
                ids = head + encode(context)[:keep] + tail
        if len(ids) > budget:
            ids = ids[-budget:]
        out.append([bos, *ids] if add_bos else ids)
    return TokenizedPrompts(out)


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``(input_ids, attention_mask)``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
        elif side == "right":
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        else:
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    return ids, mask


def answer_token_ids(tokenizer, token_strings: Sequence[str]) -> list[int]:
    """Map answer strings such as " A" to token ids, insisting that each is exactly one token (otherwise the
    class logit would not be the next-token logit)."""
    ids = []
    for s in token_strings:
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise UserInputError(
                f"answer token {s!r} is {len(toks)} tokens in this tokenizer; need exactly 1"
            )
        ids.append(toks[0])
    return ids
