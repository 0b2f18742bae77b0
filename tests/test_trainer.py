"""TrainingClient behaviour: logprobs, SFT progress, exact resume, wrong kinds, futures."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from asyncrl.errors import ClosedResourceError, ConfigError, WrongCheckpointKindError
from asyncrl.trainer.client import TrainingClient
from asyncrl.trainer.losses import cross_entropy_loss_fn
from asyncrl.types import AdamParams, Datum, ModelInput, datum_from_model_input_weights


def make_datums(n: int, seed: int = 0) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + i % 5
        tokens = torch.randint(3, 100, (length,), generator=g).tolist()
        weights = [0.0] * 3 + [1.0] * (length - 3)
        out.append(datum_from_model_input_weights(ModelInput.from_ints(tokens), weights))
    return out


@pytest.fixture
def client(tiny_model_dir: Path, tmp_path: Path):
    c = TrainingClient.from_pretrained(tiny_model_dir, seed=0, checkpoint_dir=tmp_path / "ckpt")
    yield c
    c.close()


def test_forward_matches_plain_transformers(client: TrainingClient, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    datums = make_datums(3)
    got = client.forward(datums).result()
    for d, lp in zip(datums, got, strict=True):
        with torch.no_grad():
            logits = ref(torch.tensor([d.model_input.tokens])).logits[0]
        want = torch.log_softmax(logits, -1).gather(-1, d.tensor("target_tokens")[:, None])[:, 0]
        assert lp.shape == want.shape
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)


def test_forward_backward_is_one_forward_one_backward(client: TrainingClient) -> None:
    calls = {"forward": 0}
    handle = client.model.register_forward_hook(
        lambda *a: calls.__setitem__("forward", calls["forward"] + 1)
    )
    seen: dict[str, bool] = {}

    def loss_fn(data, logprobs_list):
        seen["requires_grad"] = all(lp.requires_grad for lp in logprobs_list)
        return cross_entropy_loss_fn(data, logprobs_list)

    out = client.forward_backward_custom(make_datums(4), loss_fn).result()
    handle.remove()
    assert calls["forward"] == 1
    assert seen["requires_grad"]
    assert out.loss > 0 and "loss" in out.metrics
    grads = [p.grad for p in client.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_sft_steps_reduce_loss(client: TrainingClient) -> None:
    datums = make_datums(4)
    losses = []
    for _ in range(8):
        losses.append(client.forward_backward_custom(datums, cross_entropy_loss_fn).result().loss)
        res = client.optim_step(AdamParams(learning_rate=3e-3, grad_clip_norm=1.0)).result()
        assert res.metrics["grad_norm"] > 0
    assert client.step == 8
    assert losses[-1] < losses[0] * 0.8


def _steps(client: TrainingClient, n: int, seed: int) -> list[float]:
    out = []
    for i in range(n):
        fb = client.forward_backward_custom(make_datums(3, seed + i), cross_entropy_loss_fn)
        out.append(fb.result().loss)
        client.optim_step(AdamParams(learning_rate=1e-3)).result()
    return out


def test_save_state_then_resume_is_bitwise_identical(client: TrainingClient) -> None:
    _steps(client, 2, seed=10)
    path = client.save_state("step-2").result()
    first = _steps(client, 3, seed=20)
    assert client.load_state_with_optimizer(path).result() == 2
    assert client.step == 2
    again = _steps(client, 3, seed=20)
    assert first == again  # exact float equality: weights, Adam moments and step restored


def test_load_state_weights_only_does_not_restore_optimizer(client: TrainingClient) -> None:
    _steps(client, 1, seed=1)
    path = client.save_state("s1").result()
    before = [p.detach().clone() for p in client.model.parameters()]
    _steps(client, 2, seed=2)
    client.load_state(path).result()
    after = list(client.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert client.step == 3  # weights only: step is not rewound


def test_load_state_with_optimizer_rejects_hf_dir(
    client: TrainingClient, tiny_model_dir: Path
) -> None:
    with pytest.raises(WrongCheckpointKindError, match="not a DCP train state"):
        client.load_state_with_optimizer(tiny_model_dir).result()


def test_half_written_state_is_not_valid(client: TrainingClient) -> None:
    _steps(client, 1, seed=1)
    path = client.save_state("ok").result()
    (path / "asyncrl_state.json").unlink()  # as if the process died before the sidecar
    with pytest.raises(WrongCheckpointKindError):
        client.load_state_with_optimizer(path).result()


def test_expired_states_are_pruned(client: TrainingClient) -> None:
    _steps(client, 1, seed=1)
    old = client.save_state("short", ttl_seconds=0.05).result()
    time.sleep(0.1)
    kept = client.save_state("long").result()
    assert not old.exists()
    assert kept.exists()


def test_reference_is_frozen(client: TrainingClient) -> None:
    ref = client.create_reference()
    datums = make_datums(2)
    before = ref.forward(datums).result()
    _steps(client, 2, seed=5)
    after_ref = ref.forward(datums).result()
    after_policy = client.forward(datums).result()
    assert all(torch.equal(a, b) for a, b in zip(before, after_ref, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, after_policy, strict=True))


def test_failed_future_raises_on_result(client: TrainingClient) -> None:
    def bad_loss(data, logprobs_list):
        raise ValueError("boom in loss")

    fut = client.forward_backward_custom(make_datums(1), bad_loss)
    with pytest.raises(ValueError, match="boom in loss"):
        fut.result()


def test_unread_failed_future_is_logged_on_close(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = TrainingClient.from_pretrained(tiny_model_dir, checkpoint_dir=tmp_path)
    fut = c.optim_step(AdamParams(learning_rate=1e-3))  # no gradients: fails
    c.close()
    err = capsys.readouterr().err
    assert "trainer_future_failed_unread" in err
    assert "optim_step" in err
    assert fut.done()


def test_closed_client_raises(tiny_model_dir: Path, tmp_path: Path) -> None:
    c = TrainingClient.from_pretrained(tiny_model_dir, checkpoint_dir=tmp_path)
    c.close()
    with pytest.raises(ClosedResourceError):
        c.forward(make_datums(1))


def test_bad_model_dir_and_dtype(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TrainingClient.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"missing config\.json, model\.safetensors"):
        TrainingClient.from_pretrained(tmp_path / "empty")
    with pytest.raises(ConfigError, match="dtype"):
        TrainingClient.from_pretrained(tiny_model_dir, dtype="int4")


def test_event_loop_stays_responsive_and_order_is_kept(client: TrainingClient) -> None:
    order: list[str] = []

    def tagged(tag: str):
        def loss_fn(data, lps):
            time.sleep(0.05)
            order.append(tag)
            return cross_entropy_loss_fn(data, lps)

        return loss_fn

    async def main() -> int:
        ticks = 0
        futs = [client.forward_backward_custom(make_datums(2), tagged(str(i))) for i in range(4)]
        gathered = asyncio.gather(*(f._await() for f in futs))
        while not gathered.done():
            ticks += 1
            await asyncio.sleep(0.005)
        await gathered
        return ticks

    ticks = asyncio.run(main())
    assert order == ["0", "1", "2", "3"]
    assert ticks >= 10  # the loop kept running while ~0.2 s of compute happened
