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

__all__ = ["RowLedger", "check_prompt_lengths", "load_rows"]


def load_rows(dataset: Path | Sequence[dict[str, Any]]) -> list[Row]:
    """Validate every row up front; a bad file or row is a DataError naming it (for a file:
    the path and line number)."""
    if isinstance(dataset, Path | str):
        path = Path(dataset)
        rows = [_row_from_line(path, n, line, i) for i, (n, line) in enumerate(_lines(path))]
    else:
        rows = [validate_row(r, i) for i, r in enumerate(dataset)]
    if not rows:
        where = f" {dataset}" if isinstance(dataset, Path | str) else ""
        raise DataError(f"dataset{where} is empty: expected at least one row")
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.row_id in first:
            raise DataError(
                f"dataset row id {row.row_id!r} appears more than once (rows {first[row.row_id]} "
                f"and {i})"
            )
        first[row.row_id] = i
    return rows


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 JSONL file."""
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    if not path.is_file():
        raise DataError(f"dataset {path} is not a file (expected a JSONL file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"dataset {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = " (it looks gzip-compressed: decompress it)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(
            f"dataset {path} is not UTF-8 text (byte {exc.start}){hint}; expected JSONL, "
            "one JSON object per line"
        ) from None
    if text.lstrip().startswith("["):
        raise DataError(
            f"dataset {path} holds a JSON array; expected JSONL, one JSON object per line"
        )
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _row_from_line(path: Path, n: int, line: str, index: int) -> Row:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"dataset {path} line {n} is not JSON ({exc.msg}); "
            "expected JSONL, one object per line"
        ) from None
    try:
        return validate_row(raw, index)
    except DataError as exc:
        raise DataError(f"dataset {path} line {n}: {exc}") from None


def check_prompt_lengths(
    rows: Sequence[Row], renderer: Any, *, max_context_len: int, max_tokens: int
) -> None:
    """Raise PromptTooLongError naming the first row whose rendered prompt leaves fewer than
    ``max_tokens`` tokens of ``max_context_len`` (before any sampling, not mid-run)."""
    from asyncrl.rollout.sampler import PromptTooLongError

    budget = max_context_len - max_tokens
    for i, row in enumerate(rows):
        n = len(renderer.build_generation_prompt(row.messages()))
        if n > budget:
            raise PromptTooLongError(
                f"dataset row {i} (id={row.row_id!r}): prompt of {n} tokens does not fit: "
                f"max_context_len {max_context_len} - max_tokens {max_tokens} leaves "
                f"{max(budget, 0)}"
            )


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
