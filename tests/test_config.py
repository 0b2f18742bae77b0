from __future__ import annotations

import pytest

from asyncrl.config import WeightSyncConfig, parse_config, validate_output_model_id
from asyncrl.errors import ConfigError


@pytest.mark.parametrize("good", ["a", "my-model-1", "x" * 63, "0abc"])
def test_output_model_id_accepts_valid(good: str) -> None:
    assert validate_output_model_id(good) == good


@pytest.mark.parametrize("bad", ["", "-a", "a-", "A", "a_b", "x" * 64, "a.b", "a b"])
def test_output_model_id_rejects_invalid(bad: str) -> None:
    with pytest.raises(ConfigError, match="output_model_id"):
        validate_output_model_id(bad)


def test_weight_sync_config_names_bad_field() -> None:
    with pytest.raises(ConfigError, match="dcp_save_interval"):
        parse_config(WeightSyncConfig, {"dcp_save_interval": -1})
    with pytest.raises(ConfigError, match="inflight"):
        parse_config(WeightSyncConfig, {"inflight": "sometimes"})
    with pytest.raises(ConfigError, match="nope"):
        parse_config(WeightSyncConfig, {"nope": 1})
    assert parse_config(WeightSyncConfig, {"dcp_save_interval": 3}).dcp_save_interval == 3
