"""The configuration of a comparison: a shared base run config, and what to vary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polar_vbll.compare.methods import METHODS, deep_merge, method_config
from polar_vbll.config import _apply_override, _format_validation_error, parse_config
from polar_vbll.errors import ConfigError


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

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
        return v

    @model_validator(mode="after")
    def _base_is_valid(self) -> CompareConfig:
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


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"compare config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"compare config {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"compare config {p} must hold a mapping at the top level")
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return CompareConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(p))) from None
