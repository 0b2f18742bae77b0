"""Retry policy for sampling requests: a value plus pure decision functions (no I/O, no clock).

Invariants:
- A call makes at most ``max_attempts`` attempts that fail for a reason of their own
  (timeouts, transport errors, 408/5xx) plus at most ``max_overload_attempts`` answered 429/503,
  and no retry is started once ``total_timeout_s`` (measured from the start of the first
  attempt) would be exceeded by the backoff sleep; so a call ends within ``total_timeout_s +
  request_timeout_s``, plus whatever time its attempts wait for a free concurrency slot (the
  sampler's gate, which bounds the requests in flight, not the time).
- Backoff is exponential with jitter: after the k-th failure of its kind (k >= 1; 429/503
  answers and the other failures are counted apart) a call sleeps ``cap_k * (1 - jitter * u)``
  with ``cap_k = min(backoff_max_s, backoff_initial_s * backoff_multiplier ** (k - 1))`` and
  ``u`` uniform in [0, 1); after a 429/503 ``cap_k`` is at most ``overload_backoff_max_s`` (the
  server is polled until it takes the request); a server ``Retry-After`` raises the sleep, still
  capped by ``backoff_max_s``.
- Classification: connect errors, timeouts, 408 and 5xx are retried; 429 and 503 are
  *overload* (retried, shrink the concurrency window, do not count against a deployment's
  health or ``max_attempts``, since the server answered on purpose: vLLM 0.33 answers 503 to
  every new request for the whole of an ``abort``/``wait`` weight-update pause, which can
  outlast a handful of quick retries);
  every other 4xx, and transport errors caused by our own request, are fatal.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import httpx

from asyncrl.errors import ConfigError

__all__ = [
    "FailureKind",
    "RetryPolicy",
    "classify_exception",
    "classify_status",
    "next_retry_delay",
    "parse_retry_after",
]


class FailureKind(enum.Enum):
    """What a failed attempt says about the request and the deployment that served it."""

    OVERLOAD = "overload"  # 429/503: retry, shrink window, deployment is alive
    TIMEOUT = "timeout"  # connect/read/write/pool timeout: retry, shrink window, health failure
    TRANSIENT = "transient"  # connection refused/reset, 408, 5xx: retry, health failure
    FATAL = "fatal"  # other 4xx, malformed request: raise at once


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a sampling call retries. ``RetryPolicy.fail_fast()`` makes one attempt only."""

    max_attempts: int = 6
    max_overload_attempts: int = 600
    total_timeout_s: float = 120.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    backoff_multiplier: float = 2.0
    overload_backoff_max_s: float = 1.0
    jitter: float = 0.5
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_overload_attempts"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("total_timeout_s", "request_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, value, "a finite number > 0")
        _require(self.backoff_initial_s >= 0, "backoff_initial_s", self.backoff_initial_s, ">= 0")
        _require(
            self.backoff_max_s >= self.backoff_initial_s,
            "backoff_max_s",
            self.backoff_max_s,
            f">= backoff_initial_s ({self.backoff_initial_s})",
        )
        _require(self.backoff_multiplier >= 1, "backoff_multiplier", self.backoff_multiplier, ">=1")
        _require(
            math.isfinite(self.overload_backoff_max_s) and self.overload_backoff_max_s >= 0,
            "overload_backoff_max_s",
            self.overload_backoff_max_s,
            "a finite number >= 0",
        )
        _require(0 <= self.jitter <= 1, "jitter", self.jitter, "in [0, 1]")

    @classmethod
    def fail_fast(cls, *, request_timeout_s: float = 600.0) -> RetryPolicy:
        """One attempt, no retries (not even of a 429/503)."""
        return cls(max_attempts=1, max_overload_attempts=1, request_timeout_s=request_timeout_s)


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"RetryPolicy.{field}={value!r} is invalid: expected {expected}")


def next_retry_delay(
    policy: RetryPolicy,
    *,
    attempts_done: int,
    elapsed_s: float,
    rand: float,
    retry_after_s: float | None = None,
    overloads_done: int = 0,
    overloaded: bool = False,
) -> float | None:
    """Seconds to sleep before the next attempt, or ``None`` when the budget is spent.

    ``attempts_done`` counts failed attempts so far (>= 1), ``overloads_done`` how many of them
    were answered 429/503 and ``overloaded`` whether the last one was; ``elapsed_s`` is the time
    since the first attempt started; ``rand`` is uniform in [0, 1).
    """
    if (
        attempts_done - overloads_done >= policy.max_attempts
        or overloads_done >= policy.max_overload_attempts
    ):
        return None
    if overloaded:
        cap = min(_cap(policy, overloads_done), policy.overload_backoff_max_s)
    else:
        cap = _cap(policy, attempts_done - overloads_done)
    delay = cap * (1.0 - policy.jitter * rand)
    if retry_after_s is not None:
        delay = min(max(delay, retry_after_s), policy.backoff_max_s)
    if elapsed_s + delay >= policy.total_timeout_s:
        return None
    return delay


def _cap(policy: RetryPolicy, k: int) -> float:
    """The backoff cap after the k-th failure of a kind (hundreds of 503s must not overflow)."""
    try:
        return min(policy.backoff_max_s,
                   policy.backoff_initial_s * policy.backoff_multiplier ** max(k - 1, 0))
    except OverflowError:
        return policy.backoff_max_s


def classify_status(status_code: int) -> FailureKind | None:
    """``None`` for 2xx; otherwise how to treat the HTTP status."""
    if 200 <= status_code < 300:
        return None
    if status_code in (429, 503):
        return FailureKind.OVERLOAD
    if status_code == 408 or status_code >= 500:
        return FailureKind.TRANSIENT
    return FailureKind.FATAL


def classify_exception(exc: BaseException) -> FailureKind:
    """How to treat an exception raised by httpx while sending a request."""
    if isinstance(exc, httpx.TimeoutException):
        return FailureKind.TIMEOUT
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError):
        return FailureKind.TRANSIENT
    return FailureKind.FATAL  # UnsupportedProtocol, LocalProtocolError, DecodingError, ...


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds; HTTP-date forms and junk are ignored (``None``)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
