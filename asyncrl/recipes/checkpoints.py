"""TrainingCheckpoints: save / resume / list / promote, the cookbook's checkpoint surface.

Layout under ``log_path``:
    checkpoints/states/<name>/     DCP train state (resumable, not promotable)
    checkpoints/sampler/<name>/    sampler snapshot: base (promotable) or delta (neither)
    dataloader.json                checkpoint name -> step and row accounting (data_consumed)
    models/<output_model_id>/      promoted HF model directories

Invariants:
- ``dataloader.json`` is rewritten atomically and only AFTER the checkpoint it describes is
  complete, so a resume never points at a half-written state.
- A save that fails (e.g. the disk is full) raises ``CheckpointError`` naming the path and
  the OS reason, and removes what it had written (the DCP state, the base snapshot, the temp
  file): nothing it leaves is listed, resumed from or promoted.
- Resume picks the newest resumable checkpoint that has both a complete DCP state and a
  dataloader entry.
- Kinds follow the seeds' table: DCP = resumable, not promotable; base = promotable;
  delta = neither.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asyncrl.chaos.faults import failpoint
from asyncrl.config import validate_output_model_id
from asyncrl.errors import CheckpointError
from asyncrl.logging import get_logger
from asyncrl.trainer import state as train_state

__all__ = [
    "CheckpointInfo",
    "ResumeInfo",
    "TrainingCheckpoints",
    "list_checkpoints",
    "promote_checkpoint",
]

log = get_logger("asyncrl.checkpoints")
DATALOADER = "dataloader.json"


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int | None
    kind: str  # "train_state" | "sampler_base" | "sampler_delta"
    resumable: bool
    promotable: bool
    path: str
    created_at: float


@dataclass(frozen=True)
class ResumeInfo:
    name: str
    step: int
    data: dict[str, Any]


def _dataloader_path(log_path: Path) -> Path:
    return log_path / DATALOADER


def read_dataloader(log_path: Path) -> dict[str, Any]:
    path = _dataloader_path(log_path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {path}: {train_state.describe_os_error(exc)}"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write ``path`` via a fresh temp file in its directory (never a pre-existing file or
    link), fsync, rename; on failure the temp file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TrainingCheckpoints:
    """Thin layer over the client's save_state / save_weights_for_sampler_ext."""

    def __init__(self, client: Any, log_path: str | Path) -> None:
        self.client = client
        self.log_path = Path(log_path)

    async def save(
        self,
        name: str,
        *,
        resumable: bool,
        promotable: bool,
        data_consumed: dict[str, Any],
        step: int,
    ) -> None:
        """Write a DCP state (resumable) and/or a base snapshot (promotable), then record
        ``data_consumed`` under ``name`` in dataloader.json."""
        if not (resumable or promotable):
            raise CheckpointError("a checkpoint must be resumable, promotable or both")
        entry: dict[str, Any] = {"step": step, "created_at": time.time(), **data_consumed}
        written: list[Path] = []  # removed again if the checkpoint cannot be completed
        try:
            if resumable:
                entry["state_path"] = str(await self.client.save_state(name))
                written.append(Path(entry["state_path"]))
            if promotable:
                base = self.client.sampler_root / f"{name}-base"
                if base.exists():  # left by a killed run (unrecorded): may hold other weights
                    log.warning("stale_checkpoint_base_replaced", path=str(base))
                    shutil.rmtree(base)
                await self.client.save_weights_for_sampler_ext(f"{name}-base", "base")
                written.append(base)
                entry["sampler_path"] = str(base)
            entry.update(resumable=resumable, promotable=promotable)
            failpoint("checkpoint.before_record")  # complete on disk, not yet recorded
            self._record(name, entry)
        except BaseException:
            for path in written:
                shutil.rmtree(path, ignore_errors=True)
            if written:
                log.warning("checkpoint_rolled_back", name=name, removed=[str(p) for p in written])
            raise
        log.info(
            "checkpoint_saved",
            name=name,
            step=step,
            resumable=resumable,
            promotable=promotable,
            data_consumed=entry.get("data_consumed"),
        )

    def _record(self, name: str, entry: dict[str, Any]) -> None:
        path = _dataloader_path(self.log_path)
        data = read_dataloader(self.log_path)
        data[name] = entry
        try:
            _write_json_atomic(path, data)
        except OSError as exc:
            raise CheckpointError(
                f"cannot record checkpoint {name!r} in {path}: "
                f"{train_state.describe_os_error(exc)}; the checkpoint was not saved"
            ) from exc

    def find_resumable(self) -> ResumeInfo | None:
        """Newest checkpoint with a complete DCP state and a dataloader entry."""
        best: ResumeInfo | None = None
        for name, entry in read_dataloader(self.log_path).items():
            if not entry.get("resumable") or "state_path" not in entry:
                continue
            try:
                info = train_state.read_state_info(entry["state_path"])
            except CheckpointError:
                log.warning("checkpoint_unusable", name=name, path=entry["state_path"])
                continue
            if best is None or info.step > best.step:
                best = ResumeInfo(name=name, step=info.step, data=entry)
        return best

    async def resume(self) -> ResumeInfo | None:
        """Load the newest resumable checkpoint (weights, optimizer, step, RNG), if any."""
        info = self.find_resumable()
        self._drop_unrecorded_states(after_step=info.step if info else 0)
        if info is None:
            return None
        await self.client.load_state_with_optimizer(info.data["state_path"])
        log.info(
            "resumed", name=info.name, step=info.step, data_consumed=info.data.get("data_consumed")
        )
        return info

    def _drop_unrecorded_states(self, after_step: int) -> None:
        """Remove what a killed run left under ``checkpoints/states``: ``.tmp-*`` payloads,
        and complete states of a step after ``after_step`` that dataloader.json does not name
        (the resumed run redoes those steps; saving the same name again would clash)."""
        root = self.log_path / "checkpoints" / "states"
        entries = read_dataloader(self.log_path).values()
        recorded = {Path(e["state_path"]).name for e in entries if "state_path" in e}
        for child in sorted(root.iterdir()) if root.is_dir() else []:
            if child.name.startswith(".tmp-") or (
                child.name not in recorded and _state_step(child) > after_step
            ):
                shutil.rmtree(child, ignore_errors=True)
                log.warning("checkpoint_unrecorded_removed", path=str(child))

    async def init_from(self, ref: str) -> str:
        """``"RUN_LOG_PATH:CHECKPOINT"``: another run's weights + optimizer; step reset to 0."""
        run, _, name = ref.rpartition(":")
        path = Path(run) / "checkpoints" / "states" / name
        await self.client.load_state_with_optimizer(path)
        await self.client.set_step(0)
        log.info("initialized_from_checkpoint", source=str(path))
        return str(path)


def list_checkpoints(log_path: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint under ``log_path``: train states and sampler snapshots."""
    from asyncrl.sync.snapshot import read_manifest

    log_path = Path(log_path)
    steps = {n: e.get("step") for n, e in read_dataloader(log_path).items()}
    out: list[CheckpointInfo] = []
    for info in train_state.list_states(log_path / "checkpoints" / "states"):
        out.append(
            CheckpointInfo(
                info.name, info.step, "train_state", True, False, str(info.path), info.created_at
            )
        )
    sampler = log_path / "checkpoints" / "sampler"
    for child in sorted(sampler.iterdir()) if sampler.is_dir() else []:
        if child.name.startswith("."):
            continue
        try:
            manifest = read_manifest(child)
        except Exception:
            continue
        base = manifest.kind == "base"
        step = steps.get(child.name.removesuffix("-base"), _step_of(child.name))
        out.append(
            CheckpointInfo(
                child.name,
                step,
                f"sampler_{manifest.kind}",
                False,
                base,
                str(child),
                manifest.created_at,
            )
        )
    return sorted(out, key=lambda c: (c.created_at, c.name))


def _state_step(path: Path) -> int:
    """The step of a complete train state; -1 for anything else."""
    try:
        return train_state.read_state_info(path).step
    except CheckpointError:
        return -1


def _step_of(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "step" and parts[1].isdigit() else None


def promote_checkpoint(
    log_path: str | Path,
    output_model_id: str,
    checkpoint_name: str | None = None,
    *,
    replace: bool = False,
) -> Path:
    """Copy a promotable (base) snapshot to ``log_path/models/output_model_id`` as an HF dir.

    An existing model of that id is an error unless ``replace`` (a resumed run promoting its
    newer final checkpoint under the same id)."""
    validate_output_model_id(output_model_id)
    promotable = [c for c in list_checkpoints(log_path) if c.promotable]
    if checkpoint_name is not None:
        chosen = [c for c in promotable if c.name in (checkpoint_name, f"{checkpoint_name}-base")]
        if not chosen:
            kinds = {c.name: c.kind for c in list_checkpoints(log_path)}
            why = f"it is a {kinds[checkpoint_name]}" if checkpoint_name in kinds else "not found"
            raise CheckpointError(
                f"checkpoint {checkpoint_name!r} is not promotable ({why}); "
                f"promotable: {[c.name for c in promotable]}"
            )
    else:
        chosen = promotable[-1:]
        if not chosen:
            raise CheckpointError(f"no promotable checkpoint under {log_path}")
    source = Path(chosen[0].path)
    target = Path(log_path) / "models" / output_model_id
    if target.exists() and not replace:
        raise CheckpointError(f"{target} already exists; choose another output_model_id")
    tmp = target.with_name(f".tmp-{output_model_id}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        (tmp / "asyncrl_promoted.json").write_text(
            json.dumps({"source": str(source), **asdict(chosen[0])}, indent=1)
        )
        if target.exists():
            shutil.rmtree(target)
            log.info("promoted_model_replaced", model_dir=str(target))
        tmp.rename(target)
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot promote {source} to {target}: {train_state.describe_os_error(exc)}"
        ) from exc
    log.info("checkpoint_promoted", source=str(source), model_dir=str(target))
    return target
