"""The asyncrl error tree.

Every error asyncrl raises on purpose derives from :class:`AsyncRLError`; each category also
inherits the builtin a caller would naturally catch, so ``except ValueError`` keeps working.

    AsyncRLError
    ├── ConfigError(ValueError)            bad config value, bad model dir, bad output_model_id
    ├── DataError(ValueError)              malformed dataset row / datum (names the row)
    ├── CheckpointError(RuntimeError)      missing / wrong-kind / half-written checkpoint
    │   └── WrongCheckpointKindError       e.g. load_state_with_optimizer on a sampler snapshot
    ├── SnapshotError(RuntimeError)        sampler snapshot problems
    │   ├── ChecksumError                  bytes do not match the manifest
    │   ├── IdentityMismatchError          delta's previous identity != what is served
    │   ├── DeltaChainError                delta with no base / unknown previous snapshot
    │   └── HeldBytesLostError             a rejected in-place delta could not be undone
    ├── DeploymentError(RuntimeError)      vLLM deployment failed to start / died / unhealthy
    │   └── HotloadError                   hotload rejected or failed
    ├── SamplingError(RuntimeError)        sampling request failed (wraps httpx errors)
    │   └── CircuitOpenError               every deployment's breaker is open
    ├── RolloutError(RuntimeError)         reward / rollout coroutine failed
    ├── MetricsWriteError(OSError)         appending to metrics.jsonl failed (path, reason)
    └── ClosedResourceError(RuntimeError)  a client / deployment used after aclose()
"""

from __future__ import annotations


class AsyncRLError(Exception):
    """Root of every error asyncrl raises on purpose."""


class ConfigError(AsyncRLError, ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


class DataError(AsyncRLError, ValueError):
    """Input data (a dataset row, a datum) is malformed; the message names the row."""


class CheckpointError(AsyncRLError, RuntimeError):
    """A checkpoint is missing, incomplete or unusable."""


class WrongCheckpointKindError(CheckpointError):
    """A checkpoint of one kind was given where another kind is required."""


class SnapshotError(AsyncRLError, RuntimeError):
    """A sampler weight snapshot is invalid."""


class ChecksumError(SnapshotError):
    """Snapshot bytes do not match the checksums recorded in its manifest."""


class IdentityMismatchError(SnapshotError):
    """A delta's previous_snapshot_identity is not the identity currently held."""


class DeltaChainError(SnapshotError):
    """A delta cannot be applied: no base in the chain, or an unknown previous snapshot."""


class HeldBytesLostError(SnapshotError):
    """A delta applied in place failed verification and could not be turned back: the host
    bytes it was applied to are unusable (a base must be loaded next)."""


class DeploymentError(AsyncRLError, RuntimeError):
    """A vLLM deployment failed to start, died or is unhealthy."""


class HotloadError(DeploymentError):
    """A hotload was rejected or failed; the deployment keeps its previous identity."""


class SamplingError(AsyncRLError, RuntimeError):
    """A sampling request failed."""


class CircuitOpenError(SamplingError):
    """Every deployment's circuit breaker is open: the run is failing everywhere."""


class RolloutError(AsyncRLError, RuntimeError):
    """A user reward or rollout coroutine failed."""


class MetricsWriteError(AsyncRLError, OSError):
    """Appending a row to ``metrics.jsonl`` failed (names the path and the OS reason)."""


class ClosedResourceError(AsyncRLError, RuntimeError):
    """A resource (client, deployment, syncer) was used after it was closed."""
