"""The embedded demo: a tiny model learns a small verifiable task with async GRPO.

Steps (each is skipped when its output already exists, so a rerun resumes):
1. make a tiny Qwen2-shaped model and char tokenizer locally;
2. a short SFT warm start on synthetic, deliberately noisy answers (half of the teacher's
   answers are random letters: greedy decoding is right, sampling is often wrong);
3. async GRPO against a real vLLM deployment, with a base then delta hotload every step,
   a DCP checkpoint every few steps and a promoted model at the end;
4. held-out reward before / after (4 samples per held-out prompt at temperature 1.0: what
   RL sharpens), a metrics plot, and a summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrl.logging import get_logger

__all__ = ["DemoResult", "run_demo"]

log = get_logger("asyncrl.demo")


@dataclass
class DemoResult:
    log_path: Path
    eval_before: float | None
    eval_after: float | None
    steps: int
    plot: Path | None
    promoted_model: Path | None
    metrics_path: Path


def run_demo(
    log_path: Path,
    *,
    max_steps: int = 30,
    sft_steps: int = 120,
    seed: int = 0,
    task_name: str = "last",
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    from asyncrl.config import RLConfig, WeightSyncConfig
    from asyncrl.models import make_tiny_model
    from asyncrl.plot import plot_metrics
    from asyncrl.recipes import tasks
    from asyncrl.recipes.async_rl_loop import main
    from asyncrl.recipes.sft_loop import SFTConfig, run_sft

    log_path.mkdir(parents=True, exist_ok=True)
    task = tasks.get_task(task_name)
    train, heldout = task.make_rows(1000, 64, seed=seed)
    data = log_path / "data" / "train.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    base = log_path / "models" / "base"
    if not (base / "model.safetensors").exists():
        make_tiny_model(base, preset="tiny", seed=seed)
    sft_dir = log_path / "models" / "sft"
    if not (sft_dir / "model.safetensors").exists():
        log.info("demo_sft_start", steps=sft_steps, task=task_name)
        run_sft(
            SFTConfig(
                base_model=base,
                output_dir=sft_dir,
                max_steps=sft_steps,
                batch_size=32,
                learning_rate=1e-3,
                seed=seed,
            ),
            tasks.sft_drawer(task, train, corrupt=0.5),
        )
    cfg = RLConfig(
        log_path=log_path / "rl",
        base_model=sft_dir,
        dataset=data,
        reward_fn=task.reward,
        completions_per_prompt=8,
        prompt_groups_per_step=8,
        max_head_offpolicy_versions=1,
        learning_rate=1e-3,
        max_steps=max_steps,
        max_tokens=8,
        max_context_len=256,
        weight_sync=WeightSyncConfig(dcp_save_interval=5),
        output_model_id="demo-policy",
        eval_rows=heldout,
        seed=seed,
    )
    summary = main(cfg) if on_step is None else _main_with_progress(cfg, on_step)
    plot = plot_metrics(cfg.log_path) if (cfg.log_path / "metrics.jsonl").exists() else None
    return DemoResult(
        cfg.log_path,
        summary.eval_before,
        summary.eval_after,
        summary.steps,
        plot,
        summary.promoted_model,
        cfg.log_path / "metrics.jsonl",
    )


def _main_with_progress(cfg: Any, on_step: Callable[[dict[str, Any]], None]) -> Any:
    import anyio

    from asyncrl.recipes.async_rl_loop import run

    return anyio.run(lambda: run(cfg, on_step=on_step))
