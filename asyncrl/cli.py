"""The ``asyncrl`` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="asyncrl",
    help="Async RL for LLM post-training on local torch and real vLLM.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines.")] = False,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    from asyncrl.logging import configure_logging

    configure_logging(json=log_json, level=log_level)


@app.command("make-model")
def make_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the HF model into.")],
    preset: Annotated[str, typer.Option(help="tiny | small | qwen2-0.5b-shape")] = "tiny",
    seed: Annotated[int, typer.Option(help="Init seed.")] = 0,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "bfloat16",
) -> None:
    """Write a locally made HF-format model + tokenizer (loads in transformers and vLLM)."""
    from asyncrl.errors import ConfigError
    from asyncrl.models import make_tiny_model

    try:
        path = make_tiny_model(out_dir, preset=preset, seed=seed, dtype=dtype)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(str(path))


@app.command()
def demo(
    log_path: Annotated[Path, typer.Option(help="Where the run writes everything.")] = Path(
        "runs/demo"
    ),
    max_steps: Annotated[int, typer.Option(min=1, help="RL optimizer steps.")] = 30,
    sft_steps: Annotated[int, typer.Option(min=1, help="SFT warm-start steps.")] = 120,
    seed: Annotated[int, typer.Option(help="Seed for data, model and training.")] = 0,
) -> None:
    """Make a tiny model, warm it up with SFT, then async GRPO against a real vLLM server."""
    from asyncrl.recipes.demo import run_demo

    with _progress(max_steps) as on_step:
        result = run_demo(
            log_path, max_steps=max_steps, sft_steps=sft_steps, seed=seed, on_step=on_step
        )
    before, after = result.eval_before, result.eval_after
    typer.echo("")
    typer.echo(
        f"held-out reward: before RL {before:.3f} -> after RL {after:.3f}"
        if before is not None and after is not None
        else "held-out reward: n/a"
    )
    typer.echo(f"steps:            {result.steps}")
    typer.echo(f"metrics:          {result.metrics_path}")
    typer.echo(f"plot:             {result.plot}")
    typer.echo(f"checkpoints:      asyncrl checkpoints list {result.log_path}")
    typer.echo(f"promoted model:   {result.promoted_model}")


@contextmanager
def _progress(total: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar for the RL steps (plain step lines when not on a terminal)."""
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():

        def plain(m: dict[str, Any]) -> None:
            typer.echo(
                f"step {m['step']}/{total} reward={m.get('rollout/reward_mean', 0):.3f} "
                f"ppo_kl={m.get('train/ppo_kl', 0):.2g} ref_kld={m.get('train/ref_kld', 0):.3g}",
                err=True,
            )

        yield plain
        return
    with Progress(
        TextColumn("[bold]RL"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        transient=False,
    ) as bar:
        task = bar.add_task("", total=total)

        def update(m: dict[str, Any]) -> None:
            bar.update(
                task,
                completed=m["step"],
                description=f"reward {m.get('rollout/reward_mean', 0):.3f}",
            )

        yield update


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="JSON file with the RL Config fields.")],
) -> None:
    """Run the async RL loop from a JSON config (rerun with the same log_path to resume)."""
    import json

    from asyncrl.config import load_rl_config
    from asyncrl.errors import ConfigError
    from asyncrl.recipes.async_rl_loop import main as rl_main

    try:
        cfg = load_rl_config(json.loads(config.read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as exc:
        raise typer.BadParameter(f"{config}: {exc}") from exc
    summary = rl_main(cfg)
    typer.echo(f"done: {summary.steps} steps; metrics in {cfg.log_path / 'metrics.jsonl'}")


@app.command()
def plot(
    log_path: Annotated[Path, typer.Argument(help="A run's log_path.")],
    out: Annotated[
        Path | None, typer.Option(help="PNG path (default LOG_PATH/metrics.png).")
    ] = None,
) -> None:
    """Plot reward, ppo_kl, ref_kld and staleness over steps to a PNG."""
    from asyncrl.errors import ConfigError
    from asyncrl.plot import plot_metrics

    try:
        typer.echo(str(plot_metrics(log_path, out)))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


checkpoints_app = typer.Typer(help="List and promote checkpoints of a run.", no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")


@checkpoints_app.command("list")
def checkpoints_list(
    log_path: Annotated[Path, typer.Argument(help="A run's log_path.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Name, step, kind (train state / sampler base / sampler delta), resumable, promotable."""
    import dataclasses
    import json

    from asyncrl.recipes.checkpoints import list_checkpoints

    items = list_checkpoints(log_path)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(c) for c in items], indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "step", "kind", "resumable", "promotable")
    for c in items:
        table.add_row(
            c.name, str(c.step), c.kind.replace("_", " "), str(c.resumable), str(c.promotable)
        )
    Console().print(table)


@checkpoints_app.command("promote")
def checkpoints_promote(
    log_path: Annotated[Path, typer.Argument(help="A run's log_path.")],
    output_model_id: Annotated[str, typer.Option(help="1-63 chars: a-z, 0-9, '-'.")],
    checkpoint_name: Annotated[str | None, typer.Option(help="Default: newest promotable.")] = None,
) -> None:
    """Write a promotable checkpoint as an HF model dir (loads in transformers, serves in vLLM)."""
    from asyncrl.errors import AsyncRLError
    from asyncrl.recipes.checkpoints import promote_checkpoint

    try:
        typer.echo(str(promote_checkpoint(log_path, output_model_id, checkpoint_name)))
    except AsyncRLError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="HF model directory.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8000,
) -> None:
    """Serve a model with vLLM on loopback (with the asyncrl hotload extension) until Ctrl-C."""
    import anyio

    from asyncrl.sync.deployment import DeploymentConfig, DeploymentManager

    async def go() -> None:
        async with DeploymentManager() as mgr:
            dep = await mgr.create_or_get(
                DeploymentConfig(
                    model_dir=model_dir, snapshot_root=model_dir.parent / "snapshots", port=port
                )
            )
            typer.echo(f"serving {model_dir} at {dep.base_url} (log: {dep.log_path}); Ctrl-C stops")
            await anyio.sleep_forever()

    anyio.run(go)


bench_app = typer.Typer(help="Benchmarks (from a source checkout).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command(
    "hotload", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def bench_hotload(ctx: typer.Context) -> None:
    """Hotload latency: base vs delta bytes and latency, naive XOR, cold restart.

    Runs benchmarks/hotload_latency.py; extra arguments pass through to it
    (e.g. `asyncrl bench hotload --presets tiny --steps 3`)."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hotload_latency.py"
    if not script.exists():
        raise typer.BadParameter(
            f"{script} not found: the benchmarks ship with the source checkout, not the wheel"
        )
    sys.argv = [str(script), *ctx.args]
    runpy.run_path(str(script), run_name="__main__")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
