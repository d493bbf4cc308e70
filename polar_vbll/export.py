"""``polar-vbll export RUN --merged DIR``: the run's backbone with its adapter merged into the weights, for
servers that cannot load our adapter (docs/deploy.md).

``DIR`` receives a plain Hugging Face causal-LM folder (``config.json``, ``model.safetensors``, the
tokenizer files; it loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and its logits equal the
adapted model's up to float rounding), and beside it the run's head (``head.safetensors``) and
``readout.json`` (answer letters and token ids, prompt settings). PoLAR layers are merged
(``W0 + s U Theta V^T``) and unwrapped back to the original linear layers; LoRA through peft's
``merge_and_unload``. Written to a temporary folder beside ``DIR`` and renamed into place: an existing
non-empty ``DIR`` is refused, nothing is overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from polar_vbll.errors import UserInputError


def check_destination(dest: Path) -> Path:
    """``dest`` (absolute), refused when it exists and is not an empty folder."""
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserInputError(f"{dest} already exists and is not empty; give a new folder (nothing is overwritten)")
    return dest


def merged_backbone(adapter) -> nn.Module:
    """The Hugging Face model of ``adapter`` with every adapted layer's update folded into its weight and the
    adapter layers replaced by the original linear layers (the adapter object is spent afterwards)."""
    from polar_vbll.adapters.layer import PolarLinear

    if hasattr(adapter, "peft_model"):  # LoRA (polar_vbll.adapters.lora)
        return adapter.peft_model.merge_and_unload()
    model = adapter.base_model
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, PolarLinear):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.base_layer)
    return model


def export_merged(run: str | Path, dest: str | Path, device: str | None = "cpu") -> Path:
    """Write the merged backbone of ``run``, its tokenizer, head and readout to ``dest`` (see the module
    docstring); returns ``dest``. ``UserInputError`` for an existing ``dest``, an ensemble (one backbone per
    member) or a run without a trained adapter, before the model loads."""
    from polar_vbll.models import load_backbone
    from polar_vbll.placement import placement_for
    from polar_vbll.readout import check_readout
    from polar_vbll.saved import check_run_folder

    dest = check_destination(Path(dest))
    folder = check_run_folder(run)
    if len(folder.folders) > 1:
        raise UserInputError(f"{folder.path} is an ensemble of {len(folder.folders)} members, each with its "
                             "own adapter: one merged backbone cannot hold them")  # fmt: skip
    kind = folder.method.adapter_kind
    placement = placement_for(folder.cfg.model, device)
    model, tokenizer = load_backbone(folder.cfg.model, placement)
    check_readout(folder.readout, tokenizer, str(folder.path))
    adapter = kind.load(model, folder.path / "adapter")
    merged = merged_backbone(adapter)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in ("head.safetensors", "readout.json"):
            shutil.copy2(folder.path / name, tmp / name)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
