"""LoRA as an adapter kind next to PoLAR, on **peft**, behind the same interface as ``PolarModel``.

``LoraAdapter(model, LoraConfig(...))`` injects standard PEFT LoRA layers
(``W = W0 + (alpha / r) B A``, A Kaiming-uniform, B = 0, so the model starts exactly at ``W0``) and
exposes what the trainer, the feature code and the evaluation call on any adapter
(:class:`polar_vbll.protocols.AdapterModel`):

- ``base_model``: the Hugging Face model, modified in place (the decoder blocks hold the LoRA layers, so
  ``polar_vbll.backbone.decoder_of`` and the cached-prefix path of ``polar_vbll.features`` work unchanged);
- ``stiefel_parameters()`` -> ``[]``: LoRA has no manifold factors (the trainer builds no Stiefel
  optimizer for an empty list);
- ``theta_parameters()`` -> every ``lora_A`` / ``lora_B`` weight (Euclidean, AdamW). **LoRA-MAP** is the
  same adapter trained with AdamW weight decay on these (a Gaussian prior on A, B): the method
  ``lora_map`` sets ``optim.theta_weight_decay``, nothing here changes;
- ``adapter_state_dict()`` / ``load_adapter_state_dict()`` (strict), ``save_adapter(dir)`` (peft's
  ``save_pretrained``, safetensors), ``export_peft_lora(dir)`` (the same files: it *is* a PEFT adapter);
- ``orthogonality_error()`` -> ``0.0`` and ``stable_ranks()`` (of ``B A`` per layer: LoRA's is the one that
  collapses toward 1, the comparison PoLAR is about).

Layer selection is PoLAR's (:func:`polar_vbll.adapters.model.select_targets`): the same
``target_modules`` / ``layers`` give exactly the same modules. The selected modules are handed to peft as
full module paths (which is also what ``PolarModel.export_peft_lora`` writes), so a saved adapter
re-applies to exactly those layers in any PEFT stack, independent of how peft matches
``layers_to_transform`` for a given architecture.

peft is imported when a LoRA adapter is built, so importing this module never needs it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polar_vbll.adapters.config import LoraConfig, PolarConfig, lora_config_from_dict
from polar_vbll.adapters.dropout import seeded_rng
from polar_vbll.adapters.layer import PolarLinear, stable_rank
from polar_vbll.adapters.model import TargetLayer, check_peft_targets, resolve_targets, select_targets
from polar_vbll.adapters.state import (
    CONFIG_DIGEST_KEY,
    check_config_digest,
    config_digest,
    read_json_config,
    read_safetensors,
    require_shapes,
    strict_copy_,
)
from polar_vbll.adapters.state import names_preview as _names_preview
from polar_vbll.architecture import transposed
from polar_vbll.checkpoint import sha256_file
from polar_vbll.errors import CheckpointError, ConfigError, UserInputError
from polar_vbll.extras import require

#: Our side file in a saved LoRA adapter directory (peft writes ``adapter_config.json`` and
#: ``adapter_model.safetensors``; this one records the :class:`LoraConfig` that selected the layers).
LORA_BASELINE_CONFIG_NAME = "lora_baseline_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_FORMAT_VERSION = 2  # 2: the side file records the weights' sha256 and a digest of its own fields
#: The peft adapter name used throughout (one adapter per model).
ADAPTER_NAME = "default"


# ---------------------------------------------------------------------------------------------- helpers
def _require_peft():
    require("polar_vbll.adapters.lora")  # peft: a core dependency, imported lazily (polar_vbll.extras)
    import peft

    return peft


def _select_targets(model: nn.Module, config: LoraConfig) -> list[TargetLayer]:
    """The layers PoLAR would adapt under the same selection (sorted by path), with LoRA's own rank check."""
    # r=1 for the selection: PoLAR's rank check speaks of Stiefel factors; LoRA's is done below.
    as_polar = PolarConfig(r=1, alpha=1.0, target_modules=config.target_modules, layers=config.layers)
    try:
        targets = select_targets(model, as_polar)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("PolarConfig", "LoraConfig")) from None
    small = [t for t in targets if config.r > min(t.in_features, t.out_features)]
    if small:
        t = small[0]
        raise ConfigError(
            f"LoraConfig.r={config.r} exceeds min(in, out) = {min(t.in_features, t.out_features)} "
            f"of layer {t.name!r}: a rank-r update of that layer cannot have rank r"
        )
    return targets


def _has_lora(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "lora_A", None), nn.ModuleDict) for m in model.modules())


# ----------------------------------------------------------------------------------------------- model
class LoraAdapter(nn.Module):
    """A Hugging Face causal LM with peft LoRA layers, exposing the ``PolarModel`` interface (see the module
    docstring). ``peft_model`` is the ``PeftModel``; ``base_model`` is the original HF model object (peft
    replaces the targeted linears in place), which is what ``FeatureSource`` and ``decoder_of`` need.

    Every base parameter is frozen; only ``lora_A`` / ``lora_B`` require grad. The initial A is drawn under
    :func:`seeded_rng` (``init_seed``), so the same model and config give the same initial adapter without
    touching the caller's RNG.
    """

    #: the side file a saved adapter carries (our config), and the ``adapter_type`` it records
    CONFIG_NAME = LORA_BASELINE_CONFIG_NAME
    ADAPTER_TYPE = "lora_baseline"
    #: the config validator of this kind (a subclass's config extends ``LoraConfig``)
    parse_config = staticmethod(lora_config_from_dict)

    def __init__(self, model: nn.Module, config: LoraConfig | Mapping[str, Any]) -> None:
        super().__init__()
        config = resolve_targets(model, self.parse_config(config, f"{type(self).__name__}(config=...)"))
        peft = _require_peft()
        if _has_lora(model) or any(isinstance(m, PolarLinear) for m in model.modules()):
            raise UserInputError("the model already holds adapters; inject LoRA into a fresh base model")
        names = [t.name for t in _select_targets(model, config)]
        peft_config = peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=names,
            lora_dropout=config.dropout,
            bias="none",
            task_type="CAUSAL_LM",
            # Conv1D layers (GPT-2 family) store their weight (in, out): peft's fan_in_fan_out convention
            fan_in_fan_out=any(transposed(model.get_submodule(n)) for n in names),
        )
        model.requires_grad_(False)
        was_training = model.training
        with seeded_rng(config.init_seed), warnings.catch_warnings():
            # transformers 5 deprecates an attribute peft still reads; not ours to fix, and not actionable.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = peft.get_peft_model(model, peft_config, adapter_name=ADAPTER_NAME)
        self.peft_model = peft_model
        self.lora_config = config
        # peft's new layers are created in train mode, so in an eval-mode backbone their dropout would be
        # live at evaluation time: give every module the mode the model had (use set_adapter_dropout / train()
        # to turn adapter dropout on for training or MC dropout).
        self.train(was_training)

        adapted = [n for n, _ in self.lora_layers()]
        if adapted != names:  # peft matched differently from our selection: never train the wrong layers
            raise RuntimeError(f"peft adapted {_names_preview(adapted)}, expected {_names_preview(names)}")
        wrong = [n for n, p in self.base_model.named_parameters() if p.requires_grad and "lora_" not in n]
        if wrong:
            raise RuntimeError(f"non-LoRA parameters require grad after injection: {_names_preview(wrong)}")

    # ---------------------------------------------------------------------------------------- plumbing
    @property
    def base_model(self) -> nn.Module:
        """The HF model holding the LoRA layers (the object passed in, modified in place)."""
        return self.peft_model.get_base_model()

    def __getattr__(self, name: str) -> Any:
        """Fall through to ``base_model`` (``.config``, ``.device``...), as ``PolarModel`` does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("peft_model", "base_model", "lora_config"):
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @property
    def scaling(self) -> float:
        return self.lora_config.scaling

    def lora_layers(self) -> list[tuple[str, nn.Module]]:
        """``(module path in base_model, peft LoRA layer)`` for every adapted layer, sorted by path."""
        found = [
            (n, m)
            for n, m in self.base_model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and ADAPTER_NAME in m.lora_A
        ]
        return sorted(found, key=lambda item: item[0])

    def lora_factors(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """``(path, A (r, in), B (out, r))`` per adapted layer, sorted by path."""
        return [
            (n, m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight) for n, m in self.lora_layers()
        ]

    # -------------------------------------------------------------------------------------- parameters
    def stiefel_parameters(self) -> list[nn.Parameter]:
        """None: LoRA has no factors on a manifold. The trainer must skip its Stiefel optimizer for an
        empty list (``torch.optim`` optimizers refuse an empty parameter list)."""
        return []

    def theta_parameters(self) -> list[nn.Parameter]:
        """Every ``lora_A`` then ``lora_B`` weight, per layer in sorted path order (Euclidean; AdamW, with
        weight decay for LoRA-MAP)."""
        out: list[nn.Parameter] = []
        for _, a, b in self.lora_factors():
            out += [a, b]
        return out

    def update_parameters(self) -> list[nn.Parameter]:
        """The parameters whose zeroing gives back the base model (every B: ``W0 + s 0 A = W0``)."""
        return [b for _, _, b in self.lora_factors()]

    def merge(self) -> None:
        """Fold ``(alpha / r) B A`` into the base weights (peft's ``merge_adapter``)."""
        self.peft_model.merge_adapter()

    def unmerge(self) -> None:
        """Undo :meth:`merge` (peft's ``unmerge_adapter``)."""
        self.peft_model.unmerge_adapter()

    # -------------------------------------------------------------------------------------- diagnostics
    def orthogonality_error(self) -> float:
        """Always 0.0: LoRA has no Stiefel factors, so there is no constraint to violate. Returned (rather
        than raising) so the trainer's logging code runs unchanged for both adapters."""
        return 0.0

    def stable_ranks(self) -> dict[str, float]:
        """Module path -> stable rank ``||B A||_F^2 / ||B A||_2^2`` (0.0 while B = 0), from the r x r core
        of the factors (``stable_rank(B, I, A^T)``), never forming the out x in update."""
        out: dict[str, float] = {}
        for n, a, b in self.lora_factors():
            eye = torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
            out[n] = stable_rank(b, eye, a.T)
        return out

    # -------------------------------------------------------------------------------------- state dicts
    def _adapter_params(self) -> dict[str, nn.Parameter]:
        # PEFT's saved key form (adapter name stripped), the same as PolarModel.peft_lora_state_dict.
        out: dict[str, nn.Parameter] = {}
        for n, a, b in self.lora_factors():
            out[f"base_model.model.{n}.lora_A.weight"] = a
            out[f"base_model.model.{n}.lora_B.weight"] = b
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Key -> detached clone of every LoRA tensor, keys in PEFT's saved form
        (``base_model.model.<module path>.lora_{A,B}.weight``, what ``save_pretrained`` writes)."""
        return {k: p.detach().clone() for k, p in self._adapter_params().items()}

    @torch.no_grad()
    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], where: str = "state dict"
    ) -> None:
        """Copy LoRA tensors in, strictly: every key present, no extra key, shapes equal, values finite.
        Raises :class:`CheckpointError` naming ``where``; nothing is copied unless everything checks out."""
        strict_copy_(self._adapter_params(), state_dict, f"LoRA weights in {where}")

    # ------------------------------------------------------------------------------------- save / load
    def save_adapter(self, directory: str | os.PathLike[str]) -> Path:
        """Write the adapter with peft's ``save_pretrained`` (``adapter_config.json`` +
        ``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``) plus
        ``lora_baseline_config.json`` (our config, for :meth:`load_adapter`). Returns the directory."""
        d = self.save_peft(directory)
        meta = {
            "format_version": LORA_FORMAT_VERSION,
            "adapter_type": self.ADAPTER_TYPE,
            "lora_config": self.lora_config.model_dump(mode="json"),
            "adapted_modules": [n for n, _ in self.lora_layers()],
            "weights_sha256": sha256_file(d / LORA_WEIGHTS_NAME),
            **self._save_extra(d),
        }
        meta[CONFIG_DIGEST_KEY] = config_digest(meta)
        (d / self.CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return d

    def save_peft(self, directory: str | os.PathLike[str]) -> Path:
        """peft's two files (``adapter_config.json``, ``adapter_model.safetensors``) holding the LoRA factors
        only: a posterior attached to the layers (BLoB, TFB) is a module peft would save with them, and that a
        plain PEFT loader would reject as unexpected keys."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lora_only = {k: v for k, v in self.peft_model.state_dict().items() if ".lora_" in k}
        self.peft_model.save_pretrained(str(d), safe_serialization=True, state_dict=lora_only)
        return d

    def _save_extra(self, directory: Path) -> dict[str, Any]:
        """Files beyond peft's a subclass writes into ``directory``; returns their entries of the side file."""
        return {}

    @classmethod
    def _load_extra(cls, directory: Path, meta: dict[str, Any], config: LoraConfig, targets) -> tuple[dict, dict]:
        """A subclass's own tensors from ``directory`` (checked against ``meta``, the side file) and their
        expected shapes for the ``targets`` layers: ``(tensors, shapes)`` keyed like ``adapter_state_dict``."""
        return {}, {}

    def export_peft_lora(self, directory: str | os.PathLike[str]) -> Path:
        """A standard PEFT LoRA adapter directory: the very files :meth:`save_adapter` writes (named like
        ``PolarModel.export_peft_lora`` so run code treats both adapters alike); refused, with nothing written,
        when it adapts no module or the LM head (:func:`~polar_vbll.adapters.model.check_peft_targets`)."""
        check_peft_targets(self.base_model, [n for n, _ in self.lora_layers()], f"PEFT export to {directory}")
        return self.save_adapter(directory)

    @classmethod
    def load_adapter(cls, model: nn.Module, directory: str | os.PathLike[str]) -> LoraAdapter:
        """Inject the adapter saved by :meth:`save_adapter` in ``directory`` into ``model`` (a fresh base
        model) and load its weights strictly. Reads safetensors only (no pickle)."""
        d = Path(directory)
        cfg_path, weights = d / cls.CONFIG_NAME, d / LORA_WEIGHTS_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path} does not exist: {d} is not a {cls.ADAPTER_TYPE} adapter directory")
        raw = read_json_config(cfg_path)
        if raw.get("format_version") != LORA_FORMAT_VERSION:
            raise CheckpointError(
                f"{cfg_path}: unsupported or missing format_version (this polar_vbll reads "
                f"{LORA_FORMAT_VERSION}; an adapter saved by an older version has no hashes: save it again)"
            )
        check_config_digest(raw, cfg_path)
        config = cls.parse_config(raw.get("lora_config") or {}, f"{cfg_path} (field 'lora_config')")
        if not weights.is_file():
            raise CheckpointError(f"LoRA weights {weights} do not exist")
        if sha256_file(weights) != raw.get("weights_sha256"):
            raise CheckpointError(f"LoRA weights {weights} are truncated or altered (sha256 does not match {cfg_path})")
        tensors = read_safetensors(weights, "LoRA weights")
        # Dry run before touching the model: the file must hold exactly A (r, in) and B (out, r) of every
        # layer this config selects (a file for another architecture or config fails here, readably).
        expected: dict[str, tuple[int, ...]] = {}
        targets = _select_targets(model, config)
        for t in targets:
            expected[f"base_model.model.{t.name}.lora_A.weight"] = (config.r, t.in_features)
            expected[f"base_model.model.{t.name}.lora_B.weight"] = (t.out_features, config.r)
        extra, extra_shapes = cls._load_extra(d, raw, config, targets)
        tensors, expected = {**tensors, **extra}, {**expected, **extra_shapes}
        require_shapes(
            expected, tensors, f"LoRA weights {weights} do not match {cfg_path} for {type(model).__name__}"
        )
        adapter = cls(model, config)
        adapter.load_adapter_state_dict(tensors, where=str(weights))
        return adapter


def inject_lora(model: nn.Module, config: LoraConfig | Mapping[str, Any]) -> LoraAdapter:
    """Inject LoRA into ``model`` in place and return the wrapping :class:`LoraAdapter`."""
    return LoraAdapter(model, config)
