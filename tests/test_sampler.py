"""DeploymentSampler against a fake vLLM /v1/completions server (``httpx.MockTransport``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from asyncrl.errors import ClosedResourceError, ConfigError, DataError, SamplingError
from asyncrl.rollout.concurrency import CircuitOpenError, ConcurrencyConfig, HealthPolicy
from asyncrl.rollout.retry import RetryPolicy
from asyncrl.rollout.sampler import DeploymentSampler, PromptTooLongError, SampledCompletion

Fault = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def completion_response(body: dict[str, Any]) -> dict[str, Any]:
    """What vLLM returns for ``body``: n choices (listed in reverse index order)."""
    prompt = body["prompt"]
    choices = []
    for i in range(body["n"]):
        token_ids = [(len(prompt) + i * 10 + k) % 60 + 1 for k in range(body["max_tokens"])]
        choices.append(
            {
                "index": i,
                "text": f"choice{i}",
                "logprobs": {
                    "token_logprobs": [-0.5 * (i + 1) - 0.01 * k for k in range(len(token_ids))],
                    "tokens": [f"t{t}" for t in token_ids],
                    "text_offset": list(range(len(token_ids))),
                    "top_logprobs": None,
                },
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": token_ids,
                "prompt_token_ids": prompt,
            }
        )
    return {"id": "cmpl-1", "object": "text_completion", "choices": choices[::-1], "usage": {}}


def status(code: int, message: str = "oops", headers: dict[str, str] | None = None) -> Fault:
    def fault(request: httpx.Request) -> httpx.Response:
        error = {"message": message, "type": "Error", "param": None, "code": code}
        return httpx.Response(code, json={"error": error}, headers=headers)

    return fault


def connect_refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


class FakeVLLM:
    """Serves valid completions unless a fault is queued (``once``) or set (``always``) for a
    host; records every request and the most requests it ever had in flight."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.once: dict[str, list[Fault]] = {}
        self.always: dict[str, Fault] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.headers: list[httpx.Headers] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold: anyio.Event | None = None  # when set, requests wait for it
        self.arrived: tuple[int, anyio.Event] | None = None  # set once that many came in

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def hosts(self) -> Counter[str]:
        return Counter(host for host, _ in self.requests)

    async def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/completions"
        body = json.loads(request.content)
        host = request.url.host
        self.requests.append((host, body))
        self.headers.append(request.headers)
        if self.arrived is not None and len(self.requests) >= self.arrived[0]:
            self.arrived[1].set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await anyio.sleep(self.delay)
            if self.hold is not None:
                await self.hold.wait()
            queued = self.once.get(host)
            fault = queued.pop(0) if queued else self.always.get(host)
            if fault is not None:
                return fault(request)
            return httpx.Response(200, json=completion_response(body))
        finally:
            self.in_flight -= 1


FAST_RETRY = RetryPolicy(max_attempts=5, backoff_initial_s=0.001, backoff_max_s=0.005)


def make_sampler(
    fake: FakeVLLM, urls: list[str] | str = "http://a:8000", **kwargs: Any
) -> DeploymentSampler:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("max_context_len", 64)
    return DeploymentSampler(urls, "tiny", transport=fake.transport, **kwargs)


# --------------------------------------------------------------------------- request and parsing


@pytest.mark.anyio
async def test_request_body_states_every_sampling_parameter() -> None:
    fake = FakeVLLM()
    async with make_sampler(fake, api_key="sekret") as sampler:
        await sampler.sample_with_prompt_tokens([3, 4, 5, 6], 2, 5, 0.7, stop_token_ids=[2])
        await sampler.sample_with_prompt_tokens([3], 1, 1, 1.0, seed=11, stop=["\n"])
    (_, body), (_, body2) = fake.requests
    assert body["model"] == "tiny"
    assert body["prompt"] == [3, 4, 5, 6]
    assert (body["n"], body["max_tokens"], body["temperature"]) == (2, 5, 0.7)
    assert body["logprobs"] == 0
    assert body["return_token_ids"] is True
    assert body["top_p"] == 1.0 and body["top_k"] == -1 and body["min_p"] == 0.0
    assert body["repetition_penalty"] == 1.0
    assert body["presence_penalty"] == 0.0 and body["frequency_penalty"] == 0.0
    assert body["skip_special_tokens"] is False
    assert body["stop_token_ids"] == [2]
    assert "stop" not in body and "seed" not in body
    assert body2["seed"] == 11 and body2["stop"] == ["\n"]
    assert fake.headers[0]["authorization"] == "Bearer sekret"


@pytest.mark.anyio
async def test_parses_n_choices_in_index_order() -> None:
    fake = FakeVLLM()
    version = {"served": "snap-7"}
    async with make_sampler(fake, policy_version_fn=lambda: version["served"]) as sampler:
        out = await sampler.sample_with_prompt_tokens([3, 4, 5, 6], 3, 4, 1.0)
    assert len(out) == 3
    expected = completion_response({"prompt": [3, 4, 5, 6], "n": 3, "max_tokens": 4})
    by_index = {c["index"]: c for c in expected["choices"]}
    for i, completion in enumerate(out):
        assert isinstance(completion, SampledCompletion)
        assert completion.text == f"choice{i}"
        assert completion.prompt_len == 4
        assert completion.prompt_tokens == (3, 4, 5, 6)
        assert completion.completion_tokens == tuple(by_index[i]["token_ids"])
        assert completion.full_tokens == (3, 4, 5, 6, *by_index[i]["token_ids"])
        assert completion.sampling_logprobs == pytest.approx(
            by_index[i]["logprobs"]["token_logprobs"]
        )
        assert completion.finish_reason == "length"
        assert completion.policy_version == "snap-7"
        assert completion.deployment == "http://a:8000"
        assert completion.latency_s >= 0
        assert completion.text_valid_utf8


@pytest.mark.anyio
async def test_metrics_count_requests_tokens_and_finish_reasons() -> None:
    fake = FakeVLLM()
    async with make_sampler(fake) as sampler:
        await sampler.sample_with_prompt_tokens([1, 2], 2, 3, 1.0)
        await sampler.sample_with_prompt_tokens([1, 2, 3], 1, 4, 1.0)
        metrics = sampler.metrics()
    assert metrics["calls"] == 2
    assert metrics["completions"] == 3
    assert metrics["tokens_generated"] == 2 * 3 + 4
    assert metrics["prompt_tokens"] == 5
    assert metrics["finish_reasons"] == {"length": 3}
    assert metrics["retries"] == 0 and metrics["in_flight"] == 0
    deployment = metrics["deployments"]["http://a:8000"]
    assert deployment["requests"] == 2 and deployment["successes"] == 2
    assert deployment["window"] == ConcurrencyConfig().max_in_flight


@pytest.mark.anyio
async def test_sample_with_tokens_renders_chat_with_generation_prompt() -> None:
    class FakeChatTokenizer:
        def __init__(self) -> None:
            self.add_generation_prompt: list[bool] = []

        def apply_chat_template(
            self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
        ) -> dict[str, list[int]]:  # transformers-5 style BatchEncoding-like mapping
            assert tokenize
            self.add_generation_prompt.append(add_generation_prompt)
            ids = [ord(ch) % 50 for m in messages for ch in m["content"]]
            return {"input_ids": [*ids, 7] if add_generation_prompt else ids}

    fake = FakeVLLM()
    tokenizer = FakeChatTokenizer()
    async with make_sampler(fake, tokenizer=tokenizer) as sampler:
        out = await sampler.sample_with_tokens([{"role": "user", "content": "hi"}], 1, 2, 1.0)
    expected_prompt = [ord("h") % 50, ord("i") % 50, 7]
    assert tokenizer.add_generation_prompt == [True]
    assert fake.requests[0][1]["prompt"] == expected_prompt
    assert out[0].prompt_tokens == tuple(expected_prompt)


@pytest.mark.anyio
async def test_sample_with_tokens_without_tokenizer_is_a_config_error() -> None:
    async with make_sampler(FakeVLLM()) as sampler:
        with pytest.raises(ConfigError, match="tokenizer"):
            await sampler.sample_with_tokens([{"role": "user", "content": "hi"}], 1, 2, 1.0)


# --------------------------------------------------------------------------- bad input / output


@pytest.mark.anyio
async def test_prompt_too_long_is_an_explicit_error_and_sends_nothing() -> None:
    fake = FakeVLLM()
    async with make_sampler(fake, max_context_len=64) as sampler:
        with pytest.raises(PromptTooLongError, match="60 tokens") as info:
            await sampler.sample_with_prompt_tokens(list(range(60)), 1, 5, 1.0)
        assert isinstance(info.value, DataError)
        assert fake.requests == []
        out = await sampler.sample_with_prompt_tokens(list(range(59)), 1, 5, 1.0)  # exactly fits
    assert len(out[0].completion_tokens) == 5


@pytest.mark.anyio
async def test_bad_prompt_and_arguments_are_rejected() -> None:
    async with make_sampler(FakeVLLM()) as sampler:
        with pytest.raises(DataError, match="empty"):
            await sampler.sample_with_prompt_tokens([], 1, 5, 1.0)
        with pytest.raises(DataError, match="-1"):
            await sampler.sample_with_prompt_tokens([1, -1], 1, 5, 1.0)
        with pytest.raises(ConfigError, match="n="):
            await sampler.sample_with_prompt_tokens([1], 0, 5, 1.0)


def _choice_without(field: str) -> Fault:
    def fault(request: httpx.Request) -> httpx.Response:
        body = completion_response(json.loads(request.content))
        choice = body["choices"][0]
        if field == "token_ids":
            del choice["token_ids"]
        else:
            choice["logprobs"]["token_logprobs"] = choice["logprobs"]["token_logprobs"][:-1]
        return httpx.Response(200, json=body)

    return fault


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("field", "named"), [("token_ids", "'token_ids'"), ("logprobs", "'logprobs.token_logprobs'")]
)
async def test_response_missing_fields_is_a_sampling_error_naming_the_field(
    field: str, named: str
) -> None:
    fake = FakeVLLM()
    fake.always["a"] = _choice_without(field)
    async with make_sampler(fake) as sampler:
        with pytest.raises(SamplingError, match=named):
            await sampler.sample_with_prompt_tokens([1, 2, 3], 1, 4, 1.0)
    assert len(fake.requests) == 1  # a malformed body is not retried


@pytest.mark.anyio
async def test_wrong_number_of_choices_is_a_sampling_error() -> None:
    fake = FakeVLLM()

    def one_choice(request: httpx.Request) -> httpx.Response:
        body = completion_response({**json.loads(request.content), "n": 1})
        return httpx.Response(200, json=body)

    fake.always["a"] = one_choice
    async with make_sampler(fake) as sampler:
        with pytest.raises(SamplingError, match="'choices' has 1 choices, expected 2"):
            await sampler.sample_with_prompt_tokens([1, 2, 3], 2, 4, 1.0)


@pytest.mark.anyio
async def test_invalid_utf8_text_is_replaced_and_flagged_not_fatal() -> None:
    fake = FakeVLLM()

    def raw(text_json: bytes) -> Fault:
        def fault(request: httpx.Request) -> httpx.Response:
            content = (
                b'{"choices":[{"index":0,"text":"' + text_json + b'","token_ids":[5,6],'
                b'"logprobs":{"token_logprobs":[-0.5,-1.5]},"finish_reason":"stop"}]}'
            )
            return httpx.Response(
                200, content=content, headers={"content-type": "application/json"}
            )

        return fault

    fake.once["a"] = [raw(b"ok\xff\xfe"), raw(b"x\\ud800y"), raw(b"caf\xc3\xa9")]
    async with make_sampler(fake) as sampler:
        bad_bytes = (await sampler.sample_with_prompt_tokens([1], 1, 2, 1.0))[0]
        surrogate = (await sampler.sample_with_prompt_tokens([1], 1, 2, 1.0))[0]
        good = (await sampler.sample_with_prompt_tokens([1], 1, 2, 1.0))[0]
        metrics = sampler.metrics()
    assert bad_bytes.text.startswith("ok") and "\ufffd" in bad_bytes.text
    assert not bad_bytes.text_valid_utf8
    assert bad_bytes.completion_tokens == (5, 6)
    assert bad_bytes.sampling_logprobs == (-0.5, -1.5)
    assert not surrogate.text_valid_utf8
    surrogate.text.encode("utf-8")  # safe to write anywhere
    assert good.text == "café" and good.text_valid_utf8
    assert metrics["invalid_utf8"] == 2
    assert metrics["finish_reasons"] == {"stop": 3}


# --------------------------------------------------------------------------- retries and errors


@pytest.mark.anyio
async def test_retries_503_then_succeeds_and_records_the_version_sent() -> None:
    fake = FakeVLLM()
    fake.once["a"] = [status(503, "paused for weight update")]
    versions = iter(range(1, 100))
    async with make_sampler(fake, policy_version_fn=lambda: next(versions)) as sampler:
        out = await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
        metrics = sampler.metrics()
    assert len(fake.requests) == 2
    assert out[0].policy_version == 2  # read when the successful attempt was sent
    assert metrics["retries"] == 1
    deployment = metrics["deployments"]["http://a:8000"]
    assert deployment["overloads"] == 1 and deployment["state"] == "closed"


@pytest.mark.anyio
async def test_timeout_is_retried() -> None:
    fake = FakeVLLM()
    fake.once["a"] = [read_timeout]
    async with make_sampler(fake) as sampler:
        out = await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
        assert sampler.metrics()["deployments"]["http://a:8000"]["timeouts"] == 1
    assert len(out) == 1 and len(fake.requests) == 2


@pytest.mark.anyio
async def test_a_pause_longer_than_max_attempts_of_503s_is_waited_out() -> None:
    # vLLM 0.33 answers 503 to new requests for the whole of an abort/wait weight-update pause
    fake = FakeVLLM()
    fake.once["a"] = [status(503, "engine paused")] * 12
    retry = RetryPolicy(max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.005)
    async with make_sampler(fake, retry=retry) as sampler:
        out = await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
        metrics = sampler.metrics()
    assert len(out) == 1 and len(fake.requests) == 13
    assert metrics["retries"] == 12 and metrics["failed_calls"] == 0


@pytest.mark.anyio
async def test_503_answers_are_bounded_by_max_overload_attempts() -> None:
    fake = FakeVLLM()
    fake.always["a"] = status(503, "server busy")
    retry = RetryPolicy(max_attempts=1, max_overload_attempts=4, backoff_initial_s=0.001,
                        backoff_max_s=0.005)
    async with make_sampler(fake, retry=retry) as sampler:
        with pytest.raises(SamplingError, match=r"after 4 attempt.*HTTP 503: server busy"):
            await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
    assert len(fake.requests) == 4


@pytest.mark.anyio
async def test_retry_budget_is_bounded_and_reports_the_last_error() -> None:
    fake = FakeVLLM()
    fake.always["a"] = status(500, "server busy")
    retry = RetryPolicy(max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.005)
    async with make_sampler(fake, retry=retry) as sampler:
        with pytest.raises(SamplingError, match=r"after 3 attempt.*HTTP 500: server busy") as info:
            await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
        metrics = sampler.metrics()
    assert len(fake.requests) == 3
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert metrics["failed_calls"] == 1 and metrics["retries"] == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "token id 999 is out of vocabulary", "code": 400}},
        {"object": "error", "message": "token id 999 is out of vocabulary", "code": 400},
    ],
)
async def test_400_is_fatal_with_the_server_message(body: dict[str, Any]) -> None:
    fake = FakeVLLM()
    fake.always["a"] = lambda request: httpx.Response(400, json=body)
    async with make_sampler(fake) as sampler:
        with pytest.raises(SamplingError, match="HTTP 400: token id 999 is out of vocabulary") as e:
            await sampler.sample_with_prompt_tokens([999], 1, 3, 1.0)
        assert sampler.metrics()["deployments"]["http://a:8000"]["state"] == "closed"
    assert len(fake.requests) == 1
    assert isinstance(e.value.__cause__, httpx.HTTPStatusError)


@pytest.mark.anyio
async def test_breaker_trips_when_every_deployment_fails() -> None:
    fake = FakeVLLM()
    fake.always["a"] = status(500, "engine dead")
    fake.always["b"] = connect_refused
    with capture_logs() as logs:
        sampler = make_sampler(
            fake,
            ["http://a:8000", "http://b:8000"],
            retry=RetryPolicy(max_attempts=50, backoff_initial_s=0.001, backoff_max_s=0.002),
            health=HealthPolicy(failure_threshold=2, cooldown_s=60.0),
        )
        async with sampler:
            with pytest.raises(CircuitOpenError, match="all 2 deployments failing") as info:
                await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
            assert isinstance(info.value.__cause__, httpx.HTTPError)
            assert "engine dead" in str(info.value) or "Connection refused" in str(info.value)
            assert fake.hosts() == {"a": 2, "b": 2}  # K per deployment, not 50 attempts
            with pytest.raises(CircuitOpenError):  # while open: fail fast, nothing sent
                await sampler.sample_with_prompt_tokens([1, 2], 1, 3, 1.0)
            assert len(fake.requests) == 4
            states = {url: d["state"] for url, d in sampler.metrics()["deployments"].items()}
    assert states == {"http://a:8000": "open", "http://b:8000": "open"}
    unhealthy = [e for e in logs if e["event"] == "deployment_unhealthy"]
    assert sorted(e["deployment"] for e in unhealthy) == ["http://a:8000", "http://b:8000"]
    assert sum(e["event"] == "sampling_retry" for e in logs) == 3  # 4 attempts, 3 retries


@pytest.mark.anyio
async def test_policy_version_fn_error_does_not_leak_a_slot() -> None:
    fake = FakeVLLM()

    def broken() -> int:
        raise LookupError("no snapshot yet")

    async with make_sampler(fake, policy_version_fn=broken) as sampler:
        with pytest.raises(LookupError):
            await sampler.sample_with_prompt_tokens([1], 1, 1, 1.0)
        assert sampler.metrics()["in_flight"] == 0


# --------------------------------------------------------------------------- deployments


@pytest.mark.anyio
async def test_load_spreads_evenly_over_two_deployments() -> None:
    fake = FakeVLLM()
    fake.hold, all_arrived = anyio.Event(), anyio.Event()
    fake.arrived = (20, all_arrived)
    async with make_sampler(fake, ["http://a:8000", "http://b:8000/v1/"]) as sampler:
        assert sampler.base_urls == ["http://a:8000", "http://b:8000"]
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(sampler.sample_with_prompt_tokens, [1, 2], 1, 2, 1.0)
            with anyio.fail_after(5):
                await all_arrived.wait()
            in_flight = {url: d["in_flight"] for url, d in sampler.metrics()["deployments"].items()}
            fake.hold.set()
    assert fake.hosts() == {"a": 10, "b": 10}
    assert in_flight == {"http://a:8000": 10, "http://b:8000": 10}


@pytest.mark.anyio
async def test_unhealthy_deployment_is_skipped_then_recovers_after_cooldown() -> None:
    fake = FakeVLLM()
    fake.always["a"] = connect_refused
    async with make_sampler(
        fake,
        ["http://a:8000", "http://b:8000"],
        health=HealthPolicy(failure_threshold=2, cooldown_s=0.5),
    ) as sampler:
        served = [
            (await sampler.sample_with_prompt_tokens([1, 2], 1, 2, 1.0))[0].deployment
            for _ in range(10)
        ]
        assert served == ["http://b:8000"] * 10  # every call succeeded, on b
        assert fake.hosts()["a"] == 2  # K failures, then skipped
        assert sampler.metrics()["deployments"]["http://a:8000"]["state"] == "open"
        del fake.always["a"]  # a comes back
        await anyio.sleep(0.55)
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(sampler.sample_with_prompt_tokens, [1, 2], 1, 2, 1.0)
        assert fake.hosts()["a"] > 2  # the probe and later requests reached a
        assert sampler.metrics()["deployments"]["http://a:8000"]["state"] == "closed"


@pytest.mark.anyio
async def test_concurrency_bound_is_respected() -> None:
    fake = FakeVLLM(delay=0.02)
    async with make_sampler(fake, concurrency=ConcurrencyConfig(max_in_flight=3)) as sampler:
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(sampler.sample_with_prompt_tokens, [1, 2], 1, 2, 1.0)
        assert sampler.metrics()["in_flight"] == 0
    assert len(fake.requests) == 12
    assert fake.max_in_flight == 3


@pytest.mark.anyio
async def test_adaptive_window_shrinks_on_429() -> None:
    fake = FakeVLLM()
    fake.once["a"] = [status(429, "slow down", headers={"retry-after": "0"})]
    config = ConcurrencyConfig(max_in_flight=8, adaptive=True)
    async with make_sampler(fake, concurrency=config) as sampler:
        await sampler.sample_with_prompt_tokens([1, 2], 1, 2, 1.0)
        assert sampler.metrics()["deployments"]["http://a:8000"]["window"] == 4


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.anyio
async def test_use_after_close_raises_closed_resource_error() -> None:
    fake = FakeVLLM()
    sampler = make_sampler(fake)
    async with sampler:
        await sampler.sample_with_prompt_tokens([1], 1, 1, 1.0)
    await sampler.aclose()  # idempotent
    with pytest.raises(ClosedResourceError):
        await sampler.sample_with_prompt_tokens([1], 1, 1, 1.0)
    with pytest.raises(ClosedResourceError):
        async with sampler:
            pass


def test_constructor_validates_urls() -> None:
    with pytest.raises(ConfigError, match="empty"):
        DeploymentSampler([], "m", max_context_len=8)
    with pytest.raises(ConfigError, match="duplicates"):
        DeploymentSampler(["http://a:1", "http://a:1/v1"], "m", max_context_len=8)
    with pytest.raises(ConfigError, match="ftp"):
        DeploymentSampler("ftp://a:1", "m", max_context_len=8)
