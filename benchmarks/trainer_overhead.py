"""TrainingClient overhead: forward_backward_custom + optim_step vs a hand-written torch loop.

Same model weights, same padded batch, same masked-NLL loss, same AdamW; the two paths are
interleaved step by step so machine noise hits both alike. Prints per-preset median step
times and the ratio client/hand (target <= 1.10).

    .venv/bin/python benchmarks/trainer_overhead.py [--presets tiny small] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from asyncrl.models import make_tiny_model
from asyncrl.trainer.client import TrainingClient
from asyncrl.types import AdamParams, Datum, ModelInput, datum_from_model_input_weights

LR = 1e-4


def make_batch(batch: int, length: int, vocab: int) -> list[Datum]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        tokens = torch.randint(3, vocab, (length,), generator=g).tolist()
        weights = [0.0] * (length // 4) + [1.0] * (length - length // 4)
        out.append(datum_from_model_input_weights(ModelInput.from_ints(tokens), weights))
    return out


def nll_loss(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    w = torch.cat([d.tensor("weights") for d in data])
    lp = torch.cat(logprobs)
    loss = -(lp * w).sum() / w.sum()
    return loss, {"loss": float(loss.detach())}


class HandLoop:
    """The plain torch loop a user would write for the same step."""

    def __init__(self, model_dir: Path, datums: list[Datum]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.95))
        B, T = len(datums), max(d.model_input.length for d in datums)
        self.ids = torch.zeros((B, T), dtype=torch.long)
        self.tgt = torch.zeros((B, T), dtype=torch.long)
        self.w = torch.zeros((B, T))
        self.mask = torch.zeros((B, T), dtype=torch.long)
        for i, d in enumerate(datums):
            n = d.model_input.length
            self.ids[i, :n] = torch.tensor(d.model_input.tokens)
            self.tgt[i, :n] = d.tensor("target_tokens")
            self.w[i, :n] = d.tensor("weights")
            self.mask[i, :n] = 1

    def step(self) -> float:
        logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits
        B, T, V = logits.shape
        lp = -F.cross_entropy(logits.reshape(B * T, V), self.tgt.reshape(-1), reduction="none")
        loss = -(lp.reshape(B, T) * self.w).sum() / self.w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def client_step(client: TrainingClient, datums: list[Datum]) -> float:
    out = client.forward_backward_custom(datums, nll_loss).result()
    client.optim_step(AdamParams(learning_rate=LR)).result()
    return out.loss


def bench(preset: str, steps: int, batch: int, length: int, workdir: Path) -> dict:
    model_dir = make_tiny_model(workdir / preset, preset=preset, seed=0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    datums = make_batch(batch, length, vocab)
    hand = HandLoop(model_dir, datums)
    client = TrainingClient.from_pretrained(model_dir, checkpoint_dir=workdir / "ckpt")
    for _ in range(3):  # warm-up both
        hand.step()
        client_step(client, datums)
    t_hand, t_client = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        hand.step()
        t1 = time.perf_counter()
        client_step(client, datums)
        t2 = time.perf_counter()
        t_hand.append(t1 - t0)
        t_client.append(t2 - t1)
    client.close()
    h, c = statistics.median(t_hand), statistics.median(t_client)
    return {
        "preset": preset,
        "hand_s": h,
        "client_s": c,
        "ratio": c / h,
        "batch": batch,
        "seq_len": length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            r = bench(preset, args.steps, args.batch, args.seq_len, Path(tmp))
            results.append(r)
            print(
                f"{preset:>8}: hand {r['hand_s'] * 1e3:7.2f} ms/step | client "
                f"{r['client_s'] * 1e3:7.2f} ms/step | ratio {r['ratio']:.3f} (target <= 1.10)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
