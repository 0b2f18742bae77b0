"""Dataset loading and exact row accounting across steps, stops and resumes.

``RowLedger`` is a pure state machine over row indices of the current epoch:

    pending -> (take) -> out -> done        (trained, filtered or dropped by policy)
                          \\-> (give_back) -> pending   (too stale: sampled again)

Invariants: every row of an epoch ends ``done`` exactly once; a checkpoint records the
``done`` sets of the open epochs, so after a resume the rows that were sampled but not
trained when the run stopped are taken again, and no row is trained twice. Rows are keyed
``(epoch, index)``: the next epoch may open while the last rows of the previous one are out.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
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


RowKey = tuple[int, int]  # (epoch, row index)


class RowLedger:
    """Which rows are pending, out (being sampled / waiting to train) or done, per epoch.

    The next epoch's rows become available as soon as the current epoch has nothing left
    pending, even while some of its rows are still out: a step never waits for rows that can
    only be trained by that same step."""

    def __init__(
        self, n_rows: int, *, done: Mapping[int, Sequence[int]] | None = None, consumed: int = 0
    ) -> None:
        if n_rows < 1:
            raise DataError("dataset is empty")
        self.n_rows = n_rows
        self.consumed = consumed
        self.done: dict[int, set[int]] = {e: set(v) for e, v in (done or {0: ()}).items()}
        self.out: set[RowKey] = set()
        self.pending: deque[RowKey] = deque(
            (e, i) for e in sorted(self.done) for i in range(n_rows) if i not in self.done[e]
        )
        self._latest = max(self.done)

    @property
    def epoch(self) -> int:
        """The newest epoch rows have been taken from."""
        return self._latest

    def take(self) -> RowKey:
        """The next (epoch, row index); opens the next epoch when nothing is pending."""
        if not self.pending:
            self._latest += 1
            self.done[self._latest] = set()
            self.pending.extend((self._latest, i) for i in range(self.n_rows))
        key = self.pending.popleft()
        self.out.add(key)
        return key

    def give_back(self, key: RowKey) -> None:
        """A row that must be sampled again (e.g. too stale): first in line."""
        self.out.remove(key)
        self.pending.appendleft(key)

    def finish(self, key: RowKey) -> None:
        """The row was trained, filtered or dropped: it will not be taken again this epoch."""
        self.out.remove(key)
        epoch, index = key
        self.done[epoch].add(index)
        self.consumed += 1
        self._forget_complete_epochs()

    def _forget_complete_epochs(self) -> None:
        for e in sorted(self.done):
            if e < self._latest and len(self.done[e]) == self.n_rows:
                del self.done[e]

    def state(self) -> dict[str, Any]:
        """JSON-able: per open epoch, the rows done; and rows consumed in total."""
        return {
            "epoch": self._latest,
            "done": {str(e): sorted(v) for e, v in self.done.items()},
            "data_consumed": self.consumed,
        }

    @classmethod
    def from_state(cls, n_rows: int, state: dict[str, Any]) -> RowLedger:
        raw = state.get("done", {})
        done = {int(e): [int(i) for i in v] for e, v in raw.items()} if raw else {0: []}
        if any(not 0 <= i < n_rows for v in done.values() for i in v):
            raise DataError(
                "dataloader state refers to rows beyond the dataset; was the dataset changed?"
            )
        return cls(n_rows, done=done, consumed=int(state.get("data_consumed", 0)))
