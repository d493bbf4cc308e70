"""``PolarModel``: inject PoLAR adapters into a Hugging Face model, save / load / export them.

Layout (what an optimizer or a distributed worker selects):

- ``PolarModel.base_model`` — the HF model, modified in place: every targeted linear layer (``nn.Linear``
  or transformers' ``Conv1D``) is replaced by a :class:`PolarLinear` holding the frozen linear
  (``base_layer``) and ``polar_theta``. All other base parameters are frozen.
- ``PolarModel.polar_bank`` — the :class:`StiefelBank` holding every U and V. It is a child of the
  ``PolarModel`` (so ``.to(device)`` and ``state_dict`` of the wrapper cover it) but *not* of
  ``base_model``: hand ``base_model`` to DeepSpeed and step the bank yourself.

Adapter files (``save_adapter``): ``adapter_config.json`` (format version, the whole ``PolarConfig``, slot
layout, sha256 of the weights) and ``adapter_model.safetensors`` (bank groups + thetas, names containing
``polar_``). Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from polar_vbll.adapters.bank import SlotRequest, StiefelBank, _refuse_dtype_change, plan_slots
from polar_vbll.adapters.config import AUTO, FORMAT_VERSION, PolarConfig, TargetConfig, polar_config_from_dict
from polar_vbll.adapters.layer import PolarLinear, stable_rank
from polar_vbll.adapters.state import (
    CONFIG_DIGEST_KEY,
    check_config_digest,
    config_digest,
    read_json_config,
    read_safetensors,
    require_shapes,
    strict_copy_,
)
from polar_vbll.architecture import decoder_path, default_target_modules, is_linear, linear_dims, transposed
from polar_vbll.errors import CheckpointError, ConfigError, UserInputError

C = TypeVar("C", bound=TargetConfig)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Value of ``adapter_type`` in our ``adapter_config.json`` (tells it apart from a PEFT adapter dir).
ADAPTER_TYPE = "polar"


# ------------------------------------------------------------------------------------------ target search
@dataclass(frozen=True)
class TargetLayer:
    """A linear layer selected for adaptation: its module path and weight shape."""

    name: str
    in_features: int
    out_features: int

    @property
    def u_slot(self) -> str:
        return f"{self.name}.U"

    @property
    def v_slot(self) -> str:
        return f"{self.name}.V"


def _matches(name: str, target: str) -> bool:
    # PEFT's list semantics: exact name, or a dotted suffix ("q_proj" matches "...self_attn.q_proj").
    return name == target or name.endswith("." + target)


def _block_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """``(container path, index)`` of the first numbered ``nn.ModuleList`` entry on ``name``'s path
    (``model.layers.12.self_attn.q_proj`` -> ``("model.layers", 12)``); None outside numbered blocks.
    The first index is the block index; later ones (MoE experts) are not."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            container = ".".join(parts[:i])
            try:
                sub = model.get_submodule(container)
            except AttributeError:
                continue
            if isinstance(sub, nn.ModuleList):
                return container, int(part)
    return None


def off_feature_path(model: nn.Module, names: list[str]) -> list[str]:
    """The modules among ``names`` that the features never pass through: everything outside the decoder
    body (:func:`polar_vbll.architecture.decoder_of`), e.g. the LM head. An adapter there would change
    nothing the method reads, and the LM head's rows are where the answer-letter head starts from."""
    try:
        prefix = decoder_path(model)
    except UserInputError:
        prefix = None
    if prefix:
        return [n for n in names if not n.startswith(prefix + ".")]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n in names if head is not None and model.get_submodule(n) is head]


def check_peft_targets(model: nn.Module, names: list[str], where: str) -> None:
    """Refuse (``UserInputError``, one line, nothing written) a PEFT LoRA export that serving stacks would
    mishandle: one adapting no module (vLLM then silently serves the base model) or holding a delta on the
    LM head (vLLM refuses LoRA weights on ``lm_head``). Our adapters never sit there (:func:`select_targets`
    drops layers off the feature path); the merged export (``polar-vbll export RUN --merged DIR``) folds any
    delta into the weights instead."""
    if not names:
        raise UserInputError(f"{where}: the adapter adapts no module; a PEFT export of it would match nothing "
                             "(vLLM would silently serve the base model): not written")  # fmt: skip
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    on_head = [n for n in names if n.rsplit(".", 1)[-1] == "lm_head" or (
        head is not None and model.get_submodule(n) is head)]  # fmt: skip
    if on_head:
        raise UserInputError(f"{where}: the adapter holds a delta on the LM head ({on_head[0]}), which vLLM "
                             "refuses in a LoRA adapter: not written; export the merged model instead "
                             "(`polar-vbll export RUN --merged DIR`)")  # fmt: skip


def resolve_targets(model: nn.Module, config: C) -> C:
    """``config`` with ``target_modules: auto`` replaced by ``model``'s architecture defaults
    (:func:`polar_vbll.architecture.default_target_modules`); an explicit list is returned as it is."""
    if config.target_modules != AUTO:
        return config
    return config.model_copy(update={"target_modules": default_target_modules(model)})


def select_targets(model: nn.Module, config: PolarConfig) -> list[TargetLayer]:
    """The linear layers ``config`` adapts in ``model``, sorted by name, without modifying anything.

    Raises :class:`ConfigError` (readable, naming modules) when a target name matches no linear layer,
    the selection holds only layers off the feature path (the LM head; dropped with a warning when other
    layers are selected too), a ``layers`` index is out of range, or ``r`` exceeds a selected layer's
    ``min(in, out)``.
    """
    if any(isinstance(m, PolarLinear) for m in model.modules()):
        raise UserInputError(
            "the model already contains PoLAR adapters; inject into a fresh model (or call "
            "PolarModel.load_adapter on one)"
        )
    config = resolve_targets(model, config)
    linears = {n: m for n, m in model.named_modules() if is_linear(m) and n}
    available = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unmatched = [t for t in config.target_modules if not any(_matches(n, t) for n in linears)]
    if unmatched:
        raise ConfigError(
            f"PolarConfig.target_modules: {unmatched} match no linear module (nn.Linear or Conv1D) of "
            f"{type(model).__name__}; linear modules available (by last name component): {available}"
        )
    chosen = sorted(n for n in linears if any(_matches(n, t) for t in config.target_modules))
    off_path = off_feature_path(model, chosen)
    if off_path:
        why = (
            "not on the feature path: the features are the decoder's final hidden state, read before the LM "
            "head (the last layer is the method's head, over the answer letters)"
        )
        if len(off_path) == len(chosen):
            raise ConfigError(
                f"PolarConfig.target_modules selects only {off_path}, {why}; adapt layers of the decoder "
                f"blocks instead, e.g. {[a for a in available if a.endswith('_proj')][:5]}"
            )
        warnings.warn(f"target_modules: {off_path} dropped from the adapted layers, {why}", stacklevel=2)
        chosen = [n for n in chosen if n not in off_path]

    if config.layers is not None:
        blocks = {n: _block_of(model, n) for n in chosen}
        containers = sorted({b[0] for b in blocks.values() if b is not None})
        if not containers:
            raise ConfigError(
                "PolarConfig.layers is set, but none of the target modules lies in a numbered block "
                f"(nn.ModuleList) of {type(model).__name__}"
            )
        if len(containers) > 1:
            raise ConfigError(
                f"PolarConfig.layers is ambiguous: the target modules lie in several block lists "
                f"{containers}; narrow target_modules (e.g. 'self_attn.q_proj')"
            )
        n_blocks = len(model.get_submodule(containers[0]))
        bad = [i for i in config.layers if not -n_blocks <= i < n_blocks]
        if bad:
            raise ConfigError(
                f"PolarConfig.layers: indices {bad} are out of range for {containers[0]} with {n_blocks} "
                f"blocks (valid: {-n_blocks}..{n_blocks - 1})"
            )
        wanted = {i % n_blocks for i in config.layers}
        chosen = [n for n in chosen if blocks[n] is not None and blocks[n][1] in wanted]
        if not chosen:
            raise ConfigError(
                f"PolarConfig.layers={config.layers} selects blocks that hold none of the target modules "
                f"{config.target_modules} in {type(model).__name__}; choose other blocks or targets"
            )

    targets = [TargetLayer(n, *linear_dims(linears[n])) for n in chosen]
    too_small = [t for t in targets if config.r > min(t.in_features, t.out_features)]
    if too_small:
        t = too_small[0]
        more = f" (and {len(too_small) - 1} more)" if len(too_small) > 1 else ""
        raise ConfigError(
            f"PolarConfig.r={config.r} exceeds min(in, out) of layer {t.name!r} with weight shape "
            f"(out={t.out_features}, in={t.in_features}){more}: a rank-r Stiefel factor needs r <= "
            f"{min(t.in_features, t.out_features)}"
        )
    return targets


def _slot_requests(targets: list[TargetLayer], r: int) -> list[SlotRequest]:
    """U then V for every target, in the (sorted) target order: the deterministic draw order."""
    reqs: list[SlotRequest] = []
    for t in targets:
        reqs += [SlotRequest(t.u_slot, t.out_features, r), SlotRequest(t.v_slot, t.in_features, r)]
    return reqs


# --------------------------------------------------------------------------------------------- file I/O
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same directory, fsync it, then ``os.replace`` it over ``path``,
    so an interruption leaves either the old file or the new one, never half of one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(cpu, str(p), metadata=metadata))


def _model_name_or_path(model: nn.Module) -> str | None:
    for obj in (getattr(model, "config", None), model):
        name = getattr(obj, "name_or_path", None) or getattr(obj, "_name_or_path", None)
        if isinstance(name, str) and name:
            return name
    return None


# ------------------------------------------------------------------------------------------- the model
class PolarModel(nn.Module):
    """A Hugging Face model with PoLAR adapters injected in place.

    ``PolarModel(model, config)`` freezes every base parameter, replaces each targeted linear layer by
    a :class:`PolarLinear`, and draws U, V for all of them into one :class:`StiefelBank` from a generator
    seeded with ``config.init_seed`` (slots in sorted module-name order, U before V), so the same model
    and config always give the same initial adapter.
    """

    #: what a saved adapter's config records as its type, and the config validator of this kind (a subclass's
    #: config extends ``PolarConfig``: PoLAR-BLoB, ``polar_vbll.adapters.blob``)
    ADAPTER_TYPE = ADAPTER_TYPE
    parse_config = staticmethod(polar_config_from_dict)

    def __init__(self, model: nn.Module, config: PolarConfig) -> None:
        super().__init__()
        config = resolve_targets(model, self.parse_config(config, f"{type(self).__name__}(config=...)"))
        targets = select_targets(model, config)
        model.requires_grad_(False)

        generator = torch.Generator().manual_seed(config.init_seed)
        bank = StiefelBank.build(_slot_requests(targets, config.r), generator=generator)
        first = model.get_submodule(targets[0].name) if targets else None
        if first is not None:
            bank.to(first.weight.device)

        for t in targets:
            parent_name, _, child = t.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            layer = PolarLinear(
                base, bank, t.u_slot, t.v_slot, r=config.r, alpha=config.alpha, dropout=config.dropout
            )
            layer.train(base.training)  # a new module starts in train mode; follow the backbone's mode
            setattr(parent, child, layer)

        self.base_model = model
        self.polar_bank = bank
        self.polar_config = config

    # ---------------------------------------------------------------------------------------- plumbing
    def __getattr__(self, name: str) -> Any:
        """Fall through to ``base_model`` (``.config``, ``.generate``, ``.device``...), as PEFT does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "polar_bank"):
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Check before anything is converted: a refused bf16 cast must not leave the backbone half-cast.
        _refuse_dtype_change(fn, "PolarModel (its StiefelBank)")
        return super()._apply(fn, recurse)

    def polar_layers(self) -> Iterator[tuple[str, PolarLinear]]:
        """``(module path in base_model, layer)`` for every adapted layer, sorted by path."""
        found = [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, PolarLinear)]
        yield from sorted(found, key=lambda item: item[0])

    @property
    def scaling(self) -> float:
        return self.polar_config.scaling

    # -------------------------------------------------------------------------------------- parameters
    def stiefel_parameters(self) -> list[nn.Parameter]:
        """The bank's ``(G, n, r)`` group tensors, in sorted group order (for the manifold optimizer)."""
        return [p for _, p in self.polar_bank.groups()]

    def update_parameters(self) -> list[nn.Parameter]:
        """The parameters whose zeroing gives back the base model (every Theta: ``W0 + s U 0 V^T = W0``)."""
        return self.theta_parameters()

    def theta_parameters(self) -> list[nn.Parameter]:
        """Every ``polar_theta`` (Euclidean; plain AdamW), in sorted layer order."""
        return [m.polar_theta for _, m in self.polar_layers()]

    def merge(self) -> None:
        """Fold every adapter into its base weight (forward then costs what the base model costs)."""
        for _, m in self.polar_layers():
            m.merge()

    def unmerge(self) -> None:
        """Undo :meth:`merge` (see :meth:`PolarLinear.unmerge` for when this refuses)."""
        for _, m in self.polar_layers():
            m.unmerge()

    # -------------------------------------------------------------------------------------- diagnostics
    def orthogonality_error(self) -> float:
        """Worst ``||X^T X - I||_F`` over every U and V."""
        return self.polar_bank.max_orthogonality_error()

    def stable_ranks(self) -> dict[str, float]:
        """Module path -> stable rank ``||dW||_F^2 / ||dW||_2^2`` of its update (0.0 while Theta = 0),
        computed from the actual U, Theta, V (see :func:`stable_rank`)."""
        return {n: stable_rank(m.U, m.polar_theta, m.V) for n, m in self.polar_layers()}

    # -------------------------------------------------------------------------------------- state dicts
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> detached clone of every adapter tensor: the bank groups
        (``polar_bank.polar_groups.<key>``) and the thetas (``base_model.<path>.polar_theta``). Names match
        ``self.named_parameters()``. Clones, so a saved snapshot does not move with later steps."""
        out = {f"polar_bank.polar_groups.{k}": p.detach().clone() for k, p in self.polar_bank.groups()}
        for name, m in self.polar_layers():
            out[f"base_model.{name}.polar_theta"] = m.polar_theta.detach().clone()
        return out

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        out = {f"polar_bank.polar_groups.{k}": p for k, p in self.polar_bank.groups()}
        for name, m in self.polar_layers():
            out[f"base_model.{name}.polar_theta"] = m.polar_theta
        return out

    @torch.no_grad()
    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], where: str = "state dict"
    ) -> None:
        """Copy adapter tensors in, strictly: every key present, no extra key, shapes equal, values finite.

        Raises :class:`CheckpointError` naming ``where`` and the offending keys; nothing is copied unless
        everything checks out. Refuses while merged (the merged delta would no longer be subtractable).
        """
        if any(m.merged for _, m in self.polar_layers()):
            raise RuntimeError("load_adapter_state_dict: the adapters are merged; call unmerge() first")
        strict_copy_(self._adapter_params(), state_dict, f"adapter weights in {where}")

    # ------------------------------------------------------------------------------------- save / load
    def save_adapter(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``directory`` (created if
        needed), each atomically. Returns the directory. The config records the sha256 of the weights, so
        a torn pair (new weights, old config) is detected on load rather than silently mixed."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        weights = d / ADAPTER_WEIGHTS_NAME
        _write_safetensors(
            weights,
            self.adapter_state_dict(),
            metadata={"format": "pt", "adapter_type": self.ADAPTER_TYPE, "format_version": str(FORMAT_VERSION)},
        )
        cfg = {
            "format_version": FORMAT_VERSION,
            "adapter_type": self.ADAPTER_TYPE,
            "polar_config": self.polar_config.model_dump(mode="json"),
            "base_model_name_or_path": _model_name_or_path(self.base_model),
            "base_model_class": type(self.base_model).__name__,
            "scaling": self.scaling,
            "adapted_modules": [n for n, _ in self.polar_layers()],
            "slots": {name: [key, idx] for name, (key, idx) in self.polar_bank.slots.items()},
            "groups": {k: list(p.shape) for k, p in self.polar_bank.groups()},
            "weights_file": ADAPTER_WEIGHTS_NAME,
            "sha256": _sha256(weights),
        }
        cfg[CONFIG_DIGEST_KEY] = config_digest(cfg)
        _write_json(d / ADAPTER_CONFIG_NAME, cfg)
        return d

    @classmethod
    def load_adapter(cls, model: nn.Module, directory: str | os.PathLike[str]) -> PolarModel:
        """Inject the adapter saved in ``directory`` into ``model`` (a fresh base model) and load its
        weights. Everything is verified (format version, sha256, config, slot layout, tensor shapes)
        before ``model`` is modified. Raises :class:`CheckpointError` / :class:`ConfigError` naming the file.
        """
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"adapter directory {d} does not exist or is not a directory")
        cfg_path, weights = d / ADAPTER_CONFIG_NAME, d / ADAPTER_WEIGHTS_NAME
        raw = read_json_config(cfg_path)
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{cfg_path}: format_version {version!r} is not supported (this polar_vbll reads "
                f"{FORMAT_VERSION}); was it written by another tool, an older version (no config hash: save "
                "it again) or a newer one?"
            )
        check_config_digest(raw, cfg_path)
        if "polar_config" not in raw:
            raise CheckpointError(f"{cfg_path}: field 'polar_config' is missing")
        if raw.get("adapter_type", ADAPTER_TYPE) != cls.ADAPTER_TYPE:
            raise CheckpointError(
                f"{cfg_path}: adapter_type {raw.get('adapter_type')!r} is not {cls.ADAPTER_TYPE!r} (this loader's)"
            )
        config = cls.parse_config(raw["polar_config"], f"{cfg_path} (field 'polar_config')")
        if not weights.is_file():
            raise CheckpointError(f"adapter weights {weights} do not exist")
        expected_sha = raw.get("sha256")
        if not isinstance(expected_sha, str):
            raise CheckpointError(f"{cfg_path}: field 'sha256' is missing")
        actual_sha = _sha256(weights)
        if actual_sha != expected_sha:
            raise CheckpointError(
                f"adapter weights {weights} are truncated or altered: sha256 {actual_sha[:16]}... does not "
                f"match {expected_sha[:16]}... recorded in {cfg_path}"
            )
        tensors = read_safetensors(weights, "adapter weights")

        targets = select_targets(model, config)
        saved_slots = {k: tuple(v) for k, v in (raw.get("slots") or {}).items()}
        expected_slots, expected_shapes = plan_slots(_slot_requests(targets, config.r))
        if saved_slots != expected_slots:
            raise CheckpointError(
                f"{cfg_path}: the saved slot layout does not match the layers this config selects in "
                f"{type(model).__name__}; was the adapter saved for another architecture?"
            )
        saved_name = raw.get("base_model_name_or_path")
        this_name = _model_name_or_path(model)
        if saved_name and this_name and saved_name != this_name:
            warnings.warn(
                f"adapter in {d} was saved for base model {saved_name!r}, loading into {this_name!r}",
                stacklevel=2,
            )
        # Check tensor names and shapes before touching the model (a dry run of the strict load).
        shapes = {f"polar_bank.polar_groups.{k}": v for k, v in expected_shapes.items()}
        shapes.update({f"base_model.{t.name}.polar_theta": (config.r, config.r) for t in targets})
        shapes.update(cls._extra_shapes(targets, config))
        require_shapes(shapes, tensors, f"adapter weights {weights} do not match {cfg_path}")
        polar = cls(model, config)
        polar.load_adapter_state_dict(tensors, where=str(weights))
        return polar

    @classmethod
    def _extra_shapes(cls, targets, config) -> dict[str, tuple[int, ...]]:
        """A subclass's own saved tensors (beyond the bank and the thetas) and their shapes for ``targets``."""
        return {}

    # ------------------------------------------------------------------------------------------ export
    def peft_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters as PEFT LoRA tensors: ``lora_A = V^T`` (r, in), ``lora_B = U Theta`` (out, r), so
        ``(lora_alpha / r) B A = s U Theta V^T`` exactly (same alpha, same r). Keys use PEFT's saved form
        ``base_model.model.<module path>.lora_{A,B}.weight``."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, m in self.polar_layers():
                out[f"base_model.model.{name}.lora_A.weight"] = m.V.T.detach().float().contiguous().clone()
                out[f"base_model.model.{name}.lora_B.weight"] = (
                    (m.U @ m.polar_theta.float()).detach().contiguous().clone()
                )
        return out

    def export_peft_lora(self, directory: str | os.PathLike[str]) -> Path:
        """Write a standard PEFT LoRA adapter (``adapter_config.json`` in ``LoraConfig`` form and
        ``adapter_model.safetensors``) loadable by ``peft.PeftModel.from_pretrained(base, directory)``,
        for serving with any PEFT/vLLM stack. ``target_modules`` lists the full module paths adapted
        here, so PEFT adapts exactly the same layers whatever ``layers`` selected. peft is not needed to
        write it."""
        d = Path(directory)
        check_peft_targets(self.base_model, [n for n, _ in self.polar_layers()], f"PEFT export to {d}")
        d.mkdir(parents=True, exist_ok=True)
        _write_safetensors(d / ADAPTER_WEIGHTS_NAME, self.peft_lora_state_dict(), metadata={"format": "pt"})
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": _model_name_or_path(self.base_model),
            "revision": None,
            "inference_mode": True,
            "r": self.polar_config.r,
            "lora_alpha": self.polar_config.alpha,
            "lora_dropout": self.polar_config.dropout,
            "target_modules": [n for n, _ in self.polar_layers()],
            "bias": "none",
            # Conv1D layers (GPT-2 family) store their weight (in, out): peft's fan_in_fan_out convention
            "fan_in_fan_out": any(transposed(m.base_layer) for _, m in self.polar_layers()),
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        _write_json(d / ADAPTER_CONFIG_NAME, cfg)
        return d


def inject_polar(model: nn.Module, config: PolarConfig | Mapping[str, Any]) -> PolarModel:
    """Inject PoLAR adapters into ``model`` in place and return the wrapping :class:`PolarModel`."""
    return PolarModel(model, polar_config_from_dict(config, "inject_polar(config=...)"))
