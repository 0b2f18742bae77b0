"""Data passed to the trainer: ModelInput, Datum, AdamParams (Tinker / Fireworks names).

Invariants:
- A ``Datum`` holds ``model_input`` (tokens[:-1]) and ``loss_fn_inputs`` with at least
  ``target_tokens`` (tokens[1:]) and ``weights`` (same length). Weight 0.0 = prompt / env
  token (not trained), 1.0 = trained token.
- Importing this module does not import torch; tensors are made lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncrl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

__all__ = ["AdamParams", "Datum", "ModelInput", "datum_from_model_input_weights"]


@dataclass(frozen=True, slots=True)
class ModelInput:
    """A token sequence fed to the model."""

    tokens: tuple[int, ...]

    @classmethod
    def from_ints(cls, tokens: Iterable[int]) -> ModelInput:
        out = tuple(int(t) for t in tokens)
        if any(t < 0 for t in out):
            raise DataError(f"ModelInput tokens must be non-negative ints, got {out[:8]}...")
        return cls(out)

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(())

    def to_ints(self) -> list[int]:
        return list(self.tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def append_int(self, token: int) -> ModelInput:
        return ModelInput((*self.tokens, int(token)))


@dataclass(frozen=True, slots=True)
class Datum:
    """One training example: the input tokens plus per-target-token loss inputs."""

    model_input: ModelInput
    loss_fn_inputs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("target_tokens", "weights"):
            if key not in self.loss_fn_inputs:
                raise DataError(f"Datum.loss_fn_inputs is missing {key!r}")
        n = self.model_input.length
        for key, value in self.loss_fn_inputs.items():
            if _length(value) != n:
                raise DataError(
                    f"Datum.loss_fn_inputs[{key!r}] has length {_length(value)}, "
                    f"expected {n} (the model_input length)"
                )

    def tensor(self, key: str, dtype: Any = None) -> torch.Tensor:
        """``loss_fn_inputs[key]`` as a 1-D torch tensor."""
        import torch

        value = self.loss_fn_inputs[key]
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return t if dtype is None else t.to(dtype)


def _length(value: Any) -> int:
    shape = getattr(value, "shape", None)
    if shape is not None:
        if len(shape) != 1:
            raise DataError(f"loss_fn_inputs values must be 1-D, got shape {tuple(shape)}")
        return int(shape[0])
    return len(value)


def datum_from_model_input_weights(
    model_input: ModelInput, weights: Sequence[float] | Any, max_length: int | None = None
) -> Datum:
    """Build a next-token Datum from full ``tokens`` and per-token ``weights``.

    ``weights[i]`` says whether token ``i`` is trained. Sequences longer than ``max_length``
    are truncated from the right. The result predicts ``tokens[1:]`` from ``tokens[:-1]``.
    """
    import torch

    tokens = model_input.to_ints()
    w = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights)
    w = w.to(torch.float32)
    if w.ndim != 1 or w.shape[0] != len(tokens):
        raise DataError(
            f"weights must be 1-D with one entry per token: got shape {tuple(w.shape)} "
            f"for {len(tokens)} tokens"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise DataError("weights must be finite and >= 0")
    if max_length is not None:
        if max_length < 2:
            raise DataError(f"max_length must be >= 2, got {max_length}")
        tokens, w = tokens[:max_length], w[:max_length]
    if len(tokens) < 2:
        raise DataError(f"a datum needs at least 2 tokens, got {len(tokens)}")
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": torch.tensor(tokens[1:], dtype=torch.long),
            "weights": w[1:].clone(),
        },
    )


@dataclass(frozen=True, slots=True)
class AdamParams:
    """AdamW hyper-parameters for one ``optim_step``. ``grad_clip_norm=0`` disables clipping."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ConfigError(f"AdamParams.{name}={value!r} is out of range")
