"""Train-state checkpoints in torch DCP format (torch.distributed.checkpoint).

Layout of one state directory ``<states_root>/<name>/``:
    .metadata, __0_0.distcp      DCP payload: model, optimizer, step, torch RNG state
    asyncrl_state.json           sidecar, written LAST: kind="train_state", step, expiry

Invariants:
- A state is valid only if its sidecar exists; states are written into ``.tmp-*`` and renamed,
  so a crash mid-write never leaves a directory that looks valid.
- ``load_state_with_optimizer`` on anything that is not a DCP train state raises
  ``WrongCheckpointKindError`` — never a silent weights-only restore.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrl.chaos.faults import failpoint
from asyncrl.errors import CheckpointError, WrongCheckpointKindError

SIDECAR = "asyncrl_state.json"
STATE_KIND = "train_state"


@dataclass(frozen=True)
class StateInfo:
    """What the sidecar of a train state says."""

    path: Path
    name: str
    step: int
    created_at: float
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def find_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, one in its cause / context chain, or one behind a
    per-rank failure of torch DCP's ``CheckpointException`` (which hides the OS reason)."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        todo += [err.__cause__, err.__context__]
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def describe_os_error(exc: BaseException) -> str:
    """``"No space left on device (ENOSPC)"``: the OS reason behind ``exc``, for messages."""
    err = find_os_error(exc)
    if err is None:
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0] if first else ''}"
    code = errno.errorcode.get(err.errno, "") if err.errno else ""
    text = err.strerror or str(err) or type(err).__name__
    return f"{text} ({code})" if code else text


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch DCP's CheckpointException (a BaseException) wrapping a failure."""
    return isinstance(exc, OSError) or type(exc).__name__ == "CheckpointException"


def check_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name in ("..", "."):
        raise CheckpointError(f"checkpoint name {name!r} must be a plain name (no '/', no '.')")
    return name


def describe_kind(path: Path) -> str:
    """A human description of what lies at ``path`` (for wrong-kind errors)."""
    if (path / SIDECAR).exists():
        return "a DCP train state"
    if (path / "snapshot.json").exists():
        return "a sampler weight snapshot (safetensors + manifest, no optimizer state)"
    if (path / "config.json").exists():
        return "an HF model directory (weights only, no optimizer state)"
    if (path / ".metadata").exists():
        return "a DCP directory without an asyncrl sidecar (incomplete or foreign)"
    return "not a checkpoint"


def read_state_info(path: str | Path) -> StateInfo:
    """Read and validate a train state's sidecar; wrong kinds raise WrongCheckpointKindError."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a directory")
    sidecar = p / SIDECAR
    if not sidecar.exists() or not (p / ".metadata").exists():
        raise WrongCheckpointKindError(
            f"{p} is {describe_kind(p)}, not a DCP train state; load_state_with_optimizer "
            "needs a path returned by save_state() (use load_state() for weights only)"
        )
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("kind") != STATE_KIND:
            raise WrongCheckpointKindError(f"{sidecar} has kind {meta.get('kind')!r}")
        return StateInfo(
            p, meta["name"], int(meta["step"]), float(meta["created_at"]), meta.get("expires_at")
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{sidecar} is unreadable: {exc}") from exc


def save_dcp_state(
    states_root: Path, name: str, state: dict[str, Any], *, step: int, ttl_seconds: float | None
) -> Path:
    """Write ``state`` as a DCP checkpoint at ``states_root/name`` atomically."""
    import torch.distributed.checkpoint as dcp

    check_name(name)
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise CheckpointError(f"ttl_seconds must be > 0, got {ttl_seconds}")
    final = states_root / name
    if final.exists():
        raise CheckpointError(f"train state {final} already exists; pick a new name")
    try:
        states_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the train-state directory {states_root}: {describe_os_error(exc)}"
        ) from exc
    tmp = states_root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        with warnings.catch_warnings():
            # single-process DCP is intended here; torch warns that no process group exists
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp))
        failpoint("state.before_rename")  # payload in .tmp-*, no sidecar yet
        now = time.time()
        meta = {
            "kind": STATE_KIND,
            "name": name,
            "step": step,
            "created_at": now,
            "expires_at": None if ttl_seconds is None else now + ttl_seconds,
        }
        _write_synced(tmp / SIDECAR, json.dumps(meta, indent=2))
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(exc):
            raise CheckpointError(
                f"cannot write train state {final}: {describe_os_error(exc)}; nothing was saved"
            ) from exc
        raise
    return final


def load_dcp_state(path: Path, state: dict[str, Any]) -> None:
    """Load a DCP checkpoint in place into ``state`` (tensors are filled)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))


def list_states(states_root: Path) -> list[StateInfo]:
    """Valid train states under ``states_root``, oldest first (``.tmp-*`` ignored)."""
    if not states_root.is_dir():
        return []
    infos = []
    for child in states_root.iterdir():
        if child.name.startswith(".") or not (child / SIDECAR).exists():
            continue
        try:
            infos.append(read_state_info(child))
        except CheckpointError:
            continue
    return sorted(infos, key=lambda s: (s.created_at, s.step))


def prune_expired(states_root: Path, now: float | None = None) -> list[Path]:
    """Delete expired train states; return their paths."""
    now = time.time() if now is None else now
    removed = []
    for info in list_states(states_root):
        if info.expired(now):
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.path)
    return removed


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
