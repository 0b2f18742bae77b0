"""The outcome of one fault scenario, and the table of all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RowAudit", "ScenarioResult", "audit_rows", "format_table"]


@dataclass
class ScenarioResult:
    """What was injected and what the run made of it.

    ``rows_lost``: rows of the dataset's completed epochs never trained, filtered or dropped;
    ``rows_duplicated``: rows trained more than once in one epoch (counting only the steps
    that survived into the final history, i.e. after a resume the redone steps replace the
    killed run's). ``recover_s``: seconds from each fault to the run making progress again."""

    name: str
    faults_injected: int
    faults_survived: int
    rows_lost: int | None  # None: the scenario trains no dataset rows
    rows_duplicated: int | None
    recover_s: list[float] = field(default_factory=list)
    completed: bool = False
    detail: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.completed
            and self.faults_injected > 0
            and self.faults_survived == self.faults_injected
            and self.rows_lost in (0, None)
            and self.rows_duplicated in (0, None)
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def format_table(results: Sequence[ScenarioResult]) -> str:
    """A fixed-width table: one line per scenario, then the verdict."""
    header = ("scenario", "injected", "survived", "lost", "dup", "recover_s (max)", "ok")
    lines = [header]
    for r in results:
        worst = f"{max(r.recover_s):.1f}" if r.recover_s else "-"
        lines.append(
            (
                r.name,
                str(r.faults_injected),
                str(r.faults_survived),
                "n/a" if r.rows_lost is None else str(r.rows_lost),
                "n/a" if r.rows_duplicated is None else str(r.rows_duplicated),
                worst,
                "yes" if r.ok else "NO",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    verdict = "all survived, 0 lost, 0 duplicated" if all(r.ok for r in results) else "FAILED"
    out.append(f"\n{verdict}")
    return "\n".join(out)


@dataclass(frozen=True)
class RowAudit:
    """Rows of a run checked against its final checkpoint (see ``audit_rows``)."""

    steps: int
    finished: int
    lost: int
    duplicated: int
    unaccounted: int  # finished in the history but pending in the final state: would rerun


def audit_rows(log_path: Any, n_rows: int) -> RowAudit:
    """Check ``rows.jsonl`` against the newest checkpoint's row state in ``dataloader.json``.

    The history is the last record of each step up to that checkpoint's step (a resumed run
    redoes the steps after its checkpoint and its records replace the killed run's). A row is
    *lost* when the final state counts it done but no step of the history finished it, and
    *duplicated* when the history finishes it more than once in one epoch; *unaccounted* rows
    were finished but are still pending in the final state (a further run would redo them)."""
    import json
    from collections import Counter
    from pathlib import Path

    from asyncrl.recipes.checkpoints import read_dataloader

    entries = [e for e in read_dataloader(Path(log_path)).values() if "step" in e]
    if not entries:
        raise ValueError(f"{log_path} has no checkpoint to audit against")
    final = max(entries, key=lambda e: int(e["step"]))
    last_step = int(final["step"])
    history: dict[int, list[tuple[int, int]]] = {}
    trace = Path(log_path) / "rows.jsonl"
    for line in trace.read_text().splitlines() if trace.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if int(record["step"]) <= last_step:
            history[int(record["step"])] = [(int(e), int(i)) for e, i in record["finished"]]
    counts = Counter(key for keys in history.values() for key in keys)
    done = {int(e): {int(i) for i in v} for e, v in final.get("done", {}).items()}
    newest = max(done, default=0)
    expected = {(e, i) for e in done for i in done[e]}
    epochs = {e for e, _ in counts} | set(range(newest))
    expected |= {(e, i) for e in epochs if e < newest and e not in done for i in range(n_rows)}
    return RowAudit(
        steps=len(history),
        finished=sum(counts.values()),
        lost=len(expected - set(counts)),
        duplicated=sum(c - 1 for c in counts.values() if c > 1),
        unaccounted=len(set(counts) - expected),
    )
