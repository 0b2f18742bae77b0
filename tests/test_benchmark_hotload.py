"""The hotload benchmark's own logic: its arguments are checked before anything starts, and
the target rows it prints are the ratios the issue sets (computed from synthetic samples)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "hotload_latency.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("hotload_latency_under_test", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


hl = _load()


# -- arguments ----------------------------------------------------------------------------------


def test_defaults_are_the_issue_s_run(tmp_path: Path) -> None:
    args = hl.parse_args(["--out", str(tmp_path)])
    assert args.presets == ["tiny", "qwen2-0.5b-shape"]
    assert args.lrs == [1e-6, 1e-5]
    assert (args.steps, args.link_gbps, args.update) == (5, 10.0, "auto")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--presets", "bogus"], "invalid choice: 'bogus'"),
        (["--presets", "tiny", "tiny"], "--presets repeats a value"),
        (["--steps", "0"], "argument --steps: '0' must be an integer above 0"),
        (["--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
        (["--lrs", "1e-6", "0"], "argument --lrs: '0' must be a finite number above 0"),
        (["--lrs=-1e-5"], "argument --lrs: '-1e-5' must be a finite number above 0"),
        (["--lrs", "nan"], "argument --lrs: 'nan' must be a finite number above 0"),
        (["--lrs", "1e-6", "1e-6"], "--lrs repeats a value"),
        (["--link-gbps", "inf"], "argument --link-gbps: 'inf' must be a finite number above 0"),
        (["--link-gbps", "fast"], "argument --link-gbps: 'fast' is not a finite number"),
        (["--update", "sgd"], "invalid choice: 'sgd'"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        hl.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(SystemExit):
        hl.parse_args(["--out", str(path)])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_main_rejects_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*_: Any) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(hl.anyio, "run", must_not_run)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        hl.main(["--steps", "0", "--out", str(out)])
    assert exc.value.code == 2
    assert not out.exists()


# -- targets ------------------------------------------------------------------------------------


def _sample(
    kind: str,
    lr: float | None,
    step: int,
    e2e: float,
    *,
    warmup: float = 0.1,
    nbytes: int = 0,
    naive: int | None = None,
) -> Any:
    return hl.Sample(
        lr=lr,
        step=step,
        kind=kind,
        identity=f"{kind}{lr}{step}",
        nbytes=nbytes,
        payload_bytes=nbytes,
        changed_tensors=1,
        reloaded_tensors=1,
        save_s=0.0,
        encode_s=0.1,
        transfer_s=0.0,
        pause_s=0.0,
        reload_s=0.0,
        resume_s=0.0,
        warmup_s=warmup,
        wall_s=e2e,
        e2e_s=e2e,
        naive_bytes=naive,
    )


def _run(preset: str, lrs: list[float]) -> Any:
    samples = [_sample("base", None, 0, 9.0, nbytes=1000)]  # the first load: left out
    for lr in lrs:
        for step, e2e in enumerate((1.0, 1.2, 1.4), start=1):
            samples.append(
                _sample("delta", lr, step, e2e * lr / 1e-6, nbytes=40 * step, naive=100 * step)
            )
            samples.append(_sample("base", lr, step, 3.0 + step, nbytes=1000))
    bare = [{"reload_s": r, "verify_s": 0.1, "idle_probe_s": p}
            for r, p in ((0.5, 0.7), (0.8, 0.2), (0.9, 0.4))]
    cold = [
        {"start_to_ready_s": 100.0, "baseline": False},  # our own first start: not used
        {"start_to_ready_s": 20.0, "baseline": True},
        {"start_to_ready_s": 30.0, "baseline": True},
    ]
    return hl.Run(preset, "sign", 1000, 10.0, samples, bare, cold, [1.0])


def _rows(preset: str, lrs: list[float]) -> dict[tuple[str, str], dict[str, Any]]:
    run = _run(preset, lrs)
    rows = hl.targets(run, hl.summarize(run, lrs), lrs)
    by_key = {(row["target"], row["scope"]): row for row in rows}
    assert len(by_key) == len(rows)
    return by_key


def test_target_rows_are_the_issue_s_ratios() -> None:
    rows = _rows("qwen2-0.5b-shape", [1e-6, 1e-5])
    t = hl.TARGETS_TEXT
    # the p50 of 40/80/120 bytes over the 1000-byte base
    assert rows[(t["delta_bytes"], "lr 1e-6, p50")]["value"] == pytest.approx(0.08)
    assert rows[(t["delta_bytes"], "lr 1e-6, p50")]["pass"] is False
    # sums: (40 + 80 + 120) / (100 + 200 + 300)
    assert rows[(t["shuffle"], "lr 1e-06, sum")]["value"] == pytest.approx(0.4)
    assert rows[(t["shuffle"], "lr 1e-06, sum")]["pass"] is True
    # e2e p50 1.2 s against the base syncs' 5.0 s, the bare reloads' 0.8 s, the two plain
    # restarts' 25 s (the configured server's 100 s first start is not a baseline)
    vs_base = rows[(t["delta_vs_base"], "lr 1e-06, p50")]
    assert vs_base["value"] == pytest.approx(1.2 / 5.0)
    assert vs_base["value_without_probe"] == pytest.approx(1.1 / 4.9)
    assert vs_base["pass"] is True
    vs_bare = rows[(t["delta_vs_bare"], "lr 1e-06, p50")]
    assert vs_bare["value"] == pytest.approx(1.5)
    assert vs_bare["value_without_probe"] == pytest.approx(1.1 / 0.8)
    assert vs_bare["pass"] is True
    # the floor: the bare reloads' p50 0.8 s plus the idle probes' p50 0.4 s, over 0.8 s
    assert vs_bare["floor"] == pytest.approx((0.8 + 0.4) / 0.8)
    assert rows[(t["delta_vs_cold"], "lr 1e-06, p50")]["floor"] is None
    assert rows[(t["delta_vs_cold"], "lr 1e-06, p50")]["value"] == pytest.approx(1.2 / 25.0)
    # at lr 1e-5 the synthetic deltas take ten times longer: every latency target fails
    for key in ("delta_vs_base", "delta_vs_bare", "delta_vs_cold"):
        row = rows[(t[key], "lr 1e-05, p50")]
        assert row["pass"] is False, key
    assert rows[(t["delta_vs_bare"], "lr 1e-05, p50")]["value"] == pytest.approx(15.0)


def test_delta_vs_base_is_a_target_on_the_half_billion_shape_only() -> None:
    rows = _rows("tiny", [1e-6])
    row = rows[(hl.TARGETS_TEXT["delta_vs_base"], "lr 1e-06, p50")]
    assert row["pass"] is None
    assert row["value"] == pytest.approx(1.2 / 5.0)


def test_without_lr_1e6_there_is_no_bytes_target() -> None:
    rows = _rows("tiny", [1e-5])
    assert not [key for key in rows if key[0] == hl.TARGETS_TEXT["delta_bytes"]]


def test_exit_status_follows_the_targets() -> None:
    def result(*passes: bool | None) -> dict[str, Any]:
        return {"targets": [{"pass": p} for p in passes]}

    assert hl.verdict([result(True, None), result(True)]) == 0
    assert hl.verdict([result(True, None), result(True, False)]) == 1
    assert hl.verdict([]) == 0
    run = _run("qwen2-0.5b-shape", [1e-6, 1e-5])
    rows = hl.targets(run, hl.summarize(run, [1e-6, 1e-5]), [1e-6, 1e-5])
    assert hl.verdict([{"targets": rows}]) == 1


def test_a_run_without_idle_probes_has_no_floor() -> None:
    run = _run("tiny", [1e-6])
    for b in run.bare:
        del b["idle_probe_s"]
    rows = hl.targets(run, hl.summarize(run, [1e-6]), [1e-6])
    assert all(row["floor"] is None for row in rows)
