"""Hotloading snapshots into a REAL vLLM server (one per session, see tests/vllm_fixtures.py).

What a user would see is checked: the served ``prompt_logprobs`` of a fixed token sequence
match a transformers bf16 forward of the weights that were hotloaded, and stay unchanged
when a hotload is rejected. The last test deletes the server and checks no process is left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import conftest  # tests/conftest.py, as pytest imports it ("prepend" import mode)
import httpx
import pytest

from asyncrl.errors import (
    ChecksumError,
    ClosedResourceError,
    HotloadError,
    IdentityMismatchError,
)
from asyncrl.sync import snapshot as snap
from asyncrl.sync.deployment import (
    Deployment,
    DeploymentManager,
    HotloadResult,
    process_group_members,
)

if not hasattr(conftest, "vllm_deployment"):  # until conftest imports the shared fixtures
    from vllm_fixtures import *  # noqa: F403

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TOKENS = [3, 17, 42, 5, 99, 64, 8, 120, 33, 2, 77, 51]  # fixed ids < vocab (128)
ATOL = 0.03  # served bf16 (vLLM kernels) vs transformers bf16 forward


# ---------------------------------------------------------------------------------------------
# helpers


def _load(model_dir: Path) -> dict[str, Any]:
    import safetensors.torch

    return dict(safetensors.torch.load_file(model_dir / "model.safetensors"))


def reference_logprobs(model_dir: Path, tensors: Mapping[str, Any]) -> list[float]:
    """Logprob of each next token of TOKENS under a transformers bf16 forward of ``tensors``."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(AutoConfig.from_pretrained(model_dir)).to(torch.bfloat16).eval()
    missing, unexpected = model.load_state_dict(dict(tensors), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    with torch.no_grad():
        logprobs = model(torch.tensor([TOKENS])).logits[0].float().log_softmax(-1)
    return [logprobs[i - 1, TOKENS[i]].item() for i in range(1, len(TOKENS))]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Snap:
    name: str
    path: Path
    identity: str
    host: snap.HostSnapshot
    tensors: dict[str, Any]

    @property
    def previous(self) -> dict[str, str]:
        return {"previous_snapshot_identity": self.identity}


@dataclass(frozen=True)
class Snaps:
    model_dir: Path
    root: Path
    start: list[float]  # reference logprobs of the weights the server starts with
    base: Snap  # seed-1 weights
    delta: Snap  # base with layer 1's down_proj changed
    other_base: Snap  # seed-2 weights, never loaded: deltas on it are on the wrong chain
    wrong_chain_delta: Snap
    outside: Path  # a valid base outside the snapshot root
    outside_relative: str  # the same, relative to the root ("../..")
    link_out: Path  # a symlink inside the root to ``outside``


def _write_base(root: Path, name: str, tensors: dict[str, Any]) -> Snap:
    manifest, host = snap.write_base(root, name, tensors)
    return Snap(name, root / name, manifest.snapshot_identity, host, tensors)


def _write_delta(root: Path, name: str, tensors: dict[str, Any], on: Snap) -> Snap:
    manifest, host = snap.write_delta(root, name, tensors, on.host)
    return Snap(name, root / name, manifest.snapshot_identity, host, tensors)


def _changed_layer(tensors: dict[str, Any], scale: float) -> dict[str, Any]:
    out = dict(tensors)
    name = "model.layers.1.mlp.down_proj.weight"
    out[name] = (tensors[name].float() * scale).to(tensors[name].dtype)
    return out


@pytest.fixture(scope="module")
def snaps(
    vllm_model_dir: Path, vllm_snapshot_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Snaps:
    from asyncrl.models import make_tiny_model

    made = tmp_path_factory.mktemp("other-models")
    seed1 = _load(make_tiny_model(made / "seed1", seed=1))
    seed2 = _load(make_tiny_model(made / "seed2", seed=2))
    root = vllm_snapshot_root
    base = _write_base(root, "it-base", seed1)
    other = _write_base(root, "it-other-base", seed2)
    outside = _write_base(made / "outside-root", "outside", seed1).path
    (root / "it-link-out").symlink_to(outside)
    return Snaps(
        model_dir=vllm_model_dir,
        root=root,
        start=reference_logprobs(vllm_model_dir, _load(vllm_model_dir)),
        base=base,
        delta=_write_delta(root, "it-delta", _changed_layer(seed1, 12.0), base),
        other_base=other,
        wrong_chain_delta=_write_delta(root, "it-wrong-chain", _changed_layer(seed2, 5.0), other),
        outside=outside,
        outside_relative=os.path.relpath(outside, root),
        link_out=root / "it-link-out",
    )


async def load_base(manager: DeploymentManager, deployment: Deployment, s: Snaps) -> HotloadResult:
    return await manager.hotload_and_wait(deployment, s.base.identity, snapshot_path=s.base.path)


async def assert_serves(
    manager: DeploymentManager, deployment: Deployment, expected: list[float]
) -> None:
    served = await manager.prompt_logprobs(deployment, TOKENS)
    assert max_abs_diff(served, expected) < ATOL, (served, expected)


# ---------------------------------------------------------------------------------------------
# tests (in file order: the last one deletes the server)


async def test_server_serves_token_id_prompts(vllm_deployment: Deployment) -> None:
    body = {"model": vllm_deployment.served_model_name, "prompt": TOKENS[:4], "max_tokens": 3,
            "logprobs": 0, "temperature": 1.0, "return_token_ids": True}
    async with httpx.AsyncClient(base_url=vllm_deployment.base_url, trust_env=False,
                                 timeout=60) as client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) >= 1
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])


async def test_base_hotload_serves_the_new_weights(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    expected = reference_logprobs(snaps.model_dir, snaps.base.tensors)
    assert max_abs_diff(expected, snaps.start) > 10 * ATOL  # the check below means something
    result = await load_base(vllm_manager, vllm_deployment, snaps)
    assert result.identity == snaps.base.identity and result.kind == "base"
    assert result.changed_tensors == result.reloaded_tensors == len(snaps.base.tensors)
    assert result.timings.total_s >= result.timings.reload_s > 0
    await assert_serves(vllm_manager, vllm_deployment, expected)


async def test_status_reports_identity_version_and_pid(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    status = await vllm_manager.get_status(vllm_deployment)
    assert status.ready
    assert status.current_snapshot_identity == snaps.base.identity
    assert status.weight_version == snaps.base.identity
    assert status.kind == "base" and status.hotloads >= 1
    assert status.pid == vllm_deployment.pid and status.pid is not None
    assert status.base_url == vllm_deployment.base_url


async def test_delta_reloads_only_the_changed_layer(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    expected = reference_logprobs(snaps.model_dir, snaps.delta.tensors)
    before = reference_logprobs(snaps.model_dir, snaps.base.tensors)
    assert max_abs_diff(expected, before) > 10 * ATOL
    result = await vllm_manager.hotload_and_wait(
        vllm_deployment, snaps.delta.identity, snapshot_path=snaps.delta.path,
        incremental_snapshot_metadata=snaps.base.previous,
    )
    layer1 = [n for n in snaps.base.tensors if n.startswith("model.layers.1.")]
    assert (result.kind, result.changed_tensors, result.reloaded_tensors) == (
        "delta", 1, len(layer1))
    await assert_serves(vllm_manager, vllm_deployment, expected)
    status = await vllm_manager.get_status(vllm_deployment)
    assert status.current_snapshot_identity == snaps.delta.identity


async def test_wrong_chain_delta_is_rejected_and_weights_unchanged(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    expected = reference_logprobs(snaps.model_dir, snaps.base.tensors)
    delta = snaps.wrong_chain_delta
    with pytest.raises(IdentityMismatchError):  # caller names the chain the file is on
        await vllm_manager.hotload_and_wait(
            vllm_deployment, delta.identity, snapshot_path=delta.path,
            incremental_snapshot_metadata=snaps.other_base.previous,
        )
    with pytest.raises(IdentityMismatchError):  # caller believes it is on the served base
        await vllm_manager.hotload_and_wait(
            vllm_deployment, delta.identity, snapshot_path=delta.path,
            incremental_snapshot_metadata=snaps.base.previous,
        )
    await assert_serves(vllm_manager, vllm_deployment, expected)
    status = await vllm_manager.get_status(vllm_deployment)
    assert status.current_snapshot_identity == snaps.base.identity


async def test_tampered_delta_is_rejected_and_weights_unchanged(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    expected = reference_logprobs(snaps.model_dir, snaps.base.tensors)
    tampered = snaps.root / "it-tampered"
    shutil.copytree(snaps.delta.path, tampered)
    data = bytearray((tampered / snap.DELTA_FILE).read_bytes())
    data[len(data) // 2] ^= 0x40
    (tampered / snap.DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        await vllm_manager.hotload_and_wait(
            vllm_deployment, snaps.delta.identity, snapshot_path=tampered,
            incremental_snapshot_metadata=snaps.base.previous,
        )
    await assert_serves(vllm_manager, vllm_deployment, expected)


async def test_paths_outside_the_root_are_rejected(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    expected = reference_logprobs(snaps.model_dir, snaps.base.tensors)
    identity = snaps.base.identity  # the outside snapshot holds the same weights
    for path in (snaps.outside, snaps.link_out, snaps.outside_relative):
        with pytest.raises(HotloadError, match=r"not inside the snapshot root"):
            await vllm_manager.hotload_and_wait(vllm_deployment, identity, snapshot_path=path)
    await assert_serves(vllm_manager, vllm_deployment, expected)


async def test_wrong_token_is_rejected(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    intruder = await vllm_manager.attach(vllm_deployment.base_url, hotload_token="wrong")
    async with intruder:
        with pytest.raises(HotloadError, match="token"):
            await vllm_manager.hotload_and_wait(
                intruder, snaps.delta.identity, snapshot_path=snaps.delta.path,
                incremental_snapshot_metadata=snaps.base.previous,
            )
    status = await vllm_manager.get_status(vllm_deployment)
    assert status.current_snapshot_identity == snaps.base.identity


async def test_keep_mode_hotload_lets_inflight_requests_finish(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment, snaps: Snaps
) -> None:
    await load_base(vllm_manager, vllm_deployment, snaps)
    body = {"model": vllm_deployment.served_model_name, "prompt": TOKENS, "max_tokens": 200,
            "ignore_eos": True, "temperature": 1.0}
    replies: list[dict[str, Any]] = []

    async def long_request() -> None:
        async with httpx.AsyncClient(base_url=vllm_deployment.base_url, trust_env=False,
                                     timeout=120) as client:
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            replies.append(response.json())

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_request)
        await anyio.sleep(0.3)
        result = await vllm_manager.hotload_and_wait(
            vllm_deployment, snaps.delta.identity, snapshot_path=snaps.delta.path,
            incremental_snapshot_metadata=snaps.base.previous, inflight="keep",
        )
    assert result.identity == snaps.delta.identity
    choice = replies[0]["choices"][0]
    assert choice["finish_reason"] == "length"
    assert replies[0]["usage"]["completion_tokens"] == 200


async def test_delete_leaves_no_process(
    vllm_manager: DeploymentManager, vllm_deployment: Deployment
) -> None:
    pid = vllm_deployment.pid
    assert pid is not None and process_group_members(pid)  # api server, engine core, worker
    await vllm_manager.delete(vllm_deployment)
    assert process_group_members(pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ClosedResourceError):
        await vllm_manager.get_status(vllm_deployment)
