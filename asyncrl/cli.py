"""The ``asyncrl`` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
