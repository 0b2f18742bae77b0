from __future__ import annotations

import pytest
import torch

from asyncrl.errors import ConfigError, DataError
from asyncrl.types import AdamParams, Datum, ModelInput, datum_from_model_input_weights


def test_datum_shifts_tokens_and_weights() -> None:
    tokens = [5, 6, 7, 8, 9]
    weights = [0.0, 0.0, 1.0, 1.0, 1.0]  # two prompt tokens, three trained
    d = datum_from_model_input_weights(ModelInput.from_ints(tokens), weights)
    assert d.model_input.to_ints() == [5, 6, 7, 8]
    assert d.tensor("target_tokens").tolist() == [6, 7, 8, 9]
    assert d.tensor("weights").tolist() == [0.0, 1.0, 1.0, 1.0]


def test_datum_truncates_to_max_length() -> None:
    d = datum_from_model_input_weights(ModelInput.from_ints(range(10)), [1.0] * 10, max_length=4)
    assert d.model_input.to_ints() == [0, 1, 2]
    assert d.tensor("target_tokens").tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("tokens", "weights", "match"),
    [
        ([1, 2, 3], [1.0, 1.0], "one entry per token"),
        ([1], [1.0], "at least 2 tokens"),
        ([1, 2], [1.0, float("nan")], "finite"),
        ([1, 2], [1.0, -1.0], ">= 0"),
    ],
)
def test_bad_datums_are_clear_errors(tokens: list[int], weights: list[float], match: str) -> None:
    with pytest.raises(DataError, match=match):
        datum_from_model_input_weights(ModelInput.from_ints(tokens), weights)


def test_datum_rejects_missing_or_misaligned_inputs() -> None:
    mi = ModelInput.from_ints([1, 2, 3])
    with pytest.raises(DataError, match="weights"):
        Datum(mi, {"target_tokens": torch.tensor([2, 3, 4])})
    with pytest.raises(DataError, match="expected 3"):
        Datum(mi, {"target_tokens": torch.tensor([2, 3]), "weights": torch.ones(2)})
    with pytest.raises(DataError, match="non-negative"):
        ModelInput.from_ints([1, -2])


def test_adam_params_defaults_and_validation() -> None:
    p = AdamParams(learning_rate=1e-3)
    assert (p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm) == (
        0.9,
        0.95,
        1e-8,
        0.0,
        0.0,
    )
    with pytest.raises(ConfigError, match="beta2"):
        AdamParams(learning_rate=1e-3, beta2=1.0)
    with pytest.raises(ConfigError, match="learning_rate"):
        AdamParams(learning_rate=float("nan"))
