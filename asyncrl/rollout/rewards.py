"""Running user reward functions safely, and what happens when they fail.

Invariants:
- A reward is a finite real number. ``None``, strings, NaN, inf, or an exception is a
  *failure* recorded with its cause (row id, what was returned / raised) — never turned into 0.
- A reward function that runs past its timeout is cut off and recorded as failed.
- The failure policy is a value: ``FailFast()`` raises ``RolloutError``;
  ``RetryOnFailure(max_retries, timeout)`` retries then fails the sample;
  ``DropGroup()`` drops the whole group and counts it.
- Plain (non-async) reward functions run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from asyncrl.errors import ConfigError, RolloutError, SamplingError
from asyncrl.logging import get_logger

__all__ = [
    "DropGroup",
    "FailFast",
    "FailurePolicy",
    "RetryOnFailure",
    "SampleFailure",
    "call_with_policy",
    "check_reward",
]

log = get_logger("asyncrl.rollout")


@dataclass(frozen=True)
class FailFast:
    """The first failure stops the run with a RolloutError naming the row and cause."""

    timeout: float = 60.0


@dataclass(frozen=True)
class RetryOnFailure:
    """Retry a failed call up to ``max_retries`` times, each bounded by ``timeout`` seconds."""

    max_retries: int = 2
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"RetryOnFailure.max_retries must be >= 0, got {self.max_retries}")
        if not self.timeout > 0:
            raise ConfigError(f"RetryOnFailure.timeout must be > 0, got {self.timeout}")


@dataclass(frozen=True)
class DropGroup:
    """A failed sample drops its whole group (recorded and counted, the run goes on)."""

    timeout: float = 60.0


FailurePolicy = FailFast | RetryOnFailure | DropGroup


@dataclass(frozen=True)
class SampleFailure:
    """A failed reward / rollout call, as data: which row, which stage, why."""

    row_id: str
    stage: str
    cause: str
    attempts: int

    def as_error(self) -> RolloutError:
        return RolloutError(
            f"{self.stage} failed for row {self.row_id!r} after {self.attempts} attempt(s): "
            f"{self.cause}"
        )


def check_reward(value: Any) -> float:
    """``value`` as a float if it is a finite real number; else TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"returned {value!r} ({type(value).__name__}); expected a finite float")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"returned {out}; expected a finite float")
    return out


async def _call_once(fn: Callable[..., Any], args: tuple[Any, ...], limit_s: float) -> Any:
    with anyio.fail_after(limit_s):
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        ):
            return await fn(*args)
        # A sync function cannot be interrupted; abandon_on_cancel lets the timeout fire.
        result = await anyio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)
        if inspect.isawaitable(result):
            return await result
        return result


async def call_with_policy(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    policy: FailurePolicy,
    row_id: str,
    stage: str,
    validate: Callable[[Any], Any] = lambda v: v,
) -> Any | SampleFailure:
    """Call ``fn(*args)`` under ``policy``; return its validated value or a SampleFailure.

    FailFast raises RolloutError instead of returning a failure. A SamplingError (the
    deployment failed under a rollout_fn) propagates unchanged: it is not the user's fault,
    and the loop may recover the deployment and sample the row again.
    """
    retries = policy.max_retries if isinstance(policy, RetryOnFailure) else 0
    cause = ""
    for attempt in range(1, retries + 2):
        try:
            return validate(await _call_once(fn, args, policy.timeout))
        except TimeoutError:
            cause = f"timed out after {policy.timeout}s"
        except SamplingError:  # the deployment failed, not the user's code: the loop decides
            raise
        except Exception as exc:  # user code: any error is recorded with its cause
            cause = f"{type(exc).__name__}: {exc}"
        log.warning("sample_failed", row_id=row_id, stage=stage, attempt=attempt, cause=cause)
    failure = SampleFailure(row_id=row_id, stage=stage, cause=cause, attempts=retries + 1)
    if isinstance(policy, FailFast):
        raise failure.as_error()
    return failure
