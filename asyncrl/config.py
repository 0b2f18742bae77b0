"""Configuration values shared by the recipes. Imports neither torch nor vLLM (tested).

Validation errors are ``ConfigError`` (a ``ValueError``) naming the field and the rule.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from asyncrl.errors import ConfigError

__all__ = ["OUTPUT_MODEL_ID_RE", "WeightSyncConfig", "parse_config", "validate_output_model_id"]

OUTPUT_MODEL_ID_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def validate_output_model_id(value: str) -> str:
    """1-63 chars of a-z, 0-9 and '-', not starting or ending with '-'."""
    if not isinstance(value, str) or not OUTPUT_MODEL_ID_RE.match(value):
        raise ConfigError(
            f"output_model_id {value!r} is invalid: use 1-63 characters of lowercase a-z, "
            "0-9 and '-', not starting or ending with '-'"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class WeightSyncConfig(_Strict):
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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid {model.__name__}: {problems}") from exc
