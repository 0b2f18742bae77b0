"""Concurrency control and deployment health for sampling: pure state machines + a tiny gate.

Everything above :class:`DeploymentGate` is pure: no tasks, no clients, no clock (callers pass
``now``), so it is unit-tested without an event loop (prime-rl ``concurrency.py`` style).

Invariants:
- A deployment never has more requests in flight than its window's ``limit``; the limit of an
  :class:`AIMDWindow` stays in ``[min_in_flight, max_in_flight]`` whatever happens.
- AIMD: a good result of a request dispatched while the window was full (the caller queue is
  the "queue signal") adds ``increase_step / window`` (about ``increase_step`` per window of
  completions); an overload (429/503), a timeout, or a per-token latency above target multiplies
  the window by ``decrease_factor`` at most once per window epoch, so a burst of 429s from one
  window of requests shrinks it once, not to the floor.
- A :class:`CircuitBreaker` (one per deployment) opens after ``failure_threshold`` consecutive
  health failures, stays open ``cooldown_s``, then lets exactly one probe through (half-open);
  the probe's success closes it, its failure re-opens it for another cooldown. Any success
  resets the consecutive count. Overloads (429/503) and rejected requests (4xx) prove the server
  is alive: they count as successes for health.
- :class:`Router` dispatches to the deployment with the fewest requests in flight among those
  whose breaker admits a request and whose window has room (ties rotate). When every breaker is
  open (none past its cooldown) the run is failing everywhere: :class:`DeploymentGate` raises
  :class:`CircuitOpenError` at once instead of queueing.
- :class:`DeploymentGate` hands slots to waiters in FIFO order; a waiter cancelled after being
  handed a slot gives it back; closing the gate fails every waiter with ClosedResourceError.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from asyncrl.errors import CircuitOpenError, ClosedResourceError, ConfigError

__all__ = [
    "AIMDWindow",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcurrencyConfig",
    "DeploymentGate",
    "FixedWindow",
    "HealthEvent",
    "HealthPolicy",
    "NoSlot",
    "Outcome",
    "Router",
    "Ticket",
    "make_window",
    "pick_least_in_flight",
]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class ConcurrencyConfig:
    """Requests in flight *per deployment*: a fixed window, or AIMD when ``adaptive``.

    ``target_step_latency_s`` is seconds per generated token (request latency divided by the
    longest completion of the request); above it AIMD shrinks the window. ``None``: only
    overloads and timeouts shrink it.
    """

    max_in_flight: int = 64
    adaptive: bool = False
    min_in_flight: int = 1
    initial_in_flight: int | None = None  # None: start at max_in_flight
    target_step_latency_s: float | None = None
    increase_step: float = 1.0
    decrease_factor: float = 0.5

    def __post_init__(self) -> None:
        _require(self.min_in_flight >= 1, "min_in_flight", self.min_in_flight, ">= 1")
        _require(
            self.max_in_flight >= self.min_in_flight,
            "max_in_flight",
            self.max_in_flight,
            f">= min_in_flight ({self.min_in_flight})",
        )
        if self.initial_in_flight is not None:
            _require(
                self.min_in_flight <= self.initial_in_flight <= self.max_in_flight,
                "initial_in_flight",
                self.initial_in_flight,
                f"in [{self.min_in_flight}, {self.max_in_flight}]",
            )
        if self.target_step_latency_s is not None:
            _require(
                self.target_step_latency_s > 0,
                "target_step_latency_s",
                self.target_step_latency_s,
                "> 0",
            )
        _require(self.increase_step > 0, "increase_step", self.increase_step, "> 0")
        _require(0 < self.decrease_factor < 1, "decrease_factor", self.decrease_factor, "in (0, 1)")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """When a deployment is marked unhealthy, and for how long before a probe."""

    failure_threshold: int = 5
    cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        _require(self.failure_threshold >= 1, "failure_threshold", self.failure_threshold, ">= 1")
        _require(
            math.isfinite(self.cooldown_s) and self.cooldown_s >= 0,
            "cooldown_s",
            self.cooldown_s,
            "a finite number >= 0",
        )


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


# --------------------------------------------------------------------------- windows


class FixedWindow:
    """A constant limit. Same interface as :class:`AIMDWindow`; every signal is ignored."""

    __slots__ = ("_limit",)

    def __init__(self, limit: int) -> None:
        _require(limit >= 1, "max_in_flight", limit, ">= 1")
        self._limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def epoch(self) -> int:
        return 0

    def on_success(self, epoch: int, *, step_latency_s: float | None, saturated: bool) -> None:
        return None

    def on_congestion(self, epoch: int) -> bool:
        return False


class AIMDWindow:
    """Additive-increase / multiplicative-decrease window bounded to ``[minimum, maximum]``."""

    __slots__ = ("_epoch", "_step", "_target", "_window", "decrease_factor", "maximum", "minimum")

    def __init__(
        self,
        *,
        minimum: int,
        maximum: int,
        initial: int | None = None,
        target_step_latency_s: float | None = None,
        increase_step: float = 1.0,
        decrease_factor: float = 0.5,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.decrease_factor = decrease_factor
        self._window = float(maximum if initial is None else initial)
        self._target = target_step_latency_s
        self._step = increase_step
        self._epoch = 0

    @property
    def limit(self) -> int:
        return max(self.minimum, min(self.maximum, math.floor(self._window + 1e-9)))

    @property
    def epoch(self) -> int:
        """Bumped by every decrease; a signal from an older epoch cannot decrease again."""
        return self._epoch

    def on_success(self, epoch: int, *, step_latency_s: float | None, saturated: bool) -> None:
        """A served request: shrink if its per-token latency is above target, else maybe grow."""
        target = self._target
        if target is not None and step_latency_s is not None and step_latency_s > target:
            self.on_congestion(epoch)
            return
        if saturated:
            self._window = min(float(self.maximum), self._window + self._step / self._window)

    def on_congestion(self, epoch: int) -> bool:
        """Overload / timeout / slow: multiplicative decrease, once per epoch. True if it shrank."""
        if epoch != self._epoch:
            return False
        self._window = max(float(self.minimum), self._window * self.decrease_factor)
        self._epoch += 1
        return True


def make_window(config: ConcurrencyConfig) -> FixedWindow | AIMDWindow:
    """The window a deployment gets under ``config``."""
    if not config.adaptive:
        return FixedWindow(config.max_in_flight)
    return AIMDWindow(
        minimum=config.min_in_flight,
        maximum=config.max_in_flight,
        initial=config.initial_in_flight,
        target_step_latency_s=config.target_step_latency_s,
        increase_step=config.increase_step,
        decrease_factor=config.decrease_factor,
    )


# --------------------------------------------------------------------------- circuit breaker


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # cooldown over: one probe may go (or is in flight)


class CircuitBreaker:
    """Per-deployment health: closed -> open (K consecutive failures) -> half-open probe."""

    __slots__ = (
        "_opened_at",
        "_probe_in_flight",
        "_state",
        "consecutive_failures",
        "cooldown_s",
        "failure_threshold",
    )

    def __init__(self, failure_threshold: int, cooldown_s: float) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.consecutive_failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probe_in_flight = False

    def state(self, now: float) -> BreakerState:
        """The state as seen at ``now`` (an open breaker past its cooldown reads half-open)."""
        if self._state is BreakerState.OPEN and now >= self.reopen_at:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def reopen_at(self) -> float:
        """When an open breaker admits its probe."""
        return self._opened_at + self.cooldown_s

    def can_dispatch(self, now: float) -> bool:
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probe_in_flight

    def on_dispatch(self, now: float) -> bool:
        """Record a dispatch the caller checked with :meth:`can_dispatch`; True if a probe."""
        if self.state(now) is BreakerState.CLOSED:
            return False
        self._state = BreakerState.HALF_OPEN
        self._probe_in_flight = True
        return True

    def record_success(self) -> bool:
        """The deployment answered. True if this closed an open / half-open breaker."""
        recovered = self._state is not BreakerState.CLOSED
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._probe_in_flight = False
        return recovered

    def record_failure(self, now: float) -> bool:
        """A health failure. True if this opened the breaker (from closed or half-open)."""
        self.consecutive_failures += 1
        if self._state is BreakerState.OPEN:
            return False
        if (
            self._state is BreakerState.HALF_OPEN
            or self.consecutive_failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = now
            self._probe_in_flight = False
            return True
        return False

    def abandon_probe(self) -> None:
        """The probe ended with no verdict (cancelled): let another probe go."""
        self._probe_in_flight = False


# --------------------------------------------------------------------------- routing


def pick_least_in_flight(
    in_flight: Sequence[int], eligible: Sequence[bool], start: int = 0
) -> int | None:
    """Index of the eligible entry with the fewest in flight; ties go to the first at or after
    ``start`` (rotating ``start`` spreads ties). ``None`` if nothing is eligible."""
    best: int | None = None
    count = len(in_flight)
    for offset in range(count):
        index = (start + offset) % count
        if eligible[index] and (best is None or in_flight[index] < in_flight[best]):
            best = index
    return best


class Outcome(enum.Enum):
    """How an attempt ended, as far as the deployment's health and window are concerned."""

    SUCCESS = "success"  # served; feeds latency to the window
    ALIVE = "alive"  # answered but the request was rejected (4xx) or unparsable
    OVERLOAD = "overload"  # 429 / 503
    TIMEOUT = "timeout"
    FAILURE = "failure"  # connect error, 408, 5xx
    CANCELLED = "cancelled"  # caller went away: no verdict


class NoSlot(enum.Enum):
    BUSY = "busy"  # wait: some deployment will free a slot or finish its probe
    ALL_OPEN = "all_open"  # every breaker is open: fail


class HealthEvent(enum.Enum):
    UNHEALTHY = "unhealthy"
    RECOVERED = "recovered"


@dataclass(frozen=True, slots=True)
class Ticket:
    """One dispatched attempt: where it went and what the window looked like."""

    index: int
    epoch: int
    probe: bool
    saturated: bool


@dataclass(slots=True)
class _Deployment:
    url: str
    window: FixedWindow | AIMDWindow
    breaker: CircuitBreaker
    in_flight: int = 0
    requests: int = 0
    successes: int = 0
    failures: int = 0
    overloads: int = 0
    timeouts: int = 0
    last_error: str | None = None


class Router:
    """Pure bookkeeping for N deployments: choose, dispatch, and account results."""

    def __init__(
        self, urls: Sequence[str], concurrency: ConcurrencyConfig, health: HealthPolicy
    ) -> None:
        if not urls:
            raise ConfigError("Router needs at least one deployment URL")
        self._deps = [
            _Deployment(
                url=url,
                window=make_window(concurrency),
                breaker=CircuitBreaker(health.failure_threshold, health.cooldown_s),
            )
            for url in urls
        ]
        self._rotate = 0
        self.last_error: tuple[str, str] | None = None  # (url, message) of the latest failure

    @property
    def urls(self) -> list[str]:
        return [dep.url for dep in self._deps]

    def try_acquire(self, now: float) -> Ticket | NoSlot:
        """Dispatch one attempt to the least-loaded admissible deployment, if any."""
        deps = self._deps
        eligible = [d.in_flight < d.window.limit and d.breaker.can_dispatch(now) for d in deps]
        index = pick_least_in_flight([d.in_flight for d in deps], eligible, self._rotate)
        if index is None:
            return NoSlot.ALL_OPEN if self.all_open(now) else NoSlot.BUSY
        self._rotate = (index + 1) % len(deps)
        dep = deps[index]
        dep.in_flight += 1
        dep.requests += 1
        probe = dep.breaker.on_dispatch(now)
        return Ticket(index, dep.window.epoch, probe, dep.in_flight >= dep.window.limit)

    def release(
        self,
        ticket: Ticket,
        outcome: Outcome,
        now: float,
        *,
        step_latency_s: float | None = None,
        error: str | None = None,
    ) -> HealthEvent | None:
        """Account one finished attempt; returns a health transition, if it caused one."""
        dep = self._deps[ticket.index]
        dep.in_flight -= 1
        if error is not None:
            dep.last_error = error
            self.last_error = (dep.url, error)
        if outcome is Outcome.CANCELLED:
            if ticket.probe:
                dep.breaker.abandon_probe()
            return None
        if outcome is Outcome.SUCCESS:
            dep.successes += 1
            dep.window.on_success(
                ticket.epoch, step_latency_s=step_latency_s, saturated=ticket.saturated
            )
        elif outcome in (Outcome.OVERLOAD, Outcome.TIMEOUT):
            dep.window.on_congestion(ticket.epoch)
        if outcome is Outcome.OVERLOAD:
            dep.overloads += 1
        if outcome in (Outcome.SUCCESS, Outcome.ALIVE, Outcome.OVERLOAD):
            return HealthEvent.RECOVERED if dep.breaker.record_success() else None
        dep.failures += 1
        if outcome is Outcome.TIMEOUT:
            dep.timeouts += 1
        return HealthEvent.UNHEALTHY if dep.breaker.record_failure(now) else None

    def mark_healthy(self, url: str | None = None) -> int:
        """Close the breakers of ``url`` (default: all), e.g. after the deployment behind it
        was restarted. Returns how many were open or half-open."""
        return sum(
            dep.breaker.record_success() for dep in self._deps if url is None or dep.url == url
        )

    def all_open(self, now: float) -> bool:
        """Every breaker is open and none is past its cooldown: failing everywhere."""
        return all(d.breaker.state(now) is BreakerState.OPEN for d in self._deps)

    def next_reopen_at(self, now: float) -> float | None:
        """Earliest time an open breaker admits a probe (``None`` if none is open)."""
        open_ = BreakerState.OPEN
        times = [d.breaker.reopen_at for d in self._deps if d.breaker.state(now) is open_]
        return min(times) if times else None

    def url(self, index: int) -> str:
        return self._deps[index].url

    def consecutive_failures(self, index: int) -> int:
        return self._deps[index].breaker.consecutive_failures

    def in_flight(self) -> int:
        return sum(d.in_flight for d in self._deps)

    def all_open_message(self, now: float) -> str:
        reopen = self.next_reopen_at(now)
        wait = f"; next probe in {max(0.0, reopen - now):.1f}s" if reopen is not None else ""
        last = f"{self.last_error[0]}: {self.last_error[1]}" if self.last_error else "unknown"
        return f"all {len(self._deps)} deployments failing (circuit open{wait}): last error {last}"

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        """Per-deployment counters and state, keyed by URL."""
        return {
            d.url: {
                "state": d.breaker.state(now).value,
                "in_flight": d.in_flight,
                "window": d.window.limit,
                "requests": d.requests,
                "successes": d.successes,
                "failures": d.failures,
                "overloads": d.overloads,
                "timeouts": d.timeouts,
                "consecutive_failures": d.breaker.consecutive_failures,
                "last_error": d.last_error,
            }
            for d in self._deps
        }


# --------------------------------------------------------------------------- async gate


class _Waiter:
    __slots__ = ("error", "event", "ticket")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.ticket: Ticket | None = None
        self.error: BaseException | None = None


class DeploymentGate:
    """Async front of a :class:`Router`: ``acquire()`` waits (FIFO) for a slot."""

    def __init__(
        self,
        router: Router,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_health_event: Callable[[HealthEvent, int], None] | None = None,
    ) -> None:
        self.router = router
        self._clock = clock
        self._on_health_event = on_health_event
        self._waiters: deque[_Waiter] = deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> Ticket:
        """A slot on some deployment. Raises CircuitOpenError if every breaker is open."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise ClosedResourceError("the deployment gate is closed")
        if not self._waiters:
            got = self.router.try_acquire(self._clock())
            if isinstance(got, Ticket):
                await anyio.lowlevel.cancel_shielded_checkpoint()
                return got
            if got is NoSlot.ALL_OPEN:
                raise self._circuit_open_error()
        return await self._wait()

    async def _wait(self) -> Ticket:
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            while True:
                reopen = self.router.next_reopen_at(self._clock())
                delay = math.inf if reopen is None else max(0.0, reopen - self._clock()) + 1e-3
                with anyio.move_on_after(delay):
                    await waiter.event.wait()
                if waiter.ticket is None and waiter.error is None:
                    self._dispatch()  # a cooldown ran out: a probe may go now
                if waiter.error is not None:
                    raise waiter.error
                if waiter.ticket is not None:
                    return waiter.ticket
        except BaseException:
            if waiter.ticket is not None:
                self.release(waiter.ticket, Outcome.CANCELLED)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(
        self,
        ticket: Ticket,
        outcome: Outcome,
        *,
        step_latency_s: float | None = None,
        error: str | None = None,
    ) -> None:
        """Give a slot back with the attempt's outcome, and hand freed slots to waiters."""
        event = self.router.release(
            ticket, outcome, self._clock(), step_latency_s=step_latency_s, error=error
        )
        if event is not None and self._on_health_event is not None:
            self._on_health_event(event, ticket.index)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiters:
            got = self.router.try_acquire(self._clock())
            if got is NoSlot.BUSY:
                return
            if got is NoSlot.ALL_OPEN:
                self._fail_waiters(self._circuit_open_error)
                return
            waiter = self._waiters.popleft()
            waiter.ticket = got
            waiter.event.set()

    def mark_healthy(self, url: str | None = None) -> None:
        """Close the breakers of ``url`` (default: all) and hand slots to waiters."""
        self.router.mark_healthy(url)
        self._dispatch()

    def _circuit_open_error(self) -> CircuitOpenError:
        return CircuitOpenError(self.router.all_open_message(self._clock()))

    def _fail_waiters(self, make_error: Callable[[], BaseException]) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = make_error()
            waiter.event.set()

    def close(self) -> None:
        """Fail every waiter and refuse new acquisitions."""
        self._closed = True
        self._fail_waiters(lambda: ClosedResourceError("the deployment gate closed while waiting"))
