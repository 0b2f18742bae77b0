"""TrainingClient: a local torch model behind the Tinker / Fireworks training API.

Every method returns a :class:`TrainFuture` (awaitable, and ``.result(timeout)``). Work runs on
ONE worker thread, so calls execute in submission order and an asyncio program calling the
client stays responsive.

Invariants:
- ``forward_backward_custom`` runs exactly one forward and one backward: the loss function
  receives the live logprob tensors (``requires_grad=True``) of that single forward.
- Gradients accumulate across ``forward_backward_custom`` calls until ``optim_step``, which
  applies them (AdamW, optional grad-norm clipping) and zeroes them.
- ``save_state`` writes weights, optimizer, step and RNG state (DCP); restoring it and
  repeating the same calls reproduces the same losses bit for bit on CPU.
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from asyncrl.errors import (
    CheckpointError,
    ClosedResourceError,
    ConfigError,
    DataError,
    SnapshotError,
)
from asyncrl.logging import get_logger
from asyncrl.models import check_model_dir
from asyncrl.trainer import state as train_state
from asyncrl.trainer.futures import TrainFuture
from asyncrl.trainer.types import AdamParams, Datum

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
LossFn = Callable[[list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]
log = get_logger("asyncrl.trainer")

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Result of ``forward_backward_custom``: the loss value, the loss metrics, and logprobs."""

    loss: float
    metrics: dict[str, float]
    logprobs: list[torch.Tensor] = field(repr=False)


@dataclass(frozen=True)
class OptimStepResult:
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class SaveSamplerResult:
    """A written sampler snapshot (HF safetensors base, or XOR delta) and what it cost."""

    path: Path
    snapshot_name: str
    snapshot_identity: str
    kind: str
    previous_snapshot_identity: str | None
    nbytes: int
    save_s: float  # collecting the weights (a copy only for ``source_identity``)
    encode_s: float  # conversion to the sampler dtype, XOR/filter/zstd, checksums, file write

    @property
    def incremental_snapshot_metadata(self) -> dict[str, str] | None:
        """What ``hotload_and_wait`` needs for a delta (None for a base)."""
        if self.kind == "base" or self.previous_snapshot_identity is None:
            return None
        return {"previous_snapshot_identity": self.previous_snapshot_identity}


class _Worker:
    """One thread that runs submitted calls in order, shared by a client and its references."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncrl-train")
        self._lock = threading.Lock()
        self._futures: weakref.WeakSet[TrainFuture[Any]] = weakref.WeakSet()
        self.closed = False

    def check_open(self, op: str) -> None:
        if self.closed:
            raise ClosedResourceError(f"cannot call {op}: the training client is closed")

    def submit(self, op: str, fn: Callable[[], T]) -> TrainFuture[T]:
        with self._lock:
            self.check_open(op)
            fut = TrainFuture(self._pool.submit(fn), op)
            self._futures.add(fut)
        return fut

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._pool.shutdown(wait=True)
        for fut in list(self._futures):
            fut.report_if_unread("client_closed")


def _resolve_dtype(dtype: str | Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def batch_logprobs(model: Any, datums: Sequence[Datum], pad_id: int) -> list[torch.Tensor]:
    """Target-token logprobs of each datum from ONE padded forward pass."""
    import torch
    import torch.nn.functional as F

    if not datums:
        raise DataError("expected at least one datum, got an empty list")
    lengths = [d.model_input.length for d in datums]
    if min(lengths) < 1:
        raise DataError(f"datum {lengths.index(min(lengths))} has an empty model_input")
    B, T = len(datums), max(lengths)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    targets_BT = torch.zeros((B, T), dtype=torch.long)
    mask_BT = torch.zeros((B, T), dtype=torch.long)
    for i, d in enumerate(datums):
        n = lengths[i]
        input_ids_BT[i, :n] = torch.tensor(d.model_input.tokens, dtype=torch.long)
        targets_BT[i, :n] = d.tensor("target_tokens", torch.long)
        mask_BT[i, :n] = 1
    vocab = model.config.vocab_size
    if int(targets_BT.max()) >= vocab or int(input_ids_BT.max()) >= vocab:
        raise DataError(f"token id out of range for vocab_size={vocab}")
    logits_BTV = model(input_ids=input_ids_BT, attention_mask=mask_BT).logits
    logprobs_BT = -F.cross_entropy(
        logits_BTV.float().reshape(B * T, -1), targets_BT.reshape(-1), reduction="none"
    ).reshape(B, T)
    return [logprobs_BT[i, : lengths[i]] for i in range(B)]


SUPPORT_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model")


def support_files(model_dir: Path) -> list[str]:
    """Config / tokenizer / template files of an HF dir (everything but the weights)."""
    return sorted(
        p.name
        for p in model_dir.iterdir()
        if p.is_file() and p.suffix in SUPPORT_FILE_SUFFIXES and not p.name.endswith(".index.json")
    )


def serving_tensors(model: Any) -> dict[str, torch.Tensor]:
    """HF tensor names -> the model's live tensors (detached, not copied); tied lm_head left
    out. They change with the next optimizer step: copy before that."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


def serving_state_dict(model: Any, dtype: Any) -> dict[str, torch.Tensor]:
    """HF tensor names -> contiguous CPU copies in ``dtype``; tied lm_head left out."""
    return {
        name: tensor.to("cpu", dtype).contiguous()
        for name, tensor in serving_tensors(model).items()
    }


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    import json

    config = json.loads(config_path.read_text())
    config["dtype"] = dtype  # transformers >= 5 spelling; vLLM reads it too
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


class _ModelHolder:
    """State shared by the compute functions: the model and its tokenizer's pad id."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id

    def forward(self, datums: Sequence[Datum]) -> list[torch.Tensor]:
        import torch

        with torch.no_grad():
            return [lp.detach() for lp in batch_logprobs(self.model, datums, self.pad_id)]


class ReferenceClient:
    """A frozen copy of the policy for reference logprobs: ``forward`` only."""

    def __init__(self, holder: _ModelHolder, worker: _Worker) -> None:
        self._holder = holder
        self._worker = worker

    def forward(self, datums: Sequence[Datum]) -> TrainFuture[list[torch.Tensor]]:
        data = list(datums)
        return self._worker.submit("reference.forward", lambda: self._holder.forward(data))


class TrainingClient:
    """A local torch policy with forward / forward_backward_custom / optim_step / checkpoints."""

    def __init__(
        self, model: Any, *, model_dir: Path, checkpoint_dir: Path, pad_id: int, seed: int
    ) -> None:
        import torch

        self._holder = _ModelHolder(model, pad_id)
        self._worker = _Worker()
        self.model_dir = model_dir
        self.checkpoint_dir = checkpoint_dir
        self.seed = seed
        self._step = 0
        self.sampler_dtype = "bfloat16"
        # host-side bytes of recent sampler snapshots, by identity: deltas are XORed against
        # them (never against bytes read back from a deployment)
        self._host_snapshots: dict[str, Any] = {}
        self._last_identity: str | None = None
        params = [p for p in model.parameters() if p.requires_grad]
        self._optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-8)

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        seed: int = 0,
        dtype: str | Any = "float32",
        checkpoint_dir: str | Path | None = None,
    ) -> TrainingClient:
        """Load an HF-format model directory for training (float32 by default on CPU)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(model_dir)
        check_model_dir(path)
        torch_dtype = _resolve_dtype(dtype)
        torch.manual_seed(seed)
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"model directory {path}: config.json is not usable: {exc}") from exc
        # safetensors only: pickled *.bin weights would run arbitrary code when loaded
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
        model.eval()  # no dropout: training is deterministic; gradients still flow
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        # absolute: snapshot paths are handed to a server whose root is this directory
        ckpt = Path(checkpoint_dir if checkpoint_dir is not None else "checkpoints").absolute()
        log.info("trainer_loaded", model_dir=str(path), dtype=str(torch_dtype), seed=seed)
        return cls(model, model_dir=path, checkpoint_dir=ckpt, pad_id=int(pad), seed=seed)

    @property
    def model(self) -> Any:
        """The underlying torch module (read it only between calls)."""
        return self._holder.model

    @property
    def step(self) -> int:
        """Number of optimizer steps applied so far."""
        return self._step

    @property
    def states_root(self) -> Path:
        return self.checkpoint_dir / "states"

    def create_reference(self) -> ReferenceClient:
        """A frozen copy of the current weights (``forward`` only), e.g. for ref logprobs."""
        self._worker.check_open("create_reference")
        frozen = copy.deepcopy(self._holder.model)
        for p in frozen.parameters():
            p.requires_grad_(False)
        return ReferenceClient(_ModelHolder(frozen, self._holder.pad_id), self._worker)

    # ------------------------------------------------------------------------------ compute
    def forward(self, datums: Sequence[Datum]) -> TrainFuture[list[torch.Tensor]]:
        """Per-datum target-token logprobs under the current weights (no grad)."""
        data = list(datums)
        return self._worker.submit("forward", lambda: self._holder.forward(data))

    def forward_backward_custom(
        self, datums: Sequence[Datum], loss_fn: LossFn
    ) -> TrainFuture[ForwardBackwardOutput]:
        """One forward, ``loss_fn(data, logprobs_list)``, one backward; gradients accumulate."""
        data = list(datums)
        return self._worker.submit("forward_backward_custom", lambda: self._fwd_bwd(data, loss_fn))

    def _fwd_bwd(self, data: list[Datum], loss_fn: LossFn) -> ForwardBackwardOutput:
        import torch

        logprobs = batch_logprobs(self._holder.model, data, self._holder.pad_id)
        out = loss_fn(data, logprobs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("loss_fn must return (loss_tensor, metrics_dict)")
        loss, metrics = out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError("loss_fn must return a scalar tensor that depends on the logprobs")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is not finite ({value}); gradients were not applied")
        loss.backward()
        return ForwardBackwardOutput(
            loss=value,
            metrics={k: float(v) for k, v in metrics.items()},
            logprobs=[lp.detach() for lp in logprobs],
        )

    def optim_step(self, params: AdamParams) -> TrainFuture[OptimStepResult]:
        """Apply the accumulated gradients with AdamW, then zero them."""
        return self._worker.submit("optim_step", lambda: self._optim_step(params))

    def _optim_step(self, hp: AdamParams) -> OptimStepResult:
        import torch

        params = [p for p in self._holder.model.parameters() if p.requires_grad]
        if all(p.grad is None for p in params):
            raise RuntimeError(
                "optim_step with no accumulated gradients; call forward_backward_custom first"
            )
        for group in self._optimizer.param_groups:
            group.update(
                lr=hp.learning_rate,
                betas=(hp.beta1, hp.beta2),
                eps=hp.eps,
                weight_decay=hp.weight_decay,
            )
        max_norm = hp.grad_clip_norm if hp.grad_clip_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._step += 1
        metrics = {"grad_norm": grad_norm, "learning_rate": hp.learning_rate}
        return OptimStepResult(step=self._step, metrics=metrics)

    # -------------------------------------------------------------------------- checkpoints
    def _train_state(self) -> dict[str, Any]:
        import torch
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._holder.model, self._optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "meta": {"step": torch.tensor(self._step), "rng": torch.get_rng_state()},
        }

    def save_state(self, name: str, ttl_seconds: float | None = None) -> TrainFuture[Path]:
        """Write weights + optimizer + step + RNG (DCP) under ``checkpoint_dir/states/name``."""
        return self._worker.submit("save_state", lambda: self._save_state(name, ttl_seconds))

    def _save_state(self, name: str, ttl_seconds: float | None) -> Path:
        train_state.prune_expired(self.states_root)
        path = train_state.save_dcp_state(
            self.states_root, name, self._train_state(), step=self._step, ttl_seconds=ttl_seconds
        )
        log.info("train_state_saved", path=str(path), step=self._step)
        return path

    def load_state_with_optimizer(self, path: str | Path) -> TrainFuture[int]:
        """Restore weights, optimizer, step and RNG from a ``save_state`` path; return step."""
        return self._worker.submit(
            "load_state_with_optimizer", lambda: self._load_state(Path(path), optimizer=True)
        )

    def load_state(self, path: str | Path) -> TrainFuture[int]:
        """Restore weights only (from a train state or an HF / sampler base dir)."""
        return self._worker.submit("load_state", lambda: self._load_state(Path(path), False))

    def _load_state(self, path: Path, optimizer: bool) -> int:
        import torch
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if not optimizer and not (path / train_state.SIDECAR).exists():
            return self._load_hf_weights(path)
        info = train_state.read_state_info(path)
        sd = self._train_state()
        if not optimizer:
            sd = {"model": sd["model"]}
        train_state.load_dcp_state(path, sd)
        if optimizer:
            set_state_dict(
                self._holder.model,
                self._optimizer,
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
            )
            self._step = int(sd["meta"]["step"])
            torch.set_rng_state(sd["meta"]["rng"])
        else:
            set_model_state_dict(self._holder.model, sd["model"])
        self._optimizer.zero_grad(set_to_none=True)
        log.info("train_state_loaded", path=str(path), step=info.step, optimizer=optimizer)
        return self._step

    def _load_hf_weights(self, path: Path) -> int:
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise train_state.CheckpointError(
                f"{path} is {train_state.describe_kind(path)}; no weights found"
            )
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(f))
        model = self._holder.model
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [
            m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)
        ]
        if missing or unexpected:
            raise train_state.CheckpointError(
                f"weights in {path} do not match the model: missing={missing[:5]} "
                f"unexpected={unexpected[:5]}"
            )
        if model.config.tie_word_embeddings:
            model.tie_weights()
        log.info("weights_loaded", path=str(path))
        return self._step

    def set_step(self, step: int) -> TrainFuture[int]:
        """Set the optimizer step counter (e.g. 0 after initialising from another run)."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")

        def run() -> int:
            self._step = step
            return step

        return self._worker.submit("set_step", run)

    @property
    def sampler_root(self) -> Path:
        return self.checkpoint_dir / "sampler"

    def save_weights_for_sampler_ext(
        self,
        name: str,
        checkpoint_type: str = "base",
        *,
        previous_snapshot_identity: str | None = None,
        source_identity: str | None = None,
        consume_previous: bool = False,
    ) -> TrainFuture[SaveSamplerResult]:
        """Write the current weights for serving under ``checkpoint_dir/sampler/name``.

        ``"base"``: full weights in ``sampler_dtype`` (an HF dir that vLLM and transformers
        load). ``"delta"``: XOR against ``previous_snapshot_identity`` (default: the last
        snapshot this client wrote), byte-plane shuffled and zstd-compressed; a delta with no
        base in the chain raises DeltaChainError. ``source_identity`` writes the weights of an
        earlier snapshot of this client (kept host-side) instead of the live weights: a base
        that replaces a rejected delta holds exactly that delta's weights.

        ``consume_previous=True`` (what the WeightSyncer passes: its next delta is computed
        against this one, or it sends a base): a delta of the live weights is written over the
        host bytes of the snapshot it is computed on (one host copy of the model, not two, and
        no fresh memory), which is then no longer held, also when the write fails; a later
        delta on that identity raises DeltaChainError. By default it stays held, so that
        further deltas can be computed against it."""
        if checkpoint_type not in ("base", "delta"):
            raise ConfigError(f"checkpoint_type must be 'base' or 'delta', got {checkpoint_type!r}")
        return self._worker.submit(
            f"save_weights_for_sampler_ext({checkpoint_type})",
            lambda: self._save_sampler(
                name, checkpoint_type, previous_snapshot_identity, source_identity,
                consume_previous,
            ),
        )

    def _save_sampler(
        self, name: str, kind: str, previous: str | None, source: str | None, consume: bool
    ) -> SaveSamplerResult:
        import time

        from asyncrl.errors import DeltaChainError
        from asyncrl.sync import snapshot

        t0 = time.perf_counter()
        if source is not None:
            if source not in self._host_snapshots:
                raise DeltaChainError(f"snapshot {source} is no longer held by this client")
            tensors = snapshot.to_torch(self._host_snapshots[source])
        else:  # converted to the sampler dtype while it is written (no full-size copy first)
            tensors = serving_tensors(self._holder.model)
        t1 = time.perf_counter()
        if kind == "delta":
            previous = previous or self._last_identity
            if previous is None or previous not in self._host_snapshots:
                raise DeltaChainError(
                    f"cannot save delta {name!r}: no base snapshot {previous or ''} in this "
                    "client's chain; save a base first"
                )
        else:
            previous = None
        # what _remember would drop after this write goes now: its buffers are then reused for
        # the new snapshot's bytes instead of fresh memory (one copy of the model less). If the
        # write fails they stay dropped: a later delta on one of them is a DeltaChainError (the
        # weight syncer then sends a base)
        self._keep_only(previous, source, self._last_identity)
        # a delta of the live weights that may consume its previous snapshot turns its bytes
        # into the new ones in place, unless another held snapshot shares them
        in_place = consume and kind == "delta" and source is None and self._exclusive(previous)
        try:
            host = self._write_snapshot(name, kind, tensors, previous, in_place)
        except OSError as exc:  # snapshot.py removed its temp dir: nothing looks valid
            raise SnapshotError(
                f"cannot write sampler snapshot {self.sampler_root / name}: "
                f"{train_state.describe_os_error(exc)}; nothing was saved"
            ) from exc
        finally:
            if in_place and previous is not None:  # consumed, also by a failed write (its
                self._host_snapshots.pop(previous, None)  # bytes may then be half turned)
        t2 = time.perf_counter()
        self._remember(host, keep=None if in_place else previous)
        path = self.sampler_root / name
        nbytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        log.info(
            "sampler_snapshot_saved",
            name=name,
            kind=kind,
            identity=host.identity,
            previous_snapshot_identity=previous,
            bytes=nbytes,
        )
        return SaveSamplerResult(
            path, name, host.identity, kind, previous, nbytes, t1 - t0, t2 - t1
        )

    def _write_snapshot(
        self,
        name: str,
        kind: str,
        tensors: dict[str, torch.Tensor],
        previous: str | None,
        in_place: bool = False,
    ) -> Any:
        from asyncrl.sync import snapshot

        dtype = snapshot.dtype_name(_resolve_dtype(self.sampler_dtype))
        if kind == "base":
            extras = {f: self.model_dir / f for f in support_files(self.model_dir)}
            return snapshot.write_base(
                self.sampler_root, name, tensors, dtype=dtype, extra_files=extras
            )[1]
        assert previous is not None
        return snapshot.write_delta(
            self.sampler_root, name, tensors, self._host_snapshots[previous], dtype=dtype,
            in_place=in_place,
        )[1]

    def _exclusive(self, identity: str | None) -> bool:
        """Whether no other held snapshot shares bytes with ``identity``'s (a delta written
        from another held snapshot's weights keeps the arrays of its unchanged tensors)."""
        from asyncrl.sync import snapshot

        held = self._host_snapshots.get(identity) if identity is not None else None
        return held is not None and not any(
            snapshot.shares_bytes(held, other)
            for key, other in self._host_snapshots.items() if key != identity
        )

    def _keep_only(self, *identities: str | None) -> None:
        """Drop the host bytes of every snapshot but these (freed buffers are reused)."""
        self._host_snapshots = {
            k: v for k, v in self._host_snapshots.items() if k in identities
        }

    def _remember(self, host: Any, keep: str | None) -> None:
        """Keep the new snapshot's host bytes, the one it was based on, and the most recent
        one before it (a side export, e.g. a promotable base, must not evict what the weight
        syncer's next delta is computed against); drop the rest."""
        self._keep_only(keep, self._last_identity)
        self._host_snapshots[host.identity] = host
        self._last_identity = host.identity

    def export_hf(self, out_dir: str | Path, *, dtype: str = "bfloat16") -> TrainFuture[Path]:
        """Write the current weights as an HF model directory (config, tokenizer copied)."""
        return self._worker.submit("export_hf", lambda: self._export_hf(Path(out_dir), dtype))

    def _export_hf(self, out: Path, dtype: str) -> Path:
        import shutil

        from safetensors import SafetensorError
        from safetensors.torch import save_file

        torch_dtype = _resolve_dtype(dtype)
        tensors = serving_state_dict(self._holder.model, torch_dtype)
        tmp = out.with_name(f".tmp-{out.name}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in support_files(self.model_dir):
                shutil.copy2(self.model_dir / name, tmp / name)
            _set_config_dtype(tmp / "config.json", dtype)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except (OSError, SafetensorError) as exc:  # safetensors reports "I/O error: ..."
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"cannot export the model to {out}: {train_state.describe_os_error(exc)}"
            ) from exc
        return out

    # ------------------------------------------------------------------------------ closing

    def close(self) -> None:
        """Finish queued work, report failed futures nobody read, release the worker."""
        self._worker.close()

    async def aclose(self) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> TrainingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
