"""The synchronous (strictly on-policy) RL loop: the async loop with no off-policy head room.

``main(cfg)`` runs ``asyncrl.recipes.async_rl_loop`` with ``max_head_offpolicy_versions=0``:
the admission gate lets exactly one step's prompt groups be sampled per published version,
so every trained token comes from the weights the deployment served for that step.
"""

from __future__ import annotations

from typing import Any

from asyncrl.config import RLConfig
from asyncrl.recipes import async_rl_loop
from asyncrl.recipes.async_rl_loop import RunSummary

__all__ = ["Config", "RunSummary", "main"]

Config = RLConfig


def on_policy(cfg: RLConfig) -> RLConfig:
    """``cfg`` with ``max_head_offpolicy_versions=0``."""
    data: dict[str, Any] = {**dict(cfg), "max_head_offpolicy_versions": 0}
    return RLConfig(**data)


def main(cfg: RLConfig) -> RunSummary:
    return async_rl_loop.main(on_policy(cfg))
