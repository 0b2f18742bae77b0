"""Small verifiable tasks shipped with asyncrl (the demo trains on one of them).

Every task is a :class:`Task`: ``make_rows(n_train, n_heldout, seed=...)`` returns
(train, heldout) dataset rows ``{"id", "prompt", "answer"}`` whose words never overlap between
the splits; ``reward(completion, row)`` scores ``completion.text`` against
``row.data["answer"]`` in [0, 1]; ``sft_messages(row, corrupt=..., rng=...)`` is one supervised
conversation for a warm start, wrong with probability ``corrupt`` (a deliberately imperfect
teacher, which RL against the verifier then corrects). ``sft_drawer(task, rows, corrupt)`` turns
that into the ``draw(rng)`` function ``run_sft`` takes. Everything is generated from a seed.

Tasks (``TASKS``):

- ``last`` (the demo's task): "last WORD" -> the word's last letter (words of 3-5 letters from
  ``a``-``l``). The tiny local model learns the skill in ~100 SFT steps at lr 1e-3 (lr >= 2e-3
  stalls on a plateau), so a short warm start on a noisy teacher (``corrupt=0.5``: half the
  answers are a random letter) gives a policy that is right greedily but only ~40-55% of the
  time at temperature 1; GRPO (lr 1e-3; 2e-3 is unstable) then raises the held-out sampled
  reward by +0.3 to +0.5 within 30 steps. Reward: 1.0 or 0.0.
- ``reverse``: "reverse WORD" -> the word reversed. Harder: the tiny model needs ~200 clean
  SFT steps at lr 1e-3 for 3-letter words, more with a noisy teacher. Reward: partial credit
  (fraction of positions right, 0 if the length differs).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncrl.rollout.types import Row

__all__ = [
    "TASKS",
    "Task",
    "get_task",
    "last_letter_reward",
    "last_letter_sft_messages",
    "make_last_letter_rows",
    "make_reverse_rows",
    "positional_reward",
    "reverse_reward",
    "reverse_sft_messages",
    "sft_drawer",
]

Messages = list[dict[str, str]]
DatasetRow = dict[str, Any]

DEFAULT_ALPHABET = 12  # letters a..l: a small output space keeps the warm start short


def _words(n: int, seed: int, length: tuple[int, int], alphabet: int) -> list[str]:
    """``n`` distinct random words (seeded) over the first ``alphabet`` lowercase letters."""
    lo, hi = length
    if not 1 <= alphabet <= 26:
        raise ValueError(f"alphabet must be in 1..26, got {alphabet}")
    if not 1 <= lo <= hi:
        raise ValueError(f"length must be (lo, hi) with 1 <= lo <= hi, got {length}")
    possible = sum(alphabet**k for k in range(lo, hi + 1))
    if n > possible:
        raise ValueError(
            f"cannot draw {n} distinct words of length {lo}-{hi} over {alphabet} letters "
            f"(only {possible} exist)"
        )
    letters = string.ascii_lowercase[:alphabet]
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        word = "".join(rng.choices(letters, k=rng.randint(lo, hi)))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _split_rows(
    verb: str,
    answer: Callable[[str], str],
    n_train: int,
    n_heldout: int,
    seed: int,
    length: tuple[int, int],
    alphabet: int,
) -> tuple[list[DatasetRow], list[DatasetRow]]:
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"row counts must be >= 0, got {n_train}, {n_heldout}")
    words = _words(n_train + n_heldout, seed, length, alphabet)

    def row(i: int, w: str, split: str) -> DatasetRow:
        return {"id": f"{split}-{i}", "prompt": f"{verb} {w}", "answer": answer(w)}

    train = [row(i, w, "train") for i, w in enumerate(words[:n_train])]
    heldout = [row(i, w, "heldout") for i, w in enumerate(words[n_train:])]
    return train, heldout


def _completion_text(completion: Any) -> str:
    return str(completion.text if hasattr(completion, "text") else completion).strip()


def positional_reward(completion: Any, row: Row) -> float:
    """Fraction of characters in the right place; 0.0 when the length differs.

    ``completion`` is a sampled completion (its ``.text`` is read) or a plain string;
    surrounding whitespace is ignored. For a one-character answer this is exact match.
    """
    want = str(row.data["answer"])
    got = _completion_text(completion)
    if len(got) != len(want) or not want:
        return 0.0
    return sum(a == b for a, b in zip(got, want, strict=True)) / len(want)


# ----------------------------------------------------------------------------- last letter


def make_last_letter_rows(
    n_train: int,
    n_heldout: int,
    *,
    seed: int = 0,
    length: tuple[int, int] = (3, 5),
    alphabet: int = DEFAULT_ALPHABET,
) -> tuple[list[DatasetRow], list[DatasetRow]]:
    """(train, heldout) rows ``{"id", "prompt": "last WORD", "answer": WORD[-1]}``; the two
    splits never share a word."""
    return _split_rows("last", lambda w: w[-1], n_train, n_heldout, seed, length, alphabet)


def last_letter_reward(completion: Any, row: Row) -> float:
    """1.0 when the completion (stripped) is exactly the answer letter, else 0.0."""
    return positional_reward(completion, row)


def last_letter_sft_messages(
    row: DatasetRow, *, corrupt: float, rng: random.Random, alphabet: int = DEFAULT_ALPHABET
) -> Messages:
    """A supervised conversation for ``row``; with probability ``corrupt`` the answer is a
    uniformly random letter of the alphabet instead (it may coincide with the right one)."""
    answer = str(row["answer"])
    if rng.random() < corrupt:
        answer = rng.choice(string.ascii_lowercase[:alphabet])
    return [
        {"role": "user", "content": str(row["prompt"])},
        {"role": "assistant", "content": answer},
    ]


# --------------------------------------------------------------------------------- reverse


def make_reverse_rows(
    n_train: int,
    n_heldout: int,
    *,
    seed: int = 0,
    length: tuple[int, int] = (3, 5),
    alphabet: int = DEFAULT_ALPHABET,
) -> tuple[list[DatasetRow], list[DatasetRow]]:
    """(train, heldout) rows ``{"id", "prompt": "reverse WORD", "answer": WORD[::-1]}``;
    the two splits never share a word."""
    return _split_rows("reverse", lambda w: w[::-1], n_train, n_heldout, seed, length, alphabet)


def reverse_reward(completion: Any, row: Row) -> float:
    """Fraction of characters in the right place; 0.0 when the length differs."""
    return positional_reward(completion, row)


def reverse_sft_messages(row: DatasetRow, *, corrupt: float, rng: random.Random) -> Messages:
    """A supervised conversation for ``row``; with probability ``corrupt`` the answer has
    two adjacent characters swapped."""
    answer = list(str(row["answer"]))
    if len(answer) > 1 and rng.random() < corrupt:
        i = rng.randrange(len(answer) - 1)
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    return [
        {"role": "user", "content": str(row["prompt"])},
        {"role": "assistant", "content": "".join(answer)},
    ]


# ----------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Task:
    """A named task: row maker, reward function and SFT conversation maker."""

    name: str
    make_rows: Callable[..., tuple[list[DatasetRow], list[DatasetRow]]]
    reward: Callable[[Any, Row], float]
    sft_messages: Callable[..., Messages]


TASKS: dict[str, Task] = {
    "last": Task("last", make_last_letter_rows, last_letter_reward, last_letter_sft_messages),
    "reverse": Task("reverse", make_reverse_rows, reverse_reward, reverse_sft_messages),
}


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def sft_drawer(
    task: Task | str, rows: Sequence[DatasetRow], corrupt: float = 0.0
) -> Callable[[random.Random], Messages]:
    """``draw(rng)`` for ``run_sft``: a random row of ``rows`` rendered by the task's
    ``sft_messages`` with the given ``corrupt`` rate (same rng => same conversations)."""
    t = get_task(task) if isinstance(task, str) else task
    if not rows:
        raise ValueError("sft_drawer needs at least one row")
    if not 0.0 <= corrupt <= 1.0:
        raise ValueError(f"corrupt must be in [0, 1], got {corrupt}")
    pool = list(rows)

    def draw(rng: random.Random) -> Messages:
        return t.sft_messages(rng.choice(pool), corrupt=corrupt, rng=rng)

    return draw
