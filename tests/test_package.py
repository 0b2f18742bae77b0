"""Package-level promises: light imports, pinned public API, errors tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

import asyncrl
from asyncrl import errors


def test_import_does_not_touch_torch_or_vllm() -> None:
    code = (
        "import sys, asyncrl, asyncrl.config, asyncrl.types, asyncrl.errors, asyncrl.cli;"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules);"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names_are_pinned() -> None:
    assert asyncrl.__all__ == sorted(
        [
            "AdamParams",
            "AsyncRLError",
            "CheckpointError",
            "ChecksumError",
            "CircuitOpenError", "ClosedResourceError",
            "ConfigError",
            "DataError",
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
            "Datum",
            "datum_from_model_input_weights",
            "get_logger",
            "make_loss_fn",
            "make_tiny_model",
        ]
    )
    for name in asyncrl.__all__:
        assert getattr(asyncrl, name) is not None


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = asyncrl.no_such_thing  # type: ignore[attr-defined]


def test_error_tree_matches_builtins() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.DataError, ValueError)
    assert issubclass(errors.WrongCheckpointKindError, errors.CheckpointError)
    assert issubclass(errors.IdentityMismatchError, errors.SnapshotError)
    assert issubclass(errors.HotloadError, errors.DeploymentError)
    for name in dir(errors):
        obj = getattr(errors, name)
        ours = isinstance(obj, type) and obj.__module__ == errors.__name__
        if ours and issubclass(obj, Exception):
            assert issubclass(obj, errors.AsyncRLError), name
