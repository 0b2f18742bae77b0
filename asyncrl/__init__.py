"""asyncrl: async, event-driven RL for LLM post-training on local torch and real vLLM.

Importing ``asyncrl`` touches neither torch nor vLLM: public names resolve lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> defining module
_EXPORTS: dict[str, str] = {
    "AdamParams": "asyncrl.trainer.types",
    "Datum": "asyncrl.trainer.types",
    "ModelInput": "asyncrl.trainer.types",
    "datum_from_model_input_weights": "asyncrl.trainer.types",
    "TrainingClient": "asyncrl.trainer.client",
    "ReferenceClient": "asyncrl.trainer.client",
    "ForwardBackwardOutput": "asyncrl.trainer.client",
    "OptimStepResult": "asyncrl.trainer.client",
    "TrainFuture": "asyncrl.trainer.futures",
    "LossConfig": "asyncrl.trainer.losses",
    "make_loss_fn": "asyncrl.trainer.losses",
    "make_tiny_model": "asyncrl.models",
    "configure_logging": "asyncrl.logging",
    "get_logger": "asyncrl.logging",
    "AsyncRLError": "asyncrl.errors",
    "ConfigError": "asyncrl.errors",
    "DataError": "asyncrl.errors",
    "CheckpointError": "asyncrl.errors",
    "WrongCheckpointKindError": "asyncrl.errors",
    "SnapshotError": "asyncrl.errors",
    "ChecksumError": "asyncrl.errors",
    "IdentityMismatchError": "asyncrl.errors",
    "DeltaChainError": "asyncrl.errors",
    "HeldBytesLostError": "asyncrl.errors",
    "DeploymentError": "asyncrl.errors",
    "HotloadError": "asyncrl.errors",
    "SamplingError": "asyncrl.errors",
    "RolloutError": "asyncrl.errors",
    "ClosedResourceError": "asyncrl.errors",
    "CircuitOpenError": "asyncrl.errors",
    "MetricsWriteError": "asyncrl.errors",
}

__all__ = [
    "AdamParams",
    "AsyncRLError",
    "CheckpointError",
    "ChecksumError",
    "CircuitOpenError",
    "ClosedResourceError",
    "ConfigError",
    "DataError",
    "Datum",
    "DeltaChainError",
    "DeploymentError",
    "ForwardBackwardOutput",
    "HeldBytesLostError",
    "HotloadError",
    "IdentityMismatchError",
    "LossConfig",
    "MetricsWriteError",
    "ModelInput",
    "OptimStepResult",
    "ReferenceClient",
    "RolloutError",
    "SamplingError",
    "SnapshotError",
    "TrainFuture",
    "TrainingClient",
    "WrongCheckpointKindError",
    "configure_logging",
    "datum_from_model_input_weights",
    "get_logger",
    "make_loss_fn",
    "make_tiny_model",
]

if TYPE_CHECKING:
    from asyncrl.errors import (
        AsyncRLError,
        CheckpointError,
        ChecksumError,
        CircuitOpenError,
        ClosedResourceError,
        ConfigError,
        DataError,
        DeltaChainError,
        DeploymentError,
        HeldBytesLostError,
        HotloadError,
        IdentityMismatchError,
        MetricsWriteError,
        RolloutError,
        SamplingError,
        SnapshotError,
        WrongCheckpointKindError,
    )
    from asyncrl.logging import configure_logging, get_logger
    from asyncrl.models import make_tiny_model
    from asyncrl.trainer.client import (
        ForwardBackwardOutput,
        OptimStepResult,
        ReferenceClient,
        TrainingClient,
    )
    from asyncrl.trainer.futures import TrainFuture
    from asyncrl.trainer.losses import LossConfig, make_loss_fn
    from asyncrl.trainer.types import AdamParams, Datum, ModelInput, datum_from_model_input_weights


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncrl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
