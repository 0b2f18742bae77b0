"""Bad input is a clear error: the right class from ``asyncrl.errors`` and a message naming
what is wrong (the field, the row / line, the path) and what was expected.

Cases here: dataset files (rows missing fields, wrong types, empty prompts, bad ids, files that
are not JSONL), prompts over the context limit, reward functions that raise or return NaN /
inf / None / a string (under FailFast and DropGroup), config values out of range, base model
directories missing files, and model output that is not valid UTF-8.

Covered elsewhere (not repeated here):
- validate_row on in-memory rows (missing 'prompt', empty, wrong type, bad message, not an
  object, id named in the message): tests/test_rollout_user_api.py::test_malformed_rows_name_the_row
- check_reward on None / str / NaN / inf / bool: test_rollout_user_api.py
- a JSONL line that is not JSON, a missing dataset file, duplicate ids in memory:
  tests/test_recipe_parts.py::test_load_rows_from_jsonl_and_errors
- RLConfig completions_per_prompt=1, max_head_offpolicy_versions, output_model_id 'Bad_Name',
  loss 'dpo', dcp_save_interval=-2, reward_fn 'nope:missing', init_from_checkpoint:
  tests/test_recipe_parts.py::test_rl_config_validation_names_fields; output_model_id rules:
  tests/test_config.py; a bad config file through the CLI:
  test_recipe_parts.py::test_cli_train_rejects_a_bad_config_file
- the sampler's PromptTooLongError (nothing is sent), empty / negative prompt token ids, served
  text that is not valid UTF-8 replaced and counted:
  tests/test_sampler.py (test_prompt_too_long_is_an_explicit_error_and_sends_nothing,
  test_bad_prompt_and_arguments_are_rejected,
  test_invalid_utf8_text_is_replaced_and_flagged_not_fatal)
- model dir that does not exist / lacks config.json and weights, bad dtype:
  tests/test_trainer.py::test_bad_model_dir_and_dtype; DeploymentConfig field errors:
  tests/test_deployment.py::test_config_errors_name_the_field
- hotload with a path outside the snapshot root, a symlink out of it, a wrong / missing
  bearer token, an identity that is not the served one, a delta with no base, a tampered
  file: unit level in tests/test_deployment.py (test_resolve_snapshot_path_*,
  test_check_token, test_worker_rejects_before_touching_the_engine); against a real vLLM
  server in tests/test_deployment_integration.py (test_paths_outside_the_root_are_rejected,
  test_wrong_token_is_rejected, test_wrong_chain_delta_is_rejected_and_weights_unchanged)
- unwritable / full directories: tests/test_disk_faults.py
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncrl.config import RLConfig, load_rl_config
from asyncrl.errors import ConfigError, DataError, RolloutError
from asyncrl.models import build_tokenizer, check_model_dir
from asyncrl.recipes.data import check_prompt_lengths, load_rows
from asyncrl.rollout.renderers import ImChatRenderer
from asyncrl.rollout.rewards import (
    DropGroup,
    FailFast,
    SampleFailure,
    call_with_policy,
    check_reward,
)
from asyncrl.rollout.sampler import PromptTooLongError, parse_completions
from asyncrl.rollout.types import validate_row
from asyncrl.trainer.client import TrainingClient

# ------------------------------------------------------------------------------ dataset files


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "ok"}', "", '{"answer": 3}'], r"line 3: dataset row 1: missing required "
         r"field 'prompt'"),
        (['{"prompt": 42}'], r"line 1: dataset row 0: 'prompt' must be a string or a list of "
         r"messages, got int"),
        (['{"id": "q1", "prompt": " \\t "}'], r"line 1: dataset row 0 \(id='q1'\): 'prompt' is "
         r"empty"),
        (['{"prompt": "a"}', '{"prompt": []}'], r"line 2: dataset row 1: 'prompt' has no messages"),
        (['{"prompt": [{"role": "user", "content": 5}]}'], r"line 1: .*prompt\[0\]: message "
         r"field 'content' must be a string"),
        (['"just a string"'], r"line 1: dataset row 0: expected a JSON object, got str"),
        (['{"id": {"k": 1}, "prompt": "x"}'], r"'id' must be a non-empty string or an integer, "
         r"got dict"),
        (['{"id": true, "prompt": "x"}'], r"'id' must be a non-empty string or an integer, "
         r"got bool"),
        (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "a", "prompt": "z"}'],
         r"row id 'a' appears more than once \(rows 0 and 2\)"),
    ],
    ids=["missing-prompt", "prompt-int", "prompt-blank", "no-messages", "content-int",
         "row-not-object", "id-dict", "id-bool", "duplicate-id"],
)
def test_bad_dataset_rows_name_the_file_line_and_field(
    tmp_path: Path, lines: list[str], match: str
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_rows(path)
    assert isinstance(info.value, ValueError)
    if "line" in match:
        assert str(path) in str(info.value)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: _write(d / "a.json", json.dumps([{"prompt": "x"}], indent=2).encode()),
         "holds a JSON array; expected JSONL, one JSON object per line"),
        (lambda d: _write(d / "a.jsonl.gz", gzip.compress(b'{"prompt": "x"}\n')),
         r"is not UTF-8 text \(byte 1\) \(it looks gzip-compressed: decompress it\); expected "
         "JSONL"),
        (lambda d: _write(d / "a.csv", b"prompt,answer\n2+2,4\n"),
         "line 1 is not JSON .*expected JSONL"),
        (lambda d: _write(d / "latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1")),
         r"is not UTF-8 text \(byte 15\)"),
        (lambda d: _write(d / "blank.jsonl", b"\n  \n"), "is empty: expected at least one row"),
        (lambda d: d, "is not a file"),
    ],
    ids=["json-array", "gzip", "csv", "latin-1", "blank", "directory"],
)
def test_dataset_file_that_is_not_jsonl(
    tmp_path: Path, make: Callable[[Path], Path], match: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError, match=match) as info:
        load_rows(path)
    assert f"dataset {path} " in str(info.value)


# ------------------------------------------------------------------------ prompt too long


@pytest.mark.parametrize(
    "prompt",
    ["x" * 100, [{"role": "system", "content": "s" * 50}, {"role": "user", "content": "u" * 50}]],
    ids=["text", "chat"],
)
def test_prompt_over_the_context_limit_names_the_row(prompt: Any) -> None:
    renderer = ImChatRenderer(build_tokenizer(128))
    rows = [validate_row({"id": "short", "prompt": "hi"}, 0),
            validate_row({"id": "long", "prompt": prompt}, 1)]
    check_prompt_lengths(rows[:1], renderer, max_context_len=128, max_tokens=16)  # fits
    with pytest.raises(PromptTooLongError) as info:
        check_prompt_lengths(rows, renderer, max_context_len=128, max_tokens=16)
    assert isinstance(info.value, DataError)
    n = len(renderer.build_generation_prompt(rows[1].messages()))
    assert n > 112
    assert str(info.value) == (
        f"dataset row 1 (id='long'): prompt of {n} tokens does not fit: max_context_len 128 "
        "- max_tokens 16 leaves 112"
    )


# ------------------------------------------------------------------------------ reward functions


def _raises(completion: Any, row: Any) -> float:
    raise ZeroDivisionError("division by zero in my reward")


BAD_REWARDS: list[tuple[Callable[..., Any], str]] = [
    (_raises, "ZeroDivisionError: division by zero in my reward"),
    (lambda c, r: math.nan, r"ValueError: returned nan; expected a finite float"),
    (lambda c, r: math.inf, r"ValueError: returned inf; expected a finite float"),
    (lambda c, r: -math.inf, r"ValueError: returned -inf; expected a finite float"),
    (lambda c, r: None, r"TypeError: returned None \(NoneType\); expected a finite float"),
    (lambda c, r: "1.0", r"TypeError: returned '1.0' \(str\); expected a finite float"),
    (lambda c, r: [1.0], r"TypeError: returned \[1.0\] \(list\); expected a finite float"),
]
BAD_REWARD_IDS = ["raises", "nan", "inf", "-inf", "None", "str", "list"]


@pytest.mark.anyio
@pytest.mark.parametrize(("fn", "cause"), BAD_REWARDS, ids=BAD_REWARD_IDS)
async def test_bad_reward_under_fail_fast_names_row_stage_and_cause(
    fn: Callable[..., Any], cause: str
) -> None:
    want = rf"^reward failed for row 'r7' after 1 attempt\(s\): {cause}$"
    with pytest.raises(RolloutError, match=want):
        await call_with_policy(
            fn, ("completion", "row"), policy=FailFast(), row_id="r7", stage="reward",
            validate=check_reward,
        )


@pytest.mark.anyio
@pytest.mark.parametrize(("fn", "cause"), BAD_REWARDS, ids=BAD_REWARD_IDS)
async def test_bad_reward_under_drop_group_is_recorded_with_its_cause(
    fn: Callable[..., Any], cause: str
) -> None:
    out = await call_with_policy(
        fn, ("completion", "row"), policy=DropGroup(), row_id="r8", stage="group_reward",
        validate=check_reward,
    )
    assert isinstance(out, SampleFailure)
    assert (out.row_id, out.stage, out.attempts) == ("r8", "group_reward", 1)
    assert re.fullmatch(cause, out.cause), out.cause


# ------------------------------------------------------------------------------------ config


def _base(tmp_path: Path) -> dict[str, Any]:
    return {"log_path": str(tmp_path / "run"), "base_model": str(tmp_path / "model"),
            "dataset": [{"prompt": "x"}], "reward_fn": "asyncrl.recipes.tasks:reverse_reward"}


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"learning_rate": 0}, r"learning_rate: Input should be greater than 0"),
        ({"learning_rate": -1e-5}, r"learning_rate: Input should be greater than 0"),
        ({"learning_rate": math.inf}, r"learning_rate: Input should be a finite number"),
        ({"max_steps": 0}, r"max_steps: Input should be greater than or equal to 1"),
        ({"completions_per_prompt": 0}, r"completions_per_prompt: .*greater than or equal to 2"),
        ({"prompt_groups_per_step": 0}, r"prompt_groups_per_step: .*greater than or equal to 1"),
        ({"max_tokens": 0}, r"max_tokens: .*greater than or equal to 1"),
        ({"max_tokens": 1024, "max_context_len": 1024},
         r"max_tokens \(1024\) must be < max_context_len \(1024\)"),
        ({"max_context_len": 8}, r"max_context_len: .*greater than or equal to 16"),
        ({"temperature": 0}, r"temperature: Input should be greater than 0"),
        ({"temperature": math.nan}, r"temperature: Input should be a finite number"),
        ({"kl_beta": -0.1}, r"kl_beta: .*greater than or equal to 0"),
        ({"grad_clip_norm": -1}, r"grad_clip_norm: .*greater than or equal to 0"),
        ({"rollout_workers": 0}, r"rollout_workers: .*greater than or equal to 1"),
        ({"reward_timeout_s": 0}, r"reward_timeout_s: Input should be greater than 0"),
        ({"failure_policy": "ignore"}, r"failure_policy: String should match pattern"),
        ({"failure_retries": -1}, r"failure_retries: .*greater than or equal to 0"),
        ({"weight_sync": {"dcp_save_interval": -1}},
         r"weight_sync\.dcp_save_interval: .*greater than or equal to 0"),
        ({"weight_sync": {"first_checkpoint_type": "full"}},
         r"weight_sync\.first_checkpoint_type: String should match pattern"),
        ({"loss": {"name": "ppo2"}}, r"loss\.name: .*unknown loss 'ppo2'; choose one of"),
        ({"loss": {"normalization": "per_planet"}},
         r"loss\.normalization: .*unknown normalization 'per_planet'"),
        ({"loss": {"eps_clip": -0.2}}, r"loss\.eps_clip: .*greater than or equal to 0"),
        ({"loss": {"tis_cap": 0}}, r"loss\.tis_cap: Input should be greater than 0"),
        ({"loss": {"eps_clip": math.inf}}, r"loss\.eps_clip: Input should be a finite number"),
        ({"output_model_id": "-my-model"}, r"output_model_id: .*'-my-model' is invalid"),
        ({"output_model_id": "My.Model"}, r"output_model_id: .*'My.Model' is invalid"),
        ({"metrics_sinks": ["mlflow"]}, r"metrics_sinks: .*unknown metrics sinks \['mlflow'\]"),
        ({"reward_fn": 42}, r"reward_fn: .*must be a callable or 'module:function', got 42"),
        ({"rollout_fn": "asyncrl.recipes.tasks:reverse_reward"},
         r"give exactly one of reward_fn, group_reward_fn or rollout_fn"),
        ({"learning_rat": 1e-4}, r"learning_rat: Extra inputs are not permitted"),
    ],
)
def test_config_value_out_of_range_names_the_field(
    tmp_path: Path, update: dict[str, Any], match: str
) -> None:
    data = {**_base(tmp_path), **update}
    with pytest.raises(ConfigError, match=match) as info:
        load_rl_config(data)
    assert str(info.value).startswith("invalid RLConfig: ")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match=match):  # the same through the constructor
        RLConfig(**data)


def test_config_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid RLConfig: .*valid dictionary"):
        load_rl_config([_base(tmp_path)])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- base model dir


def _remove(*names: str) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        for name in names:
            (d / name).unlink()

    return run


def _shard(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _pickled_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_remove("config.json"), r"is missing config\.json$"),
        (_remove("model.safetensors"), r"is missing model\.safetensors$"),
        (_remove("tokenizer.json"), r"is missing a tokenizer \(tokenizer\.json, tokenizer\.model "
         r"or vocab\.json \+ merges\.txt\)$"),
        (_remove("config.json", "tokenizer.json"), r"is missing config\.json, a tokenizer"),
        (_shard, r"is missing weight shard model-00002-of-00002\.safetensors \(named in "
         r"model\.safetensors\.index\.json\)$"),
        (_pickled_only,
         r"found only pickled weights \['pytorch_model\.bin'\].*never loads pickles"),
        (lambda d: (d / "config.json").write_text('{"model_type": "qwen2",'),
         r"config\.json is unreadable"),
        (lambda d: (d / "config.json").write_text("[]"),
         r"config\.json must hold a JSON object, got list"),
    ],
    ids=["no-config", "no-weights", "no-tokenizer", "two-missing", "missing-shard",
         "pickle-only", "config-truncated", "config-not-object"],
)
def test_base_model_dir_missing_files(
    tiny_model_dir: Path, tmp_path: Path, damage: Callable[[Path], None], match: str
) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    damage(model_dir)
    with pytest.raises(ConfigError, match=match) as info:
        TrainingClient.from_pretrained(model_dir)
    assert str(model_dir) in str(info.value)
    with pytest.raises(ConfigError, match=match):  # the check a deployment runs too
        check_model_dir(model_dir)


def test_base_model_path_is_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "model.safetensors", b"\0")
    with pytest.raises(ConfigError, match=rf"model directory {path} is not a directory"):
        TrainingClient.from_pretrained(path)


def test_config_json_of_an_unknown_architecture(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model_dir / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ConfigError, match=rf"model directory {model_dir}: config\.json is not "
                       "usable: .*no-such-arch"):
        TrainingClient.from_pretrained(model_dir)


# ------------------------------------------------------------------------- model output UTF-8


def _payload(text: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "token_ids": [5, 6], "finish_reason": "stop",
              "logprobs": {"token_logprobs": [-0.5, -1.5]}}
    return {"choices": [choice]}


@pytest.mark.parametrize(
    ("text", "want_text", "valid"),
    [
        ("ok\udcff", "ok\ufffd\ufffd\ufffd", False),  # a lone surrogate (JSON "\udcff")
        ("bytes lost: \ufffd", "bytes lost: \ufffd", False),  # already replaced by decoding
        (17, "17", False),  # not a string at all
        ("caf\u00e9 \U0001f600", "caf\u00e9 \U0001f600", True),
        (None, "", True),
    ],
    ids=["surrogate", "replacement-char", "not-a-string", "valid", "missing"],
)
def test_model_output_that_is_not_valid_utf8_is_flagged(
    text: Any, want_text: str, valid: bool
) -> None:
    [completion] = parse_completions(
        _payload(text), prompt=(1, 2), n=1, deployment="http://d", policy_version=3, latency_s=0.1
    )
    assert (completion.text, completion.text_valid_utf8) == (want_text, valid)
    completion.text.encode("utf-8")  # always safe to write or hand to a reward function
    assert completion.completion_tokens == (5, 6)  # the tokens are what is trained
