"""Chaos: the vLLM deployment is SIGKILLed twice during a real run (once the whole server,
once only its engine process); the run completes, counts the recoveries, and its rows audit
clean. See asyncrl/chaos/deployment_kill.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncrl.chaos.deployment_kill import run_deployment_kill, server_pgids
from asyncrl.metrics import read_metrics

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.anyio
async def test_run_survives_two_deployment_kills(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = await run_deployment_kill(tmp_path, tiny_model_dir)
    assert result.completed, result.detail
    assert result.faults_injected == 2
    assert result.faults_survived == 2, result.detail
    assert (result.rows_lost, result.rows_duplicated) == (0, 0)
    assert result.ok
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 7))
    restarts = [r["deployment/restarts"] for r in rows]
    assert restarts[-1] == 2 and restarts == sorted(restarts)
    assert restarts[1] == 0  # nothing before the first kill (after step 2's sync)
    # after each recovery the chain restarted from a base, then went on with deltas
    assert rows[-1]["sync/is_delta"] == 1.0
    # the servers were all stopped: nothing recorded is left
    assert server_pgids(tmp_path / "run" / "deployment") == []
