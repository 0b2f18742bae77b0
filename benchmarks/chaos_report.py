"""Chaos report: run every fault scenario for real and print what the runs survived.

    .venv/bin/python benchmarks/chaos_report.py [--out runs/chaos_report]
        [--only deployment snapshot reward trainer]

Scenarios (each in asyncrl/chaos/, each also a test under the ``chaos`` marker):

- deployment: the vLLM server SIGKILLed twice mid-run (whole process group, then only its
  engine); the loop restarts it, re-hotloads a base and re-samples the in-flight rows;
- snapshot: a delta truncated / bit-flipped / swapped for another point of the chain between
  save and hotload; the server rejects it, the syncer falls back to a base;
- reward: reward functions that hang (async forever, plain past the timeout);
- trainer: the training process SIGKILLed between and during checkpoint writes, then the
  same command rerun; it resumes from the last complete state.

Columns: faults injected, faults survived, rows lost, rows duplicated (``n/a`` where the
scenario trains no dataset rows), and the longest time to recover. Target: all survived,
0 lost, 0 duplicated. Exit status 1 when a scenario misses it. Writes ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from asyncrl.chaos.report import ScenarioResult, format_table

Scenario = Callable[[Path, Path], Awaitable[ScenarioResult]]


def scenarios() -> dict[str, Scenario]:
    from asyncrl.chaos.deployment_kill import run_deployment_kill
    from asyncrl.chaos.hung_reward import run_hung_reward
    from asyncrl.chaos.snapshot_faults import run_snapshot_corruption

    async def trainer(workdir: Path, model_dir: Path) -> ScenarioResult:
        from asyncrl.chaos.trainer_kill import run_trainer_kill

        return await anyio.to_thread.run_sync(lambda: run_trainer_kill(workdir, model_dir))

    return {
        "deployment": run_deployment_kill,
        "snapshot": run_snapshot_corruption,
        "reward": run_hung_reward,
        "trainer": trainer,
    }


def prepare(out: Path, only: list[str]) -> Path:
    """A fresh ``out`` with the tiny model every scenario trains."""
    from asyncrl.models import make_tiny_model

    unknown = [name for name in only if name not in scenarios()]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {sorted(scenarios())}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return make_tiny_model(out / "model", preset="tiny", seed=0)


async def main(out: Path, model_dir: Path, only: list[str]) -> int:
    known = scenarios()
    results: list[ScenarioResult] = []
    for name in only or list(known):
        print(f"[chaos] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = await known[name](out / name, model_dir)
        print(
            f"[chaos] {name}: {'ok' if result.ok else 'FAILED'} in "
            f"{time.perf_counter() - t0:.0f} s: {result.detail}",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    print(format_table(results))
    report = json.dumps([r.to_json() for r in results], indent=1)
    await anyio.Path(out / "report.json").write_text(report)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/chaos_report"))
    parser.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args()
    model = prepare(args.out, args.only)
    sys.exit(anyio.run(main, args.out, model, args.only))
