"""Per-step metrics: ``{log_path}/metrics.jsonl`` (one JSON object per optimizer step).

Writes go through aiofiles so the event loop never blocks on disk. Non-finite floats are
written as JSON ``null`` (and counted in ``nonfinite``) rather than as invalid JSON.
Optional sinks (TensorBoard, Weights & Biases) are used only when asked for AND installed;
asking for one that is not installed is a clear ConfigError at start, not a silent no-op.

A log directory that cannot hold ``metrics.jsonl`` (a file in the way, ...) is a ConfigError
when the writer is made; a write that fails later (disk full, file too large) raises
:class:`MetricsWriteError` naming the path and the OS reason, after cutting the file back to
its last complete line (a later row never shares a line with a torn one).
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiofiles

from asyncrl.errors import ConfigError, MetricsWriteError
from asyncrl.logging import get_logger
from asyncrl.trainer.state import describe_os_error

__all__ = ["MetricsWriteError", "MetricsWriter", "clean_row", "read_metrics"]

log = get_logger("asyncrl.metrics")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def clean_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as metrics.jsonl holds them: tensors / numpy scalars as Python numbers,
    non-finite floats as None."""
    return {k: _clean(v) for k, v in metrics.items()}


class MetricsWriter:
    """Appends one JSON line per step; forwards to optional sinks."""

    def __init__(self, log_path: str | Path, *, sinks: tuple[str, ...] = ()) -> None:
        self.path = Path(log_path) / "metrics.jsonl"
        self.nonfinite = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        except OSError as exc:
            raise ConfigError(
                f"log_path {self.path.parent} cannot hold metrics.jsonl: {describe_os_error(exc)}"
            ) from exc
        self._sinks: list[Any] = [self._make_sink(name, Path(log_path)) for name in sinks]

    @staticmethod
    def _make_sink(name: str, log_path: Path) -> Any:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                return SummaryWriter(str(log_path / "tensorboard"))
            if name == "wandb":
                import wandb

                return wandb.init(dir=str(log_path), resume="allow")
        except ImportError as exc:
            raise ConfigError(f"metrics sink {name!r} was asked for but is not installed") from exc
        raise ConfigError(f"unknown metrics sink {name!r}; choose tensorboard or wandb")

    async def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **clean_row(metrics)}
        self.nonfinite += sum(1 for k, v in metrics.items() if row.get(k) is None and v is not None)
        line = json.dumps(row) + "\n"
        size = None
        try:
            async with aiofiles.open(self.path, "a", encoding="utf-8") as f:
                size = await f.tell()
                await f.write(line)
        except OSError as exc:
            self._cut_back(size)
            raise MetricsWriteError(
                f"cannot append step {step} to {self.path}: {describe_os_error(exc)}"
            ) from exc
        for sink in self._sinks:
            self._to_sink(sink, step, row)

    def _cut_back(self, size: int | None) -> None:
        """Best effort: drop the torn tail a failed append left after ``size`` bytes."""
        if size is None:
            return
        try:
            if self.path.is_file() and self.path.stat().st_size > size:
                os.truncate(self.path, size)
        except OSError:
            log.warning("metrics_torn_line_left", path=str(self.path))

    @staticmethod
    def _to_sink(sink: Any, step: int, row: Mapping[str, Any]) -> None:
        numeric = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if hasattr(sink, "add_scalar"):
            for k, v in numeric.items():
                sink.add_scalar(k, v, step)
        else:
            sink.log(numeric, step=step)

    def close(self) -> None:
        for sink in self._sinks:
            (getattr(sink, "close", None) or sink.finish)()


def read_metrics(log_path: str | Path) -> list[dict[str, Any]]:
    """All rows of ``{log_path}/metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(log_path) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("metrics_line_unreadable", path=str(path))
    return rows
