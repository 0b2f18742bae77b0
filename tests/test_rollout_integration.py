"""The rollout path against a REAL vLLM server (the session's one, see tests/vllm_fixtures.py).

What a user of :class:`DeploymentSampler` would see is checked on the wire, not mocked:

- the prompt comes back as the head of ``full_tokens`` and the completion's token ids follow;
- ``sampling_logprobs`` are the served behaviour logprobs: one per completion token, finite,
  <= 0, and equal (within bf16 noise) to the server's ``prompt_logprobs`` of the same tokens fed
  back as a prompt. The fixture server runs ``--logprobs-mode processed_logprobs``; at
  temperature 0 (greedy) and at temperature 1 (with ``top_p=1, top_k=-1``, which the sampler
  always sends) the processed distribution is the raw one, so the two must agree;
- stop behaviour of vLLM 0.32, as measured here and pinned by these tests: a stop token id IS
  included in ``token_ids`` (so it is the last completion token and gets a logprob), it is NOT
  in ``text``, and ``stop_reason`` is that id. The tiny model's generation_config lists
  ``<|im_end|>`` and ``<|endoftext|>`` as EOS, so the server stops on them even when the
  request names no stop ids (``<|endoftext|>`` is the tokenizer EOS: ``stop_reason`` None);
- ``max_tokens`` reached -> finish_reason "length" with exactly ``max_tokens`` tokens;
- a prompt that does not fit ``max_context_len - max_tokens`` raises PromptTooLongError with no
  request on the wire, and the largest prompt that fits is accepted by the server;
- a multi-turn CalculatorEnv episode driven by ``run_episode`` produces a consistent Trajectory.

The served tiny model is random: nothing here asserts on what it writes, only on structure.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import conftest  # tests/conftest.py, as pytest imports it ("prepend" import mode)
import httpx
import pytest

from asyncrl.rollout.env import CalculatorEnv, run_episode
from asyncrl.rollout.renderers import ImChatRenderer, renderer_for
from asyncrl.rollout.retry import RetryPolicy
from asyncrl.rollout.sampler import DeploymentSampler, PromptTooLongError, SampledCompletion
from asyncrl.rollout.types import StepResult
from asyncrl.sync.deployment import Deployment, DeploymentManager

if not hasattr(conftest, "vllm_deployment"):  # until conftest imports the shared fixtures
    from vllm_fixtures import *  # noqa: F403
from vllm_fixtures import VLLM_MAX_MODEL_LEN

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

LOGPROB_ATOL = 0.02  # decode-time vs prefill-time logprobs of the same tokens, bf16 on CPU
MESSAGES = [{"role": "user", "content": "What is 6*7?"}]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer(vllm_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vllm_model_dir)


@pytest.fixture(scope="module")
def renderer(tokenizer: Any) -> ImChatRenderer:
    rend = renderer_for(tokenizer)
    assert isinstance(rend, ImChatRenderer)
    return rend


@pytest.fixture(scope="module")
def model_stop_ids(vllm_model_dir: Path) -> frozenset[int]:
    """Ids the server stops on by itself (the model's generation_config EOS list)."""
    config = json.loads((vllm_model_dir / "generation_config.json").read_text())
    eos = config["eos_token_id"]
    return frozenset(eos if isinstance(eos, list) else [eos])


@pytest.fixture
def version() -> dict[str, int]:
    """The 'current policy version' the sampler stamps on samples (tests bump it)."""
    return {"v": 0}


@pytest.fixture
async def sampler(
    vllm_deployment: Deployment, tokenizer: Any, version: dict[str, int]
) -> AsyncIterator[DeploymentSampler]:
    async with DeploymentSampler(
        vllm_deployment.base_url,
        str(vllm_deployment.served_model_name),
        tokenizer,
        max_context_len=VLLM_MAX_MODEL_LEN,
        retry=RetryPolicy.fail_fast(),
        policy_version_fn=lambda: version["v"],
    ) as s:
        yield s


async def served_prompt_logprobs(
    manager: DeploymentManager, deployment: Deployment, tokens: Sequence[int]
) -> list[float]:
    """The server's logprob of each token of ``tokens`` given the ones before it (index 0: nan,
    so that index i is token i's)."""
    return [math.nan, *await manager.prompt_logprobs(deployment, tokens)]


def assert_well_formed(c: SampledCompletion, prompt: Sequence[int], max_tokens: int) -> None:
    assert c.full_tokens[: c.prompt_len] == tuple(prompt) == c.prompt_tokens
    assert 1 <= len(c.completion_tokens) <= max_tokens
    assert len(c.sampling_logprobs) == len(c.completion_tokens)
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in c.sampling_logprobs), c.sampling_logprobs
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    if c.finish_reason == "length":
        assert len(c.completion_tokens) == max_tokens and c.stop_reason is None
    assert c.latency_s > 0


def assert_stops_at_first(c: SampledCompletion, stops: frozenset[int]) -> None:
    """A "stop" completion ends with its first stop token; a "length" one holds none."""
    tokens = c.completion_tokens
    if c.finish_reason == "stop":
        assert tokens[-1] in stops, (tokens, stops)
        assert not stops & set(tokens[:-1]), tokens
    else:
        assert not stops & set(tokens), tokens


# ---------------------------------------------------------------------------------------------
# one call


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 11)])
async def test_tokens_round_trip_and_logprobs_are_the_served_ones(
    sampler: DeploymentSampler,
    vllm_manager: DeploymentManager,
    vllm_deployment: Deployment,
    renderer: ImChatRenderer,
    version: dict[str, int],
    temperature: float,
    seed: int | None,
) -> None:
    prompt = renderer.build_generation_prompt(MESSAGES)
    version["v"] = 5
    (c,) = await sampler.sample_with_prompt_tokens(prompt, 1, 24, temperature, seed=seed)
    assert_well_formed(c, prompt, 24)
    assert c.prompt_len == len(prompt)
    assert c.policy_version == 5 and c.deployment == vllm_deployment.base_url
    assert c.text_valid_utf8

    served = await served_prompt_logprobs(vllm_manager, vllm_deployment, c.full_tokens)
    reference = served[c.prompt_len :]
    diffs = [abs(a - b) for a, b in zip(c.sampling_logprobs, reference, strict=True)]
    assert max(diffs) < LOGPROB_ATOL, (c.sampling_logprobs, reference)


async def test_chat_messages_render_like_the_renderer(
    sampler: DeploymentSampler, renderer: ImChatRenderer
) -> None:
    """sample_with_tokens (the tokenizer's chat template) sends the ImChatRenderer prompt."""
    (c,) = await sampler.sample_with_tokens(MESSAGES, 1, 4, 0.0)
    assert c.prompt_tokens == tuple(renderer.build_generation_prompt(MESSAGES))


async def test_n_completions_are_each_well_formed(
    sampler: DeploymentSampler, renderer: ImChatRenderer, model_stop_ids: frozenset[int]
) -> None:
    prompt = renderer.build_generation_prompt(MESSAGES)
    completions = await sampler.sample_with_prompt_tokens(prompt, 4, 12, 1.0)
    assert len(completions) == 4  # distinct or not: a random model may repeat itself
    for c in completions:
        assert_well_formed(c, prompt, 12)
        assert_stops_at_first(c, model_stop_ids)
    metrics = sampler.metrics()
    assert metrics["calls"] == 1 and metrics["completions"] == 4
    assert metrics["tokens_generated"] == sum(len(c.completion_tokens) for c in completions)


async def test_generation_stops_at_im_end_and_keeps_it_in_token_ids(
    sampler: DeploymentSampler, renderer: ImChatRenderer, model_stop_ids: frozenset[int]
) -> None:
    """vLLM 0.32 keeps the stop token in ``token_ids`` (last token, with a logprob), drops it
    from ``text`` and reports it as ``stop_reason``."""
    im_end, eos = renderer.stop_token_ids
    assert renderer.tokenizer.decode([im_end]) == "<|im_end|>"
    assert eos == renderer.tokenizer.eos_token_id
    prompt = renderer.build_generation_prompt(MESSAGES)
    ended: list[SampledCompletion] = []
    for seed in range(4):  # near-uniform model: ~1 in 128 tokens is <|im_end|>
        completions = await sampler.sample_with_prompt_tokens(
            prompt, 16, 48, 1.0, stop_token_ids=renderer.stop_token_ids, seed=seed
        )
        for c in completions:
            assert_well_formed(c, prompt, 48)
            assert_stops_at_first(c, model_stop_ids | {im_end})
        ended += [c for c in completions if c.completion_tokens[-1] == im_end]
        if ended:
            break
    assert ended, "no completion ended with <|im_end|> in 64 samples"
    for c in ended:
        assert c.finish_reason == "stop" and c.stop_reason == im_end
        assert "<|im_end|>" not in c.text
        assert len(c.sampling_logprobs) == len(c.completion_tokens)


async def test_stop_token_ids_are_sent_and_honoured(sampler: DeploymentSampler) -> None:
    """A stop id the model does not stop on by itself: the same seeded sample, re-run with it
    as a stop id, is cut right after its first occurrence (the stop id included)."""
    prompt = [5, 20, 30, 40, 50, 60]
    for seed in range(8):
        (free,) = await sampler.sample_with_prompt_tokens(prompt, 1, 16, 1.0, seed=seed)
        if len(free.completion_tokens) >= 5:
            break
    else:
        pytest.fail("no seeded completion of >= 5 tokens")
    stop_id = free.completion_tokens[3]
    cut = free.completion_tokens.index(stop_id) + 1
    (stopped,) = await sampler.sample_with_prompt_tokens(
        prompt, 1, 16, 1.0, stop_token_ids=[stop_id], seed=seed
    )
    assert stopped.completion_tokens == free.completion_tokens[:cut]
    assert stopped.sampling_logprobs == pytest.approx(free.sampling_logprobs[:cut], abs=1e-6)
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)


async def test_max_tokens_reached_finishes_with_length(
    sampler: DeploymentSampler, renderer: ImChatRenderer
) -> None:
    prompt = renderer.build_generation_prompt(MESSAGES)
    completions = await sampler.sample_with_prompt_tokens(prompt, 8, 3, 1.0, seed=3)
    capped = [c for c in completions if c.finish_reason == "length"]
    assert capped, [c.finish_reason for c in completions]
    for c in completions:
        assert_well_formed(c, prompt, 3)
    assert all(len(c.completion_tokens) == 3 for c in capped)


async def test_too_long_prompt_raises_before_any_request(
    vllm_deployment: Deployment, version: dict[str, int]
) -> None:
    sent: list[httpx.Request] = []

    class CountingTransport(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request)
            return await super().handle_async_request(request)

    async with DeploymentSampler(
        vllm_deployment.base_url,
        str(vllm_deployment.served_model_name),
        max_context_len=VLLM_MAX_MODEL_LEN,
        retry=RetryPolicy.fail_fast(),
        transport=CountingTransport(),
    ) as sampler:
        max_tokens = 8
        fits = VLLM_MAX_MODEL_LEN - max_tokens
        with pytest.raises(PromptTooLongError, match=f"{fits + 1} tokens"):
            await sampler.sample_with_prompt_tokens([7] * (fits + 1), 1, max_tokens, 0.0)
        assert sent == [] and sampler.metrics()["calls"] == 0

        # the largest prompt that fits is what the server accepts too
        (c,) = await sampler.sample_with_prompt_tokens([7] * fits, 1, max_tokens, 0.0)
        assert len(sent) == 1 and c.prompt_len == fits
        assert len(c.full_tokens) <= VLLM_MAX_MODEL_LEN


# ---------------------------------------------------------------------------------------------
# a multi-turn episode


class ToolCallingCalculatorEnv(CalculatorEnv):
    """CalculatorEnv whose first ``scripted_calls`` actions are read as if they ended with
    ``<calc>6*7</calc>`` (a random model never writes a tool call), so the episode really
    takes several turns. What the policy generated is recorded unchanged by ``run_episode``."""

    def __init__(self, renderer: Any, scripted_calls: int) -> None:
        super().__init__("What is 6*7?", 42, renderer)
        self.scripted_calls = scripted_calls

    @property
    def stop_token_ids(self) -> Sequence[int]:
        """End of turn, plus every letter and digit: a near-uniform model then ends its turns
        within a few tokens (a turn cut by max_tokens would end the episode early)."""
        chars = self.renderer.tokenizer.encode(
            string.ascii_letters + string.digits, add_special_tokens=False
        )
        return [*self.renderer.stop_token_ids, *chars]

    async def step(self, action: Sequence[int]) -> StepResult:
        if self.tool_calls < self.scripted_calls:
            call = self.renderer.tokenizer.encode("<calc>6*7</calc>", add_special_tokens=False)
            action = [t for t in action if t not in self.stop_token_ids] + call
        return await super().step(action)


class RecordingSampler:
    """Delegates to the real sampler; records every call and bumps the policy version after
    each one (as if the trainer published a new policy between turns)."""

    def __init__(self, inner: DeploymentSampler, version: dict[str, int]) -> None:
        self.inner = inner
        self.version = version
        self.calls: list[tuple[list[int], list[int], SampledCompletion]] = []

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int],
        n: int,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[SampledCompletion]:
        out = await self.inner.sample_with_prompt_tokens(
            prompt_token_ids, n, max_tokens, temperature, stop, stop_token_ids
        )
        self.calls.append((list(prompt_token_ids), list(stop_token_ids or ()), out[0]))
        self.version["v"] += 1
        return out


async def test_calculator_episode_trajectory_is_consistent(
    sampler: DeploymentSampler,
    vllm_manager: DeploymentManager,
    vllm_deployment: Deployment,
    renderer: ImChatRenderer,
    version: dict[str, int],
) -> None:
    env = ToolCallingCalculatorEnv(renderer, scripted_calls=2)
    recorder = RecordingSampler(sampler, version)
    version["v"] = 10
    traj = await run_episode(
        env,
        recorder,
        policy_version=lambda: version["v"],
        max_turns=4,
        max_tokens=32,
        temperature=1.0,
        row_id="calc-0",
    )
    turns = traj.turns
    assert len(turns) == len(recorder.calls) == 3  # two tool calls, then no call: done
    assert traj.row_id == "calc-0" and traj.reward in (0.0, 1.0)
    tool_obs = renderer.continuation([], [{"role": "tool", "content": "42"}])
    assert list(turns[0].observation_tokens) == renderer.build_generation_prompt(env._history[:2])
    assert [list(t.observation_tokens) for t in turns[1:]] == [tool_obs, tool_obs]

    context: list[int] = []
    for k, (turn, (prompt, stops, sample)) in enumerate(zip(turns, recorder.calls, strict=True)):
        context += turn.observation_tokens
        assert prompt == context and stops == list(env.stop_token_ids)  # the model saw it all
        assert turn.action_tokens[-1] in env.stop_token_ids
        assert turn.action_tokens == sample.completion_tokens
        assert turn.action_logprobs == sample.sampling_logprobs
        assert turn.finish_reason == sample.finish_reason
        assert turn.policy_version == sample.policy_version == 10 + k
        context += turn.action_tokens
    assert traj.tokens == context == list(recorder.calls[-1][2].full_tokens)

    n = len(traj.tokens)
    mask, behaviour, versions = traj.loss_mask, traj.behaviour_logprobs, traj.policy_versions
    assert len(mask) == len(behaviour) == len(versions) == n
    generated = [i for i in range(n) if mask[i] == 1.0]
    assert len(generated) == traj.num_generated == sum(len(t.action_logprobs) for t in turns)
    observed = [i for i in range(n) if mask[i] == 0.0]
    assert len(observed) + len(generated) == n
    assert all(behaviour[i] == 0.0 and versions[i] == -1 for i in observed)
    assert all(math.isfinite(behaviour[i]) and behaviour[i] <= 0.0 for i in generated)
    assert {versions[i] for i in generated} == {10, 11, 12} and traj.oldest_version == 10

    # the behaviour logprobs are those of the served policy on the whole multi-turn sequence
    served = await served_prompt_logprobs(vllm_manager, vllm_deployment, traj.tokens)
    diffs = [abs(behaviour[i] - served[i]) for i in generated]
    assert max(diffs) < LOGPROB_ATOL, max(diffs)
