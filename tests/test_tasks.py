"""Shipped tasks: splits, rewards and SFT conversations (pure python, fast)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from asyncrl.recipes import tasks
from asyncrl.recipes.tasks import (
    TASKS,
    get_task,
    last_letter_reward,
    last_letter_sft_messages,
    make_last_letter_rows,
    make_reverse_rows,
    positional_reward,
    reverse_reward,
    reverse_sft_messages,
    sft_drawer,
)
from asyncrl.rollout.types import Row, validate_row


def _row(answer: str) -> Row:
    return Row(row_id="r", prompt="p", data={"answer": answer})


def _completion(text: str) -> SimpleNamespace:
    return SimpleNamespace(text=text)


@pytest.mark.parametrize("make", [make_last_letter_rows, make_reverse_rows])
def test_splits_are_disjoint_sized_and_valid(make):
    train, held = make(300, 64, seed=3)
    assert len(train) == 300 and len(held) == 64
    words = lambda rows: {r["prompt"].split(" ", 1)[1] for r in rows}  # noqa: E731
    assert len(words(train)) == 300 and len(words(held)) == 64
    assert not words(train) & words(held)
    ids = [r["id"] for r in train + held]
    assert len(set(ids)) == len(ids)
    for i, raw in enumerate(train + held):
        row = validate_row(raw, i)
        assert row.data["answer"] and set(raw) == {"id", "prompt", "answer"}


def test_answers_follow_the_task():
    train, _ = make_last_letter_rows(50, 0, seed=0)
    for r in train:
        verb, word = r["prompt"].split(" ")
        assert verb == "last" and r["answer"] == word[-1] and 3 <= len(word) <= 5
        assert set(word) <= set("abcdefghijkl")
    train, _ = make_reverse_rows(50, 0, seed=0, length=(2, 3), alphabet=4)
    for r in train:
        verb, word = r["prompt"].split(" ")
        assert verb == "reverse" and r["answer"] == word[::-1] and 2 <= len(word) <= 3
        assert set(word) <= set("abcd")


@pytest.mark.parametrize("make", [make_last_letter_rows, make_reverse_rows])
def test_rows_are_deterministic_in_the_seed(make):
    assert make(100, 20, seed=7) == make(100, 20, seed=7)
    assert make(100, 20, seed=7) != make(100, 20, seed=8)


def test_reverse_rows_unchanged_by_the_refactor():
    # pinned: the reverse rows for seed 0 are what earlier versions produced
    train, held = make_reverse_rows(2, 1, seed=0)
    assert [r["prompt"] for r in train + held] == [
        f"reverse {w}" for w in tasks._words(3, 0, (3, 5), 12)
    ]


def test_too_many_words_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="only 8 exist"):
        make_last_letter_rows(8, 1, length=(3, 3), alphabet=2)
    make_last_letter_rows(6, 2, length=(3, 3), alphabet=2)  # exactly all of them


def test_last_letter_reward_by_hand():
    row = _row("c")
    assert last_letter_reward(_completion("c"), row) == 1.0
    assert last_letter_reward(_completion(" c\n"), row) == 1.0
    assert last_letter_reward(_completion("d"), row) == 0.0
    assert last_letter_reward(_completion("cc"), row) == 0.0
    assert last_letter_reward(_completion(""), row) == 0.0
    assert last_letter_reward("c", row) == 1.0  # a plain string works too


def test_positional_reward_by_hand():
    row = _row("cba")
    assert reverse_reward(_completion("cba"), row) == 1.0
    assert reverse_reward(_completion("cbx"), row) == pytest.approx(2 / 3)
    assert reverse_reward(_completion("abc"), row) == pytest.approx(1 / 3)
    assert reverse_reward(_completion("xyz"), row) == 0.0
    assert reverse_reward(_completion("cb"), row) == 0.0
    assert reverse_reward(_completion("cbaa"), row) == 0.0
    assert positional_reward(_completion("x"), _row("")) == 0.0


def test_last_letter_sft_messages_and_corruption_rate():
    row = {"id": "t", "prompt": "last abc", "answer": "c"}
    clean = last_letter_sft_messages(row, corrupt=0.0, rng=random.Random(0))
    assert clean == [
        {"role": "user", "content": "last abc"},
        {"role": "assistant", "content": "c"},
    ]
    rng = random.Random(1)
    answers = [
        last_letter_sft_messages(row, corrupt=0.5, rng=rng)[1]["content"] for _ in range(4000)
    ]
    assert set(answers) <= set("abcdefghijkl")
    wrong = sum(a != "c" for a in answers) / len(answers)
    assert wrong == pytest.approx(0.5 * 11 / 12, abs=0.04)
    rng = random.Random(2)
    always = [last_letter_sft_messages(row, corrupt=1.0, rng=rng)[1]["content"] for _ in range(600)]
    assert len(set(always)) == 12


def test_reverse_sft_messages_swap_adjacent_characters():
    row = {"id": "t", "prompt": "reverse abc", "answer": "cba"}
    assert reverse_sft_messages(row, corrupt=0.0, rng=random.Random(0))[1]["content"] == "cba"
    got = reverse_sft_messages(row, corrupt=1.0, rng=random.Random(0))[1]["content"]
    assert got in {"bca", "cab"}


def test_sft_drawer_is_seeded_and_draws_from_the_rows():
    train, _ = make_last_letter_rows(40, 0, seed=0)
    draw = sft_drawer("last", train, corrupt=0.0)
    a = [draw(random.Random(5)) for _ in range(3)]
    assert a == [draw(random.Random(5)) for _ in range(3)]
    prompts = {r["prompt"]: r["answer"] for r in train}
    rng = random.Random(0)
    for _ in range(50):
        user, assistant = draw(rng)
        assert prompts[user["content"]] == assistant["content"]


def test_sft_drawer_feeds_the_renderer(tiny_model_dir):
    from transformers import AutoTokenizer

    from asyncrl.rollout.renderers import renderer_for

    renderer = renderer_for(AutoTokenizer.from_pretrained(tiny_model_dir))
    train, _ = make_reverse_rows(10, 0, seed=0)
    tokens, weights = renderer.build_supervised_example(
        sft_drawer("reverse", train)(random.Random(0))
    )
    assert len(tokens) == len(weights) and 0 < sum(weights) < len(weights)


def test_registry_and_argument_checks():
    assert set(TASKS) == {"last", "reverse"}
    assert get_task("last").reward is last_letter_reward
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="corrupt"):
        sft_drawer("last", [{"id": "a", "prompt": "last ab", "answer": "b"}], corrupt=1.5)
    with pytest.raises(ValueError, match="at least one row"):
        sft_drawer("last", [])
