"""What rollout users write and what rollouts produce.

Users implement one of:
- ``async def reward_fn(completion: SampledCompletion, row: Row) -> float`` (a plain function
  works too; it runs off the event loop), or
- ``async def rollout_fn(ctx: RolloutContext, row: Row) -> Trajectory`` for custom multi-step
  logic, or
- an :class:`Env` (multi-turn, tool-using), driven by ``asyncrl.rollout.env.run_episode``.

Invariants:
- A :class:`Trajectory` is a sequence of turns; concatenating every turn's observation and
  action tokens gives the full token sequence. Only action (generated) tokens are trained
  (loss mask 1); observation / tool / env tokens have mask 0, logprob 0 and version -1.
- Every generated token carries the policy version that produced it.
- An :class:`Env` is single-use: one episode per instance.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from asyncrl.errors import DataError

if TYPE_CHECKING:
    from asyncrl.trainer.types import Datum

__all__ = [
    "Env",
    "RolloutContext",
    "Row",
    "StepResult",
    "Trajectory",
    "TrajectoryGroup",
    "Turn",
    "validate_row",
]


@dataclass(frozen=True, slots=True)
class Row:
    """One validated dataset row: ``prompt`` is a string or a list of chat messages."""

    row_id: str
    prompt: str | tuple[Mapping[str, str], ...]
    data: Mapping[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]


def validate_row(raw: Any, index: int) -> Row:
    """Turn a raw dataset record into a Row, or raise DataError naming the row and field."""
    where = f"dataset row {index}"
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "id" in raw:
        where = f"dataset row {index} (id={raw['id']!r})"
        row_id = raw["id"]
        if isinstance(row_id, bool) or not isinstance(row_id, str | int) or row_id == "":
            raise DataError(
                f"{where}: 'id' must be a non-empty string or an integer, "
                f"got {type(row_id).__name__}"
            )
    if "prompt" not in raw:
        raise DataError(f"{where}: missing required field 'prompt'")
    prompt = raw["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        parsed: str | tuple[Mapping[str, str], ...] = prompt
    elif isinstance(prompt, list):
        parsed = tuple(_check_message(m, f"{where}: prompt[{i}]") for i, m in enumerate(prompt))
        if not parsed:
            raise DataError(f"{where}: 'prompt' has no messages")
    else:
        raise DataError(
            f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
        )
    row_id = str(raw.get("id", index))
    data = {k: v for k, v in raw.items() if k not in ("prompt", "id")}
    return Row(row_id=row_id, prompt=parsed, data=data)


def _check_message(m: Any, where: str) -> Mapping[str, str]:
    if not isinstance(m, Mapping):
        raise DataError(f"{where}: a message must be an object with 'role' and 'content'")
    for key in ("role", "content"):
        if not isinstance(m.get(key), str):
            raise DataError(f"{where}: message field {key!r} must be a string")
    return {"role": m["role"], "content": m["content"]}


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn: tokens the environment added, then the tokens the policy generated."""

    observation_tokens: tuple[int, ...]
    action_tokens: tuple[int, ...]
    action_logprobs: tuple[float, ...]
    policy_version: int
    reward: float = 0.0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if len(self.action_tokens) != len(self.action_logprobs):
            raise DataError(
                f"turn has {len(self.action_tokens)} action tokens but "
                f"{len(self.action_logprobs)} logprobs"
            )


@dataclass(frozen=True, slots=True)
class Trajectory:
    """A finished episode: its turns, total reward and bookkeeping."""

    turns: tuple[Turn, ...]
    reward: float
    row_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.turns:
            raise DataError(f"trajectory for row {self.row_id!r} has no turns")
        if not math.isfinite(self.reward):
            raise DataError(f"trajectory for row {self.row_id!r} has reward {self.reward}")

    @property
    def tokens(self) -> list[int]:
        return [t for turn in self.turns for t in (*turn.observation_tokens, *turn.action_tokens)]

    @property
    def loss_mask(self) -> list[float]:
        return [
            m
            for turn in self.turns
            for m in ([0.0] * len(turn.observation_tokens) + [1.0] * len(turn.action_tokens))
        ]

    @property
    def behaviour_logprobs(self) -> list[float]:
        return [
            lp
            for turn in self.turns
            for lp in ([0.0] * len(turn.observation_tokens) + list(turn.action_logprobs))
        ]

    @property
    def policy_versions(self) -> list[int]:
        return [
            v
            for turn in self.turns
            for v in (
                [-1] * len(turn.observation_tokens)
                + [turn.policy_version] * len(turn.action_tokens)
            )
        ]

    @property
    def num_generated(self) -> int:
        return sum(len(t.action_tokens) for t in self.turns)

    @property
    def oldest_version(self) -> int:
        """The oldest policy version that generated any token of this trajectory."""
        versions = [t.policy_version for t in self.turns if t.action_tokens]
        return min(versions) if versions else -1

    def to_datum(self, advantage: float, max_length: int | None = None) -> Datum:
        """Next-token Datum with per-token advantages and behaviour logprobs (shifted)."""
        import torch

        from asyncrl.trainer.types import ModelInput, datum_from_model_input_weights

        base = datum_from_model_input_weights(
            ModelInput.from_ints(self.tokens), self.loss_mask, max_length
        )
        n = base.model_input.length
        mask = base.tensor("weights")
        behaviour = torch.tensor(self.behaviour_logprobs[1 : n + 1], dtype=torch.float32)
        return type(base)(
            base.model_input,
            {
                **base.loss_fn_inputs,
                "advantages": mask * advantage,
                "behaviour_logprobs": behaviour,
            },
        )


@dataclass(frozen=True, slots=True)
class TrajectoryGroup:
    """G trajectories sampled for the same row (the unit GRPO normalises over)."""

    row_id: str
    trajectories: tuple[Trajectory, ...]

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @property
    def oldest_version(self) -> int:
        return min(t.oldest_version for t in self.trajectories)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What an environment returns after one action."""

    reward: float
    done: bool
    next_observation: Sequence[int] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)


class Env(ABC):
    """A single-use multi-turn environment. Token-level: observations and actions are ids."""

    @abstractmethod
    async def initial_observation(self) -> Sequence[int]:
        """Prompt tokens for the first turn."""

    @abstractmethod
    async def step(self, action: Sequence[int]) -> StepResult:
        """Apply the generated tokens; return reward, done and the next observation tokens."""

    @property
    def stop_token_ids(self) -> Sequence[int]:
        """Token ids that end one action (e.g. the end-of-turn token)."""
        return ()


class SamplerLike(Protocol):
    """What a rollout needs from a sampler (``DeploymentSampler`` implements it)."""

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int],
        n: int,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Sequence[Any]: ...


@dataclass(frozen=True)
class RolloutContext:
    """Handed to ``rollout_fn``: the sampler, the renderer / tokenizer, and the policy version."""

    sampler: SamplerLike
    renderer: Any
    tokenizer: Any
    policy_version: Callable[[], int]
    max_tokens: int = 256
    temperature: float = 1.0


RewardFn = Callable[[Any, Row], "float | Awaitable[float]"]
RolloutFn = Callable[[RolloutContext, Row], Awaitable[Trajectory]]
