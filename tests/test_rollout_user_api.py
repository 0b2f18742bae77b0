"""What rollout users write: rows, rewards + failure policies, renderers, trajectories, envs."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from asyncrl.errors import DataError, RolloutError
from asyncrl.models import build_tokenizer
from asyncrl.rollout.env import CalculatorEnv, run_episode, safe_eval
from asyncrl.rollout.renderers import ChatTemplateRenderer, ImChatRenderer, renderer_for
from asyncrl.rollout.rewards import (
    DropGroup,
    FailFast,
    RetryOnFailure,
    SampleFailure,
    call_with_policy,
    check_reward,
)
from asyncrl.rollout.types import Trajectory, Turn, validate_row


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(128)


# ------------------------------------------------------------------------------------ rows
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"answer": 3}, "row 0: missing required field 'prompt'"),
        ({"prompt": "   "}, "'prompt' is empty"),
        ({"prompt": 42}, "must be a string or a list of messages, got int"),
        ({"prompt": []}, "has no messages"),
        ({"prompt": [{"role": "user"}]}, r"prompt\[0\]: message field 'content'"),
        (["not", "a", "dict"], "expected a JSON object, got list"),
        ({"id": "q7", "prompt": None}, "id='q7'"),
    ],
)
def test_malformed_rows_name_the_row(raw: Any, match: str) -> None:
    with pytest.raises(DataError, match=match):
        validate_row(raw, 0)


def test_valid_rows() -> None:
    row = validate_row({"id": "a1", "prompt": "2+2?", "answer": 4}, 5)
    assert row.row_id == "a1"
    assert row.messages() == [{"role": "user", "content": "2+2?"}]
    assert row.data == {"answer": 4}
    assert validate_row({"prompt": [{"role": "user", "content": "x"}]}, 9).row_id == "9"


# --------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    ("value", "match"),
    [(None, "None"), ("1.0", "str"), (float("nan"), "nan"), (float("inf"), "inf"), (True, "bool")],
)
def test_check_reward_rejects_non_numbers(value: Any, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        check_reward(value)


def test_check_reward_accepts_reals() -> None:
    assert check_reward(1) == 1.0
    assert check_reward(0.25) == 0.25


@pytest.mark.anyio
async def test_sync_and_async_reward_functions() -> None:
    async def areward(x: int) -> float:
        return x / 2

    def sreward(x: int) -> float:
        return x * 2.0

    for fn, want in ((areward, 1.5), (sreward, 6.0)):
        got = await call_with_policy(
            fn, (3,), policy=FailFast(), row_id="r", stage="reward", validate=check_reward
        )
        assert got == want


@pytest.mark.anyio
async def test_fail_fast_raises_with_row_and_cause() -> None:
    def bad(x: int) -> float:
        raise KeyError("no such key")

    with pytest.raises(RolloutError, match=r"row 'r3'.*KeyError"):
        await call_with_policy(bad, (1,), policy=FailFast(), row_id="r3", stage="reward")


@pytest.mark.anyio
async def test_nan_reward_is_a_failure_not_zero() -> None:
    out = await call_with_policy(
        lambda x: math.nan,
        (1,),
        policy=DropGroup(),
        row_id="r",
        stage="reward",
        validate=check_reward,
    )
    assert isinstance(out, SampleFailure)
    assert "nan" in out.cause


@pytest.mark.anyio
async def test_retry_on_failure_retries_then_succeeds() -> None:
    calls = {"n": 0}

    async def flaky(x: int) -> float:
        calls["n"] += 1
        if calls["n"] < 3:
            raise RuntimeError("transient")
        return 1.0

    got = await call_with_policy(
        flaky, (0,), policy=RetryOnFailure(max_retries=2, timeout=5), row_id="r", stage="reward"
    )
    assert got == 1.0 and calls["n"] == 3


@pytest.mark.anyio
async def test_hung_reward_is_cut_off_by_timeout() -> None:
    import anyio

    async def hang(x: int) -> float:
        await anyio.sleep(30)
        return 1.0

    def hang_sync(x: int) -> float:
        time.sleep(2)
        return 1.0

    for fn in (hang, hang_sync):
        t0 = time.monotonic()
        out = await call_with_policy(
            fn, (0,), policy=RetryOnFailure(max_retries=0, timeout=0.2), row_id="h", stage="reward"
        )
        assert isinstance(out, SampleFailure)
        assert "timed out" in out.cause
        assert time.monotonic() - t0 < 1.5


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryOnFailure(max_retries=-1)


# ------------------------------------------------------------------------------- renderers
def test_im_renderer_matches_chat_template(tokenizer: Any) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    im, tmpl = ImChatRenderer(tokenizer), ChatTemplateRenderer(tokenizer)
    assert im.build_generation_prompt(msgs) == tmpl.build_generation_prompt(msgs)
    end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    assert im.stop_token_ids == [end, eos]
    assert sorted(tmpl.stop_token_ids) == sorted([end, eos])
    assert isinstance(renderer_for(tokenizer), ImChatRenderer)


def test_supervised_mask_covers_only_assistant(tokenizer: Any) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for renderer in (ImChatRenderer(tokenizer), ChatTemplateRenderer(tokenizer)):
        tokens, weights = renderer.build_supervised_example(msgs)
        trained = tokenizer.decode([t for t, w in zip(tokens, weights, strict=True) if w == 1.0])
        assert trained == "yo<|im_end|>"
        assert len(tokens) == len(weights)


def test_continuation_is_prefix_consistent(tokenizer: Any) -> None:
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    new = [{"role": "tool", "content": "42"}]
    for renderer in (ImChatRenderer(tokenizer), ChatTemplateRenderer(tokenizer)):
        upto_stop = renderer.render_messages(history)[:-1]  # generation ended at <|im_end|>
        full = renderer.build_generation_prompt([*history, *new])
        assert upto_stop + renderer.continuation(history, new) == full


# ----------------------------------------------------------------------------- trajectory
def test_trajectory_masks_versions_and_datum() -> None:
    traj = Trajectory(
        turns=(
            Turn((1, 2), (3, 4), (-0.1, -0.2), policy_version=5),
            Turn((6,), (7,), (-0.3,), policy_version=6),
        ),
        reward=1.0,
        row_id="r",
    )
    assert traj.tokens == [1, 2, 3, 4, 6, 7]
    assert traj.loss_mask == [0, 0, 1, 1, 0, 1]
    assert traj.policy_versions == [-1, -1, 5, 5, -1, 6]
    assert traj.oldest_version == 5
    d = traj.to_datum(advantage=0.5)
    assert d.tensor("target_tokens").tolist() == [2, 3, 4, 6, 7]
    assert d.tensor("weights").tolist() == [0, 1, 1, 0, 1]
    assert d.tensor("advantages").tolist() == [0, 0.5, 0.5, 0, 0.5]
    assert d.tensor("behaviour_logprobs").tolist() == pytest.approx([0, -0.1, -0.2, 0, -0.3])


def test_trajectory_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="no turns"):
        Trajectory(turns=(), reward=0.0)
    with pytest.raises(DataError, match="reward nan"):
        Trajectory(turns=(Turn((1,), (2,), (0.0,), 0),), reward=math.nan)
    with pytest.raises(DataError, match="logprobs"):
        Turn((1,), (2, 3), (0.0,), 0)


# ------------------------------------------------------------------------------------- env
def test_safe_eval() -> None:
    assert safe_eval("2*(3+4)-5") == 9
    assert safe_eval("-7//2") == -4
    for bad in ("__import__('os')", "2**100000", "a+1", "1.5+1"):
        with pytest.raises(ValueError):
            safe_eval(bad)


@dataclass
class _Sample:
    full_tokens: list[int]
    prompt_len: int
    sampling_logprobs: list[float]
    finish_reason: str
    policy_version: int | None = None


class ScriptedSampler:
    """A fake sampler that 'generates' scripted texts (implements SamplerLike)."""

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompts: list[list[int]] = []

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int],
        n: int,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[_Sample]:
        self.prompts.append(list(prompt_token_ids))
        text = self.replies.pop(0)
        out = self.tokenizer.encode(text, add_special_tokens=False) + list(stop_token_ids or [])
        return [
            _Sample(list(prompt_token_ids) + out, len(prompt_token_ids), [-0.5] * len(out), "stop")
        ]


@pytest.mark.anyio
async def test_calculator_episode_with_tool_call(tokenizer: Any) -> None:
    renderer = ImChatRenderer(tokenizer)
    env = CalculatorEnv("What is 12*7+3?", 87, renderer)
    sampler = ScriptedSampler(tokenizer, ["<calc>12*7+3</calc>", "ANSWER: 87"])
    traj = await run_episode(env, sampler, policy_version=lambda: 3, row_id="c1")
    assert traj.reward == 1.0
    assert len(traj.turns) == 2 and env.tool_calls == 1
    # the tool's answer is in the context of the second request, and is not trained
    second_obs = tokenizer.decode(list(traj.turns[1].observation_tokens))
    assert "<|im_start|>tool\n87<|im_end|>" in second_obs
    assert sampler.prompts[1] == traj.tokens[: len(sampler.prompts[1])]
    mask = traj.loss_mask
    obs_start = len(traj.turns[0].observation_tokens) + len(traj.turns[0].action_tokens)
    assert all(
        m == 0.0 for m in mask[obs_start : obs_start + len(traj.turns[1].observation_tokens)]
    )
    assert traj.policy_versions[-1] == 3


@pytest.mark.anyio
async def test_calculator_wrong_answer_and_single_use(tokenizer: Any) -> None:
    env = CalculatorEnv("What is 2+2?", 4, ImChatRenderer(tokenizer))
    traj = await run_episode(
        env, ScriptedSampler(tokenizer, ["ANSWER: 5"]), policy_version=lambda: 0
    )
    assert traj.reward == 0.0
    with pytest.raises(RolloutError, match="single-use"):
        await env.initial_observation()


@pytest.mark.anyio
async def test_truncated_turn_ends_the_episode(tokenizer: Any) -> None:
    class NoStop(ScriptedSampler):
        async def sample_with_prompt_tokens(
            self, prompt_token_ids, n, max_tokens, temperature, stop=None, stop_token_ids=None
        ):  # type: ignore[override]
            out = await super().sample_with_prompt_tokens(
                prompt_token_ids, n, max_tokens, temperature, stop, []
            )
            out[0].finish_reason = "length"
            return out

    env = CalculatorEnv("What is 2+2?", 4, ImChatRenderer(tokenizer))
    traj = await run_episode(env, NoStop(tokenizer, ["<calc>2+2</calc>"]), policy_version=lambda: 0)
    assert len(traj.turns) == 1 and traj.turns[0].finish_reason == "length"


@pytest.mark.anyio
async def test_non_int_policy_version_is_a_clear_error(tokenizer: Any) -> None:
    class StrVersion(ScriptedSampler):
        async def sample_with_prompt_tokens(self, *args, **kwargs):  # type: ignore[override]
            out = await super().sample_with_prompt_tokens(*args, **kwargs)
            out[0].policy_version = "abc123"  # type: ignore[assignment]
            return out

    env = CalculatorEnv("What is 2+2?", 4, ImChatRenderer(tokenizer))
    with pytest.raises(RolloutError, match="policy versions must be ints"):
        await run_episode(env, StrVersion(tokenizer, ["ANSWER: 4"]), policy_version=lambda: 0)
