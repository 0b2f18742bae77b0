"""Dataset loading and exact row accounting across steps, stops and resumes.

``RowLedger`` is a pure state machine over row indices of the current epoch:

    pending -> (take) -> out -> done        (trained, filtered or dropped by policy)
                          \\-> (give_back) -> pending   (too stale: sampled again)

Invariants: every row of an epoch ends ``done`` exactly once; a checkpoint records the
``done`` set, so after a resume the rows that were sampled but not trained when the run
stopped are taken again, and no row is trained twice.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncrl.errors import DataError
from asyncrl.rollout.types import Row, validate_row

__all__ = ["RowLedger", "load_rows"]


def load_rows(dataset: Path | Sequence[dict[str, Any]]) -> list[Row]:
    """Validate every row up front; a bad file or row is a DataError naming it."""
    if isinstance(dataset, Path | str):
        path = Path(dataset)
        if not path.is_file():
            raise DataError(f"dataset {path} does not exist")
        raw = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"dataset {path} line {n} is not JSON ({exc.msg}); "
                    "expected JSONL, one object per line"
                ) from None
    else:
        raw = list(dataset)
    if not raw:
        raise DataError("dataset is empty")
    rows = [validate_row(r, i) for i, r in enumerate(raw)]
    ids = [r.row_id for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"dataset row id {dup!r} appears more than once")
    return rows


class RowLedger:
    """Which rows of the epoch are pending, out (being sampled / waiting) or done."""

    def __init__(self, n_rows: int, *, epoch: int = 0, done: Sequence[int] = ()) -> None:
        if n_rows < 1:
            raise DataError("dataset is empty")
        self.n_rows = n_rows
        self.epoch = epoch
        self.done: set[int] = set(done)
        self.out: set[int] = set()
        self.pending: deque[int] = deque(i for i in range(n_rows) if i not in self.done)

    def take(self) -> tuple[int, int]:
        """Next (epoch, row index); starts a new epoch when this one is exhausted."""
        if not self.pending and not self.out:
            self.epoch += 1
            self.done.clear()
            self.pending.extend(range(self.n_rows))
        if not self.pending:
            raise LookupError("all rows of this epoch are out; wait for them")
        index = self.pending.popleft()
        self.out.add(index)
        return self.epoch, index

    def has_pending(self) -> bool:
        return bool(self.pending) or not self.out

    def give_back(self, index: int) -> None:
        """A row that must be sampled again (e.g. too stale): first in line."""
        self.out.remove(index)
        self.pending.appendleft(index)

    def finish(self, index: int) -> None:
        """The row was trained, filtered or dropped: it will not be taken again this epoch."""
        self.out.remove(index)
        self.done.add(index)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": sorted(self.done), "data_consumed": len(self.done)}

    @classmethod
    def from_state(cls, n_rows: int, state: dict[str, Any]) -> RowLedger:
        done = [int(i) for i in state.get("done", [])]
        if any(not 0 <= i < n_rows for i in done):
            raise DataError(
                "dataloader state refers to rows beyond the dataset; was the dataset changed?"
            )
        return cls(n_rows, epoch=int(state.get("epoch", 0)), done=done)
