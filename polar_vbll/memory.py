"""Memory before work: a run's peak estimated from the model, batch, prompt length and method, checked
against what the device has, before the backbone loads.

A setting that cannot fit (a batch of 100,000 prompts, a 70B model on a laptop) used to grow until the
kernel's OOM killer ended the process after minutes, without a word (and on a shared machine the kernel
may pick another process). :func:`check_fits` refuses it in one line with the estimate's parts and what
to change. The estimate is deliberately simple and on the high side:

- weights: the backbone's parameter count (read from its safetensors headers) x the dtype's bytes;
- training activations per step (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", section 4.1, with memory-efficient attention, so without the ``a s^2`` term):
  ``batch x tokens x (34 h / 2 + 4 i / 2) x bytes`` per block that gradients flow through (the adapted
  blocks and every block above the lowest one), ``h`` the hidden size, ``i`` the MLP's; ``tokens`` is the
  longest prompt of the training split when it is tokenized, else ``model.max_length``;
- the cached frozen prefix (the cheap path): every example's states, ``tokens x h x`` the storage dtype
  (none with ``train.prefix_cache=stream``: they stay on disk, one batch read at a time);
- a fixed process floor (the CPU: torch, transformers, the tokenizer; about 1 GiB).

Against: on a CUDA device the free memory (``torch.cuda.mem_get_info``); on the CPU ``MemAvailable``
(/proc/meminfo). Measured against real peaks in ``tests/test_memory.py`` (the estimate stays above).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from polar_vbll.errors import ConfigError
from polar_vbll.token_rows import row_lengths

GIB = 2**30
#: bytes per element of the backbone dtypes and the prefix-cache dtypes
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: the CPU process floor (torch, transformers, the tokenizer, the data): measured ~0.8 GiB for the tiny model
_FLOOR = 1 * GIB


@dataclass(frozen=True)
class Estimate:
    """A run's estimated peak, in bytes, by part."""

    weights: int
    activations: int
    prefix: int
    floor: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.prefix + self.floor

    def describe(self) -> str:
        parts = [("weights", self.weights), ("training activations", self.activations),
                 ("cached prefix", self.prefix), ("process", self.floor)]  # fmt: skip
        return ", ".join(f"{name} {n / GIB:.1f}" for name, n in parts if n)


def parameter_count(model_dir: Path) -> int:
    """Parameters in a safetensors model folder, from the files' headers (nothing is loaded)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


def model_shape(model_dir: Path) -> tuple[int, int, int]:
    """``(hidden size, MLP width, blocks)`` of the model in ``model_dir``, read by transformers' own config
    class (so every architecture's names for them, ``n_embd``, ``ffn_dim``, ``d_model``..., are understood);
    the MLP width is 4x the hidden size where the config does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(getattr(text, "hidden_size", 0) or 0)
    inter = next((int(v) for k in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim")
                  if isinstance(v := getattr(text, k, None), int) and v > 0), 4 * h)  # fmt: skip
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0)
    return h, inter, max(layers, 1)


def estimate(cfg, model_dir: Path, tokens: int, total_tokens: int, batch: int) -> Estimate:
    """The estimate of a run of ``cfg`` on the model in ``model_dir`` (``config.json`` and safetensors), for
    training prompts of up to ``tokens`` tokens, ``total_tokens`` tokens in all splits (the cached prefix) and
    ``batch`` examples per step (see the module docstring)."""
    from polar_vbll.methods import METHODS
    from polar_vbll.placement import effective_dtype

    h, inter, layers = model_shape(model_dir)
    dtype = effective_dtype(cfg.model)
    b = _BYTES[dtype]
    weights = parameter_count(model_dir) * b
    method = METHODS[cfg.method]
    section = getattr(cfg, method.adapter_kind.section)
    adapted = [(i % layers) for i in section.layers] if section.layers is not None else list(range(layers))
    grad_blocks = layers - min(adapted) if (adapted and method.trains) else 0
    per_token_block = (34 * h + 4 * inter) * b // 2
    activations = batch * tokens * per_token_block * grad_blocks
    prefix = 0
    if cfg.train.cache_frozen_prefix and cfg.train.prefix_cache != "stream" and adapted and min(adapted) > 0:
        prefix = total_tokens * h * _BYTES[cfg.train.prefix_cache_dtype]
    floor = _FLOOR if cfg.model.device in ("auto", "cpu") and not torch.cuda.is_available() else 0
    return Estimate(weights, activations, prefix, floor)


def available(device: torch.device) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, or the CPU's ``MemAvailable``; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_session_fits(cfg, splits: dict, placement, tokenizer) -> None:
    """:func:`check_fits` for a one-process run of ``cfg`` on its tokenized ``splits`` (the longest training
    prompt, every split's tokens, the step's batch clamped to the training split)."""
    from polar_vbll.models import model_dir
    from polar_vbll.training.schedule import effective_batch_size

    train = splits["train"]
    tokens = max(row_lengths(train.ids), default=1)
    total = sum(sum(row_lengths(enc.ids)) for enc in splits.values())
    batch = effective_batch_size(cfg.train.batch_size, len(train))
    est = estimate(cfg, model_dir(cfg.model, tokenizer), tokens, total, batch)
    check_fits(est, placement.device, batch, tokens)


def check_fits(est: Estimate, device: torch.device, batch: int, tokens: int, where: str = "this machine") -> None:
    """Refuse (one line, :class:`ConfigError`) a run whose estimate exceeds what ``device`` has free."""
    free = available(device)
    if free is None or est.total <= free:
        return
    stream = ", train.prefix_cache: stream (the cached prefix on disk only)" if est.prefix > est.total / 4 else ""
    raise ConfigError(
        f"this run needs about {est.total / GIB:.1f} GiB ({est.describe()} GiB: {batch} prompts per step of up "
        f"to {tokens} tokens), {where} has {free / GIB:.1f} GiB free on {device}: lower train.batch_size or "
        "model.max_length, adapt fewer blocks (polar.layers / lora.layers), use model.dtype: bfloat16, "
        f"train.activation_checkpointing: true{stream}, or --workers to shard the model"
    )
