"""The configuration of a comparison: a shared base run config, and what to vary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polar_vbll.config import RunConfig, _apply_override, _format_validation_error, deep_merge, parse_config
from polar_vbll.errors import ConfigError
from polar_vbll.methods import ADAPTERS, METHODS
from polar_vbll.tasks.registry import task_folder

#: Run-config fields a comparison sets for every run itself; given in ``base`` (or in a method's or a
#: task's overrides) they would be silently replaced, so they are refused there, naming the key to use.
PER_RUN_FIELDS: dict[str, str] = {
    "method": "each run's method comes from `methods:`",
    "data.task": "each run's task comes from `tasks:`",
    "train.seed": "each run's seed comes from `seeds:`",
    **{f"{kind.section}.init_seed": "adapter init seeds follow `seeds:`" for kind in ADAPTERS.values()},
    "head.vbll.init_seed": "head init seeds follow `seeds:`",
    "head.fit.seed": "head fit seeds follow `seeds:`",
    "name": "runs are named <comparison name>/<task folder>/<method>/seed<seed>",
    "output_dir": "runs are written under the comparison's own `output_dir`",
}
#: Set for the OOD protocol's training task when the comparison has an ``ood:`` section.
OOD_FIELDS: dict[str, str] = {
    "data.ood_tasks": "the OOD sets come from `ood.eval_tasks`",
    "data.ood_limit": "the OOD sets' size comes from `ood.limit`",
}


def _given(mapping: dict[str, Any], path: str) -> bool:
    node: Any = mapping
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def method_config(
    base: dict[str, Any], method: str, extra: dict[str, Any] | None, task: str, seed: int
) -> dict[str, Any]:
    """The config mapping of one (method, task, seed): base, then the user's per-method overrides, then
    the method, task and seed (training order, adapter init, head init all follow the seed)."""
    per_run = {
        "method": method,
        "data": {"task": task},
        "train": {"seed": seed},
        **{kind.section: {"init_seed": seed} for kind in ADAPTERS.values()},  # every adapter kind's init
        "head": {"vbll": {"init_seed": seed}, "fit": {"seed": seed}},
    }
    return deep_merge(base, extra or {}, per_run)


class OODConfig(BaseModel):
    """The out-of-distribution protocol: train on ``train_task``, score ``eval_tasks`` against its test set."""

    model_config = ConfigDict(extra="forbid")

    train_task: str = "openbookqa"
    eval_tasks: list[str] = Field(
        default_factory=lambda: [
            "arc_challenge",
            "arc_easy",
            "mmlu:college_chemistry",
            "mmlu:college_physics",
        ]
    )
    limit: int | None = Field(None, gt=0, description="first N questions of each OOD set")


class CompareConfig(BaseModel):
    """Methods x tasks x seeds over one ``base`` run config (a RunConfig mapping shared by every run)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "compare"
    output_dir: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict)
    tasks: list[str] = Field(default_factory=lambda: ["arc_easy"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    methods: list[str] = Field(default_factory=lambda: ["zero_shot", "polar_mle", "polar_vbll"], min_length=1)
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    task_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-task overrides of the base, e.g. a data limit for BoolQ"
    )
    ood: OODConfig | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        from polar_vbll.config import check_name

        return check_name(v)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
        return v

    @model_validator(mode="after")
    def _base_is_valid(self) -> CompareConfig:
        refused = dict(PER_RUN_FIELDS, **(OOD_FIELDS if self.ood is not None else {}))
        places = [("base", self.base)]
        places += [(f"method_overrides.{m}", o) for m, o in self.method_overrides.items()]
        places += [(f"task_overrides.{t}", o) for t, o in self.task_overrides.items()]
        for where, mapping in places:
            for path, reason in refused.items():
                if _given(mapping, path):
                    raise ValueError(f"{where}.{path} is set per run by the comparison ({reason}); remove it")
        for method, mapping in self.method_overrides.items():
            for section in ("model", "data"):
                if section in mapping:
                    raise ValueError(
                        f"method_overrides.{method}.{section}: the methods of a comparison share the backbone and "
                        f"the data (tokenized once per task); set {section} in base or in task_overrides"
                    )
        # validate every method's config now, so a typo fails before hours of training, not after
        for m in self.methods:
            parse_config(
                method_config(self.base, m, self.method_overrides.get(m), self.tasks[0], self.seeds[0]),
                f"compare base + method {m}",
            )
        return self

    def base_for(self, task: str) -> dict[str, Any]:
        """The base config of one task: ``base`` with that task's overrides applied."""
        return deep_merge(self.base, self.task_overrides.get(task, {}))

    def run_config(self, method: str, task: str, seed: int) -> RunConfig:
        """The run config of one (method, task, seed), named and placed as the comparison writes it, with the
        OOD sets on the OOD protocol's training task (``model.dtype`` as given: the runner resolves it)."""
        mapping = method_config(self.base_for(task), method, self.method_overrides.get(method), task, seed)
        mapping["name"] = f"{self.name}/{task_folder(task)}/{method}/seed{seed}"
        mapping["output_dir"] = self.output_dir
        if self.ood is not None and task == self.ood.train_task:
            mapping.setdefault("data", {})["ood_tasks"] = list(self.ood.eval_tasks)
            mapping["data"]["ood_limit"] = self.ood.limit
        return parse_config(mapping, f"compare method {method} on {task} (seed {seed})")


def _read_mapping(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"compare config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"compare config {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"compare config {p} must hold a mapping at the top level")
    return data


def read_profile(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A compare YAML as a mapping, ``extends:`` resolved: ``extends: paper`` (a packaged profile's name, or a
    YAML path, relative to this file's folder) is read first and this file's keys are merged over it
    (mappings merge key by key; lists and values replace; ``ood: null`` drops the parent's OOD section)."""
    from polar_vbll.config import packaged_config, packaged_names

    p = Path(path)
    if p.resolve() in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, p.resolve()))
        raise ConfigError(f"compare config {p}: `extends` loops ({chain})")
    data = _read_mapping(p)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    names = ", ".join(packaged_names("compare"))
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"compare config {p}: `extends` must name one profile ({names}) or a YAML file")
    is_file = "/" in parent or parent.endswith((".yaml", ".yml"))
    parent_path = (p.parent / parent) if is_file else packaged_config("compare", parent)
    if not is_file and not parent_path.is_file():
        raise ConfigError(
            f"compare config {p}: `extends: {parent}` is neither a packaged profile ({names}) nor a file"
        )
    return deep_merge(read_profile(parent_path, (*_seen, p.resolve())), data)


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    p = Path(path)
    data = read_profile(p)
    for item in overrides or []:
        _apply_override(data, item)
    run_sections = {"method", "model", "data", *(k.section for k in ADAPTERS.values()), "optim", "train", "head",
                    "eval"}
    hint = "a run setting: it goes under base (e.g. --set base.train.steps=50)"
    try:
        return CompareConfig.model_validate(data)
    except ValidationError as err:
        hints = dict.fromkeys(run_sections, hint)
        raise ConfigError(_format_validation_error(err, str(p), CompareConfig, hints)) from None
