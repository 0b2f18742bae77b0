"""Deployment and worker-extension logic without vLLM: config validation, command line,
path and token checks, error mapping, the worker's verification, control-call sequencing
(``httpx.MockTransport`` fakes) and process-group handling (a stdlib fake server process)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch

from asyncrl.errors import (
    AsyncRLError,
    ChecksumError,
    ClosedResourceError,
    ConfigError,
    DeltaChainError,
    DeploymentError,
    HeldBytesLostError,
    HotloadError,
    IdentityMismatchError,
    SnapshotError,
)
from asyncrl.sync import snapshot as snap
from asyncrl.sync.cpus import usable_cpus
from asyncrl.sync.deployment import (
    PROBE_PROMPT,
    SMALL_MACHINE_CPUS,
    Deployment,
    DeploymentConfig,
    DeploymentManager,
    _EngineStateUnknown,
    build_hotload_request,
    check_probe,
    default_reserved_cpus,
    exception_from_reply,
    interpret_hotload_replies,
    is_loopback,
    process_group_members,
    server_command,
    server_env,
    with_memory_reuse,
)
from asyncrl.sync.worker_extension import (
    ENV_HOTLOAD_TOKEN,
    ENV_SNAPSHOT_ROOT,
    EXTENSION_CLS,
    AsyncRLWorkerExtension,
    HotloadRequest,
    WorkerHotloadState,
    check_token,
    error_reply,
    reload_order,
    resolve_snapshot_path,
)


def _config(tmp_path: Path, **overrides: Any) -> DeploymentConfig:
    fields: dict[str, Any] = {"model_dir": tmp_path / "model", "snapshot_root": tmp_path / "snaps"}
    return DeploymentConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# config and command line


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"host": "0.0.0.0"}, "loopback"),
        ({"host": "10.1.2.3"}, "loopback"),
        ({"extra_args": ["--port=9"]}, "extra_args"),
        ({"extra_args": ["--worker-extension-cls", "x.Y"]}, "extra_args"),
        ({"env": {ENV_HOTLOAD_TOKEN: "x"}}, "env"),
        ({"env": {"VLLM_SERVER_DEV_MODE": "0"}}, "env"),
        ({"logprobs_mode": "sampled"}, "logprobs_mode"),
        ({"dtype": "int8"}, "dtype"),
        ({"kv_cache_gib": 0}, "kv_cache_gib"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_config_errors_name_the_field(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        _config(tmp_path, **overrides)
    assert isinstance(info.value, ValueError)


def test_config_requires_model_dir_and_snapshot_root() -> None:
    with pytest.raises(ConfigError, match="model_dir") as info:
        DeploymentConfig()
    assert "snapshot_root" in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_are_accepted(tmp_path: Path, host: str) -> None:
    assert is_loopback(host)
    assert _config(tmp_path, host=host).host == host


def test_remote_host_needs_allow_remote(tmp_path: Path) -> None:
    assert not is_loopback("example.com")
    assert _config(tmp_path, host="10.0.0.5", allow_remote=True).host == "10.0.0.5"


def test_token_is_hidden_in_repr(tmp_path: Path) -> None:
    config = _config(tmp_path, hotload_token="s3cret")
    assert "s3cret" not in repr(config)
    assert "s3cret" not in repr(HotloadRequest("id", "p", token="s3cret"))


def test_server_command(tmp_path: Path) -> None:
    config = _config(tmp_path, max_model_len=1024, served_model_name="tiny",
                     extra_args=("--seed", "3"), hotload_token="s3cret")
    cmd = server_command(config, port=8123, python="/py")
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for expected in (f"--model {tmp_path / 'model'}", "--host 127.0.0.1", "--port 8123",
                     "--dtype bfloat16", "--logprobs-mode processed_logprobs",
                     f"--worker-extension-cls {EXTENSION_CLS}", "--max-model-len 1024",
                     "--served-model-name tiny", "--enforce-eager"):
        assert expected in joined
    assert cmd[-2:] == ["--seed", "3"]
    assert "s3cret" not in joined  # the token travels in the environment only
    lean = server_command(_config(tmp_path, enforce_eager=False), port=1, python="/py")
    assert "--enforce-eager" not in lean and "--max-model-len" not in lean


def test_server_env(tmp_path: Path) -> None:
    config = _config(tmp_path, env={"VLLM_CPU_OMP_THREADS_BIND": "all"}, kv_cache_gib=2)
    base = {"PATH": "/bin", ENV_HOTLOAD_TOKEN: "inherited", "PYTHONPATH": "/x"}
    env = server_env(config, token="tok", base_env=base)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "all"
    assert env[ENV_SNAPSHOT_ROOT] == str((tmp_path / "snaps").resolve())
    assert env[ENV_HOTLOAD_TOKEN] == "tok"
    import asyncrl

    package_parent = str(Path(asyncrl.__file__).resolve().parents[1])
    assert env["PYTHONPATH"].split(os.pathsep) == [package_parent, "/x"]
    assert ENV_HOTLOAD_TOKEN not in server_env(config, token=None, base_env=base)
    tunables = dict(part.split("=") for part in env["GLIBC_TUNABLES"].split(":"))
    assert tunables["glibc.malloc.mmap_max"] == "0"
    assert int(tunables["glibc.malloc.trim_threshold"]) >= 1 << 40
    plain = server_env(_config(tmp_path, reuse_freed_memory=False), token=None, base_env=base)
    assert "GLIBC_TUNABLES" not in plain


def test_reserved_cpus_none_kept_on_a_small_machine(tmp_path: Path) -> None:
    # vLLM's default keeps one core for its API server: half the forward on 2 cores
    base = {"PATH": "/bin"}
    small = server_env(_config(tmp_path), token=None, base_env=base, cpus=SMALL_MACHINE_CPUS)
    assert small["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    large = server_env(_config(tmp_path), token=None, base_env=base, cpus=SMALL_MACHINE_CPUS + 1)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in large  # vLLM's default
    for cpus in (2, 64):
        chosen = server_env(_config(tmp_path, reserved_cpus=1), token=None, base_env=base,
                            cpus=cpus)
        assert chosen["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    inherited = {**base, "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}  # the user's shell chose
    kept = server_env(_config(tmp_path), token=None, base_env=inherited, cpus=2)
    assert kept["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    field = server_env(_config(tmp_path, reserved_cpus=0), token=None, base_env=inherited, cpus=2)
    assert field["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"  # the field wins
    assert default_reserved_cpus(1) == 0 and default_reserved_cpus(64) is None
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="use the field 'reserved_cpus'"):
        _config(tmp_path, env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    with pytest.raises(ValueError, match="reserved_cpus"):
        _config(tmp_path, reserved_cpus=-1)


def test_usable_cpus_is_this_process_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncrl.sync import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert usable_cpus() == 3
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert snap._default_workers() == 32  # the codec's threads are capped
    monkeypatch.delattr(cpus.os, "sched_getaffinity")  # as on macOS
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: None)
    assert usable_cpus() == 1


def test_with_memory_reuse_keeps_what_the_user_set() -> None:
    assert with_memory_reuse("").split(":") == [
        "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 40}",
    ]
    mixed = with_memory_reuse("glibc.malloc.mmap_max=4:glibc.cpu.x86_shstk=off")
    assert mixed.split(":") == [
        "glibc.malloc.mmap_max=4", "glibc.cpu.x86_shstk=off",
        f"glibc.malloc.trim_threshold={1 << 40}",
    ]
    assert with_memory_reuse(mixed) == mixed  # idempotent


# ---------------------------------------------------------------------------------------------
# path, token, request and error mapping


def test_resolve_snapshot_path_accepts_paths_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "s1").mkdir(parents=True)
    real = (root / "s1").resolve()
    assert resolve_snapshot_path(root, "s1") == real
    assert resolve_snapshot_path(root, str(root / "s1")) == real
    assert resolve_snapshot_path(root, "./x/../s1") == real
    (root / "alias").symlink_to(root / "s1")  # a link that stays inside is fine
    assert resolve_snapshot_path(root, "alias") == real


@pytest.mark.parametrize("bad", ["..", "../elsewhere", "/etc", ".", "", "s1/../..", "a\x00b"])
def test_resolve_snapshot_path_rejects_traversal(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "root"
    (root / "s1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(HotloadError, match="rejected"):
        resolve_snapshot_path(root, bad)


def test_resolve_snapshot_path_rejects_symlinks_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "s1").mkdir(parents=True)
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"x")
    (root / "dir-link").symlink_to(outside)
    with pytest.raises(HotloadError, match="not inside"):
        resolve_snapshot_path(root, "dir-link")
    (root / "s1" / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(HotloadError, match="links outside"):
        resolve_snapshot_path(root, "s1")


def test_resolve_snapshot_path_needs_a_root(tmp_path: Path) -> None:
    with pytest.raises(HotloadError, match="no snapshot root"):
        resolve_snapshot_path(None, str(tmp_path))


def test_check_token() -> None:
    check_token(None, None)
    check_token("anything", "")
    check_token("right", "right")
    for given in (None, "wrong", "righ", "right "):
        with pytest.raises(HotloadError, match="token"):
            check_token(given, "right")


def test_hotload_request_round_trip_and_validation() -> None:
    request = HotloadRequest("abc", "/r/s", "prev", token="t")
    assert HotloadRequest.from_json(request.to_json()) == request
    for bad in ("not json", "[]", json.dumps({"snapshot_path": "p"}),
                json.dumps({"snapshot_identity": "a", "snapshot_path": 3}),
                json.dumps({"snapshot_identity": "a", "snapshot_path": "p", "token": 1})):
        with pytest.raises(HotloadError):
            HotloadRequest.from_json(bad)


def test_build_hotload_request() -> None:
    base = build_hotload_request("id1", Path("/r/b"), None, token="t")
    assert (base.snapshot_path, base.previous_snapshot_identity, base.token) == ("/r/b", None, "t")
    delta = build_hotload_request("id2", "/r/d", {"previous_snapshot_identity": "id1"}, token=None)
    assert delta.previous_snapshot_identity == "id1"
    for metadata in ({}, {"previous_snapshot_identity": ""}, {"previous": "id1"},
                     {"previous_snapshot_identity": "id1", "extra": 1}):
        with pytest.raises(ConfigError, match="incremental_snapshot_metadata"):
            build_hotload_request("id2", "/r/d", metadata, token=None)
    with pytest.raises(ConfigError, match="snapshot_identity"):
        build_hotload_request("", "/r/d", None, token=None)


@pytest.mark.parametrize(
    "exc",
    [IdentityMismatchError("m"), ChecksumError("m"), DeltaChainError("m"), HotloadError("m")],
)
def test_error_reply_round_trips_to_the_same_exception(exc: AsyncRLError) -> None:
    reply = json.loads(json.dumps(error_reply(exc, engine_touched=False)))
    assert reply == {"ok": False, "error_type": type(exc).__name__, "message": "m",
                     "engine_touched": False}
    back = exception_from_reply(reply)
    assert type(back) is type(exc) and str(back) == "m"


def test_other_errors_map_to_hotload_error() -> None:
    reply = error_reply(SnapshotError("bad manifest"), engine_touched=False)
    assert reply["error_type"] == "HotloadError" and "SnapshotError" in reply["message"]
    assert type(exception_from_reply(reply)) is HotloadError
    odd = exception_from_reply({"ok": False, "error_type": "KeyError", "message": "k"})
    assert type(odd) is HotloadError and "KeyError: k" in str(odd)
    assert type(exception_from_reply({"ok": False})) is HotloadError


def _ok(identity: str = "id1", **extra: Any) -> dict[str, Any]:
    return {"ok": True, "identity": identity, "kind": "base", "changed_tensors": 3,
            "reloaded_tensors": 3, "verify_s": 0.01, "reload_s": 0.02, **extra}


def test_interpret_hotload_replies() -> None:
    merged = interpret_hotload_replies([_ok(reload_s=0.5), _ok(reload_s=0.1)])
    assert merged["identity"] == "id1" and merged["reload_s"] == 0.5
    rejected = error_reply(IdentityMismatchError("m"), engine_touched=False)
    with pytest.raises(IdentityMismatchError):
        interpret_hotload_replies([rejected, rejected])
    touched = error_reply(RuntimeError("boom"), engine_touched=True)
    for results in ([touched], [_ok(), rejected], [_ok("a"), _ok("b")], ["text"], []):
        with pytest.raises(_EngineStateUnknown):
            interpret_hotload_replies(results)


def test_check_probe() -> None:
    assert check_probe({"choices": [{"logprobs": {"token_logprobs": [-1.5, -0.25]}}]}) == [
        -1.5, -0.25]
    bad: list[Any] = [{"choices": [{"logprobs": {"token_logprobs": [float("nan")]}}]},
                      {"choices": [{"logprobs": {"token_logprobs": [None]}}]},
                      {"choices": [{"logprobs": {"token_logprobs": []}}]},
                      {"choices": [{"logprobs": None}]}, {"error": "x"}]
    for body in bad:
        with pytest.raises(DeploymentError):
            check_probe(body)


# ---------------------------------------------------------------------------------------------
# the worker: verification before touching the engine (real snapshots, fake reload_weights)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.norm.weight",
]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(4, 8, generator=gen).to(torch.bfloat16) for n in NAMES}


class FakeWorker(AsyncRLWorkerExtension):
    """A worker whose ``reload_weights`` records what it got (and can fail half-way)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.loaded: dict[str, torch.Tensor] = {}
        self.calls = 0
        self.fail_after = fail_after

    def reload_weights(self, weights_iterator: Any) -> None:
        self.calls += 1
        for name, tensor in weights_iterator:
            if self.fail_after is not None and len(self.loaded) >= self.fail_after:
                raise RuntimeError("device lost")
            self.loaded[name] = tensor.clone()


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    root = tmp_path / "root"
    monkeypatch.setenv(ENV_SNAPSHOT_ROOT, str(root))
    monkeypatch.setenv(ENV_HOTLOAD_TOKEN, "tok")
    t0 = _tensors(0)
    base, host = snap.write_base(root, "base", t0)
    t1 = dict(t0)
    t1["model.layers.1.mlp.down_proj.weight"] = t0["model.layers.1.mlp.down_proj.weight"] * 2
    delta, _ = snap.write_delta(root, "delta", t1, host)
    other, other_host = snap.write_base(root, "other", _tensors(5))
    wrong, _ = snap.write_delta(root, "wrong", _tensors(6), other_host)
    return {"root": root, "t0": t0, "t1": t1, "base": base, "delta": delta, "other": other,
            "wrong": wrong}


def _request(manifest: snap.SnapshotManifest, path: str, *, previous: str | None = None,
             token: str | None = "tok") -> str:
    return HotloadRequest(manifest.snapshot_identity, path, previous, token).to_json()


def _delta_request(chain: dict[str, Any], **kw: Any) -> str:
    return _request(chain["delta"], "delta", previous=chain["base"].snapshot_identity, **kw)


def test_worker_base_then_delta_reloads_whole_changed_layers(chain: dict[str, Any]) -> None:
    worker = FakeWorker()
    assert worker.asyncrl_status()["identity"] is None  # unknown until the first base
    reply = worker.asyncrl_hotload(_request(chain["base"], "base"))
    assert reply["ok"] and reply["kind"] == "base" and reply["reloaded_tensors"] == len(NAMES)
    assert all(torch.equal(worker.loaded[n], chain["t0"][n]) for n in NAMES)
    worker.loaded.clear()
    reply = worker.asyncrl_hotload(_delta_request(chain))
    assert reply["ok"] and (reply["changed_tensors"], reply["reloaded_tensors"]) == (1, 2)
    assert sorted(worker.loaded) == [n for n in NAMES if ".layers.1." in n]
    assert all(torch.equal(t, chain["t1"][n]) for n, t in worker.loaded.items())
    status = worker.asyncrl_status()
    assert (status["identity"], status["kind"], status["hotloads"]) == (
        chain["delta"].snapshot_identity, "delta", 2)
    timings = status["last_hotload"]
    assert timings["verify_s"] >= 0 and timings["reload_s"] == reply["reload_s"] >= 0


class _RecordingQuantMethod:
    def __init__(self) -> None:
        self.processed: list[torch.nn.Module] = []

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.processed.append(layer)


class _TiedModel(torch.nn.Module):
    """vLLM's layout of a tied-embedding causal LM: lm_head shares embed_tokens' tensor."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(4, 8)
        self.lm_head = torch.nn.Linear(8, 4, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.lm_head.quant_method = _RecordingQuantMethod()


class ModelRunnerWorker(FakeWorker):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        model = _TiedModel(tied)
        self.model_runner = type("Runner", (), {"get_model": lambda _self: model})()
        self.lm_head = model.lm_head


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_lm_head_is_reprocessed_when_the_embeddings_reload(
    chain: dict[str, Any], tied: bool
) -> None:
    # vLLM's reload leaves a tied lm_head's packed kernel state from the OLD embeddings
    worker = ModelRunnerWorker(tied)
    processed = worker.lm_head.quant_method.processed
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]  # reloads embeddings
    assert processed == ([worker.lm_head] if tied else [])
    assert worker.asyncrl_hotload(_delta_request(chain))["ok"]  # layer 1 only: not again
    assert len(processed) == (1 if tied else 0)


def _assert_rejected(worker: FakeWorker, request: str, error: type[Exception]) -> None:
    before = worker.asyncrl_status()
    calls = worker.calls
    reply = worker.asyncrl_hotload(request)
    assert reply["ok"] is False and reply["engine_touched"] is False, reply
    assert type(exception_from_reply(reply)) is error, reply
    assert worker.calls == calls  # the engine was never touched
    assert worker.asyncrl_status() == before


def test_worker_rejects_before_touching_the_engine(chain: dict[str, Any]) -> None:
    worker = FakeWorker()
    _assert_rejected(worker, _delta_request(chain), DeltaChainError)  # no base held yet
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]
    base_id = chain["base"].snapshot_identity
    _assert_rejected(worker, _delta_request(chain, token="nope"), HotloadError)
    _assert_rejected(worker, _delta_request(chain, token=None), HotloadError)
    _assert_rejected(worker, _request(chain["base"], "../base"), HotloadError)
    assert worker.asyncrl_hotload(_request(chain["base"], "../root/./base"))["ok"]  # inside
    _assert_rejected(worker, _request(chain["base"], "/tmp"), HotloadError)
    _assert_rejected(worker, _request(chain["delta"], "delta"), DeltaChainError)  # says base
    _assert_rejected(worker, _request(chain["base"], "base", previous=base_id), DeltaChainError)
    _assert_rejected(worker, _request(chain["wrong"], "wrong", previous=base_id),
                     IdentityMismatchError)
    _assert_rejected(worker, _request(chain["wrong"], "wrong",
                                      previous=chain["other"].snapshot_identity),
                     IdentityMismatchError)
    _assert_rejected(worker, _request(chain["base"], "delta", previous=base_id),
                     IdentityMismatchError)  # identity of another snapshot
    _assert_rejected(worker, _request(chain["base"], "missing"), HotloadError)
    _assert_rejected(worker, "{not json", HotloadError)
    blob = chain["root"] / "delta" / snap.DELTA_FILE
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    _assert_rejected(worker, _delta_request(chain), ChecksumError)
    assert worker.asyncrl_status()["identity"] == base_id


def test_worker_forgets_its_identity_when_the_reload_fails(chain: dict[str, Any]) -> None:
    worker = FakeWorker(fail_after=2)
    reply = worker.asyncrl_hotload(_request(chain["base"], "base"))
    assert reply["ok"] is False and reply["engine_touched"] is True
    assert "device lost" in reply["message"]
    assert worker.asyncrl_status()["identity"] is None  # the next sync must be a base
    worker.fail_after = None
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]


def test_worker_delta_reload_stopped_half_way_forgets_the_identity(
    chain: dict[str, Any],
) -> None:
    worker = FakeWorker()
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]
    worker.fail_after, worker.loaded = 0, {}
    reply = worker.asyncrl_hotload(_delta_request(chain))
    assert reply["ok"] is False and reply["engine_touched"] is True
    assert worker.asyncrl_status()["identity"] is None


def test_worker_forgets_its_identity_when_held_bytes_are_lost(
    chain: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = FakeWorker()
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]
    worker.loaded = {}

    def lost(*args: Any, **kwargs: Any) -> Any:
        raise HeldBytesLostError("a rejected delta could not be turned back; bytes lost")

    original = snap.prepare_snapshot
    monkeypatch.setattr(snap, "prepare_snapshot", lost)
    reply = worker.asyncrl_hotload(_delta_request(chain))
    assert reply["ok"] is False and reply["engine_touched"] is False  # the engine kept serving
    assert "bytes lost" in reply["message"] and worker.loaded == {}
    assert worker.asyncrl_status()["identity"] is None  # the next sync must be a base
    monkeypatch.setattr(snap, "prepare_snapshot", original)
    _assert_rejected(worker, _delta_request(chain), DeltaChainError)
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]


def test_worker_without_root_rejects_everything(
    chain: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_SNAPSHOT_ROOT)
    _assert_rejected(FakeWorker(), _request(chain["base"], str(chain["root"] / "base")),
                     HotloadError)


def test_reload_order_puts_the_decoder_layers_first() -> None:
    names = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.norm.weight"]
    assert reload_order(names) == (
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.embed_tokens.weight",
        "model.norm.weight")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_the_verification_runs_on_every_cpu_and_gives_the_thread_back() -> None:
    from asyncrl.sync.worker_extension import _on_every_cpu

    every = os.sched_getaffinity(0)

    def pinned_thread() -> tuple[int | None, set[int], set[int]]:
        os.sched_setaffinity(0, {min(every)})  # as vLLM-CPU pins its worker's thread
        with _on_every_cpu() as threads:
            inside = os.sched_getaffinity(0)
        return threads, inside, os.sched_getaffinity(0)

    with ThreadPoolExecutor(1) as pool:  # a thread of its own: this one stays as it is
        threads, inside, after = pool.submit(pinned_thread).result()
    assert inside == every and threads == len(every)
    assert after == {min(every)}


def test_worker_hands_the_engine_its_tensors_in_reload_order(chain: dict[str, Any]) -> None:
    worker = FakeWorker()
    assert worker.asyncrl_hotload(_request(chain["base"], "base"))["ok"]
    assert list(worker.loaded) == list(reload_order(NAMES))


def test_worker_state_prepare_touches_nothing(chain: dict[str, Any]) -> None:
    state = WorkerHotloadState()
    request = HotloadRequest.from_json(_request(chain["base"], "base"))
    plan = state.prepare(request, root=str(chain["root"]), token="tok")
    assert state.identity is None and plan.identity == chain["base"].snapshot_identity
    state.commit(plan)
    assert state.identity == plan.identity and state.hotloads == 1


# ---------------------------------------------------------------------------------------------
# control-call sequencing (httpx.MockTransport)


class FakeVLLM:
    """The control endpoints of a vLLM server, recording every call in order."""

    def __init__(self, rpc: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.calls: list[str] = []
        self.rpc = rpc or (lambda request: [_ok(request["snapshot_identity"])])
        self.probe: Any = {"choices": [{"logprobs": {"token_logprobs": [-0.5, -1.0]}}]}
        self.fail: dict[str, int] = {}
        self.rpc_delay_s = 0.0
        self.health = [200]
        self.garbled: set[str] = set()  # paths answering 200 with a body that is not JSON
        self.completions: list[dict[str, Any]] = []  # request bodies, in order

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        query = str(request.url.query, "ascii")
        body: Any = json.loads(request.content) if request.content else None
        label = f"{request.method} {path}" + (f"?{query}" if query else "")
        if path == "/collective_rpc":
            label += f" {body['method']}"
        self.calls.append(label)
        if path in self.fail:
            return httpx.Response(self.fail[path], text="injected failure")
        if path in self.garbled:
            return httpx.Response(200, text="<html>proxy error</html>")
        if path == "/health":
            return httpx.Response(self.health.pop(0) if len(self.health) > 1 else self.health[0])
        if path == "/collective_rpc":
            await anyio.sleep(self.rpc_delay_s)
            if body["method"] == "asyncrl_status":
                return httpx.Response(200, json={"results": [{"identity": "id9", "kind": "base",
                                                              "hotloads": 4, "loaded_at": 1.0}]})
            return httpx.Response(200, json={"results": self.rpc(json.loads(body["args"][0]))})
        if path == "/v1/completions":
            self.completions.append(body)
            return httpx.Response(200, json=self.probe)
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": "id9"})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served"}]})
        return httpx.Response(200, json={"ok": True})

    def hotload_calls(self) -> list[str]:
        return [c for c in self.calls if not c.startswith(("GET /v1/models", "GET /health"))]


async def _attached(fake: FakeVLLM) -> tuple[DeploymentManager, Deployment]:
    manager = DeploymentManager()
    deployment = await manager.attach("http://fake:1", hotload_token="tok",
                                      transport=httpx.MockTransport(fake))
    return manager, deployment


SEQUENCE = [
    "POST /pause?mode=keep",
    "POST /collective_rpc asyncrl_hotload",
    "POST /reset_prefix_cache?reset_running_requests=true",
    "POST /update_weight_version",
    "POST /resume",
    "POST /v1/completions",
]


@pytest.mark.anyio
async def test_hotload_sequence() -> None:
    seen: list[dict[str, Any]] = []

    def rpc(request: dict[str, Any]) -> list[dict[str, Any]]:
        seen.append(request)
        return [_ok(request["snapshot_identity"])]

    fake = FakeVLLM(rpc=rpc)
    manager, deployment = await _attached(fake)
    async with manager:
        result = await manager.hotload_and_wait(
            deployment, "id2", snapshot_path="/snaps/d",
            incremental_snapshot_metadata={"previous_snapshot_identity": "id1"},
        )
    assert fake.hotload_calls() == SEQUENCE
    assert seen == [{"snapshot_identity": "id2", "snapshot_path": "/snaps/d",
                     "previous_snapshot_identity": "id1", "token": "tok"}]
    assert (result.identity, result.kind, result.changed_tensors) == ("id2", "base", 3)
    timings = result.timings
    assert timings.total_s >= timings.pause_s + timings.reload_s + timings.resume_s
    assert min(timings.pause_s, timings.reload_s, timings.resume_s, timings.probe_s) >= 0


@pytest.mark.anyio
async def test_hotload_abort_mode_without_cache_reset() -> None:
    fake = FakeVLLM()
    manager, deployment = await _attached(fake)
    async with manager:
        await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b", inflight="abort",
                                       reset_prompt_cache=False)
        await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b", inflight="wait")
    assert fake.hotload_calls() == [
        "POST /pause?mode=abort", "POST /collective_rpc asyncrl_hotload",
        "POST /update_weight_version", "POST /resume", "POST /v1/completions",
        "POST /pause?mode=wait", "POST /collective_rpc asyncrl_hotload",
        "POST /reset_prefix_cache?reset_running_requests=false",
        "POST /update_weight_version", "POST /resume", "POST /v1/completions",
    ]


@pytest.mark.anyio
async def test_rejected_hotload_still_resumes_and_raises_the_mapped_error() -> None:
    reply = error_reply(IdentityMismatchError("delta on X, serving Y"), engine_touched=False)
    fake = FakeVLLM(rpc=lambda r: [reply])
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(IdentityMismatchError, match="delta on X"):
            await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b")
    assert fake.hotload_calls() == ["POST /pause?mode=keep", "POST /collective_rpc asyncrl_hotload",
                                    "POST /resume"]


@pytest.mark.anyio
async def test_failed_pause_still_resumes() -> None:
    fake = FakeVLLM()
    fake.fail["/pause"] = 500
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(DeploymentError, match="/pause answered HTTP 500"):
            await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b")
    assert fake.hotload_calls() == ["POST /pause?mode=keep", "POST /resume"]


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["touched", "http500", "disagree", "not-json"])
async def test_engine_in_unknown_state_is_never_resumed(failure: str) -> None:
    fake = FakeVLLM()
    if failure == "touched":
        fake.rpc = lambda r: [error_reply(RuntimeError("oom"), engine_touched=True)]
    elif failure == "disagree":
        fake.rpc = lambda r: [_ok("a"), _ok("b")]
    elif failure == "not-json":
        fake.garbled.add("/collective_rpc")
    else:
        fake.fail["/collective_rpc"] = 500
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(DeploymentError, match="left paused"):
            await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b")
    assert fake.hotload_calls() == ["POST /pause?mode=keep", "POST /collective_rpc asyncrl_hotload"]


@pytest.mark.anyio
async def test_hotload_timeout_mid_rpc_leaves_engine_paused() -> None:
    fake = FakeVLLM()
    fake.rpc_delay_s = 5.0
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(DeploymentError, match="timed out"):
            await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b", timeout=0.2)
    assert "POST /resume" not in fake.calls


@pytest.mark.anyio
async def test_unhealthy_probe_is_reported() -> None:
    fake = FakeVLLM()
    fake.probe = {"choices": [{"logprobs": {"token_logprobs": [None]}}]}
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(DeploymentError, match="unhealthy after hotload"):
            await manager.hotload_and_wait(deployment, "id1", snapshot_path="/s/b")
    assert fake.calls.count("POST /v1/completions") > 1  # bounded retries
    assert fake.calls.count("POST /resume") == 1
    assert fake.calls[-1] == "POST /pause?mode=abort"  # attached: stopped serving


@pytest.mark.anyio
async def test_probe_is_one_token_on_the_short_prompt() -> None:
    # every prompt token is a row of every matmul: the probe keeps its prompt short
    fake = FakeVLLM()
    manager, deployment = await _attached(fake)
    async with manager:
        assert await manager.probe(deployment) == [-0.5, -1.0]
    (body,) = fake.completions
    assert body["prompt"] == PROBE_PROMPT and len(PROBE_PROMPT) <= 2
    assert (body["model"], body["max_tokens"], body["logprobs"]) == ("served", 1, 0)


@pytest.mark.anyio
async def test_status_and_ready() -> None:
    fake = FakeVLLM()
    fake.health = [503, 503, 200]
    manager, deployment = await _attached(fake)
    async with manager:
        await manager.wait_for_ready(deployment, timeout=30)
        status = await manager.get_status(deployment)
    assert fake.calls[:3] == ["GET /health"] * 3
    assert "POST /v1/completions" in fake.calls  # warmup
    assert status.ready and status.current_snapshot_identity == "id9"
    assert (status.weight_version, status.kind, status.hotloads) == ("id9", "base", 4)
    assert status.pid is None and status.base_url == "http://fake:1"


@pytest.mark.anyio
async def test_wait_for_ready_times_out() -> None:
    fake = FakeVLLM()
    fake.health = [503]
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(DeploymentError, match="not ready"):
            await manager.wait_for_ready(deployment, timeout=0.6)


@pytest.mark.anyio
async def test_closed_resources_raise() -> None:
    fake = FakeVLLM()
    manager, deployment = await _attached(fake)
    async with manager:
        other = await manager.attach("http://fake:2", transport=httpx.MockTransport(fake))
        await other.aclose()
        with pytest.raises(ClosedResourceError):
            await manager.get_status(other)
        with pytest.raises(ConfigError, match="inflight"):
            await manager.hotload_and_wait(deployment, "i", snapshot_path="/s",
                                           inflight="later")  # type: ignore[arg-type]
    assert deployment.closed
    with pytest.raises(ClosedResourceError):
        await manager.hotload_and_wait(deployment, "i", snapshot_path="/s")
    with pytest.raises(ClosedResourceError):
        await manager.attach("http://fake:3")


# ---------------------------------------------------------------------------------------------
# owned processes: a stdlib fake server in its own process group

FAKE_SERVER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    mode = os.environ.get("FAKE_MODE", "ok")
    if mode == "exit":
        print("boom: unsupported configuration", flush=True)
        sys.exit(3)
    if mode == "stubborn":  # ignores SIGTERM, and so does its child
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    port = int(sys.argv[sys.argv.index("--port") + 1])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, obj, status=200):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"weight_version": "default"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/collective_rpc"):
                method = json.loads(body)["method"]
                if method == "asyncrl_status":
                    return self._send({"results": [{"identity": None, "hotloads": 0}]})
                return self._send({"results": [{"ok": False, "error_type": "HotloadError",
                                                "message": "reload died", "engine_touched": True}]})
            if self.path.startswith("/v1/completions"):
                return self._send({"choices": [{"logprobs": {"token_logprobs": [-1.0]}}]})
            self._send({"ok": True})

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def _fake_config(tmp_path: Path, mode: str) -> DeploymentConfig:
    model = tmp_path / "model"  # the fake server never reads it; it only has to look whole
    model.mkdir(exist_ok=True)
    for name, text in (("config.json", "{}"), ("model.safetensors", ""), ("tokenizer.json", "{}")):
        (model / name).write_text(text)
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    python = tmp_path / "fake-python"  # ignores "-m vllm...", runs the fake server
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    return _config(tmp_path, python_executable=str(python), env={"FAKE_MODE": mode},
                   log_dir=tmp_path / "logs", stop_grace_s=0.5, startup_timeout_s=30)


@pytest.mark.anyio
async def test_server_exiting_at_startup_reports_the_log_tail(tmp_path: Path) -> None:
    async with DeploymentManager() as manager:
        with pytest.raises(DeploymentError, match=r"exited \(code 3\)") as info:
            await manager.create_or_get(_fake_config(tmp_path, "exit"))
    assert "boom: unsupported configuration" in str(info.value)


@pytest.mark.anyio
async def test_delete_kills_the_whole_process_group(tmp_path: Path) -> None:
    async with DeploymentManager() as manager:
        deployment = await manager.create_or_get(_fake_config(tmp_path, "stubborn"))
        assert await manager.create_or_get(_fake_config(tmp_path, "stubborn")) is deployment
        pid = deployment.pid
        assert pid is not None
        with anyio.fail_after(10):
            while len(process_group_members(pid)) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await manager.delete(deployment)
        assert process_group_members(pid) == []
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ClosedResourceError):
            await manager.get_status(deployment)


@pytest.mark.anyio
async def test_engine_broken_by_a_hotload_is_restarted(tmp_path: Path) -> None:
    async with DeploymentManager() as manager:
        deployment = await manager.create_or_get(_fake_config(tmp_path, "ok"))
        old_pid = deployment.pid
        assert old_pid is not None
        with pytest.raises(DeploymentError, match="was restarted") as info:
            await manager.hotload_and_wait(deployment, "id1", snapshot_path="b")
        assert "reload died" in str(info.value)
        assert deployment.pid not in (None, old_pid)
        assert process_group_members(old_pid) == []
        status = await manager.get_status(deployment)
        assert status.ready and status.current_snapshot_identity is None
        pid = deployment.pid
    assert deployment.closed and pid is not None and process_group_members(pid) == []


# ---------------------------------------------------------------------------------------------
# reconnecting to an attached deployment (the supervisor's recovery path)


@pytest.mark.anyio
async def test_reconnect_and_wait_polls_an_attached_server_back_to_health() -> None:
    fake = FakeVLLM()
    manager, deployment = await _attached(fake)
    async with manager:
        fake.health = [503]
        assert await manager.is_alive(deployment) is False
        fake.health = [503, 503, 200]  # restarted by whoever runs it
        old_client = deployment._client
        await manager.reconnect_and_wait(deployment, timeout=10)
        assert deployment._client is not old_client  # no pooled connection to the dead one
        assert old_client.is_closed
        assert fake.calls.count("GET /health") >= 4
        assert fake.calls[-1] == "POST /v1/completions"  # ready means a probe completed
        assert await manager.is_alive(deployment) is True


@pytest.mark.anyio
async def test_reconnect_and_wait_gives_up_after_its_timeout() -> None:
    fake = FakeVLLM()
    fake.health = [503]
    manager, deployment = await _attached(fake)
    async with manager:
        with pytest.raises(DeploymentError, match="not ready after"):
            await manager.reconnect_and_wait(deployment, timeout=0.6)


@pytest.mark.anyio
async def test_prompt_logprobs_reads_each_next_token() -> None:
    fake = FakeVLLM()
    fake.probe = {"choices": [{"prompt_logprobs": [
        None, {"7": {"logprob": -1.5, "rank": 2}}, {"9": {"logprob": -0.25, "rank": 1}}]}]}
    manager, deployment = await _attached(fake)
    async with manager:
        assert await manager.prompt_logprobs(deployment, [3, 7, 9]) == [-1.5, -0.25]
        with pytest.raises(ConfigError, match="at least 2 tokens"):
            await manager.prompt_logprobs(deployment, [3])
        fake.probe = {"choices": [{"text": "x"}]}  # a server that ignored prompt_logprobs
        with pytest.raises(DeploymentError, match="no prompt_logprobs"):
            await manager.prompt_logprobs(deployment, [3, 7])


@pytest.mark.anyio
async def test_weight_version_is_read_from_weight_info() -> None:
    fake = FakeVLLM()
    manager, deployment = await _attached(fake)
    async with manager:
        assert await manager.weight_version(deployment) == "id9"
        assert fake.calls[-1] == "GET /weight_info"
        fake.fail["/weight_info"] = 500
        with pytest.raises(DeploymentError, match="weight_info answered HTTP 500") as exc:
            await manager.weight_version(deployment)
        assert exc.value.__cause__ is None  # raised as it is, not wrapped again


@pytest.mark.anyio
async def test_weight_version_turns_a_bad_answer_or_closed_client_into_deployment_error() -> None:
    async def not_json(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>proxy error</html>")

    manager = DeploymentManager()
    deployment = await manager.attach("http://fake:1", transport=httpx.MockTransport(not_json))
    async with manager:
        with pytest.raises(DeploymentError, match="weight_info"):
            await manager.weight_version(deployment)
        await deployment._client.aclose()  # as a restart does, while a read is on its way
        with pytest.raises(DeploymentError, match="weight_info"):
            await manager.weight_version(deployment)
