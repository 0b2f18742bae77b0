"""Chaos: reward functions that hang (an async one forever, a plain one past the timeout) are
cut off by reward_timeout_s in a real run; their groups are dropped and counted, their rows
finished, and the run completes. See asyncrl/chaos/hung_reward.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncrl.chaos.hung_reward import HANG_ASYNC, HANG_SYNC, run_hung_reward

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.anyio
async def test_hung_rewards_are_cut_off_and_recorded(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = await run_hung_reward(tmp_path, tiny_model_dir)
    assert result.completed, result.detail
    assert result.faults_survived == 2, result.detail
    assert (result.rows_lost, result.rows_duplicated) == (0, 0)
    trace = [
        json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()
    ]
    trained = {tuple(k) for r in trace for k in r["trained"]}
    finished = {tuple(k) for r in trace for k in r["finished"]}
    hung = {(0, int(HANG_ASYNC[1:])), (0, int(HANG_SYNC[1:]))}
    assert hung <= finished  # recorded as done (dropped), so never sampled again this epoch
    assert not hung & trained
