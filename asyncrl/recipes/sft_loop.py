"""Supervised fine-tuning: conversations -> masked NLL on assistant tokens -> HF model dir.

Used by the demo as a warm start. Invariants: only assistant tokens are trained (renderer
masks); batches are drawn with a seeded RNG, so a run is reproducible; the result is written
atomically as an HF model directory that transformers and vLLM load.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrl.errors import ConfigError
from asyncrl.logging import get_logger

__all__ = ["SFTConfig", "SFTResult", "run_sft"]

log = get_logger("asyncrl.sft")


@dataclass(frozen=True)
class SFTConfig:
    base_model: Path
    output_dir: Path
    batch_size: int = 32
    learning_rate: float = 3e-3
    max_steps: int = 200
    max_length: int = 256
    seed: int = 0
    grad_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"SFTConfig.learning_rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class SFTResult:
    model_dir: Path
    losses: list[float]


def run_sft(
    cfg: SFTConfig,
    conversations: Callable[[random.Random], Sequence[dict[str, str]]] | Sequence[Any],
    *,
    progress: Callable[[int, float], None] | None = None,
) -> SFTResult:
    """Train on conversations (a list, or a function that draws one from an RNG)."""
    from transformers import AutoTokenizer

    from asyncrl.rollout.renderers import renderer_for
    from asyncrl.trainer.client import TrainingClient
    from asyncrl.trainer.losses import cross_entropy_loss_fn
    from asyncrl.types import AdamParams, ModelInput, datum_from_model_input_weights

    renderer = renderer_for(AutoTokenizer.from_pretrained(cfg.base_model))
    rng = random.Random(cfg.seed)
    if not callable(conversations):
        if not conversations:
            raise ConfigError("SFT needs at least one conversation")
        pool = list(conversations)
        draw: Callable[[random.Random], Any] = lambda r: r.choice(pool)  # noqa: E731
    else:
        draw = conversations
    losses: list[float] = []
    client = TrainingClient.from_pretrained(
        cfg.base_model, seed=cfg.seed, checkpoint_dir=cfg.output_dir.parent / ".sft-ckpt"
    )
    with client:
        for step in range(cfg.max_steps):
            datums = []
            for _ in range(cfg.batch_size):
                tokens, weights = renderer.build_supervised_example(draw(rng))
                datums.append(
                    datum_from_model_input_weights(
                        ModelInput.from_ints(tokens), weights, cfg.max_length
                    )
                )
            out = client.forward_backward_custom(datums, cross_entropy_loss_fn).result()
            client.optim_step(
                AdamParams(learning_rate=cfg.learning_rate, grad_clip_norm=cfg.grad_clip_norm)
            ).result()
            losses.append(out.loss)
            if progress is not None:
                progress(step + 1, out.loss)
        model_dir = client.export_hf(cfg.output_dir).result()
    log.info("sft_done", steps=cfg.max_steps, final_loss=losses[-1], model_dir=str(model_dir))
    return SFTResult(model_dir=model_dir, losses=losses)
