"""The structure of a causal LM, read through transformers' own structure rather than a list of names.

One job: given any Hugging Face causal LM, say where its parts are.

* the **decoder body** (embeddings, blocks, final norm; no LM head): ``model.get_decoder()``, the way
  transformers itself reaches it (``model.model``, ``model.transformer``, ``model.gpt_neox``,
  ``model.model.decoder`` for OPT...);
* its **blocks**: the ``nn.ModuleList`` of the model's ``_no_split_modules`` class (``LlamaDecoderLayer``,
  ``GPT2Block``...), whatever the attribute is called (``layers``, ``h``, ``blocks``);
* its **linear layers**: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family: the weight is stored
  ``(in, out)``, peft's ``fan_in_fan_out`` convention);
* the **default adapter targets** of an architecture: peft's own per-architecture mapping
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: the attention projections LoRA adapts), completed
  to the PoLAR setting (the paper's q, k, v, up and down projections): the key projection beside a split
  query/value pair, and the block's MLP up and down projections, found by their shapes (up maps the hidden
  size to the MLP width, down maps it back; a gate beside an up projection is left out, as PoLAR does).
  Architectures peft does not list (Phi-3...) get the attention input projections by their customary names.
  For a Llama-family model this gives exactly ``q_proj, k_proj, v_proj, up_proj, down_proj``.
"""

from __future__ import annotations

import contextlib
import functools

from torch import nn

from polar_vbll.errors import UserInputError

#: Last name components of an attention block's input projections (split or fused), for architectures
#: peft's mapping does not list.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack",
                    "query", "key", "value")  # fmt: skip
#: Query name -> key name, to complete peft's (query, value) pairs with the key projection.
_KEY_OF = {"q_proj": "k_proj", "query": "key", "q": "k"}


@functools.cache
def linear_types() -> tuple[type, ...]:
    """The module types that hold a dense weight an adapter can wrap: ``nn.Linear`` and transformers'
    ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, linear_types())


def transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight ``(in, out)`` (``Conv1D``: peft's ``fan_in_fan_out``)."""
    return isinstance(module, linear_types()[1:])


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (the weight's full shape under ZeRO-3)."""
    shape = tuple(getattr(module.weight, "ds_shape", module.weight.shape))
    return (shape[0], shape[1]) if transposed(module) else (shape[1], shape[0])


# --------------------------------------------------------------------------------------------- structure
def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder body of a causal LM (embeddings, blocks, final norm), without its LM head: what
    ``model.get_decoder()`` returns, else the ``base_model_prefix`` attribute. Raises
    :class:`UserInputError` when no block list is found in it."""
    candidates = []
    get = getattr(model, "get_decoder", None)
    if callable(get):
        with contextlib.suppress(AttributeError, NotImplementedError, TypeError):
            candidates.append(get())
    candidates += [getattr(model, getattr(model, "base_model_prefix", "") or "model", None),
                   getattr(model, "model", None), getattr(model, "transformer", None)]  # fmt: skip
    for decoder in candidates:
        if isinstance(decoder, nn.Module) and decoder is not model and _find_blocks(model, decoder):
            return decoder
    raise UserInputError(
        f"cannot find the decoder blocks of {type(model).__name__}: neither get_decoder() nor "
        f"{getattr(model, 'base_model_prefix', 'model')!r} holds a list of its {sorted(_block_classes(model))}"
    )


def _block_classes(model: nn.Module) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or ())


def _find_blocks(model: nn.Module, decoder: nn.Module) -> str | None:
    """Path (relative to ``decoder``) of its block list: the longest ``nn.ModuleList`` of the model's
    ``_no_split_modules`` class, else the longest list of one repeated module class."""
    names = _block_classes(model)
    lists = [(n, m) for n, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) and n]
    typed = [(n, m) for n, m in lists if type(m[0]).__name__ in names]
    uniform = [(n, m) for n, m in lists if len({type(b) for b in m}) == 1 and not is_linear(m[0])]
    for pool in (typed, uniform):
        if pool:
            return max(pool, key=lambda nm: (len(nm[1]), -nm[0].count(".")))[0]
    return None


def blocks_path(model: nn.Module) -> str:
    """The dotted path of the block list inside :func:`decoder_of` (``layers``, ``h``, ``blocks``...)."""
    path = _find_blocks(model, decoder_of(model))
    assert path is not None  # decoder_of checked it
    return path


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order."""
    return decoder_of(model).get_submodule(blocks_path(model))


def decoder_path(model: nn.Module) -> str:
    """The dotted path of :func:`decoder_of` inside ``model`` (``model``, ``transformer``, ``model.decoder``)."""
    decoder = decoder_of(model)
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise UserInputError(f"the decoder of {type(model).__name__} is not one of its submodules")


# ----------------------------------------------------------------------------------------- default targets
def _peft_targets(model_type: str | None) -> list[str] | None:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # peft is a core dependency; without it, the names below
        return None
    found = mapping.get(model_type or "")
    return list(found) if isinstance(found, (list, tuple)) else None


def _in_attention(path: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in path.split("."))


def _cross_attention(path: str) -> bool:
    """A cross-attention projection (``encoder_attn``, ``crossattention``): idle in a causal LM."""
    return any("encoder_attn" in part.lower() or "crossattention" in part.lower() for part in path.split("."))


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else config
    size = getattr(text, "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def _mlp_targets(hidden: int | None, linears: dict[str, nn.Module]) -> list[str]:
    """The block's MLP up and down projections (paths inside the block), by shape: down maps the MLP width
    back to ``hidden``; up maps ``hidden`` to that width (or twice it: a fused gate-and-up projection); a
    gate beside an up projection is left out."""
    if hidden is None:
        return []
    mlp = {p: linear_dims(m) for p, m in linears.items() if not _in_attention(p)}
    downs = [p for p, (i, o) in mlp.items() if o == hidden and i != hidden]
    widths = {mlp[p][0] for p in downs}
    ups = [p for p, (i, o) in mlp.items() if i == hidden and (o in widths or o // 2 in widths)]
    plain = [p for p in ups if "gate" not in p.rsplit(".", 1)[-1]]
    return (plain or ups) + downs if downs else []


def _shortest_suffix(path: str, paths: list[str]) -> str | None:
    """The shortest dotted suffix of ``path`` that matches no other entry of ``paths`` (PEFT's suffix
    matching), or None when even the whole path is ambiguous."""
    parts = path.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if not any(p != path and (p == suffix or p.endswith("." + suffix)) for p in paths):
            return suffix
    return None


def default_target_modules(model: nn.Module) -> list[str]:
    """The adapter targets of ``model``'s architecture (see the module docstring), as PEFT-style name
    suffixes, attention projections first, then MLP up and down projections. Raises
    :class:`UserInputError` when none is found (name them in ``target_modules``)."""
    # every block's layers, by their path inside a block (hybrid models mix block kinds in one list)
    linears = {p: m for block in blocks_of(model) for p, m in block.named_modules()
               if p and is_linear(m) and not _cross_attention(p)}  # fmt: skip
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    wanted: list[str] = []
    peft_names = _peft_targets(model_type)
    if peft_names is not None:
        for name in peft_names:
            wanted.append(name)
            key = _KEY_OF.get(name)
            if key and any(p.rsplit(".", 1)[-1] == key for p in linears) and key not in peft_names:
                wanted.append(key)
    else:
        wanted = [n for n in ATTENTION_INPUTS if any(p.rsplit(".", 1)[-1] == n for p in linears)]
    chosen = [p for n in wanted for p in linears if p == n or p.endswith("." + n)]
    chosen += [p for p in _mlp_targets(_hidden_size(model), linears) if p not in chosen]
    out: list[str] = []
    for path in dict.fromkeys(chosen):
        suffix = _shortest_suffix(path, list(linears))
        if suffix is not None and suffix not in out:
            out.append(suffix)
    if not out:
        raise UserInputError(
            f"no default adapter targets for {type(model).__name__} (model_type {model_type!r}); name them with "
            f"polar.target_modules / lora.target_modules, e.g. from {sorted({p.rsplit('.', 1)[-1] for p in linears})}"
        )
    return out
