"""Renderers: chat messages -> prompt tokens, stop tokens and loss masks.

Two implementations:
- ``ChatTemplateRenderer`` uses the tokenizer's own ``apply_chat_template`` (any HF model);
- ``ImChatRenderer`` builds the ``<|im_start|>role\\ncontent<|im_end|>\\n`` format token by token
  for the local char-level tokenizer (what ``asyncrl.models`` makes), without a template engine.

Invariants:
- ``build_generation_prompt(messages)`` ends with the assistant header; generation stops at
  ``stop_token_ids``.
- ``build_supervised_example(messages)`` returns (tokens, weights) with weight 1.0 exactly on
  assistant content and its end-of-turn token; everything else 0.0.
- Rendering is prefix-consistent: the prompt for messages[:k] is a prefix of the rendering of
  messages[:k+1] (multi-turn environments rely on it; checked, not assumed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from asyncrl.errors import DataError

__all__ = ["ChatTemplateRenderer", "ImChatRenderer", "Renderer", "renderer_for"]

Message = Mapping[str, str]


class Renderer(Protocol):
    @property
    def stop_token_ids(self) -> list[int]: ...

    def build_generation_prompt(self, messages: Sequence[Message]) -> list[int]: ...

    def build_supervised_example(
        self, messages: Sequence[Message]
    ) -> tuple[list[int], list[float]]: ...

    def continuation(
        self, history: Sequence[Message], new_messages: Sequence[Message]
    ) -> list[int]: ...


def _supervised(render: Any, messages: Sequence[Message]) -> tuple[list[int], list[float]]:
    """Shared by both renderers: weights = 1 on each assistant turn's own tokens."""
    if not messages:
        raise DataError("cannot render an empty conversation")
    tokens: list[int] = []
    weights: list[float] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = render.build_generation_prompt(messages[:i])
        else:
            prefix = render.render_messages(messages[:i])
        full = render.render_messages(messages[: i + 1])
        if full[: len(tokens)] != tokens or prefix[: len(tokens)] != tokens:
            raise DataError(f"renderer is not prefix-consistent at message {i}")
        weights += [0.0] * (len(prefix) - len(tokens))
        weights += _turn_weights(full[len(prefix) :], message["role"], render.stop_token_ids)
        tokens = full
    return tokens, weights


def _turn_weights(segment: list[int], role: str, stops: Sequence[int]) -> list[float]:
    """1.0 on an assistant turn up to and including its last stop token (the template's
    text after the stop token is never generated, so never trained); 0.0 otherwise."""
    if role != "assistant":
        return [0.0] * len(segment)
    end = max((i for i, t in enumerate(segment) if t in stops), default=len(segment) - 1)
    return [1.0] * (end + 1) + [0.0] * (len(segment) - end - 1)


class ImChatRenderer:
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` rendered directly with the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._start = self._special("<|im_start|>")
        self._end = self._special("<|im_end|>")
        self._newline = tokenizer.encode("\n", add_special_tokens=False)

    def _special(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise DataError(f"tokenizer has no {token} token; use ChatTemplateRenderer")
        return int(tid)

    @property
    def stop_token_ids(self) -> list[int]:
        """End of turn, and the tokenizer's end-of-text (a model may emit either)."""
        eos = self.tokenizer.eos_token_id
        return [self._end] if eos is None or eos == self._end else [self._end, int(eos)]

    def _header(self, role: str) -> list[int]:
        return [self._start, *self.tokenizer.encode(role + "\n", add_special_tokens=False)]

    def render_messages(self, messages: Sequence[Message]) -> list[int]:
        out: list[int] = []
        for m in messages:
            out += self._header(m["role"])
            out += self.tokenizer.encode(m["content"], add_special_tokens=False)
            out += [self._end, *self._newline]
        return out

    def build_generation_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self.render_messages(messages) + self._header("assistant")

    def build_supervised_example(
        self, messages: Sequence[Message]
    ) -> tuple[list[int], list[float]]:
        return _supervised(self, messages)

    def continuation(
        self, history: Sequence[Message], new_messages: Sequence[Message]
    ) -> list[int]:
        """Tokens that follow a generated assistant turn (ended by <|im_end|>): the newline,
        the new (tool / user) messages, then the next assistant header."""
        del history  # the format is context-free
        return [*self._newline, *self.build_generation_prompt(new_messages)]


class ChatTemplateRenderer:
    """Renders with ``tokenizer.apply_chat_template`` (the model's own chat format)."""

    def __init__(self, tokenizer: Any, stop_token_ids: Sequence[int] | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("tokenizer has no chat_template")
        self.tokenizer = tokenizer
        if stop_token_ids is None:
            eos = tokenizer.eos_token_id
            stop_token_ids = [] if eos is None else [int(eos)]
            end = tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != tokenizer.unk_token_id and end not in stop_token_ids:
                stop_token_ids.append(end)
        self._stop = list(stop_token_ids)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stop)

    def _apply(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        if not messages:
            return []
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render_messages(self, messages: Sequence[Message]) -> list[int]:
        return self._apply(messages, add_generation_prompt=False)

    def build_generation_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._apply(messages, add_generation_prompt=True)

    def build_supervised_example(
        self, messages: Sequence[Message]
    ) -> tuple[list[int], list[float]]:
        return _supervised(self, messages)

    def continuation(
        self, history: Sequence[Message], new_messages: Sequence[Message]
    ) -> list[int]:
        """Tokens after the last generated turn, computed as a difference of renderings."""
        before = self.render_messages(history)
        after = self.build_generation_prompt([*history, *new_messages])
        if after[: len(before)] != before:
            raise DataError("chat template is not prefix-consistent; cannot continue a turn")
        # the generated turn ended at its stop token; the template's own end-of-turn text
        # after that token is part of the continuation
        return after[len(before) - self._tail_after_stop(history) :]

    def _tail_after_stop(self, history: Sequence[Message]) -> int:
        rendered = self.render_messages(history)
        for i in range(len(rendered) - 1, -1, -1):
            if rendered[i] in self._stop:
                return len(rendered) - 1 - i
        return 0


def renderer_for(tokenizer: Any) -> Renderer:
    """ImChatRenderer when the tokenizer has <|im_start|>/<|im_end|>, else the chat template."""
    try:
        return ImChatRenderer(tokenizer)
    except DataError:
        return ChatTemplateRenderer(tokenizer)
