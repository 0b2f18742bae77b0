"""The async RL loop: rollout actors, a trainer consumer and a weight-sync task in ONE task group.

    dataset rows -> N rollout actors, each admitting a row when the AdmissionGate
      (staleness bound) allows (DeploymentSampler -> vLLM; reward_fn / rollout_fn)
      -> result channel (bounded) -> trainer (GRPO advantages, reference logprobs, TIS,
         forward_backward_custom, optim_step) -> sync channel (bounded)
      -> weight syncer (save_and_hotload: base first, deltas after) -> publish version
      -> gate reopens

Invariants:
- Every sample carries the policy version that was published when its request was sent; a
  group staler than ``max_head_offpolicy_versions`` at training time is dropped, counted, and
  its row sampled again. ``max_head_offpolicy_versions=0`` is strictly on-policy.
- ``ppo_kl`` is exactly 0 on the first minibatch of each step: old logprobs are the live
  logprobs of that minibatch (one forward, one backward).
- Every row of an epoch is trained, filtered or dropped exactly once; a checkpoint records
  which, so a stop + rerun trains the rows that were in flight, and none twice.
- Shutdown: when the trainer reaches ``max_steps`` it waits for the last sync, saves the
  final checkpoint and cancels the task group; nothing runs after ``run`` returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncrl.chaos.faults import failpoint
from asyncrl.config import RLConfig
from asyncrl.errors import RolloutError, SamplingError
from asyncrl.logging import get_logger
from asyncrl.metrics import clean_row
from asyncrl.recipes.checkpoints import TrainingCheckpoints, promote_checkpoint
from asyncrl.recipes.data import RowKey, RowLedger, check_prompt_lengths, load_rows
from asyncrl.recipes.gate import AdmissionGate
from asyncrl.rollout.rewards import (
    DropGroup,
    FailFast,
    FailurePolicy,
    RetryOnFailure,
    SampleFailure,
    call_with_policy,
    check_reward,
)
from asyncrl.rollout.types import RolloutContext, Row, Trajectory, TrajectoryGroup, Turn
from asyncrl.sync.supervisor import DeploymentSupervisor, fresh_snapshot_name

__all__ = ["Config", "RunSummary", "main", "run"]

Config = RLConfig
POLICY_MODEL_NAME = "asyncrl-policy"
log = get_logger("asyncrl.rl")


@dataclass
class RunSummary:
    log_path: Path
    steps: int
    resumed_from: str | None
    final_checkpoint: str | None
    promoted_model: Path | None
    eval_before: float | None = None
    eval_after: float | None = None
    # time.monotonic() at which the deployment served again after each recovery
    deployment_recovered_at: list[float] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _GroupResult:
    index: RowKey
    row: Row
    group: TrajectoryGroup | None
    failure: SampleFailure | None


@dataclass
class _Counters:
    """Per-step counters, reset when a metrics row is written."""

    filtered: int = 0
    stale: int = 0
    failed: int = 0
    rollout_wait_s: float = 0.0

    def take(self) -> dict[str, float]:
        out = {
            "rollout/groups_filtered": self.filtered,
            "rollout/groups_failed": self.failed,
            "async/stale_dropped": self.stale,
            "perf/rollout_wait_time": self.rollout_wait_s,
        }
        self.filtered = self.stale = self.failed = 0
        self.rollout_wait_s = 0.0
        return out


class _Shared:
    """State shared by the tasks of one event loop (no threads touch it)."""

    def __init__(self, gate: AdmissionGate, ledger: RowLedger) -> None:
        self.gate = gate
        self.ledger = ledger
        # metrics rows of trained steps not yet in metrics.jsonl (written after their sync);
        # a checkpoint keeps them, so a kill before the sync does not lose the row
        self.unlogged: dict[int, dict[str, Any]] = {}
        self.counters = _Counters()
        self._changed = anyio.Event()

    def pulse(self) -> None:
        """Wake whoever waits for the gate or the ledger to change."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    @property
    def version(self) -> int:
        return self.gate.published_version


def failure_policy(cfg: RLConfig) -> FailurePolicy:
    if cfg.failure_policy == "fail_fast":
        return FailFast(timeout=cfg.reward_timeout_s)
    if cfg.failure_policy == "retry":
        return RetryOnFailure(max_retries=cfg.failure_retries, timeout=cfg.reward_timeout_s)
    return DropGroup(timeout=cfg.reward_timeout_s)


def first_minibatch(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Use the live logprobs (detached) as old logprobs: the single-minibatch PPO step."""
    from asyncrl.trainer.types import Datum

    def wrapped(data: Sequence[Datum], logprobs_list: Sequence[Any]) -> Any:
        with_old = [
            Datum(d.model_input, {**d.loss_fn_inputs, "old_logprobs": lp.detach()})
            for d, lp in zip(data, logprobs_list, strict=True)
        ]
        return loss_fn(with_old, logprobs_list)

    return wrapped


# ------------------------------------------------------------------------------ rollouts
class Rollouts:
    """Produces one TrajectoryGroup per row with the user's reward_fn or rollout_fn."""

    def __init__(self, cfg: RLConfig, sampler: Any, renderer: Any, shared: _Shared) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.renderer = renderer
        self.shared = shared
        self.policy = failure_policy(cfg)
        self.ctx = RolloutContext(
            sampler=sampler,
            renderer=renderer,
            tokenizer=getattr(renderer, "tokenizer", None),
            policy_version=lambda: shared.version,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
        )

    async def group(self, row: Row, key: RowKey | None = None) -> TrajectoryGroup | SampleFailure:
        """The group of ``row``; with its ledger ``key`` the sampling is seeded from
        (cfg.seed, epoch, index), so the same row on the same weights samples the same tokens
        (after a resume, a deployment restart, or in another arrival order)."""
        seed = None if key is None else sampling_seed(self.cfg.seed, key)
        if self.cfg.rollout_fn is not None:
            return await self._custom_group(row, seed)
        return await self._reward_group(row, seed)

    async def _reward_group(self, row: Row, seed: int | None) -> TrajectoryGroup | SampleFailure:
        cfg = self.cfg
        prompt = self.renderer.build_generation_prompt(row.messages())
        completions = await self.sampler.sample_with_prompt_tokens(
            prompt,
            cfg.completions_per_prompt,
            cfg.max_tokens,
            cfg.temperature,
            stop_token_ids=self.renderer.stop_token_ids,
            # vLLM seeds the n completions seed, seed + 1, ...; no key: the server's RNG
            **({} if seed is None else {"seed": seed}),
        )
        rewards = await self._score(completions, row)
        if isinstance(rewards, SampleFailure):
            return rewards
        trajectories = []
        for c, reward in zip(completions, rewards, strict=True):
            turn = Turn(
                observation_tokens=tuple(c.full_tokens[: c.prompt_len]),
                action_tokens=tuple(c.completion_tokens),
                action_logprobs=tuple(c.sampling_logprobs),
                policy_version=int(c.policy_version or 0),
                reward=reward,
                finish_reason=c.finish_reason,
            )
            trajectories.append(Trajectory(turns=(turn,), reward=reward, row_id=row.row_id))
        return TrajectoryGroup(row.row_id, tuple(trajectories))

    async def _score(self, completions: Sequence[Any], row: Row) -> list[float] | SampleFailure:
        """One reward per completion: reward_fn on each, or group_reward_fn on all of them."""
        cfg = self.cfg
        if cfg.group_reward_fn is not None:
            n = len(completions)
            out: list[float] | SampleFailure = await call_with_policy(
                cfg.group_reward_fn,
                (list(completions), row),
                policy=self.policy,
                row_id=row.row_id,
                stage="group_reward_fn",
                validate=lambda v: check_group_rewards(v, n),
            )
            return out
        rewards = []
        for c in completions:
            reward = await call_with_policy(
                cfg.reward_fn,
                (c, row),
                policy=self.policy,
                row_id=row.row_id,
                stage="reward_fn",
                validate=check_reward,
            )
            if isinstance(reward, SampleFailure):
                return reward
            rewards.append(reward)
        return rewards

    async def _custom_group(self, row: Row, seed: int | None) -> TrajectoryGroup | SampleFailure:
        results: list[Any] = [None] * self.cfg.completions_per_prompt

        async def one(i: int) -> None:
            ctx = self.ctx
            if seed is not None:  # trajectory i's k-th request: seed + i * 2**16 + k
                sampler = _SeededSampler(self.sampler, seed + (i << 16))
                ctx = dataclasses.replace(ctx, sampler=sampler)
            results[i] = await call_with_policy(
                self.cfg.rollout_fn,
                (ctx, row),
                policy=self.policy,
                row_id=row.row_id,
                stage="rollout_fn",
                validate=_check_trajectory,
            )

        async with anyio.create_task_group() as tg:
            for i in range(len(results)):
                tg.start_soon(one, i)
        failures = [r for r in results if isinstance(r, SampleFailure)]
        if failures:
            return failures[0]
        return TrajectoryGroup(row.row_id, tuple(results))


def sampling_seed(seed: int, key: RowKey) -> int:
    """The vLLM sampling seed of row ``key`` = (epoch, index) in a run seeded ``seed``: stable
    across processes (not Python's salted ``hash``), < 2**62 so ``seed + i`` stays an int64."""
    digest = hashlib.blake2b(f"{seed}:{key[0]}:{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


class _SeededSampler:
    """A sampler handed to one ``rollout_fn`` trajectory: its k-th request without a ``seed``
    gets ``seed + k`` (deterministic when the trajectory's requests are made in order)."""

    def __init__(self, sampler: Any, seed: int) -> None:
        self._sampler = sampler
        self._seed = seed
        self._calls = 0

    def _next_seed(self, seed: int | None) -> int:
        if seed is None:
            seed, self._calls = self._seed + self._calls, self._calls + 1
        return seed

    async def sample_with_prompt_tokens(
        self, *args: Any, seed: int | None = None, **kwargs: Any
    ) -> Any:
        return await self._sampler.sample_with_prompt_tokens(
            *args, seed=self._next_seed(seed), **kwargs
        )

    async def sample_with_tokens(self, *args: Any, seed: int | None = None, **kwargs: Any) -> Any:
        return await self._sampler.sample_with_tokens(*args, seed=self._next_seed(seed), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def check_group_rewards(value: Any, n: int) -> list[float]:
    """A list of ``n`` finite floats, or TypeError / ValueError saying what is wrong."""
    if not isinstance(value, list | tuple) or len(value) != n:
        raise TypeError(f"returned {value!r}; expected a list of {n} rewards, one per completion")
    return [check_reward(v) for v in value]


def _check_trajectory(value: Any) -> Trajectory:
    if not isinstance(value, Trajectory):
        raise TypeError(f"rollout_fn returned {type(value).__name__}; expected a Trajectory")
    return value


# ------------------------------------------------------------------------------- trainer
@dataclass
class _Batch:
    indices: list[RowKey] = field(default_factory=list)
    groups: list[TrajectoryGroup] = field(default_factory=list)
    advantages: list[list[float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def sort(self) -> None:
        """Order the groups by row key (epoch, index), in place."""
        order = sorted(range(len(self.indices)), key=self.indices.__getitem__)
        self.indices = [self.indices[i] for i in order]
        self.groups = [self.groups[i] for i in order]
        self.advantages = [self.advantages[i] for i in order]
        self.offsets = [self.offsets[i] for i in order]


class Trainer:
    """Collects groups into a step's batch, trains, hands the step to the syncer."""

    def __init__(self, cfg: RLConfig, client: Any, reference: Any, shared: _Shared) -> None:
        from asyncrl.trainer.losses import LossConfig, make_loss_fn

        self.cfg = cfg
        self.client = client
        self.reference = reference
        self.shared = shared
        self.filtered_in_a_row = 0
        self.max_filtered_in_a_row = max(16, 4 * cfg.prompt_groups_per_step)
        loss = cfg.loss
        self.loss_fn = first_minibatch(
            make_loss_fn(
                LossConfig(
                    name=loss.name,  # type: ignore[arg-type]
                    eps_clip=loss.eps_clip,
                    eps_clip_high=loss.eps_clip_high,
                    tis_cap=loss.tis_cap,
                    normalization=loss.normalization,  # type: ignore[arg-type]
                    kl_beta=cfg.kl_beta,
                )
            )
        )

    def accept(self, result: _GroupResult, batch: _Batch) -> None:
        """Route one finished group: failed, stale, filtered, or into the batch."""
        from asyncrl.trainer.advantages import grpo_advantages

        shared, gate = self.shared, self.shared.gate
        if result.group is None:
            gate.on_failed()
            shared.ledger.finish(result.index)
            shared.counters.failed += 1
            return
        gate.on_sampled()
        version = result.group.oldest_version
        if gate.is_too_stale(version, self.client.step):
            gate.on_stale()
            shared.ledger.give_back(result.index)
            shared.counters.stale += 1
            return
        keep = self.cfg.group_filter is None or bool(self.cfg.group_filter(result.group))
        adv = grpo_advantages(result.group.rewards) if keep else None
        if adv is None:
            gate.on_filtered()
            shared.ledger.finish(result.index)
            shared.counters.filtered += 1
            self.filtered_in_a_row += 1
            if self.filtered_in_a_row >= self.max_filtered_in_a_row:
                raise RolloutError(
                    f"no learning signal: the last {self.filtered_in_a_row} groups were all "
                    "filtered out (zero reward variance, or rejected by group_filter; last "
                    f"rewards {list(result.group.rewards)}); check the reward function, the "
                    "temperature, or warm-start the model"
                )
            return
        self.filtered_in_a_row = 0
        batch.indices.append(result.index)
        batch.groups.append(result.group)
        batch.advantages.append(adv)
        batch.offsets.append(self.client.step - version)

    async def collect(self, results: MemoryObjectReceiveStream[_GroupResult]) -> _Batch:
        batch = _Batch()
        while len(batch.groups) < self.cfg.prompt_groups_per_step:
            try:  # no scheduler round trip when a result is already waiting
                result = results.receive_nowait()
            except anyio.WouldBlock:
                result = await results.receive()
            self.accept(result, batch)
            self.shared.pulse()
        return batch

    async def train(self, batch: _Batch) -> dict[str, float]:
        from asyncrl.trainer.types import AdamParams, Datum

        batch.sort()  # the arrival order of groups must not change the float sums
        datums = [
            traj.to_datum(adv, self.cfg.max_context_len)
            for group, advs in zip(batch.groups, batch.advantages, strict=True)
            for traj, adv in zip(group.trajectories, advs, strict=True)
        ]
        ref = await self.reference.forward(datums)
        datums = [
            Datum(d.model_input, {**d.loss_fn_inputs, "ref_logprobs": r})
            for d, r in zip(datums, ref, strict=True)
        ]
        out = await self.client.forward_backward_custom(datums, self.loss_fn)
        opt = await self.client.optim_step(
            AdamParams(learning_rate=self.cfg.learning_rate, grad_clip_norm=self.cfg.grad_clip_norm)
        )
        for index in batch.indices:
            self.shared.ledger.finish(index)
        return _step_metrics(out, opt, batch, datums)


def _step_metrics(out: Any, opt: Any, batch: _Batch, datums: Sequence[Any]) -> dict[str, float]:
    rewards = [t.reward for g in batch.groups for t in g.trajectories]
    trajs = [t for g in batch.groups for t in g.trajectories]
    metrics = {f"train/{k}": v for k, v in out.metrics.items()}
    metrics.update(
        {
            "train/grad_norm": opt.metrics["grad_norm"],
            "train/learning_rate": opt.metrics["learning_rate"],
            "rollout/reward_mean": statistics.fmean(rewards),
            "rollout/reward_std": statistics.pstdev(rewards),
            "rollout/completion_tokens_mean": statistics.fmean(t.num_generated for t in trajs),
            "rollout/truncated_frac": statistics.fmean(
                any(turn.finish_reason == "length" for turn in t.turns) for t in trajs
            ),
            "async/version_offset_mean": statistics.fmean(batch.offsets),
            "async/version_offset_max": max(batch.offsets),
            "train/trained_tokens": float(sum(float(d.tensor("weights").sum()) for d in datums)),
        }
    )
    return metrics


# ---------------------------------------------------------------------------------- run
async def _actor(
    shared: _Shared,
    rows: list[Row],
    rollouts: Rollouts,
    results: MemoryObjectSendStream[_GroupResult],
    supervisor: DeploymentSupervisor | None = None,
) -> None:
    """Admit a row when the gate allows, sample its group, hand the result to the trainer.

    Time spent waiting for the gate is added to ``perf/rollout_wait_time`` (actor-seconds)."""
    async with results:
        while True:
            while not shared.gate.can_admit():
                t0 = time.perf_counter()
                await shared.wait_changed()
                shared.counters.rollout_wait_s += time.perf_counter() - t0
            key = shared.ledger.take()
            shared.gate.admit()
            row = rows[key[1]]
            out = await _sample_group(rollouts, row, supervisor, key)
            if isinstance(out, SampleFailure):
                await _send(results, _GroupResult(key, row, None, out))
            else:
                await _send(results, _GroupResult(key, row, out, None))


async def _sample_group(
    rollouts: Rollouts,
    row: Row,
    supervisor: DeploymentSupervisor | None,
    key: RowKey | None = None,
) -> TrajectoryGroup | SampleFailure:
    """One group for ``row``. Under a supervisor, a group whose requests failed because the
    deployment died, or that was sampled across a restart, is sampled again (same row: the
    ledger and the gate never see it); a sampling failure on a healthy deployment follows the
    failure policy (fail_fast raises, otherwise the group counts as failed)."""
    if supervisor is None:
        return await rollouts.group(row, key)
    while True:
        epoch = await supervisor.wait_serving()
        try:
            out = await rollouts.group(row, key)
        except SamplingError as exc:
            if await supervisor.on_sampling_error(epoch):
                log.info("group_resampled_after_recovery", row_id=row.row_id)
                continue
            if isinstance(rollouts.policy, FailFast):
                raise RolloutError(f"row {row.row_id!r}: sampling failed: {exc}") from exc
            return SampleFailure(row.row_id, "sampling", f"{type(exc).__name__}: {exc}", 1)
        if supervisor.epoch == epoch:
            return out
        log.info("group_resampled_after_recovery", row_id=row.row_id)


async def _send(stream: MemoryObjectSendStream[Any], item: Any) -> None:
    """Put ``item`` into a bounded channel, waiting only when it is full."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


async def _save_checkpoint(
    cfg: RLConfig, ckpt: TrainingCheckpoints, shared: _Shared, summary: RunSummary, step: int
) -> None:
    """A periodic (resumable) or final (resumable + promotable) checkpoint of ``step``."""
    final = step >= cfg.max_steps
    name = f"step-{step}"
    unlogged = {str(s): clean_row(m) for s, m in shared.unlogged.items()}
    await ckpt.save(
        name,
        resumable=True,
        promotable=final,
        data_consumed={**shared.ledger.state(), UNLOGGED_KEY: unlogged},
        step=step,
    )
    failpoint("loop.after_checkpoint")  # step recorded; not yet synced or logged
    if final:
        summary.final_checkpoint = name


UNLOGGED_KEY = "unlogged_metrics"


async def _restore_unlogged(resumed: Any, metrics_writer: Any, log_path: Path) -> None:
    """Write the metrics rows a killed run had trained and checkpointed but not yet logged
    (their weight sync had not finished): marked ``metrics/restored``, without sync figures."""
    from asyncrl.metrics import read_metrics

    saved = resumed.data.get(UNLOGGED_KEY) or {}
    logged = {int(r["step"]) for r in await anyio.to_thread.run_sync(read_metrics, log_path)}
    for step in sorted(int(s) for s in saved):
        if step <= resumed.step and step not in logged:
            row = {k: v for k, v in saved[str(step)].items() if k != "step"}
            await metrics_writer.write(step, {**row, "metrics/restored": 1.0})
            log.warning("metrics_row_restored_from_checkpoint", step=step)


def _checkpoint_due(cfg: RLConfig, step: int) -> bool:
    """A periodic DCP checkpoint (``dcp_save_interval``) or the final one is saved at ``step``."""
    interval = cfg.weight_sync.dcp_save_interval
    return step >= cfg.max_steps or bool(interval and step % interval == 0)


async def evaluate(
    sampler: Any,
    renderer: Any,
    reward_fn: Any,
    rows: Sequence[Row],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    timeout_s: float = 60.0,
) -> float:
    """Mean reward of ``n`` samples per row (held-out evaluation). The reward function runs
    like in training (a plain function off the loop, bounded by ``timeout_s``); any failure
    stops the evaluation with a RolloutError naming the row."""
    scores: list[float] = []
    policy = FailFast(timeout=timeout_s)

    async def one(row: Row) -> None:
        prompt = renderer.build_generation_prompt(row.messages())
        outs = await sampler.sample_with_prompt_tokens(
            prompt, n, max_tokens, temperature, stop_token_ids=renderer.stop_token_ids
        )
        for c in outs:
            value = await call_with_policy(
                reward_fn,
                (c, row),
                policy=policy,
                row_id=row.row_id,
                stage="eval reward_fn",
                validate=check_reward,
            )
            assert not isinstance(value, SampleFailure)  # FailFast raises instead
            scores.append(value)

    try:
        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(one, row)
    except* RolloutError as group:  # one clear error, not a group of the concurrent rows'
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return statistics.fmean(scores)


@dataclass
class _TrainerSide:
    client: Any
    reference: Any
    ckpt: TrainingCheckpoints
    resumed: Any


async def _open_trainer(cfg: RLConfig) -> _TrainerSide:
    """Policy client (resumed, or initialised from another run), frozen reference, checkpoints."""
    from asyncrl.trainer.client import TrainingClient

    client = await anyio.to_thread.run_sync(
        lambda: TrainingClient.from_pretrained(
            cfg.base_model, seed=cfg.seed, checkpoint_dir=cfg.log_path / "checkpoints"
        )
    )
    reference = client.create_reference()  # the base weights, before any resume
    ckpt = TrainingCheckpoints(client, cfg.log_path)
    resumed = await ckpt.resume()
    if resumed is None and cfg.init_from_checkpoint:
        await ckpt.init_from(cfg.init_from_checkpoint)
    return _TrainerSide(client, reference, ckpt, resumed)


async def _open_deployment(mgr: Any, cfg: RLConfig, client: Any) -> Any:
    """Attach to ``cfg.deployment_url`` or start a vLLM server on the base model."""
    from asyncrl.sync.deployment import DeploymentConfig

    if cfg.deployment_url:
        return await mgr.attach(cfg.deployment_url, served_model_name=POLICY_MODEL_NAME)
    return await mgr.create_or_get(
        DeploymentConfig(
            model_dir=cfg.base_model,
            snapshot_root=client.sampler_root,
            log_dir=cfg.log_path / "deployment",
            max_model_len=cfg.max_context_len,
            served_model_name=POLICY_MODEL_NAME,
        )
    )


class TracedLedger(RowLedger):
    """A RowLedger that also lists the rows finished since ``drain_finished`` was last called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._finished: list[RowKey] = []

    def finish(self, key: RowKey) -> None:
        super().finish(key)
        self._finished.append(key)

    def drain_finished(self) -> list[RowKey]:
        out, self._finished = self._finished, []
        return out


def _shared_state(cfg: RLConfig, n_rows: int, step0: int, resumed: Any) -> _Shared:
    ledger = (
        TracedLedger.from_state(n_rows, resumed.data) if resumed else TracedLedger(n_rows)
    )
    # the gate counts groups since step 0: a resumed run has consumed step0 steps' worth
    gate = AdmissionGate(
        cfg.prompt_groups_per_step,
        cfg.max_head_offpolicy_versions,
        published_version=step0,
        accepted=step0 * cfg.prompt_groups_per_step,
    )
    return _Shared(gate, ledger)


async def run(
    cfg: RLConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Run the async RL loop to ``cfg.max_steps`` (resuming from ``cfg.log_path`` if possible)."""
    from transformers import AutoTokenizer

    from asyncrl.metrics import MetricsWriter
    from asyncrl.rollout.renderers import renderer_for

    rows = load_rows(cfg.dataset)
    eval_rows = load_rows(cfg.eval_rows) if cfg.eval_rows else []
    tokenizer = await anyio.to_thread.run_sync(AutoTokenizer.from_pretrained, cfg.base_model)
    renderer = renderer_for(tokenizer)
    # a prompt that cannot fit is an error naming its row now, not a failure mid-run
    check_prompt_lengths(
        rows + eval_rows, renderer, max_context_len=cfg.max_context_len, max_tokens=cfg.max_tokens
    )
    metrics_writer = MetricsWriter(cfg.log_path, sinks=cfg.metrics_sinks)  # checks log_path
    try:
        side = await _open_trainer(cfg)
        try:
            summary = await _run_with_deployment(
                cfg, side, rows, eval_rows, renderer, metrics_writer, on_step
            )
        finally:
            await side.client.aclose()
    finally:
        metrics_writer.close()
    if cfg.output_model_id and summary.final_checkpoint:
        summary.promoted_model = promote_checkpoint(
            cfg.log_path, cfg.output_model_id, summary.final_checkpoint, replace=True
        )
    return summary


async def _run_with_deployment(
    cfg: RLConfig,
    side: _TrainerSide,
    rows: list[Row],
    eval_rows: list[Row],
    renderer: Any,
    metrics_writer: Any,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> RunSummary:
    from asyncrl.rollout.sampler import DeploymentSampler
    from asyncrl.sync.deployment import DeploymentManager
    from asyncrl.sync.syncer import WeightSyncer

    client, resumed = side.client, side.resumed
    step0 = client.step
    shared = _shared_state(cfg, len(rows), step0, resumed)
    if resumed is not None:
        await _restore_unlogged(resumed, metrics_writer, cfg.log_path)
    summary = RunSummary(cfg.log_path, step0, resumed.name if resumed else None, None, None)
    async with DeploymentManager() as mgr:
        deployment = await _open_deployment(mgr, cfg, client)
        ws = cfg.weight_sync
        syncer = WeightSyncer(
            client,
            mgr,
            deployment,
            first_checkpoint_type="base",
            warmup_after_hotload=ws.warmup_after_hotload,
            reset_prompt_cache=ws.reset_prompt_cache,
            inflight=ws.inflight,
        )
        await syncer.save_and_hotload(fresh_snapshot_name(client.sampler_root, f"step-{step0}"))
        async with DeploymentSampler(
            deployment.base_url,
            POLICY_MODEL_NAME,
            max_context_len=cfg.max_context_len,
            policy_version_fn=lambda: shared.version,
        ) as sampler:
            supervisor = DeploymentSupervisor(
                mgr,
                deployment,
                syncer,
                snapshot_root=client.sampler_root,
                max_restarts=cfg.max_deployment_restarts,
                on_recovered=sampler.mark_healthy,
            )

            async def held_out(when: str) -> float | None:
                if not eval_rows:
                    return None
                value = await evaluate(
                    sampler,
                    renderer,
                    cfg.reward_fn or _no_eval,
                    eval_rows,
                    n=4,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    timeout_s=cfg.reward_timeout_s,
                )
                log.info("eval", when=when, reward_mean=value)
                return value

            summary.eval_before = await held_out("before")
            if step0 >= cfg.max_steps:
                log.info("already_complete", step=step0, max_steps=cfg.max_steps)
                summary.final_checkpoint = resumed.name if resumed else None
            else:
                rollouts = Rollouts(cfg, sampler, renderer, shared)
                trainer = Trainer(cfg, client, side.reference, shared)
                await _loop(
                    cfg,
                    shared,
                    rows,
                    rollouts,
                    trainer,
                    syncer,
                    side.ckpt,
                    metrics_writer,
                    summary,
                    on_step,
                    supervisor=supervisor,
                )
                summary.deployment_recovered_at = list(supervisor.recovered_at)
            summary.eval_after = await held_out("after")
    return summary


def _no_eval(completion: Any, row: Row) -> float:
    raise TypeError("held-out evaluation needs a reward_fn")


async def _loop(
    cfg: RLConfig,
    shared: _Shared,
    rows: list[Row],
    rollouts: Rollouts,
    trainer: Trainer,
    syncer: Any,
    ckpt: TrainingCheckpoints,
    metrics_writer: Any,
    summary: RunSummary,
    on_step: Callable[[dict[str, Any]], None] | None,
    *,
    supervisor: DeploymentSupervisor | None = None,
) -> None:
    """Actors, trainer and weight sync in one task group. With a ``supervisor`` the weight
    sync goes through it and a watchdog task recovers the deployment when it dies."""
    res_send, res_recv = anyio.create_memory_object_stream[_GroupResult](
        max_buffer_size=cfg.prompt_groups_per_step
    )
    sync_send, sync_recv = anyio.create_memory_object_stream[Any](max_buffer_size=1)
    client = trainer.client

    async def trainer_task() -> None:
        async with sync_send:
            last = time.perf_counter()
            while client.step < cfg.max_steps:
                t0 = time.perf_counter()
                batch = await trainer.collect(res_recv)
                wait = time.perf_counter() - t0
                metrics = await trainer.train(batch)
                now = time.perf_counter()
                metrics.update({"perf/train_wait_time": wait, "perf/step_time": now - last})
                metrics.update(shared.counters.take())  # what this step's collection saw
                metrics["perf/tokens_per_s"] = metrics["train/trained_tokens"] / (now - last)
                last = now
                step = client.step
                # before the checkpoint: a state never covers rows the trace does not show
                await _trace_rows(cfg.log_path, step, batch, shared)
                shared.unlogged[step] = metrics
                if _checkpoint_due(cfg, step):
                    # here, not in the sync task: the state must be queued on the trainer's
                    # worker before our next step's work, so weights and row accounting agree
                    await _save_checkpoint(cfg, ckpt, shared, summary, step)
                queued = anyio.Event()
                await sync_send.send((step, metrics, queued))
                await queued.wait()  # the snapshot is queued before our next step's work

    sync = supervisor if supervisor is not None else syncer

    async def syncer_task() -> None:
        recoveries_seen = 0
        async with sync_recv:
            async for step, metrics, queued in sync_recv:
                name = fresh_snapshot_name(client.sampler_root, f"step-{step}")
                await sync.save_and_hotload(name, after_submit=queued.set)
                timing = sync.last_timing
                metrics.update(
                    {
                        "perf/weight_sync_time": timing.total_s,
                        "sync/bytes": timing.nbytes,
                        "sync/is_delta": float(timing.kind == "delta"),
                        **_recovery_metrics(supervisor, recoveries_seen),
                    }
                )
                recoveries_seen = supervisor.restarts if supervisor else 0
                shared.gate.on_published(step)
                shared.pulse()
                await metrics_writer.write(step, metrics)
                shared.unlogged.pop(step, None)
                summary.metrics.append({"step": step, **metrics})
                summary.steps = step
                if on_step is not None:
                    on_step({"step": step, **metrics})
        tg.cancel_scope.cancel()  # the trainer is done: stop the actors

    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer_task)
        tg.start_soon(syncer_task)
        if supervisor is not None:
            tg.start_soon(supervisor.watch)
        async with res_send:
            for _ in range(cfg.rollout_workers):
                tg.start_soon(_actor, shared, rows, rollouts, res_send.clone(), supervisor)


def _recovery_metrics(supervisor: DeploymentSupervisor | None, seen: int) -> dict[str, float]:
    """Deployment recoveries so far, and the seconds the ones since the last step took."""
    if supervisor is None:
        return {}
    return {
        "deployment/restarts": float(supervisor.restarts),
        "deployment/recover_time": float(sum(supervisor.recover_s[seen:])),
    }


async def _trace_rows(log_path: Path, step: int, batch: _Batch, shared: _Shared) -> None:
    """Append this step's rows to ``{log_path}/rows.jsonl``: the ones trained, and every row
    finished since the last step (trained, filtered, or failed under the policy). The audit of
    a run (``asyncrl.chaos.report.audit_rows``) proves from it that no row was lost or trained
    twice, across crashes and resumes."""
    finished = shared.ledger.drain_finished() if isinstance(shared.ledger, TracedLedger) else []
    record = {
        "step": step,
        "trained": [list(k) for k in batch.indices],
        "finished": [list(k) for k in finished],
    }
    async with aiofiles.open(log_path / "rows.jsonl", "a") as f:
        await f.write(json.dumps(record) + "\n")


def main(cfg: RLConfig) -> RunSummary:
    """Run the loop to completion (blocking); rerun with the same log_path to resume."""
    summary = anyio.run(run, cfg)
    if not all(
        math.isfinite(v) for m in summary.metrics for v in m.values() if isinstance(v, float)
    ):
        log.warning("nonfinite_metrics", log_path=str(summary.log_path))
    return summary
