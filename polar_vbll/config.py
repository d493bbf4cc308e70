"""Typed run configuration, loadable from YAML and dumped whole into every run's parameters.

Every model rejects unknown keys (``extra="forbid"``) so a typo in a YAML file is an error naming the
field, not a silently ignored setting. Options marked **[choice]** in ``docs/method.md`` are fields here.

``method`` names one entry of ``polar_vbll.methods.METHODS`` (an adapter kind, a head kind and a
predictive); the method's defaults are merged under the given values and its cross-field check runs when
the config is parsed, so a config that validates is a config every entry point can run or refuse at once.
Packaged configs (``polar_vbll/configs/<kind>/<name>.yaml``) are resolved here, in one place.
"""

from __future__ import annotations

import copy
import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polar_vbll.adapters.config import BlobConfig, LoraConfig, PolarBlobConfig, PolarConfig
from polar_vbll.errors import ConfigError, UserInputError
from polar_vbll.files import check_name
from polar_vbll.heads.config import VBLLConfig
from polar_vbll.heads.features import FeatureMapConfig
from polar_vbll.methods import METHODS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which backbone to load and how to feed it."""

    source: Literal["smollm2", "path", "tiny"] = "smollm2"
    path: str | None = Field(
        None,
        description="source: path - a local Hugging Face model folder, or a hub id org/name found in the Hugging "
        "Face cache (HF_HUB_OFFLINE honoured; polar_vbll.models.resolve_model_path)",
    )
    revision: str | None = Field(
        None, description="the hub revision (branch, tag or commit) of a hub id or cache folder; default main"
    )
    device: str = Field(
        "auto",
        description="where the backbone runs (polar_vbll.placement): auto (the first CUDA device when there is "
        "one, else the CPU), cpu, cuda or cuda:N; everything else follows it",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the backbone's compute dtype: auto (bfloat16 on a CUDA device that supports it, float32 "
        "otherwise; a run records what it resolved to); U, V, Theta and the heads stay float32",
    )
    add_bos: bool = Field(False, description="prepend BOS explicitly (transformers 4 and 5 disagree)")
    max_length: int = Field(300, gt=8, description="prompts longer than this keep their last tokens")
    tiny_hidden: int = Field(64, gt=0)
    tiny_layers: int = Field(2, gt=0)
    tiny_seed: int = 0

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        from polar_vbll.placement import DEVICE_PATTERN

        if not DEVICE_PATTERN.match(v):
            raise ValueError("not a device; use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, v: str | None) -> str | None:
        # recorded absolute, so the run folder's config reloads from any working directory (and every node); a
        # hub id (org/name) that is not a local path stays an id (resolved through the Hugging Face cache)
        from polar_vbll.models import HUB_ID

        if not v or (HUB_ID.match(v) and not Path(v).expanduser().exists()):
            return v
        return str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _path_needed(self) -> ModelConfig:
        if self.source == "path" and not self.path:
            raise ValueError(
                "model.source is 'path' but model.path is not set: name a model folder or hub id "
                "(--set model.path=...; in a comparison --set base.model.path=...)"
            )
        return self


class DataConfig(_Strict):
    """Task and splits. ``task`` is a built-in name (see ``docs/data.md``), ``jsonl:<path>`` or a source read
    through ``datasets`` (``hf:<folder|org/name>[:config]``, ``csv:``, ``parquet:``, ``json:<file>``), whose
    columns ``columns`` maps to our fields."""

    task: str = "arc_easy"
    columns: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="our fields (question, choices, answer, context, id) -> the columns of an hf:, csv:, "
        "parquet: or json: source, e.g. {question: text, choices: options, answer: label}; choices may list "
        "several columns (docs/data.md)",
    )
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

    @field_validator("task")
    @classmethod
    def _absolute_task(cls, v: str) -> str:
        return absolute_task(v)

    @field_validator("ood_tasks")
    @classmethod
    def _absolute_ood_tasks(cls, v: list[str]) -> list[str]:
        return [absolute_task(t) for t in v]

    @field_validator("columns")
    @classmethod
    def _columns_shape(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        if not v:
            return v
        from polar_vbll.tasks.columns import check_mapping

        return check_mapping(v)

    @model_validator(mode="after")
    def _columns_need_a_source(self) -> DataConfig:
        if self.columns and not self.task.startswith(DATASETS_PREFIXES):
            raise ValueError(
                f"data.columns maps the columns of an hf:, csv:, parquet: or json: source; data.task "
                f"{self.task!r} is not one (a jsonl: file uses our field names; read it as json:<file> to map "
                "its columns)"
            )
        return self


#: Task prefixes read through ``datasets`` (``polar_vbll.tasks.hf_source.PREFIXES``).
DATASETS_PREFIXES = ("hf:", "csv:", "parquet:", "json:")


def absolute_task(task: str) -> str:
    """``jsonl:<path>``, ``csv:``/``parquet:``/``json:<file>`` and a local ``hf:<folder>`` with the path made
    absolute (recorded so, a run folder's config reloads from any working directory and on every node); a
    hub id (``hf:org/name``) and other task names unchanged."""
    prefix = "jsonl:"
    if task.startswith(prefix) and task[len(prefix) :]:
        return prefix + str(Path(task[len(prefix) :]).expanduser().resolve())
    if task.startswith(DATASETS_PREFIXES) and task.partition(":")[2]:
        from polar_vbll.tasks.hf_source import absolute_source

        return absolute_source(task)
    return task


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
    landing_safe_distance: float | None = Field(
        0.1,
        ge=1e-3,
        le=1.0,
        description="[choice] landing's safeguard: the bound on ||X^T X - I||_F that every landing step keeps "
        "(a step that would leave it takes the normal Newton-Schulz step and the largest safe fraction of the "
        "AdamW step); null: PoLAR's unguarded landing",
    )
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
    prefix_cache: Literal["disk", "memory", "stream"] = Field(
        "disk",
        description="where the cached frozen-prefix states live: 'disk' (also in memory; shared by every run, "
        "seed, method, trial and eval on the same token ids and frozen weights, polar_vbll.prefix_cache), "
        "'stream' (on disk only, each batch's states read back from the file: memory that does not grow "
        "with the split, for large training files) or 'memory' (this process only)",
    )
    prefix_cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16",
        description="[choice] precision of the cached frozen-prefix states (RAM and disk): half precision "
        "halves both; the adapted blocks then read inputs rounded to 11 significant bits",
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
    activation_checkpointing: bool = Field(
        False, description="[choice] recompute the adapted blocks' activations in the backward pass instead of "
        "keeping them (less memory, about one more forward of the adapted blocks per step)",
    )  # fmt: skip
    compile: bool = Field(
        False, description="[choice] torch.compile every decoder block (regional, dynamic shapes; one process): "
        "off until measured on a GPU (bench/gpu_check.py); the first steps pay the compilation",
    )  # fmt: skip


class HeadFitConfig(_Strict):
    """The eta-phase: the head fitted on fixed training features (never weight decay: the ELBO already
    holds the prior). Per round, full-batch L-BFGS to convergence (``polar_vbll.heads.fit``) or a fixed
    number of Adam steps; per step (``train.alternation: per_step``), one Adam step on the step's
    minibatch after a first L-BFGS fit on the whole training set."""

    optimizer: Literal["lbfgs", "adam"] = Field(
        "lbfgs",
        description="[choice] per-round refits: full-batch L-BFGS until the gradient tolerance (or max_iter), "
        "or `steps` Adam steps",
    )
    max_iter: int = Field(500, gt=0, description="L-BFGS iterations per fit at most")
    tolerance: float = Field(1e-6, gt=0, description="L-BFGS stops when no gradient entry exceeds this")
    prior_rounds: int = Field(30, gt=0, description="empirical Bayes: prior-variance updates per refit at most")
    prior_tolerance: float = Field(
        1e-4, gt=0, description="empirical Bayes: stop when the prior variance changes by less (relative)"
    )
    lr: float = Field(1e-2, gt=0, description="Adam's learning rate (optimizer adam, and per-step refits)")
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = Field(100, gt=0, description="Adam steps per refit (optimizer adam, per_round schedule)")
    batch_size: int | None = Field(None, gt=0, description="Adam minibatch per refit step (None: full batch)")
    seed: int = 0

    @field_validator("lr", "tolerance", "prior_tolerance")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class LaplaceConfig(_Strict):
    """The ``laplace`` head kind: post-hoc last-layer Laplace around the trained deterministic head, its
    prior precision chosen by the marginal likelihood (``polar_vbll.heads.laplace``)."""

    structure: Literal["full", "kron"] = Field("full", description="full GGN, or Kronecker-factored (KFAC)")
    mean: Literal["map", "trained"] = Field(
        "map",
        description="[choice] the mode the posterior is centred on. map: the last layer refitted on the final "
        "training features as the MAP under the evidence-chosen prior (MacKay's iteration, the linear probe's "
        "fit), a Laplace approximation at a mode of the posterior it approximates; trained: the head as "
        "trained (strictly post-hoc; around an MLE head the evidence picks a weak prior and the logit "
        "variance explodes, docs/method-choices.md)",
    )
    predictive: Literal["probit", "mc"] = Field(
        "probit", description="[choice] generalized probit, or Monte Carlo over the K Gaussian logits"
    )
    mc_samples: int = Field(1000, gt=0, description="logit samples per example for predictive='mc'")
    mc_seed: int = Field(0, ge=0, description="seed of those samples")


class LinearHeadConfig(_Strict):
    """The ``linear`` head kind (``polar_vbll.heads.linear``): a trainable linear head, trained jointly with
    the adapters; MLE, or MAP under the VBLL head's Gaussian prior."""

    prior: Literal["none", "gaussian"] = Field(
        "none", description="none: MLE (cross-entropy); gaussian: MAP under N(0, prior_scale * 2 / D)"
    )
    prior_scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="the MAP prior's s_p = prior_scale * 2 / D")
    lr: float = Field(4e-3, gt=0, allow_inf_nan=False, description="Adam's learning rate for the head's weights")


class HeadConfig(_Strict):
    """Settings of the head kinds (which kind a run uses is its ``method``'s). Every head starts from the
    LM-head rows of the answer tokens (re-expressed on the standardised features), so training starts at
    the zero-shot model."""

    features: FeatureMapConfig = Field(default_factory=FeatureMapConfig)
    vbll: VBLLConfig = Field(default_factory=VBLLConfig)
    linear: LinearHeadConfig = Field(default_factory=LinearHeadConfig)
    fit: HeadFitConfig = Field(default_factory=HeadFitConfig)
    laplace: LaplaceConfig = Field(default_factory=LaplaceConfig)


class EvalConfig(_Strict):
    """Settings of the predictives (which one a run uses is its ``method``'s)."""

    temperature_scaling: bool = Field(
        False,
        description="also report the predictive after temperature scaling, its temperature fitted on the "
        "validation split's NLL (post hoc; any method; the MLE/MAP methods switch it on)",
    )
    mc_dropout_samples: int = Field(10, gt=0, description="mc_dropout: stochastic backbone passes per example")
    ensemble_members: int = Field(3, gt=0, description="ensemble: independently seeded adapter/head pairs")


class TfbConfig(_Strict):
    """TFB's post-hoc variance search (``method: tfb``; ``polar_vbll.tfb``). Defaults: the reference code's
    TFB-on-MLE protocol (Wang-ML-Lab/bayesian-peft ``scripts/tfblora/mle.sh``: upper bound 0.015, threshold
    0.003, 5 bisection steps, 10 samples)."""

    min_std: float = Field(0.001, gt=0, description="[choice] lower end of the std scale's bisection")
    max_std: float = Field(0.015, gt=0, description="[choice] upper end (the result when no step exceeds the "
                           "threshold)")
    threshold: float = Field(0.003, gt=0, description="[choice] the largest change of the anchor NLL allowed")
    iterations: int = Field(5, ge=1, description="[choice] bisection steps")
    search_samples: int = Field(10, gt=0, description="sampled passes per bisection step")
    eval_samples: int = Field(10, gt=0, description="sampled passes per example at test time")
    anchor: Literal["train", "validation"] = Field("train", description="[choice] the split the search reads "
                                                    "(the reference: the training data)")
    criterion: Literal["reference", "relative"] = Field(
        "reference", description="[choice] the NLL change: reference: |NLL - NLL0| / NLL0 / anchor size (as "
        "bayesian-peft computes it); relative: |NLL - NLL0| / NLL0")

    @model_validator(mode="after")
    def _ordered(self) -> TfbConfig:
        if self.min_std >= self.max_std:
            raise ValueError(f"tfb.min_std ({self.min_std}) must be below tfb.max_std ({self.max_std})")
        return self


class DecisionConfig(_Strict):
    """The decision rule a run is scored with and ``polar-vbll calibrate`` builds by default
    (docs/predict.md; ``polar_vbll.decisions``), calibrated on held-out data (the validation split)."""

    risk: float = Field(0.1, gt=0, lt=1, description="[choice] target selective risk: the error rate allowed "
                        "among answered questions (Learn-then-Test threshold on the confidence)")
    delta: float = Field(0.1, gt=0, lt=1, description="[choice] the risk guarantee holds with probability "
                         "1 - delta over the calibration draw")
    fwer: Literal["bonferroni_holm", "bonferroni"] = Field(
        "bonferroni_holm", description="[choice] family-wise error control of Learn-then-Test's threshold grid")
    thresholds: int = Field(10, ge=1, le=1000, description="[choice] confidence thresholds Learn-then-Test tests, "
                            "equally spaced on [1/K, 1) (more: finer, but each costs power)")
    alpha: float = Field(0.1, gt=0, lt=1, description="[choice] miscoverage of the conformal answer sets "
                         "(sets hold the answer with probability >= 1 - alpha)")
    ood_pass: float = Field(0.95, gt=0, lt=1, description="[choice] fraction of in-distribution calibration "
                            "questions the OOD flag lets pass (its threshold's quantile)")


def check_plain_name(name: str, what: str = "the name") -> None:
    """:func:`check_name` for a name a user gives (one plain part), as a :class:`ConfigError`."""
    try:
        check_name(name, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class RunConfig(_Strict):
    """One run: everything needed to reproduce it."""

    name: str = "run"
    output_dir: str = "runs"
    method: str = Field(
        "polar_mle",
        description="a named method of polar_vbll.methods.METHODS (adapter kind, head kind, predictive)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    polar: PolarConfig = Field(default_factory=PolarConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    blob: BlobConfig = Field(default_factory=BlobConfig)
    polar_blob: PolarBlobConfig = Field(default_factory=PolarBlobConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tfb: TfbConfig = Field(default_factory=TfbConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """The method's defaults, under the values given (``lora_map`` sets a weight decay unless the
        config sets one)."""
        if isinstance(data, dict):
            method = METHODS.get(data.get("method", cls.model_fields["method"].default))
            if method is not None and method.defaults:
                return deep_merge(dict(method.defaults), data)
        return data

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, nested=True)  # composed names nest; entry points refuse nesting in a user's name

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; valid methods: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _method_check(self) -> RunConfig:
        check = METHODS[self.method].check
        if check is not None:
            check(self)
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def flat_params(self) -> dict[str, Any]:
        """Every value as ``section.key`` -> value, for run parameters (MLflow, results files)."""
        return _flatten(self.model_dump(mode="json"))


def deep_merge(base: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by each override (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for over in overrides:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: Keys of the configuration layout before methods became data, and what replaced them.
_REPLACED = {
    "adapter": "renamed `polar` (the PoLAR adapter's settings)",
    "adapter_kind": "use `method` (e.g. lora_mle; `polar-vbll methods` lists them)",
    "head.kind": "use `method` (e.g. polar_vbll for the VBLL head)",
    "head.laplace_predictive": "now `head.laplace.predictive` (use method: laplace)",
    "eval.predictive": "use `method` (e.g. mc_dropout)",
}


def _close_key(model: type[BaseModel], loc: tuple) -> str | None:
    """The field of ``model`` nearest in spelling to the unknown key at ``loc`` (a dotted path), if any."""
    node: Any = model
    for part in loc[:-1]:
        field = getattr(node, "model_fields", {}).get(part)
        node = field.annotation if field is not None else None
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
    names = list(getattr(node, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), close[0]]) if close else None


def _format_validation_error(
    err: ValidationError,
    source: str,
    model: type[BaseModel] | None = None,
    hints: dict[str, str] | None = None,
) -> str:
    """One line per bad field (a single error is one line in all), naming the field, what is wrong, the
    value given, and for an unknown key what replaced it or the nearest valid key."""
    msgs = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            near = _close_key(model, e["loc"]) if model is not None else None
            if loc in _REPLACED:
                msg += f"; {_REPLACED[loc]}"
            elif hints and str(e["loc"][0]) in hints:
                msg += f"; {hints[str(e['loc'][0])]}"
            elif near:
                msg += f"; did you mean {near}?"
        if not loc:  # a check across fields: its message names them; the whole mapping says nothing more
            msgs.append(msg)
        elif e["type"] in ("missing", "extra_forbidden"):
            msgs.append(f"{loc}: {msg}")
        else:
            msgs.append(f"{loc}: {msg} (got {e.get('input')!r})")
    if len(msgs) == 1:
        return f"invalid configuration in {source}: {msgs[0]}"
    return "\n".join([f"invalid configuration in {source}:"] + [f"  {m}" for m in msgs])


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a config mapping, raising ConfigError that names every bad field."""
    if isinstance(data, dict) and {"tasks", "methods", "base"} & set(data):
        raise ConfigError(
            f"{source} is a comparison config (it has tasks / methods / base); run it with polar-vbll compare"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, RunConfig)) from None


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


#: What marks a folder as written by each kind of command (a run, a comparison, a search).
FOLDER_MARKERS = {"run": "params.json", "comparison": "compare_config.json", "search": "search.json"}


def check_outlives_the_job(path: str | Path, what: str = "output_dir") -> None:
    """Refuse a path inside Ray's temporary copy of a submitted job's ``working_dir``
    (``<session>/runtime_resources/working_dir_files/...``), where a relative path lands when a command runs
    under ``ray job submit --runtime-env ...``: Ray deletes it with its session, and with it what was written
    there. Raises :class:`ConfigError` saying what to set."""
    if "://" in str(path):
        return
    parts = Path(path).expanduser().resolve().parts
    if "runtime_resources" in parts and "working_dir_files" in parts:
        raise ConfigError(
            f"{what} {path} is inside Ray's temporary copy of this job's working_dir, which Ray deletes with its "
            "session (and what is written there with it); set an absolute output_dir / --output on storage that "
            "outlives the job, e.g. --set output_dir=/shared/runs, or a URI such as s3://bucket/runs"
        )


def check_output_folder(folder: str | Path, what: str = "output_dir", kind: str | None = None) -> None:
    """Refuse, before any work, a folder that Ray deletes with a submitted job (:func:`check_outlives_the_job`),
    a folder path that runs into an existing file (``output_dir`` naming a file, or a run name that is a file
    inside it), or (``kind``: run, comparison, search) a folder that already holds the output of another kind
    of command: a run, a comparison and a search never share one."""
    if "://" in str(folder):
        return
    check_outlives_the_job(folder, what)
    path = Path(folder).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what}: {p} is an existing file, not a folder; choose another {what}")
            break
    if kind is None or not path.is_dir():
        return
    for other, marker in FOLDER_MARKERS.items():
        if other != kind and (path / marker).is_file():
            raise ConfigError(
                f"{path} already holds a {other} ({marker}); a {kind} cannot write into it: choose another name"
            )


# ------------------------------------------------------------------------------------ packaged configs
CONFIG_KINDS = ("run", "compare")


def packaged_config(kind: str, name: str) -> Path:
    """Path of a config shipped inside the package (``polar_vbll/configs/<kind>/<name>.yaml``)."""
    return Path(str(resources.files("polar_vbll") / "configs" / kind / f"{name}.yaml"))


def packaged_names(kind: str) -> list[str]:
    """The names of the packaged configs of a kind (``run`` or ``compare``)."""
    return sorted(p.stem for p in Path(str(resources.files("polar_vbll") / "configs" / kind)).glob("*.yaml"))


def resolve_config(config: str | Path | None, kind: str = "run") -> Path | None:
    """A YAML path, or the name of a packaged config of this kind: the one rule every command uses.

    A value that exists as a file, contains a ``/`` or ends in ``.yaml``/``.yml`` is a path; anything else
    is a packaged name, refused with the valid names when there is none of that name."""
    if config is None:
        return None
    text = str(config)
    p = Path(text)
    if p.exists() or "/" in text or text.endswith((".yaml", ".yml")):
        return p
    packaged = packaged_config(kind, text)
    if packaged.is_file():
        return packaged
    raise UserInputError(
        f"config {text!r} is neither a file nor a packaged {kind} config ({', '.join(packaged_names(kind))})"
    )
