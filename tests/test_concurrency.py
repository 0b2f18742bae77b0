"""Pure decision logic of the rollout sampler: windows, breaker, routing, retry policy.

Everything but the last section runs without an event loop; time is passed in as ``now``.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncrl.errors import ClosedResourceError, ConfigError, SamplingError
from asyncrl.rollout.concurrency import (
    AIMDWindow,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ConcurrencyConfig,
    DeploymentGate,
    FixedWindow,
    HealthEvent,
    HealthPolicy,
    NoSlot,
    Outcome,
    Router,
    Ticket,
    make_window,
    pick_least_in_flight,
)
from asyncrl.rollout.retry import (
    FailureKind,
    RetryPolicy,
    classify_exception,
    classify_status,
    next_retry_delay,
    parse_retry_after,
)

# --------------------------------------------------------------------------- windows


def test_fixed_window_ignores_every_signal() -> None:
    window = make_window(ConcurrencyConfig(max_in_flight=7))
    assert isinstance(window, FixedWindow)
    window.on_success(0, step_latency_s=100.0, saturated=True)
    assert window.on_congestion(0) is False
    assert window.limit == 7


def test_aimd_grows_about_one_per_window_of_saturated_successes() -> None:
    window = AIMDWindow(minimum=1, maximum=100, initial=4)
    for _ in range(4):
        window.on_success(0, step_latency_s=None, saturated=True)
    assert window.limit == 4  # 4 + 1/4 + ... < 5 after 4 successes of a window of 4
    for _ in range(2):
        window.on_success(0, step_latency_s=None, saturated=True)
    assert window.limit == 5


def test_aimd_does_not_grow_when_callers_do_not_fill_the_window() -> None:
    window = AIMDWindow(minimum=1, maximum=100, initial=4)
    for _ in range(100):
        window.on_success(0, step_latency_s=None, saturated=False)
    assert window.limit == 4


def test_aimd_halves_on_congestion_once_per_epoch() -> None:
    window = AIMDWindow(minimum=1, maximum=64, initial=64, decrease_factor=0.5)
    epoch = window.epoch
    assert window.on_congestion(epoch) is True
    assert window.limit == 32
    # more 429s from requests dispatched before the decrease: no further cut
    assert window.on_congestion(epoch) is False
    assert window.limit == 32
    assert window.on_congestion(window.epoch) is True
    assert window.limit == 16


def test_aimd_shrinks_on_latency_above_target_and_grows_below() -> None:
    window = AIMDWindow(minimum=1, maximum=64, initial=10, target_step_latency_s=0.05)
    window.on_success(window.epoch, step_latency_s=0.2, saturated=True)
    assert window.limit == 5
    for _ in range(20):
        window.on_success(window.epoch, step_latency_s=0.01, saturated=True)
    assert window.limit > 5


def test_aimd_respects_bounds() -> None:
    window = AIMDWindow(minimum=3, maximum=5, initial=5)
    for _ in range(10):
        window.on_congestion(window.epoch)
    assert window.limit == 3
    for _ in range(1000):
        window.on_success(window.epoch, step_latency_s=None, saturated=True)
    assert window.limit == 5


@given(
    st.lists(
        st.tuples(st.sampled_from(["ok", "slow", "congestion", "stale"]), st.booleans()),
        max_size=200,
    ),
    st.integers(1, 8),
    st.integers(0, 24),
)
def test_aimd_limit_always_within_bounds(
    events: list[tuple[str, bool]], minimum: int, extra: int
) -> None:
    maximum = minimum + extra
    window = AIMDWindow(minimum=minimum, maximum=maximum, target_step_latency_s=1.0)
    for kind, saturated in events:
        if kind == "ok":
            window.on_success(window.epoch, step_latency_s=0.1, saturated=saturated)
        elif kind == "slow":
            window.on_success(window.epoch, step_latency_s=5.0, saturated=saturated)
        elif kind == "congestion":
            window.on_congestion(window.epoch)
        else:
            window.on_congestion(window.epoch - 1)
        assert minimum <= window.limit <= maximum


def test_concurrency_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="max_in_flight"):
        ConcurrencyConfig(max_in_flight=0)
    with pytest.raises(ConfigError, match="decrease_factor"):
        ConcurrencyConfig(decrease_factor=1.0)
    with pytest.raises(ConfigError, match="initial_in_flight"):
        ConcurrencyConfig(max_in_flight=4, initial_in_flight=9)
    with pytest.raises(ConfigError, match="cooldown_s"):
        HealthPolicy(cooldown_s=-1)


# --------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_k_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    assert breaker.record_failure(0.0) is False
    assert breaker.record_failure(0.0) is False
    breaker.record_success()  # resets the count
    assert breaker.record_failure(0.0) is False
    assert breaker.record_failure(0.0) is False
    assert breaker.state(0.0) is BreakerState.CLOSED
    assert breaker.record_failure(1.0) is True
    assert breaker.state(1.0) is BreakerState.OPEN
    assert not breaker.can_dispatch(5.0)


def test_breaker_half_open_admits_one_probe_and_closes_on_success() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10.0)
    breaker.record_failure(0.0)
    assert not breaker.can_dispatch(9.9)
    assert breaker.state(10.0) is BreakerState.HALF_OPEN
    assert breaker.can_dispatch(10.0)
    assert breaker.on_dispatch(10.0) is True  # the probe
    assert not breaker.can_dispatch(10.0)  # only one probe at a time
    assert breaker.record_success() is True
    assert breaker.state(10.0) is BreakerState.CLOSED
    assert breaker.can_dispatch(10.0)
    assert breaker.on_dispatch(10.0) is False


def test_breaker_failed_probe_reopens_for_a_new_cooldown() -> None:
    breaker = CircuitBreaker(failure_threshold=5, cooldown_s=10.0)
    for _ in range(5):
        breaker.record_failure(0.0)
    breaker.on_dispatch(10.0)
    assert breaker.record_failure(12.0) is True  # one failure is enough in half-open
    assert breaker.state(21.9) is BreakerState.OPEN
    assert breaker.state(22.0) is BreakerState.HALF_OPEN


def test_breaker_abandoned_probe_lets_another_probe_go() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0)
    breaker.record_failure(0.0)
    breaker.on_dispatch(2.0)
    assert not breaker.can_dispatch(2.0)
    breaker.abandon_probe()
    assert breaker.can_dispatch(2.0)


# --------------------------------------------------------------------------- routing


def test_pick_least_in_flight_skips_ineligible_and_rotates_ties() -> None:
    assert pick_least_in_flight([3, 1, 2], [True, True, True]) == 1
    assert pick_least_in_flight([3, 1, 2], [True, False, True]) == 2
    assert pick_least_in_flight([1, 1, 1], [True, True, True], start=2) == 2
    assert pick_least_in_flight([1, 1, 1], [True, True, True], start=1) == 1
    assert pick_least_in_flight([0, 0], [False, False]) is None


def _router(n: int = 2, *, max_in_flight: int = 4, threshold: int = 2, cooldown: float = 10.0):
    urls = [f"http://d{i}" for i in range(n)]
    return Router(
        urls,
        ConcurrencyConfig(max_in_flight=max_in_flight),
        HealthPolicy(failure_threshold=threshold, cooldown_s=cooldown),
    )


def _take(router: Router, now: float = 0.0) -> Ticket:
    got = router.try_acquire(now)
    assert isinstance(got, Ticket), got
    return got


def test_router_spreads_by_least_in_flight_and_respects_windows() -> None:
    router = _router(2, max_in_flight=2)
    tickets = [_take(router) for _ in range(4)]
    assert sorted(t.index for t in tickets) == [0, 0, 1, 1]
    assert router.try_acquire(0.0) is NoSlot.BUSY
    router.release(tickets[0], Outcome.SUCCESS, 0.0)
    assert _take(router).index == tickets[0].index


def test_router_marks_unhealthy_after_k_failures_and_skips_it() -> None:
    router = _router(2, threshold=2)
    events = []
    while HealthEvent.UNHEALTHY not in events:
        ticket = _take(router, 1.0)
        failing = ticket.index == 0
        outcome = Outcome.FAILURE if failing else Outcome.SUCCESS
        error = "connect refused" if failing else None
        events.append(router.release(ticket, outcome, 1.0, error=error))
    snap = router.snapshot(1.0)
    assert snap["http://d0"]["requests"] == 2  # exactly K failures, then marked
    assert snap["http://d0"]["state"] == "open"
    assert snap["http://d0"]["last_error"] == "connect refused"
    assert snap["http://d1"]["state"] == "closed"
    assert {_take(router, 2.0).index for _ in range(4)} == {1}


def test_router_recovers_an_unhealthy_deployment_through_a_probe() -> None:
    router = _router(2, threshold=1, cooldown=5.0)
    bad = _take(router)
    router.release(bad, Outcome.FAILURE, 0.0)
    # while open, everything goes to the other deployment
    busy = [_take(router, 1.0) for _ in range(3)]
    assert {t.index for t in busy} == {1 - bad.index}
    # after the cooldown one probe goes to the recovered one (fewest in flight)
    probe = _take(router, 6.0)
    assert probe.index == bad.index and probe.probe
    assert router.release(probe, Outcome.SUCCESS, 6.5) is HealthEvent.RECOVERED
    assert router.snapshot(6.5)[f"http://d{bad.index}"]["state"] == "closed"


def test_router_reports_all_open_with_last_error() -> None:
    router = _router(2, threshold=1, cooldown=30.0)
    for _ in (0, 1):
        ticket = _take(router)
        router.release(ticket, Outcome.FAILURE, 0.0, error=f"boom {ticket.index}")
    assert router.try_acquire(1.0) is NoSlot.ALL_OPEN
    message = router.all_open_message(1.0)
    assert message.startswith("all 2 deployments failing")
    assert "boom" in message and "29.0s" in message
    assert router.next_reopen_at(1.0) == 30.0
    assert isinstance(router.try_acquire(30.0), Ticket)  # half-open probe


def test_overload_is_not_a_health_failure_but_shrinks_an_adaptive_window() -> None:
    router = Router(
        ["http://d0"],
        ConcurrencyConfig(max_in_flight=8, adaptive=True),
        HealthPolicy(failure_threshold=1),
    )
    for _ in range(3):
        ticket = _take(router)
        assert router.release(ticket, Outcome.OVERLOAD, 0.0) is None
    snap = router.snapshot(0.0)["http://d0"]
    assert snap["state"] == "closed"
    assert snap["overloads"] == 3
    assert snap["window"] == 1  # 8 -> 4 -> 2 -> 1, one cut per epoch (each ticket is fresh)


def test_cancelled_probe_gives_the_probe_back() -> None:
    router = _router(1, threshold=1, cooldown=1.0)
    router.release(_take(router), Outcome.FAILURE, 0.0)
    probe = _take(router, 2.0)
    assert router.try_acquire(2.0) is NoSlot.BUSY  # probe in flight: wait, do not fail
    router.release(probe, Outcome.CANCELLED, 2.0)
    assert _take(router, 2.0).probe


# --------------------------------------------------------------------------- retry policy


def test_retry_delay_grows_exponentially_with_jitter_and_cap() -> None:
    policy = RetryPolicy(
        max_attempts=10, backoff_initial_s=1.0, backoff_max_s=5.0, jitter=0.5, total_timeout_s=1e6
    )
    no_jitter = [
        next_retry_delay(policy, attempts_done=k, elapsed_s=0.0, rand=0.0) for k in range(1, 6)
    ]
    assert no_jitter == [1.0, 2.0, 4.0, 5.0, 5.0]
    full_jitter = next_retry_delay(policy, attempts_done=3, elapsed_s=0.0, rand=0.999999)
    assert full_jitter is not None and 2.0 <= full_jitter < 4.0


def test_retry_is_bounded_in_count_and_total_time() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_initial_s=1.0, total_timeout_s=10.0, jitter=0)
    assert next_retry_delay(policy, attempts_done=2, elapsed_s=0.0, rand=0.0) == 2.0
    assert next_retry_delay(policy, attempts_done=3, elapsed_s=0.0, rand=0.0) is None
    assert next_retry_delay(policy, attempts_done=1, elapsed_s=9.5, rand=0.0) is None


def test_overload_answers_are_polled_without_using_up_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=2, max_overload_attempts=5, backoff_initial_s=1.0,
                         backoff_max_s=8.0, overload_backoff_max_s=0.5, total_timeout_s=100.0,
                         jitter=0)

    def delay(attempts: int, overloads: int, overloaded: bool) -> float | None:
        return next_retry_delay(policy, attempts_done=attempts, elapsed_s=0.0, rand=0.0,
                                overloads_done=overloads, overloaded=overloaded)

    # four 503s in a row (a vLLM 0.33 abort/wait pause): polled every 0.5 s, not 1, 2, 4, 8
    assert [delay(k, k, True) for k in range(1, 5)] == [0.5, 0.5, 0.5, 0.5]
    assert delay(5, 5, True) is None  # max_overload_attempts answered 503
    # a timeout after three 503s is the first failure of its kind: the initial backoff
    assert delay(4, 3, False) == 1.0
    assert delay(5, 3, False) is None  # two failures of its own: max_attempts spent
    # hundreds of polled 503s never overflow the exponent (4.0 ** 600 is not a float)
    many = RetryPolicy(max_overload_attempts=10_000, backoff_multiplier=4.0, jitter=0,
                       overload_backoff_max_s=0.05, total_timeout_s=1e6)
    assert next_retry_delay(many, attempts_done=600, elapsed_s=0.0, rand=0.0,
                            overloads_done=600, overloaded=True) == 0.05
    assert next_retry_delay(many, attempts_done=601, elapsed_s=0.0, rand=0.0,
                            overloads_done=600, overloaded=False) == many.backoff_initial_s
    # and the total time still bounds everything
    assert next_retry_delay(policy, attempts_done=1, elapsed_s=99.8, rand=0.0,
                            overloads_done=1, overloaded=True) is None
    fail_fast = RetryPolicy.fail_fast()
    assert next_retry_delay(fail_fast, attempts_done=1, elapsed_s=0.0, rand=0.0,
                            overloads_done=1, overloaded=True) is None


def test_retry_after_raises_the_delay_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff_initial_s=0.1, backoff_max_s=3.0, jitter=0)
    assert next_retry_delay(policy, attempts_done=1, elapsed_s=0, rand=0, retry_after_s=2) == 2.0
    assert next_retry_delay(policy, attempts_done=1, elapsed_s=0, rand=0, retry_after_s=60) == 3.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (408, FailureKind.TRANSIENT),
        (429, FailureKind.OVERLOAD),
        (500, FailureKind.TRANSIENT),
        (502, FailureKind.TRANSIENT),
        (503, FailureKind.OVERLOAD),
        (400, FailureKind.FATAL),
        (404, FailureKind.FATAL),
        (422, FailureKind.FATAL),
    ],
)
def test_classify_status(status: int, kind: FailureKind | None) -> None:
    assert classify_status(status) is kind


def test_classify_exception() -> None:
    request = httpx.Request("POST", "http://x/v1/completions")
    assert classify_exception(httpx.ConnectError("no", request=request)) is FailureKind.TRANSIENT
    assert classify_exception(httpx.ReadTimeout("slow", request=request)) is FailureKind.TIMEOUT
    assert classify_exception(httpx.ConnectTimeout("slow", request=request)) is FailureKind.TIMEOUT
    assert classify_exception(httpx.RemoteProtocolError("eof", request=request)) is (
        FailureKind.TRANSIENT
    )
    assert classify_exception(httpx.UnsupportedProtocol("ftp", request=request)) is (
        FailureKind.FATAL
    )


def test_retry_policy_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="backoff_max_s"):
        RetryPolicy(backoff_initial_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ConfigError, match="max_overload_attempts"):
        RetryPolicy(max_overload_attempts=0)
    with pytest.raises(ConfigError, match="overload_backoff_max_s"):
        RetryPolicy(overload_backoff_max_s=float("nan"))
    assert RetryPolicy.fail_fast().max_attempts == 1


# --------------------------------------------------------------------------- async gate


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_gate_hands_slots_to_waiters_in_fifo_order() -> None:
    gate = DeploymentGate(_router(1, max_in_flight=1))
    first = await gate.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        ticket = await gate.acquire()
        order.append(i)
        await anyio.lowlevel.checkpoint()
        gate.release(ticket, Outcome.SUCCESS)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
            await anyio.sleep(0.01)
        assert gate.waiting == 3
        gate.release(first, Outcome.SUCCESS)
    assert order == [0, 1, 2]
    assert gate.router.in_flight() == 0


@pytest.mark.anyio
async def test_gate_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = DeploymentGate(_router(1, max_in_flight=1))
    held = await gate.acquire()
    with anyio.move_on_after(0.02):
        await gate.acquire()
    assert gate.waiting == 0
    gate.release(held, Outcome.SUCCESS)
    with anyio.fail_after(1):
        again = await gate.acquire()
    assert again.index == 0


@pytest.mark.anyio
async def test_gate_fails_waiters_when_every_breaker_opens_and_on_close() -> None:
    gate = DeploymentGate(_router(1, max_in_flight=1, threshold=1))
    held = await gate.acquire()
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await gate.acquire()
        except SamplingError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        gate.release(held, Outcome.FAILURE, error="HTTP 500: engine dead")
    assert len(errors) == 1 and isinstance(errors[0], CircuitOpenError)
    assert "engine dead" in str(errors[0])
    with pytest.raises(CircuitOpenError):
        await gate.acquire()
    gate.close()
    with pytest.raises(ClosedResourceError):
        await gate.acquire()
