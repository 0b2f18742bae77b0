"""Small verifiable tasks shipped with asyncrl (the demo trains on one of them).

``reverse``: the user gives a short lowercase word, the assistant must answer it reversed.
The reward is partial credit (fraction of positions right, 0 if the length is wrong), so
GRPO groups have reward variance even when the policy is weak. Rows are generated from a
seed; the train and held-out splits never share a word.
"""

from __future__ import annotations

import random
import string
from typing import Any

from asyncrl.rollout.types import Row

__all__ = ["make_reverse_rows", "reverse_reward", "reverse_sft_messages"]


def _words(n: int, seed: int, length: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        word = "".join(rng.choices(string.ascii_lowercase[:12], k=rng.randint(*length)))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def make_reverse_rows(
    n_train: int, n_heldout: int, *, seed: int = 0, length: tuple[int, int] = (3, 5)
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout) dataset rows: {"id", "prompt", "answer"}; disjoint words."""
    words = _words(n_train + n_heldout, seed, length)

    def row(i: int, w: str, split: str) -> dict[str, Any]:
        return {"id": f"{split}-{i}", "prompt": f"reverse {w}", "answer": w[::-1]}

    train = [row(i, w, "train") for i, w in enumerate(words[:n_train])]
    heldout = [row(i, w, "heldout") for i, w in enumerate(words[n_train:])]
    return train, heldout


def reverse_reward(completion: Any, row: Row) -> float:
    """Fraction of characters in the right place; 0.0 when the length differs."""
    want = str(row.data["answer"])
    got = completion.text.strip() if hasattr(completion, "text") else str(completion).strip()
    if len(got) != len(want):
        return 0.0
    return sum(a == b for a, b in zip(got, want, strict=True)) / len(want)


def reverse_sft_messages(
    row: dict[str, Any], *, corrupt: float, rng: random.Random
) -> list[dict[str, str]]:
    """A supervised conversation for ``row``; with probability ``corrupt`` the answer has
    two characters swapped (a deliberately imperfect warm start that RL then improves)."""
    answer = list(row["answer"])
    if len(answer) > 1 and rng.random() < corrupt:
        i = rng.randrange(len(answer) - 1)
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": "".join(answer)},
    ]
