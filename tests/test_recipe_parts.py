"""Pure parts of the RL recipe: dataset loading, row ledger, loss wrapper, checkpoints list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asyncrl.errors import CheckpointError, ConfigError, DataError
from asyncrl.recipes.data import RowLedger, load_rows


def test_load_rows_from_jsonl_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "d.jsonl"
    good.write_text('{"id": "a", "prompt": "x"}\n\n{"prompt": "y"}\n')
    assert [r.row_id for r in load_rows(good)] == ["a", "1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_rows(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_rows([])
    with pytest.raises(DataError, match="appears more than once"):
        load_rows([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(DataError, match="row 1"):
        load_rows([{"prompt": "x"}, {"prompt": ""}])


def test_ledger_each_row_done_exactly_once_with_give_back() -> None:
    ledger = RowLedger(4)
    taken = [ledger.take() for _ in range(3)]
    assert taken == [(0, 0), (0, 1), (0, 2)]
    ledger.give_back((0, 1))  # too stale: sampled again, first in line
    ledger.finish((0, 0))
    assert ledger.take() == (0, 1)
    for i in (1, 2):
        ledger.finish((0, i))
    assert ledger.take() == (0, 3)
    ledger.finish((0, 3))
    assert ledger.state()["data_consumed"] == 4
    assert ledger.take() == (1, 0)  # all done: the next epoch starts


def test_next_epoch_opens_while_last_rows_are_out() -> None:
    ledger = RowLedger(3)
    keys = [ledger.take() for _ in range(3)]
    # nothing pending, all three out and untrained: the next epoch must not wait for them
    assert ledger.take() == (1, 0)
    for key in keys:
        ledger.finish(key)
    assert ledger.state()["done"] == {"1": []}  # epoch 0 complete and forgotten


def test_ledger_resume_takes_rows_that_were_in_flight() -> None:
    ledger = RowLedger(5)
    for _ in range(4):
        ledger.take()
    ledger.finish((0, 0))
    ledger.finish((0, 2))  # rows 1 and 3 were out (sampled, not trained) when the run stopped
    resumed = RowLedger.from_state(5, json.loads(json.dumps(ledger.state())))
    assert [resumed.take() for _ in range(3)] == [(0, 1), (0, 3), (0, 4)]
    assert resumed.consumed == 2
    with pytest.raises(DataError, match="beyond the dataset"):
        RowLedger.from_state(2, {"done": {"0": [5]}})


def test_first_minibatch_wrapper_makes_ppo_kl_zero() -> None:
    from asyncrl.recipes.async_rl_loop import first_minibatch
    from asyncrl.trainer.losses import LossConfig, make_loss_fn
    from asyncrl.types import Datum, ModelInput

    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    d = Datum(
        ModelInput.from_ints([1, 2, 3]),
        {
            "target_tokens": torch.tensor([2, 3, 4]),
            "weights": torch.tensor([0.0, 1.0, 1.0]),
            "advantages": torch.tensor([0.0, 1.0, -1.0]),
            "ref_logprobs": torch.tensor([-1.0, -2.5, -0.4]),
        },
    )
    loss, metrics = first_minibatch(make_loss_fn(LossConfig(name="grpo")))([d], [lp])
    assert metrics["ppo_kl"] == 0.0
    assert metrics["clip_frac"] == 0.0
    assert metrics["ref_kld"] > 0
    loss.backward()
    assert lp.grad is not None and lp.grad[1] < 0 < lp.grad[2]


def test_rl_config_validation_names_fields(tmp_path: Path) -> None:
    from asyncrl.config import RLConfig, load_rl_config

    base = {"log_path": str(tmp_path), "base_model": str(tmp_path), "dataset": [{"prompt": "x"}]}
    with pytest.raises(
        ConfigError, match="exactly one of reward_fn, group_reward_fn or rollout_fn"
    ):
        RLConfig(**base)
    ok = load_rl_config({**base, "reward_fn": "asyncrl.recipes.tasks:reverse_reward"})
    assert callable(ok.reward_fn)
    cases = {
        "completions_per_prompt": (1, "completions_per_prompt"),
        "max_head_offpolicy_versions": (-1, "max_head_offpolicy_versions"),
        "output_model_id": ("Bad_Name", "output_model_id"),
        "loss": ({"name": "dpo"}, "unknown loss 'dpo'"),
        "weight_sync": ({"dcp_save_interval": -2}, "dcp_save_interval"),
        "reward_fn": ("nope:missing", "cannot import"),
        "init_from_checkpoint": ("no-colon", "init_from_checkpoint"),
    }
    for key, (value, match) in cases.items():
        data = {**base, "reward_fn": len, key: value}
        with pytest.raises(ConfigError, match=match):
            RLConfig(**data)


def test_promote_rejects_bad_ids_and_missing_checkpoints(tmp_path: Path) -> None:
    from asyncrl.recipes.checkpoints import list_checkpoints, promote_checkpoint

    with pytest.raises(ConfigError, match="output_model_id"):
        promote_checkpoint(tmp_path, "-bad-")
    with pytest.raises(CheckpointError, match="no promotable checkpoint"):
        promote_checkpoint(tmp_path, "good-id")
    assert list_checkpoints(tmp_path) == []


def test_rl_loop_is_strictly_on_policy(tmp_path: Path) -> None:
    from asyncrl.recipes.rl_loop import Config, on_policy

    cfg = Config(
        log_path=tmp_path,
        base_model=tmp_path,
        dataset=[{"prompt": "x"}],
        reward_fn=len,
        max_head_offpolicy_versions=3,
        learning_rate=1e-4,
    )
    sync = on_policy(cfg)
    assert sync.max_head_offpolicy_versions == 0
    assert sync.learning_rate == 1e-4 and sync.reward_fn is len


@pytest.mark.anyio
async def test_group_reward_fn_scores_the_whole_group(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from asyncrl.config import RLConfig
    from asyncrl.recipes.async_rl_loop import Rollouts
    from asyncrl.rollout.rewards import SampleFailure
    from asyncrl.rollout.types import validate_row

    def by_length_rank(completions: list, row: object) -> list[float]:
        order = sorted(range(len(completions)), key=lambda i: len(completions[i].text))
        return [float(order.index(i)) for i in range(len(completions))]

    base = {"log_path": tmp_path, "base_model": tmp_path, "dataset": [{"prompt": "x"}]}
    row = validate_row({"id": "r", "prompt": "x"}, 0)
    outs = [SimpleNamespace(text=t) for t in ("ccc", "a", "bb")]
    rollouts = Rollouts(RLConfig(**base, group_reward_fn=by_length_rank), None, None, None)
    assert await rollouts._score(outs, row) == [2.0, 0.0, 1.0]

    short = Rollouts(RLConfig(**base, group_reward_fn=lambda c, r: [1.0]), None, None, None)
    failure = await short._score(outs, row)
    assert isinstance(failure, SampleFailure) and "expected a list of 3 rewards" in failure.cause
    nan = Rollouts(
        RLConfig(**base, group_reward_fn=lambda c, r: [0.0, float("nan"), 1.0]), None, None, None
    )
    assert isinstance(await nan._score(outs, row), SampleFailure)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_metrics_sink_asked_for_but_missing_is_a_config_error(tmp_path: Path) -> None:
    import importlib.util

    from asyncrl.metrics import MetricsWriter

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="'wandb' was asked for but is not installed"):
        MetricsWriter(tmp_path, sinks=("wandb",))
    with pytest.raises(ConfigError, match="unknown metrics sink"):
        MetricsWriter(tmp_path, sinks=("stdout",))


def test_cli_train_rejects_a_bad_config_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from asyncrl.cli import app

    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "log_path": str(tmp_path),
                "base_model": str(tmp_path),
                "dataset": [{"prompt": "x"}],
                "reward_fn": "len",
                "completions_per_prompt": 1,
            }
        )
    )
    result = CliRunner().invoke(app, ["train", str(cfg)])
    assert result.exit_code != 0
    assert "completions_per_prompt" in result.output and "reward_fn" in result.output
    (tmp_path / "broken.json").write_text("{not json")
    broken = CliRunner().invoke(app, ["train", str(tmp_path / "broken.json")])
    assert broken.exit_code != 0 and "broken.json" in broken.output


@pytest.mark.anyio
async def test_evaluate_runs_rewards_like_training_and_names_a_failing_row() -> None:
    from types import SimpleNamespace

    from asyncrl.errors import RolloutError
    from asyncrl.models import build_tokenizer
    from asyncrl.recipes.async_rl_loop import evaluate
    from asyncrl.rollout.renderers import ImChatRenderer
    from asyncrl.rollout.types import validate_row

    class Sampler:
        async def sample_with_prompt_tokens(self, prompt, n, max_tokens, temperature, **kw):
            return [SimpleNamespace(text=t) for t in ("ab", "a")[:n]]

    renderer = ImChatRenderer(build_tokenizer(128))
    rows = [validate_row({"id": "e1", "prompt": "x"}, 0)]
    mean = await evaluate(
        Sampler(),
        renderer,
        lambda c, r: float(len(c.text)),
        rows,
        n=2,
        max_tokens=4,
        temperature=1.0,
    )
    assert mean == 1.5
    with pytest.raises(RolloutError, match=r"row 'e1'.*returned None"):
        await evaluate(
            Sampler(), renderer, lambda c, r: None, rows, n=2, max_tokens=4, temperature=1.0
        )
