"""Tokenization: prompts to unpadded token ids, batches to padded tensors, answer letters to token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polar_vbll.errors import DataError, UserInputError


@dataclass
class TokenizedPrompts:
    """Unpadded token ids of each prompt (padding happens per batch, after sorting by length)."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int, add_bos: bool) -> TokenizedPrompts:
    """Tokenize prompts without special tokens and add BOS explicitly (transformers 4.x and 5.x disagree on
    whether this tokenizer prepends one).

    Nothing is ever cut here: a prompt longer than ``max_length`` tokens (BOS included) raises
    :class:`DataError`. Task prompts are fitted to the budget before (``polar_vbll.tasks.fit_prompt``, which
    shortens the passage, the choices or the question and keeps every label and "Answer:")."""
    bos = tokenizer.bos_token_id
    if add_bos and bos is None:
        raise UserInputError("model.add_bos is true but the tokenizer has no BOS token")
    budget = max_length - (1 if add_bos else 0)
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if len(ids) > budget:
            raise DataError(
                f"prompt {i} is {len(ids)} tokens, more than model.max_length={max_length} allows; fit it first "
                "(polar_vbll.tasks.fit_prompt) or raise model.max_length"
            )
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


#: The end of a real prompt (``polar_vbll.tasks.prompts``: the last choice line, then the cue): answer
#: letters are tokenized as its continuation, exactly as the model sees them.
ANSWER_PROBE = "Choices:\nA) yes\nB) no\nAnswer:"


def answer_token_ids(tokenizer, letters: Sequence[str], probe: str = ANSWER_PROBE) -> list[int]:
    """The token id of each answer letter as the model predicts it after ``Answer:``: the one token that
    ``probe + " " + letter`` adds to ``probe``.

    Read from the end of a real prompt, not from ``" A"`` alone: a SentencePiece tokenizer with a
    prefix-space normalizer (Llama-2, Mistral) encodes a lone ``" A"`` as two pieces although the token it
    predicts after ``Answer:`` is the single piece ``"▁A"``; byte-level BPE tokenizers (GPT-2 style,
    SmolLM2) give the same id either way. Letters may carry their leading space (``" A"``). Raises
    :class:`UserInputError` when the continuation is not exactly one token (the class logit must be one
    next-token logit)."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    base = encode(probe)
    ids = []
    for letter in letters:
        letter = letter.strip()
        full = encode(f"{probe} {letter}")
        if full[: len(base)] != base or len(full) != len(base) + 1:
            added = tokenizer.convert_ids_to_tokens(full[len(base) :]) if full[: len(base)] == base else full
            raise UserInputError(
                f"the answer letter {letter!r} after {probe.splitlines()[-1]!r} is not one token in this "
                f"tokenizer (it continues the prompt with {added}); the class logit must be one next-token "
                "logit"
            )
        ids.append(full[-1])
    return ids
