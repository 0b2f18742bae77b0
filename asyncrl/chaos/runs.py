"""The small real run the fault scenarios share: a tiny model, a dense reward, a few steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["letter_share_reward", "small_run_config"]


def letter_share_reward(completion: Any, row: Any) -> float:
    """A dense reward a random policy already has variance on: the share of lowercase
    letters in the completion."""
    text = str(getattr(completion, "text", completion))
    return sum(c.islower() for c in text) / max(len(text), 1)


def small_run_config(workdir: Path, model_dir: Path, *, n_rows: int = 24, **overrides: Any) -> Any:
    """An RLConfig logging to ``workdir/run``: ``n_rows`` prompts, groups of 4, 3 groups a
    step, one version off-policy, 6 steps (``overrides`` replace any field)."""
    from asyncrl.config import RLConfig, WeightSyncConfig

    fields: dict[str, Any] = {
        "log_path": Path(workdir) / "run",
        "base_model": model_dir,
        "dataset": [{"id": f"r{i}", "prompt": f"write {i} letters"} for i in range(n_rows)],
        "reward_fn": letter_share_reward,
        "completions_per_prompt": 4,
        "prompt_groups_per_step": 3,
        "max_head_offpolicy_versions": 1,
        "learning_rate": 5e-3,
        "max_steps": 6,
        "max_tokens": 6,
        "max_context_len": 128,
        "rollout_workers": 4,
        "weight_sync": WeightSyncConfig(dcp_save_interval=2),
    }
    return RLConfig(**{**fields, **overrides})
