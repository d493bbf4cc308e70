"""Typed run configuration, loadable from YAML and dumped whole into every run's parameters.

Every model rejects unknown keys (``extra="forbid"``) so a typo in a YAML file is an error naming the
field, not a silently ignored setting. Options marked **[choice]** in ``docs/method.md`` are fields here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polar_vbll.adapters.config import PolarConfig
from polar_vbll.baselines.lora import LoraBaselineConfig
from polar_vbll.errors import ConfigError
from polar_vbll.heads.config import VBLLConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which backbone to load and how to feed it."""

    source: Literal["smollm2", "path", "tiny"] = "smollm2"
    path: str | None = Field(None, description="local Hugging Face model directory (source: path)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    add_bos: bool = Field(False, description="prepend BOS explicitly (transformers 4 and 5 disagree)")
    max_length: int = Field(300, gt=8, description="prompts longer than this keep their last tokens")
    tiny_hidden: int = Field(64, gt=0)
    tiny_layers: int = Field(2, gt=0)
    tiny_seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> ModelConfig:
        if self.source == "path" and not self.path:
            raise ValueError("model.source is 'path' but model.path is not set")
        return self


class DataConfig(_Strict):
    """Task and splits. ``task`` is a built-in name (see ``docs/data.md``) or ``jsonl:<path>``."""

    task: str = "arc_easy"
    split_seed: int = 0
    train_split: str = "train"
    val_split: str = "validation"
    eval_split: str = "test"
    train_limit: int | None = Field(None, gt=0)
    val_limit: int | None = Field(None, gt=0)
    eval_limit: int | None = Field(None, gt=0)
    ood_tasks: list[str] = Field(default_factory=list, description="evaluated after training, e.g. mmlu:...")
    ood_split: str = "test"
    ood_limit: int | None = Field(None, gt=0)


class OptimConfig(_Strict):
    """Adapter optimization. Stiefel factors get ``method``; Theta always gets AdamW."""

    method: Literal["landing", "riemannian"] = Field("riemannian", description="[choice] manifold strategy")
    retraction: Literal["cholqr2", "qr", "polar"] = "cholqr2"
    second_moment: Literal["elementwise", "factor"] = Field(
        "elementwise",
        description="[choice] Riemannian Adam's second moment: 'elementwise' (AdamW-like scale, so PoLAR's "
        "lr carries over) or 'factor' (one per factor, as geoopt: a step moves a whole factor by ~lr)",
    )
    lr_stiefel: float = Field(4e-3, gt=0)
    lr_theta: float = Field(4e-3, gt=0)
    landing_lambda: float = Field(5e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    theta_weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(None, gt=0, description="clip Theta gradients (None: no clipping)")

    @field_validator("lr_stiefel", "lr_theta", "landing_lambda", "eps")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class TrainConfig(_Strict):
    """The training loop."""

    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    seed: int = 0
    cache_frozen_prefix: bool = Field(
        True,
        description="[choice] cheap path: when only the top blocks are adapted, compute the frozen blocks "
        "below them once per example and train the top blocks on the cached states",
    )
    eval_every: int = Field(0, ge=0, description="validation every N steps (0: only at the end)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0)
    alternation: Literal["per_round", "per_step"] = Field(
        "per_round",
        description="[choice] per_round: T adapter steps, then the head refitted on the whole training set's "
        "cached features; per_step: one adapter step, one head step per minibatch",
    )
    round_steps: int = Field(20, gt=0, description="T, adapter steps per round (per_round)")
    final_head_refit: bool = Field(True, description="refit the head once more on the final features")


class HeadFitConfig(_Strict):
    """The eta-phase: Adam on the head's loss with the features fixed (never weight decay: the ELBO
    already holds the prior)."""

    lr: float = Field(1e-2, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = Field(100, gt=0, description="Adam steps per refit (per_round schedule)")
    batch_size: int | None = Field(None, gt=0, description="minibatch per refit step (None: full batch)")
    seed: int = 0

    @field_validator("lr")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class HeadConfig(_Strict):
    """The last layer, started from the LM-head rows of the answer tokens in every case.

    ``deterministic``: those rows, frozen (PoLAR-MLE / LoRA-MLE: only the adapters train);
    ``vbll``: a variational Bayesian last layer (Gaussian posterior over the rows), trained by the
    alternating eta-phase. ``laplace``: post-hoc last-layer Laplace on the final (deterministic) head.
    """

    kind: Literal["deterministic", "vbll"] = "deterministic"
    vbll: VBLLConfig = Field(default_factory=VBLLConfig)
    fit: HeadFitConfig = Field(default_factory=HeadFitConfig)
    laplace: Literal["none", "full", "kron"] = Field(
        "none",
        description="post-hoc last-layer Laplace on the final head's mean (prior by marginal likelihood)",
    )
    laplace_predictive: Literal["probit", "mc"] = "probit"


class EvalConfig(_Strict):
    """How test-time predictions are made."""

    predictive: Literal["standard", "mc_dropout"] = Field(
        "standard", description="standard: one backbone pass; mc_dropout: average over adapter-dropout passes"
    )
    mc_dropout_samples: int = Field(10, gt=0)
    ensemble_members: int = Field(1, gt=0, description="deep ensemble: independently seeded adapters")


class RunConfig(_Strict):
    """One training run: everything needed to reproduce it."""

    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter_kind: Literal["polar", "lora"] = Field("polar", description="lora: the peft LoRA baseline")
    adapter: PolarConfig = Field(default_factory=PolarConfig)
    lora: LoraBaselineConfig = Field(default_factory=LoraBaselineConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def flat_params(self) -> dict[str, Any]:
        """Every value as ``section.key`` -> value, for run parameters (MLflow, results files)."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(
            f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {loc}: {msg}"
        )
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a config mapping, raising ConfigError that names every bad field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
        source = str(p)
    for item in overrides or []:
        _apply_override(data, item)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return parse_config(data, source)


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
