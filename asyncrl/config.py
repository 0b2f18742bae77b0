"""Configuration values shared by the recipes. Imports neither torch nor vLLM (tested).

Validation errors are ``ConfigError`` (a ``ValueError``) naming the field and the rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asyncrl.errors import ConfigError

__all__ = [
    "OUTPUT_MODEL_ID_RE",
    "LossSettings",
    "RLConfig",
    "StrictModel",
    "WeightSyncConfig",
    "load_rl_config",
    "parse_config",
    "validate_output_model_id",
]

OUTPUT_MODEL_ID_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def validate_output_model_id(value: str) -> str:
    """1-63 chars of a-z, 0-9 and '-', not starting or ending with '-'."""
    if not isinstance(value, str) or not OUTPUT_MODEL_ID_RE.match(value):
        raise ConfigError(
            f"output_model_id {value!r} is invalid: use 1-63 characters of lowercase a-z, "
            "0-9 and '-', not starting or ending with '-'"
        )
    return value


Problem = tuple[str, str]  # ("weight_sync.dcp_save_interval", "Input should be ...")


def _invalid(model_name: str, problems: list[Problem]) -> ConfigError:
    """The ConfigError for a model; it keeps its problems (``.problems``), so a nested model's
    are reported with their full field path (``weight_sync.dcp_save_interval``) rather than
    wrapped in the parent's message."""
    text = "; ".join(f"{loc or '<root>'}: {msg}" for loc, msg in problems)
    error = ConfigError(f"invalid {model_name}: {text}")
    error.problems = problems  # type: ignore[attr-defined]
    return error


def _problem_list(exc: ValidationError) -> list[Problem]:
    out: list[Problem] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        nested = getattr(err.get("ctx", {}).get("error"), "problems", None)
        if nested is not None:  # a nested StrictModel's own __init__ failed
            out += [(".".join(p for p in (loc, sub) if p), msg) for sub, msg in nested]
        else:
            out.append((loc, err["msg"]))
    return out


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{loc or '<root>'}: {msg}" for loc, msg in _problem_list(exc))


class StrictModel(BaseModel):
    """Frozen, no unknown fields; invalid values raise ConfigError naming every field."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _invalid(type(self).__name__, _problem_list(exc)) from None


class WeightSyncConfig(StrictModel):
    """How the trainer's weights reach the deployment, and how often train state is saved."""

    dcp_save_interval: int = Field(0, ge=0, description="DCP train state every N steps; 0=off")
    first_checkpoint_type: str = Field("base", pattern="^(base|delta)$")
    inflight: str = Field("keep", pattern="^(keep|abort|wait)$")
    warmup_after_hotload: bool = True
    reset_prompt_cache: bool = True


def parse_config(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate ``data`` into ``model``; errors become one ConfigError naming every field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(model.__name__, _problem_list(exc)) from exc


def _resolve_callable(value: Any, field: str) -> Any:
    """A callable, or a "package.module:attribute" string naming one."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and ":" in value:
        import importlib

        module, _, attr = value.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import {value!r}: {exc}") from exc
        if callable(obj):
            return obj
    raise ValueError(f"{field} must be a callable or 'module:function', got {value!r}")


class LossSettings(StrictModel):
    """The policy loss (see asyncrl.trainer.losses.LossConfig)."""

    model_config = ConfigDict(allow_inf_nan=False)

    name: str = "grpo"
    eps_clip: float = Field(0.2, ge=0)
    eps_clip_high: float | None = Field(None, ge=0)
    tis_cap: float | None = Field(2.0, gt=0)
    normalization: str = "token_mean"

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from asyncrl.trainer.losses import LOSS_NAMES

        if value not in LOSS_NAMES:
            raise ValueError(f"unknown loss {value!r}; choose one of {list(LOSS_NAMES)}")
        return value

    @field_validator("normalization")
    @classmethod
    def _known_norm(cls, value: str) -> str:
        from asyncrl.trainer.losses import NORMALIZATIONS

        if value not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {value!r}; choose one of {list(NORMALIZATIONS)}"
            )
        return value


class RLConfig(StrictModel):
    """The async RL recipe's config (the seeds' ``rl_loop.Config`` shape)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False
    )

    log_path: Path
    base_model: Path
    dataset: Path | list[dict[str, Any]]
    reward_fn: Any = None
    # group_reward_fn(completions, row) -> one reward per completion (e.g. rank-based scoring)
    group_reward_fn: Any = None
    rollout_fn: Any = None
    completions_per_prompt: int = Field(8, ge=2, description="GRPO group size (>= 2)")
    prompt_groups_per_step: int = Field(8, ge=1)
    max_head_offpolicy_versions: int = Field(1, ge=0)
    learning_rate: float = Field(1e-5, gt=0)
    kl_beta: float = Field(0.0, ge=0)
    loss: LossSettings = LossSettings()
    max_steps: int = Field(10, ge=1)
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    output_model_id: str | None = None
    init_from_checkpoint: str | None = None
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_context_len: int = Field(1024, ge=16)
    rollout_workers: int = Field(8, ge=1)
    grad_clip_norm: float = Field(1.0, ge=0)
    reward_timeout_s: float = Field(60.0, gt=0)
    failure_policy: str = Field("drop_group", pattern="^(fail_fast|retry|drop_group)$")
    failure_retries: int = Field(2, ge=0)
    # deployment crashes survived per run (restart / reconnect + base re-hotload) before giving up
    max_deployment_restarts: int = Field(10, ge=0)
    deployment_url: str | None = None
    seed: int = 0
    eval_rows: list[dict[str, Any]] | None = None
    # group_filter(group) -> bool: False drops the group (counted in rollout/groups_filtered)
    group_filter: Any = None
    metrics_sinks: tuple[str, ...] = ()

    @field_validator("log_path", "base_model")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # absolute: these paths reach a server process (snapshot root, model dir)
        return value.absolute()

    @field_validator("metrics_sinks")
    @classmethod
    def _sinks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - {"tensorboard", "wandb"})
        if unknown:
            raise ValueError(f"unknown metrics sinks {unknown}; choose tensorboard and/or wandb")
        return value

    @field_validator("reward_fn", "group_reward_fn", "rollout_fn", "group_filter", mode="before")
    @classmethod
    def _callables(cls, value: Any, info: Any) -> Any:
        return _resolve_callable(value, info.field_name)

    @field_validator("output_model_id")
    @classmethod
    def _model_id(cls, value: str | None) -> str | None:
        if value is not None:
            validate_output_model_id(value)
        return value

    @field_validator("init_from_checkpoint")
    @classmethod
    def _init_ref(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(
                f"init_from_checkpoint must be 'run_log_path:checkpoint', got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _fits_context(self) -> RLConfig:
        if self.max_tokens >= self.max_context_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be < max_context_len "
                f"({self.max_context_len}): no prompt would fit"
            )
        return self

    @model_validator(mode="after")
    def _one_of(self) -> RLConfig:
        given = [f for f in ("reward_fn", "group_reward_fn", "rollout_fn") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of reward_fn, group_reward_fn or rollout_fn (got {given})"
            )
        return self


def load_rl_config(data: dict[str, Any]) -> RLConfig:
    """Validate a dict (e.g. parsed from a JSON/TOML file) into an RLConfig."""
    return parse_config(RLConfig, data)
