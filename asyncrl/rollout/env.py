"""Multi-turn environments: the episode driver and a tool-calling example (calculator).

``run_episode(env, sampler, ...)`` alternates: sample an action from the policy, hand it to
``env.step``, append the environment's next observation — until ``done`` or ``max_turns``.
Only generated tokens are trained; tool / environment tokens get loss mask 0.

``CalculatorEnv`` asks an arithmetic question. The model may call the tool by writing
``<calc>EXPR</calc>``; the environment answers in a ``tool`` message with the value. The
episode ends when the model writes ``ANSWER: N``; reward 1.0 when N is right, else 0.0.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

from asyncrl.errors import DataError, RolloutError
from asyncrl.rollout.types import Env, SamplerLike, StepResult, Trajectory, Turn

__all__ = ["CalculatorEnv", "run_episode", "safe_eval"]

_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_MAX_ABS = 10**12


def safe_eval(expr: str) -> int:
    """Evaluate integer arithmetic (+ - * // %, parentheses, unary minus); nothing else."""
    if len(expr) > 200:
        raise ValueError("expression too long")
    tree = ast.parse(expr.strip(), mode="eval")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](ev(node.left), ev(node.right))
            if abs(value) > _MAX_ABS:
                raise ValueError("value out of range")
            return int(value)
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    return ev(tree)


_CALL = re.compile(r"<calc>(.*?)</calc>", re.S)
_ANSWER = re.compile(r"ANSWER:\s*(-?\d+)")


class CalculatorEnv(Env):
    """One arithmetic question; a calculator tool the model may call. Single use."""

    def __init__(self, question: str, answer: int, renderer: Any, *, max_tool_calls: int = 3):
        self.question = question
        self.answer = int(answer)
        self.renderer = renderer
        self.max_tool_calls = max_tool_calls
        self.tool_calls = 0
        self._history: list[dict[str, str]] = []
        self._started = False
        self._done = False

    @property
    def stop_token_ids(self) -> Sequence[int]:
        return self.renderer.stop_token_ids

    async def initial_observation(self) -> list[int]:
        if self._started:
            raise RolloutError("CalculatorEnv is single-use: initial_observation called twice")
        self._started = True
        self._history = [
            {
                "role": "system",
                "content": "Use <calc>EXPR</calc> to compute. Reply ANSWER: N when done.",
            },
            {"role": "user", "content": self.question},
        ]
        return self.renderer.build_generation_prompt(self._history)

    async def step(self, action: Sequence[int]) -> StepResult:
        if not self._started or self._done:
            raise RolloutError("CalculatorEnv.step called outside a running episode")
        text = self.renderer.tokenizer.decode(
            [t for t in action if t not in self.renderer.stop_token_ids], skip_special_tokens=False
        )
        self._history.append({"role": "assistant", "content": text})
        answer = _ANSWER.search(text)
        if answer:
            self._done = True
            return StepResult(reward=float(int(answer.group(1)) == self.answer), done=True)
        call = _CALL.search(text)
        if call is None or self.tool_calls >= self.max_tool_calls:
            self._done = True
            return StepResult(reward=0.0, done=True, metrics={"no_answer": 1.0})
        self.tool_calls += 1
        try:
            result = str(safe_eval(call.group(1)))
        except (ValueError, SyntaxError, ZeroDivisionError) as exc:
            result = f"error: {exc}"
        tool_message = [{"role": "tool", "content": result}]
        obs = self.renderer.continuation(self._history, tool_message)
        self._history += tool_message
        return StepResult(reward=0.0, done=False, next_observation=obs)


async def run_episode(
    env: Env,
    sampler: SamplerLike,
    *,
    policy_version: Callable[[], int],
    max_turns: int = 4,
    max_tokens: int = 64,
    temperature: float = 1.0,
    row_id: str = "",
) -> Trajectory:
    """Drive one episode of ``env`` with the policy behind ``sampler``."""
    if max_turns < 1:
        raise DataError(f"max_turns must be >= 1, got {max_turns}")
    observation = list(await env.initial_observation())
    context: list[int] = []
    turns: list[Turn] = []
    total = 0.0
    for _ in range(max_turns):
        context += observation
        version = policy_version()
        (sample,) = await sampler.sample_with_prompt_tokens(
            context, 1, max_tokens, temperature, stop_token_ids=list(env.stop_token_ids)
        )
        action = list(sample.full_tokens[sample.prompt_len :])
        context += action
        result = await env.step(action)
        total += result.reward
        turns.append(
            Turn(
                observation_tokens=tuple(observation),
                action_tokens=tuple(action),
                action_logprobs=tuple(sample.sampling_logprobs),
                policy_version=_version_of(sample, version),
                reward=result.reward,
                finish_reason=sample.finish_reason,
            )
        )
        if result.done:
            break
        if not action or action[-1] not in env.stop_token_ids:
            # cut by max_tokens or another end token: the next turn's context would be
            # malformed, so the episode ends here (recorded in the last turn's finish_reason)
            break
        observation = list(result.next_observation)
    return Trajectory(turns=tuple(turns), reward=total, row_id=row_id)


def _version_of(sample: Any, fallback: int) -> int:
    """The policy version the sampler stamped on ``sample``, else the one read at send time."""
    version = getattr(sample, "policy_version", None)
    if version is None:
        return fallback
    if isinstance(version, bool) or not isinstance(version, int):
        raise RolloutError(
            f"policy versions must be ints (the staleness bound counts them), got {version!r}"
        )
    return version
