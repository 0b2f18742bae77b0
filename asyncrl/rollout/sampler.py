"""Token-in / token-out sampling from one or more vLLM OpenAI servers (``/v1/completions``).

Invariants:
- One pooled ``httpx.AsyncClient`` per deployment, made once; no per-request client, no
  logging on the success path.
- Every request states its sampling parameters (``top_p=1``, ``top_k=-1``, ``min_p=0``,
  penalties neutral) so the server's generation-config defaults cannot bias the samples, and
  asks for the sampled tokens' logprobs (``logprobs=0``) and ids (``return_token_ids``).
- A :class:`SampledCompletion` is complete or the call raises: ``token_ids`` and
  ``logprobs.token_logprobs`` are present, equally long and well typed, or
  :class:`~asyncrl.errors.SamplingError` names the missing field. ``full_tokens`` is the prompt
  that was sent followed by the completion's token ids.
- A prompt longer than ``max_context_len - max_tokens`` raises :class:`PromptTooLongError`
  before any request; nothing is silently truncated or dropped.
- Text that was not valid UTF-8 (bytes replaced by vLLM, raw invalid bytes, lone surrogates)
  never crashes: it is decoded with replacement and flagged ``text_valid_utf8=False``.
- ``policy_version`` is what ``policy_version_fn()`` returned when the attempt that produced
  the sample was sent.
- Retries follow :class:`~asyncrl.rollout.retry.RetryPolicy`; other 4xx raise SamplingError
  with the server's message, chained from the httpx error; when every deployment's breaker is
  open the call raises :class:`~asyncrl.rollout.concurrency.CircuitOpenError`.

Errors: PromptTooLongError(DataError), SamplingError, CircuitOpenError(SamplingError),
ClosedResourceError (use after ``aclose()``), ConfigError (bad constructor arguments).
"""

from __future__ import annotations

import json
import math
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import httpx

from asyncrl.errors import ClosedResourceError, ConfigError, DataError, SamplingError
from asyncrl.logging import get_logger
from asyncrl.rollout.concurrency import (
    CircuitOpenError,
    ConcurrencyConfig,
    DeploymentGate,
    HealthEvent,
    HealthPolicy,
    Outcome,
    Router,
    Ticket,
)
from asyncrl.rollout.retry import (
    FailureKind,
    RetryPolicy,
    classify_exception,
    classify_status,
    next_retry_delay,
    parse_retry_after,
)

__all__ = [
    "COMPLETIONS_PATH",
    "DeploymentSampler",
    "PromptTooLongError",
    "SampledCompletion",
    "build_completion_request",
    "parse_completions",
]

COMPLETIONS_PATH = "/v1/completions"
_MAX_ERROR_CHARS = 1000
_OUTCOME_OF = {
    FailureKind.OVERLOAD: Outcome.OVERLOAD,
    FailureKind.TIMEOUT: Outcome.TIMEOUT,
    FailureKind.TRANSIENT: Outcome.FAILURE,
    FailureKind.FATAL: Outcome.ALIVE,
}

PolicyVersion = int | str | None


class PromptTooLongError(DataError):
    """The prompt plus ``max_tokens`` does not fit in ``max_context_len``."""


@dataclass(frozen=True, slots=True)
class SampledCompletion:
    """One sampled completion with everything the trainer needs to use it."""

    text: str
    full_tokens: tuple[int, ...]  # prompt + completion token ids
    prompt_len: int
    finish_reason: str  # "stop" | "length" | "abort" | ...
    sampling_logprobs: tuple[float, ...]  # one per completion token, as served
    policy_version: PolicyVersion  # policy_version_fn() when the request was sent
    deployment: str  # base URL that served it
    latency_s: float  # of the attempt that succeeded
    text_valid_utf8: bool = True
    stop_reason: int | str | None = None  # the stop token id / string that ended it, if any

    @property
    def completion_tokens(self) -> tuple[int, ...]:
        return self.full_tokens[self.prompt_len :]

    @property
    def prompt_tokens(self) -> tuple[int, ...]:
        return self.full_tokens[: self.prompt_len]


# --------------------------------------------------------------------------- request / response


def build_completion_request(
    model: str,
    prompt: Sequence[int],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    stop: Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    skip_special_tokens: bool = False,
) -> dict[str, Any]:
    """The JSON body for ``/v1/completions``: every sampling knob explicit."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt),
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": skip_special_tokens,
        "stream": False,
    }
    if stop:
        body["stop"] = list(stop)
    if stop_token_ids:
        body["stop_token_ids"] = list(stop_token_ids)
    if seed is not None:
        body["seed"] = seed
    return body


def parse_completions(
    payload: Any,
    *,
    prompt: tuple[int, ...],
    n: int,
    deployment: str,
    policy_version: PolicyVersion,
    latency_s: float,
) -> list[SampledCompletion]:
    """Validate a ``/v1/completions`` JSON body into ``n`` completions, ordered by index."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = f"{len(choices)} choices" if isinstance(choices, list) else repr(type(choices))
        raise SamplingError(f"response from {deployment}: field 'choices' has {got}, expected {n}")
    if not all(isinstance(choice, dict) for choice in choices):
        raise SamplingError(f"response from {deployment}: field 'choices' holds a non-object")
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    return [
        _parse_choice(choice, prompt, deployment, policy_version, latency_s) for choice in ordered
    ]


def _parse_choice(
    choice: dict[str, Any],
    prompt: tuple[int, ...],
    deployment: str,
    policy_version: PolicyVersion,
    latency_s: float,
) -> SampledCompletion:
    where = f"response from {deployment}, choice {choice.get('index')!r}"
    token_ids = _token_ids(choice.get("token_ids"))
    if token_ids is None:
        raise SamplingError(
            f"{where}: field 'token_ids' is missing or not a list of token ids "
            "(does the server support return_token_ids?)"
        )
    logprobs_obj = choice.get("logprobs")
    raw_logprobs = logprobs_obj.get("token_logprobs") if isinstance(logprobs_obj, dict) else None
    if not isinstance(raw_logprobs, list) or len(raw_logprobs) != len(token_ids):
        got = f"{len(raw_logprobs)} values" if isinstance(raw_logprobs, list) else "missing"
        raise SamplingError(
            f"{where}: field 'logprobs.token_logprobs' is {got}, expected one per token "
            f"({len(token_ids)})"
        )
    logprobs = _logprobs(raw_logprobs)
    if logprobs is None:
        raise SamplingError(f"{where}: field 'logprobs.token_logprobs' holds a non-number or NaN")
    served_prompt = choice.get("prompt_token_ids")
    if served_prompt is not None and tuple(served_prompt) != prompt:
        raise SamplingError(
            f"{where}: field 'prompt_token_ids' ({len(served_prompt)} ids) differs from the "
            f"prompt sent ({len(prompt)} ids)"
        )
    finish_reason = choice.get("finish_reason")
    if not isinstance(finish_reason, str):
        raise SamplingError(f"{where}: field 'finish_reason' is {finish_reason!r}, expected str")
    text, valid = _clean_text(choice.get("text"))
    return SampledCompletion(
        text=text,
        full_tokens=prompt + token_ids,
        prompt_len=len(prompt),
        finish_reason=finish_reason,
        sampling_logprobs=logprobs,
        policy_version=policy_version,
        deployment=deployment,
        latency_s=latency_s,
        text_valid_utf8=valid,
        stop_reason=choice.get("stop_reason"),
    )


def _token_ids(value: object) -> tuple[int, ...] | None:
    """``value`` as non-negative int token ids, or ``None`` (validated at C speed)."""
    if not isinstance(value, list | tuple):
        return None
    try:
        ids = array("q", value)
    except (TypeError, OverflowError):
        return None
    if ids and min(ids) < 0:
        return None
    return tuple(ids)


def _logprobs(value: list[Any]) -> tuple[float, ...] | None:
    """``value`` as floats, or ``None`` if an entry is not a number or is NaN."""
    try:
        floats = array("d", value)
    except TypeError:
        return None
    if any(map(math.isnan, floats)):
        return None
    return tuple(floats)


def _preview(values: Sequence[Any], limit: int = 8) -> str:
    head = ", ".join(repr(v) for v in list(values)[:limit])
    return f"[{head}{', ...' if len(values) > limit else ''}]"


def _clean_text(text: object) -> tuple[str, bool]:
    """Text safe to encode as UTF-8, and whether the served text was valid UTF-8."""
    if text is None:
        return "", True
    if not isinstance(text, str):
        return str(text), False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON "\udXXX" escape
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), False
    return text, "\ufffd" not in text


def _decode_json(response: httpx.Response) -> Any:
    """Body as JSON; invalid UTF-8 bytes become U+FFFD instead of failing the whole batch."""
    return json.loads(response.content.decode("utf-8", errors="replace"))


def _server_message(response: httpx.Response) -> str:
    """The error message a vLLM / OpenAI-style server put in its body (or the raw body)."""
    try:
        data = _decode_json(response)
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or data.get("message") or data.get("detail")
    if not message:
        message = response.content.decode("utf-8", errors="replace").strip() or "<empty body>"
    return str(message)[:_MAX_ERROR_CHARS]


def _normalize_base_url(url: str) -> str:
    """``http://host:port`` (trailing ``/`` and ``/v1`` dropped); ConfigError if not http(s)."""
    if not isinstance(url, str):
        raise ConfigError(f"base_urls entry {url!r} is invalid: expected an http(s) URL string")
    clean = url.strip().rstrip("/")
    clean = clean.removesuffix("/v1")
    try:
        parsed = httpx.URL(clean)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"base_urls entry {url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"base_urls entry {url!r} is invalid: expected http(s)://host[:port]")
    return clean


# --------------------------------------------------------------------------- sampler


@dataclass(frozen=True, slots=True)
class _Failure:
    kind: FailureKind
    error: Exception
    url: str
    reason: str  # e.g. "HTTP 503: paused" or "ConnectError: refused"
    retry_after_s: float | None

    @property
    def detail(self) -> str:
        return f"{self.url}: {self.reason}"


class DeploymentSampler:
    """Samples completions from one or more vLLM deployments serving ``model``.

    ``concurrency.max_in_flight`` is per deployment. ``transport`` replaces the network
    (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_urls: Sequence[str] | str,
        model: str,
        tokenizer: Any = None,
        *,
        max_context_len: int,
        concurrency: ConcurrencyConfig | None = None,
        retry: RetryPolicy | None = None,
        health: HealthPolicy | None = None,
        api_key: str | None = None,
        policy_version_fn: Callable[[], PolicyVersion] | None = None,
        skip_special_tokens: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ConfigError("base_urls is empty: expected at least one deployment URL")
        urls = [_normalize_base_url(url) for url in urls]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"base_urls has duplicates: {urls}")
        if not isinstance(max_context_len, int) or max_context_len < 2:
            raise ConfigError(f"max_context_len={max_context_len!r} is invalid: expected >= 2")
        self.model = model
        self.tokenizer = tokenizer
        self.max_context_len = max_context_len
        self.concurrency = concurrency or ConcurrencyConfig()
        self.retry = retry or RetryPolicy()
        self.health = health or HealthPolicy()
        self._policy_version_fn = policy_version_fn
        self._skip_special_tokens = skip_special_tokens
        self._clock = time.monotonic
        self._rng = random.Random()
        self._log = get_logger(__name__)
        self._gate = DeploymentGate(
            Router(urls, self.concurrency, self.health),
            clock=self._clock,
            on_health_event=self._log_health_event,
        )
        self._clients = [self._make_client(url, api_key, transport) for url in urls]
        self._tokenize_limiter = anyio.CapacityLimiter(4)
        self._closed = False
        self._counters: Counter[str] = Counter()
        self._finish_reasons: Counter[str] = Counter()

    def _make_client(
        self, url: str, api_key: str | None, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncClient:
        pool = self.concurrency.max_in_flight
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        return httpx.AsyncClient(
            base_url=url,
            transport=transport,
            headers=headers,
            trust_env=False,  # a local deployment: never route through an HTTP proxy
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            timeout=httpx.Timeout(
                self.retry.request_timeout_s, connect=self.retry.connect_timeout_s
            ),
        )

    @property
    def base_urls(self) -> list[str]:
        return self._gate.router.urls

    # ----------------------------------------------------------------- public sampling API

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int],
        n: int,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        *,
        seed: int | None = None,
    ) -> list[SampledCompletion]:
        """``n`` completions of a token-id prompt, each with its sampled tokens' logprobs."""
        self._ensure_open()
        prompt = self._check_prompt(prompt_token_ids, n, max_tokens, temperature)
        body = build_completion_request(
            self.model,
            prompt,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            stop_token_ids=stop_token_ids,
            seed=seed,
            skip_special_tokens=self._skip_special_tokens,
        )
        completions = await self._call(body, prompt, n)
        self._account(completions)
        return completions

    async def sample_with_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        n: int,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        *,
        seed: int | None = None,
    ) -> list[SampledCompletion]:
        """Render chat ``messages`` with the tokenizer's template (generation prompt added)
        off the event loop, then sample as :meth:`sample_with_prompt_tokens`."""
        self._ensure_open()
        if self.tokenizer is None:
            raise ConfigError("sample_with_tokens needs a tokenizer: pass tokenizer=...")
        prompt = await anyio.to_thread.run_sync(
            self._render_messages, list(messages), limiter=self._tokenize_limiter
        )
        return await self.sample_with_prompt_tokens(
            prompt, n, max_tokens, temperature, stop, stop_token_ids, seed=seed
        )

    def _render_messages(self, messages: list[Mapping[str, Any]]) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True
        )
        if isinstance(rendered, Mapping):  # transformers 5 may return a BatchEncoding
            rendered = rendered["input_ids"]
        ids = list(rendered)
        if len(ids) == 1 and isinstance(ids[0], list):
            ids = list(ids[0])
        return ids

    def _check_prompt(
        self, prompt_token_ids: Sequence[int], n: int, max_tokens: int, temperature: float
    ) -> tuple[int, ...]:
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} is invalid: expected an int >= 1")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens!r} is invalid: expected an int >= 1")
        if not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"temperature={temperature!r} is invalid: expected >= 0")
        prompt = _token_ids(list(prompt_token_ids))
        if prompt is None:
            raise DataError(
                f"prompt_token_ids {_preview(prompt_token_ids)} is invalid: expected "
                "non-negative int token ids"
            )
        if not prompt:
            raise DataError("prompt_token_ids is empty: expected at least one token id")
        budget = self.max_context_len - max_tokens
        if len(prompt) > budget:
            raise PromptTooLongError(
                f"prompt of {len(prompt)} tokens does not fit: max_context_len "
                f"{self.max_context_len} - max_tokens {max_tokens} leaves {max(budget, 0)}"
            )
        return prompt

    # ----------------------------------------------------------------- retries and attempts

    async def _call(
        self, body: dict[str, Any], prompt: tuple[int, ...], n: int
    ) -> list[SampledCompletion]:
        self._counters["calls"] += 1
        try:
            return await self._call_with_retries(body, prompt, n)
        except (SamplingError, ClosedResourceError):
            self._counters["failed_calls"] += 1
            raise

    async def _call_with_retries(
        self, body: dict[str, Any], prompt: tuple[int, ...], n: int
    ) -> list[SampledCompletion]:
        attempts = overloads = 0
        started: float | None = None
        last: _Failure | None = None
        while True:
            try:
                ticket = await self._gate.acquire()
            except CircuitOpenError as exc:
                if last is None:
                    raise
                raise CircuitOpenError(str(exc)) from last.error
            started = self._clock() if started is None else started
            attempts += 1
            result = await self._attempt(ticket, body, prompt, n)
            if isinstance(result, list):
                return result
            last = result
            overloads += result.kind is FailureKind.OVERLOAD
            await anyio.sleep(self._backoff(result, attempts, overloads, self._clock() - started))

    def _backoff(self, failure: _Failure, attempts: int, overloads: int, elapsed_s: float) -> float:
        """Seconds to wait before the next attempt; raises when there should be none."""
        router = self._gate.router
        if router.all_open(self._clock()):  # failing everywhere: no point in backing off
            raise CircuitOpenError(router.all_open_message(self._clock())) from failure.error
        delay = next_retry_delay(
            self.retry,
            attempts_done=attempts,
            elapsed_s=elapsed_s,
            rand=self._rng.random(),
            retry_after_s=failure.retry_after_s,
            overloads_done=overloads,
            overloaded=failure.kind is FailureKind.OVERLOAD,
        )
        if delay is None:
            raise SamplingError(
                f"sampling failed after {attempts} attempt(s) in {elapsed_s:.1f}s: "
                f"last error {failure.detail}"
            ) from failure.error
        self._counters["retries"] += 1
        self._log.warning(
            "sampling_retry",
            attempt=attempts,
            delay_s=round(delay, 3),
            kind=failure.kind.value,
            error=failure.detail,
        )
        return delay

    async def _attempt(
        self, ticket: Ticket, body: dict[str, Any], prompt: tuple[int, ...], n: int
    ) -> list[SampledCompletion] | _Failure:
        """One HTTP attempt; always gives the slot back with the attempt's outcome."""
        url = self._gate.router.url(ticket.index)
        outcome, step_latency, error = Outcome.CANCELLED, None, None
        try:
            version = self._policy_version_fn() if self._policy_version_fn is not None else None
            start = self._clock()
            try:
                response = await self._clients[ticket.index].post(COMPLETIONS_PATH, json=body)
            except httpx.HTTPError as exc:
                kind = classify_exception(exc)
                outcome = _OUTCOME_OF[kind]
                failure = self._transport_failure(exc, kind, url)
                error = failure.reason
                return failure
            latency = self._clock() - start
            status_kind = classify_status(response.status_code)
            if status_kind is None:
                outcome = Outcome.ALIVE  # until the body proves valid
                completions = self._parse(response, prompt, n, url, version, latency)
                longest = max((len(c.full_tokens) - c.prompt_len for c in completions), default=0)
                outcome, step_latency = Outcome.SUCCESS, latency / max(1, longest)
                return completions
            outcome = _OUTCOME_OF[status_kind]
            failure = self._status_failure(response, status_kind, url)
            error = failure.reason
            return failure
        except RuntimeError as exc:
            if self._closed and not isinstance(exc, SamplingError):
                raise ClosedResourceError("the sampler was closed during a request") from exc
            raise
        finally:
            self._gate.release(ticket, outcome, step_latency_s=step_latency, error=error)

    def _transport_failure(self, exc: httpx.HTTPError, kind: FailureKind, url: str) -> _Failure:
        failure = _Failure(kind, exc, url, f"{type(exc).__name__}: {exc}", None)
        if kind is FailureKind.FATAL:
            raise SamplingError(f"request to {failure.detail}") from exc
        return failure

    def _status_failure(self, response: httpx.Response, kind: FailureKind, url: str) -> _Failure:
        reason = f"HTTP {response.status_code}: {_server_message(response)}"
        error = httpx.HTTPStatusError(
            f"{url}: {reason}", request=response.request, response=response
        )
        if kind is FailureKind.FATAL:
            raise SamplingError(f"{url} rejected the request: {reason}") from error
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return _Failure(kind, error, url, reason, retry_after)

    def _parse(
        self,
        response: httpx.Response,
        prompt: tuple[int, ...],
        n: int,
        url: str,
        version: PolicyVersion,
        latency: float,
    ) -> list[SampledCompletion]:
        try:
            payload = _decode_json(response)
        except ValueError as exc:
            raise SamplingError(f"response from {url} is not JSON: {exc}") from exc
        return parse_completions(
            payload, prompt=prompt, n=n, deployment=url, policy_version=version, latency_s=latency
        )

    # ----------------------------------------------------------------- metrics and logging

    def _account(self, completions: list[SampledCompletion]) -> None:
        counters = self._counters
        counters["completions"] += len(completions)
        for completion in completions:
            counters["tokens_generated"] += len(completion.full_tokens) - completion.prompt_len
            self._finish_reasons[completion.finish_reason] += 1
            if not completion.text_valid_utf8:
                counters["invalid_utf8"] += 1
        if completions:
            counters["prompt_tokens"] += completions[0].prompt_len

    def metrics(self) -> dict[str, Any]:
        """Counters since construction: calls, completions, retries, failed calls, tokens,
        finish reasons, requests in flight, callers queued, and per-deployment counters
        (state, window, in_flight, requests, failures, overloads, ...), keyed by URL."""
        counters = self._counters
        return {
            "calls": counters["calls"],
            "completions": counters["completions"],
            "retries": counters["retries"],
            "failed_calls": counters["failed_calls"],
            "tokens_generated": counters["tokens_generated"],
            "prompt_tokens": counters["prompt_tokens"],
            "invalid_utf8": counters["invalid_utf8"],
            "finish_reasons": dict(self._finish_reasons),
            "in_flight": self._gate.router.in_flight(),
            "waiting": self._gate.waiting,
            "deployments": self._gate.router.snapshot(self._clock()),
        }

    def _log_health_event(self, event: HealthEvent, index: int) -> None:
        router = self._gate.router
        if event is HealthEvent.UNHEALTHY:
            self._log.warning(
                "deployment_unhealthy",
                deployment=router.url(index),
                consecutive_failures=router.consecutive_failures(index),
                cooldown_s=self.health.cooldown_s,
                last_error=router.snapshot(self._clock())[router.url(index)]["last_error"],
            )
        else:
            self._log.info("deployment_recovered", deployment=router.url(index))

    # ----------------------------------------------------------------- lifecycle

    def mark_healthy(self, base_url: str | None = None) -> None:
        """Forget the failures of ``base_url`` (default: every deployment): its circuit
        breaker closes and waiting requests go at once. Call it after the deployment was
        restarted and checked, rather than wait out the breaker's cooldown."""
        url = None if base_url is None else _normalize_base_url(base_url)
        if url is not None and url not in self.base_urls:
            raise ConfigError(f"{base_url!r} is not one of this sampler's deployments")
        self._gate.mark_healthy(url)
        self._log.info("sampler.marked_healthy", base_url=url or "all")

    def _ensure_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("DeploymentSampler is closed")

    async def aclose(self) -> None:
        """Close every client; later calls raise ClosedResourceError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._gate.close()
        for client in self._clients:
            await client.aclose()

    async def __aenter__(self) -> DeploymentSampler:
        self._ensure_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
