"""TrainingCheckpoints with a real TrainingClient (no deployment needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asyncrl.errors import CheckpointError
from asyncrl.recipes.checkpoints import TrainingCheckpoints, list_checkpoints, promote_checkpoint
from asyncrl.trainer.client import TrainingClient
from asyncrl.trainer.losses import cross_entropy_loss_fn
from asyncrl.types import AdamParams, ModelInput, datum_from_model_input_weights


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _step(client: TrainingClient) -> None:
    d = datum_from_model_input_weights(ModelInput.from_ints(range(3, 15)), [0.0] * 4 + [1.0] * 8)
    client.forward_backward_custom([d], cross_entropy_loss_fn).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()


def _client(model_dir: Path, log_path: Path) -> TrainingClient:
    return TrainingClient.from_pretrained(model_dir, checkpoint_dir=log_path / "checkpoints")


@pytest.mark.anyio
async def test_save_resume_list_promote(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with _client(tiny_model_dir, run) as client:
        ckpt = TrainingCheckpoints(client, run)
        _step(client)
        await ckpt.save(
            "step-1", resumable=True, promotable=False, data_consumed={"data_consumed": 4}, step=1
        )
        _step(client)
        await ckpt.save(
            "step-2", resumable=True, promotable=True, data_consumed={"data_consumed": 8}, step=2
        )
        want = {k: v.clone() for k, v in client.model.state_dict().items()}
    loader = json.loads((run / "dataloader.json").read_text())
    assert loader["step-2"]["data_consumed"] == 8 and loader["step-2"]["promotable"] is True

    with _client(tiny_model_dir, run) as client:
        info = await TrainingCheckpoints(client, run).resume()
        assert info is not None and (info.name, info.step) == ("step-2", 2)
        assert client.step == 2
        assert all(torch.equal(v, want[k]) for k, v in client.model.state_dict().items())

    kinds = {(c.name, c.kind, c.resumable, c.promotable) for c in list_checkpoints(run)}
    assert ("step-1", "train_state", True, False) in kinds
    assert ("step-2-base", "sampler_base", False, True) in kinds

    model_dir = promote_checkpoint(run, "my-model")
    from transformers import AutoModelForCausalLM

    promoted = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    got = promoted.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(got, want["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16).float())
    with pytest.raises(CheckpointError, match="already exists"):
        promote_checkpoint(run, "my-model")
    with pytest.raises(CheckpointError, match="not promotable"):
        promote_checkpoint(run, "other", checkpoint_name="step-1-missing")


@pytest.mark.anyio
async def test_half_written_state_is_skipped_on_resume(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    with _client(tiny_model_dir, run) as client:
        ckpt = TrainingCheckpoints(client, run)
        _step(client)
        await ckpt.save("step-1", resumable=True, promotable=False, data_consumed={}, step=1)
        _step(client)
        await ckpt.save("step-2", resumable=True, promotable=False, data_consumed={}, step=2)
    (run / "checkpoints" / "states" / "step-2" / "asyncrl_state.json").unlink()  # torn write
    with _client(tiny_model_dir, run) as client:
        info = await TrainingCheckpoints(client, run).resume()
        assert info is not None and info.name == "step-1" and client.step == 1


@pytest.mark.anyio
async def test_init_from_another_run_resets_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    with _client(tiny_model_dir, tmp_path / "a") as client:
        for _ in range(3):
            _step(client)
        await TrainingCheckpoints(client, tmp_path / "a").save(
            "step-3", resumable=True, promotable=False, data_consumed={}, step=3
        )
        want = {k: v.clone() for k, v in client.model.state_dict().items()}
    with _client(tiny_model_dir, tmp_path / "b") as client:
        await TrainingCheckpoints(client, tmp_path / "b").init_from(f"{tmp_path / 'a'}:step-3")
        assert client.step == 0
        assert all(torch.equal(v, want[k]) for k, v in client.model.state_dict().items())


@pytest.mark.anyio
async def test_cli_checkpoints_and_plot(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from asyncrl.cli import app
    from asyncrl.metrics import MetricsWriter

    run = tmp_path / "run"
    with _client(tiny_model_dir, run) as client:
        _step(client)
        await TrainingCheckpoints(client, run).save(
            "step-1", resumable=True, promotable=True, data_consumed={}, step=1
        )
    writer = MetricsWriter(run)
    for step in (1, 2):
        await writer.write(
            step,
            {"rollout/reward_mean": 0.1 * step, "train/ppo_kl": 0.0, "train/ref_kld": float("nan")},
        )
    runner = CliRunner()
    listed = runner.invoke(app, ["checkpoints", "list", str(run), "--json"])
    assert listed.exit_code == 0, listed.output
    kinds = {(c["name"], c["kind"]) for c in json.loads(listed.output)}
    assert kinds == {("step-1", "train_state"), ("step-1-base", "sampler_base")}
    bad = runner.invoke(app, ["checkpoints", "promote", str(run), "--output-model-id", "Bad_"])
    assert bad.exit_code != 0 and "output_model_id" in bad.output
    good = runner.invoke(app, ["checkpoints", "promote", str(run), "--output-model-id", "m-1"])
    assert good.exit_code == 0 and (run / "models" / "m-1" / "model.safetensors").exists()
    plotted = runner.invoke(app, ["plot", str(run)])
    assert plotted.exit_code == 0, plotted.output
    assert (run / "metrics.png").stat().st_size > 1000
    assert writer.nonfinite == 2  # the NaN ref_kld was written as null, and counted
    empty = runner.invoke(app, ["plot", str(tmp_path / "nothing")])
    assert empty.exit_code != 0 and "no metrics" in empty.output
