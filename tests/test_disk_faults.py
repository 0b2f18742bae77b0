"""Unwritable and full directories under real failing filesystem conditions (we run as root,
so permission bits prove nothing): a regular file where a directory must be (EEXIST /
ENOTDIR), a file size limit (``RLIMIT_FSIZE``; CPython ignores SIGXFSZ, so writes past it
fail with EFBIG) and ``/dev/full`` (ENOSPC).

Each failure must raise a clear asyncrl error naming the path and the OS reason, and leave
nothing that a later list / resume / promote takes for valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncrl.errors import CheckpointError, ConfigError, DeltaChainError, SnapshotError
from asyncrl.metrics import MetricsWriteError, MetricsWriter, read_metrics
from asyncrl.recipes.checkpoints import TrainingCheckpoints, list_checkpoints, promote_checkpoint
from asyncrl.sync.snapshot import list_snapshots
from asyncrl.trainer import state as train_state
from asyncrl.trainer.client import TrainingClient

LIMIT = 256 * 1024  # below every weight file of the tiny model, above any log the test writes


@contextlib.contextmanager
def file_size_limit(nbytes: int = LIMIT) -> Iterator[None]:
    """Writes past ``nbytes`` fail with EFBIG in this process, until the block ends."""
    for fd in (1, 2):  # the limit also applies to a captured stdout / stderr file
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > nbytes // 2:
            pytest.skip(f"fd {fd} is a regular file of {st.st_size} bytes")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _leftovers(root: Path) -> list[str]:
    """Hidden temp files / dirs anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name)


@pytest.fixture
def client(tiny_model_dir: Path, tmp_path: Path) -> Iterator[TrainingClient]:
    with TrainingClient.from_pretrained(tiny_model_dir, checkpoint_dir=tmp_path / "ck") as c:
        yield c


def _blocked(path: Path) -> Path:
    """A regular file at ``path``: nothing can be created at or under it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file where a directory must be\n")
    return path


# --------------------------------------------------------------------------- train state (DCP)


@pytest.mark.parametrize(
    ("blocked", "reason"),
    [("ck/states", r"File exists \(EEXIST\)"), ("ck", r"Not a directory \(ENOTDIR\)")],
)
def test_save_state_where_a_file_blocks_the_directory(
    client: TrainingClient, tmp_path: Path, blocked: str, reason: str
) -> None:
    _blocked(tmp_path / blocked)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'ck' / 'states'}: {reason}"):
        client.save_state("s1").result()


def test_save_state_past_the_file_size_limit_leaves_nothing(
    client: TrainingClient, tmp_path: Path
) -> None:
    states = tmp_path / "ck" / "states"
    with file_size_limit(), pytest.raises(CheckpointError) as info:
        client.save_state("s1").result()
    assert f"cannot write train state {states / 's1'}" in str(info.value)
    assert "File too large (EFBIG)" in str(info.value)
    assert sorted(p.name for p in states.iterdir()) == []  # no .tmp-* left either
    assert train_state.list_states(states) == []
    assert client.save_state("s1").result() == states / "s1"  # the name is still free


# --------------------------------------------------------------------------- sampler snapshots


def test_snapshot_past_the_file_size_limit_leaves_nothing(
    client: TrainingClient, tmp_path: Path
) -> None:
    root = tmp_path / "ck" / "sampler"
    with file_size_limit(), pytest.raises(SnapshotError) as info:
        client.save_weights_for_sampler_ext("b1", "base").result()
    assert f"cannot write sampler snapshot {root / 'b1'}" in str(info.value)
    assert "File too large (EFBIG)" in str(info.value)
    assert list_snapshots(root) == [] and _leftovers(root) == []
    # the failed base is not part of the delta chain
    with pytest.raises(DeltaChainError, match="save a base first"):
        client.save_weights_for_sampler_ext("d1", "delta").result()
    assert client.save_weights_for_sampler_ext("b1", "base").result().path == root / "b1"


def test_snapshot_root_under_a_file(client: TrainingClient, tmp_path: Path) -> None:
    _blocked(tmp_path / "ck" / "sampler")
    with pytest.raises(SnapshotError, match=r"sampler/b1: File exists \(EEXIST\)"):
        client.save_weights_for_sampler_ext("b1", "base").result()


def test_export_past_the_file_size_limit_leaves_no_temp_dir(
    client: TrainingClient, tmp_path: Path
) -> None:
    out = tmp_path / "export" / "model"
    out.parent.mkdir()
    with file_size_limit(), pytest.raises(CheckpointError) as info:
        client.export_hf(out).result()
    assert f"cannot export the model to {out}" in str(info.value)
    assert "File too large" in str(info.value)
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- recipe checkpoints


@pytest.mark.anyio
async def test_dataloader_json_unwritable_rolls_the_state_back(
    client: TrainingClient, tmp_path: Path
) -> None:
    log_path = _blocked(tmp_path / "run") / "sub"  # dataloader.json cannot be created
    ckpt = TrainingCheckpoints(client, log_path)
    with pytest.raises(CheckpointError) as info:
        await ckpt.save("step-1", resumable=True, promotable=True, data_consumed={}, step=1)
    assert f"cannot record checkpoint 'step-1' in {log_path / 'dataloader.json'}" in str(
        info.value
    )
    assert "Not a directory (ENOTDIR)" in str(info.value)
    # the DCP state and the base written before the failure are gone
    assert train_state.list_states(client.states_root) == []
    assert list_snapshots(client.sampler_root) == []


@pytest.mark.anyio
async def test_dataloader_json_past_the_size_limit_keeps_the_previous_record(
    client: TrainingClient, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    ckpt = TrainingCheckpoints(client, run)
    await ckpt.save("step-1", resumable=True, promotable=False, data_consumed={}, step=1)
    before = (run / "dataloader.json").read_text()
    big = {"done": list(range(60_000))}  # dataloader.json would grow past the limit
    with file_size_limit(), pytest.raises(CheckpointError) as info:
        await ckpt.save("step-2", resumable=True, promotable=False, data_consumed=big, step=2)
    assert "File too large (EFBIG)" in str(info.value)
    assert (run / "dataloader.json").read_text() == before
    assert _leftovers(run) == []
    assert [s.name for s in train_state.list_states(client.states_root)] == ["step-1"]
    resumable = ckpt.find_resumable()
    assert resumable is not None and resumable.name == "step-1"


@pytest.mark.anyio
async def test_base_that_fails_after_the_state_rolls_the_state_back(
    client: TrainingClient, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _blocked(client.sampler_root)
    ckpt = TrainingCheckpoints(client, run)
    with pytest.raises(SnapshotError, match=r"File exists \(EEXIST\)"):
        await ckpt.save("final", resumable=True, promotable=True, data_consumed={}, step=3)
    assert train_state.list_states(client.states_root) == []
    assert ckpt.find_resumable() is None
    assert [c.name for c in list_checkpoints(run)] == []


@pytest.mark.anyio
async def test_promote_onto_a_blocked_models_dir(client: TrainingClient, tmp_path: Path) -> None:
    run = tmp_path / "run"
    client.checkpoint_dir = run / "checkpoints"
    await TrainingCheckpoints(client, run).save(
        "final", resumable=False, promotable=True, data_consumed={}, step=1
    )
    _blocked(run / "models")
    with pytest.raises(CheckpointError, match=r"models/my-model: Not a directory \(ENOTDIR\)"):
        promote_checkpoint(run, "my-model")
    assert (run / "models").is_file()


# --------------------------------------------------------------------------- metrics.jsonl


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda log: _blocked(log.parent), r"Not a directory \(ENOTDIR\)"),
        (lambda log: (log / "metrics.jsonl").mkdir(parents=True), r"Is a directory \(EISDIR\)"),
    ],
    ids=["log-dir-under-a-file", "metrics-jsonl-is-a-directory"],
)
def test_unusable_log_dir_is_a_config_error(tmp_path: Path, setup: object, reason: str) -> None:
    log_path = tmp_path / "run" / "logs"
    setup(log_path)  # type: ignore[operator]
    want = rf"log_path {log_path} cannot hold metrics.jsonl: {reason}"
    with pytest.raises(ConfigError, match=want):
        MetricsWriter(log_path)


@pytest.mark.anyio
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_metrics_on_a_full_disk(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(MetricsWriteError) as info:
        await writer.write(1, {"loss": 0.5})
    assert isinstance(info.value, OSError)
    assert f"cannot append step 1 to {tmp_path / 'metrics.jsonl'}" in str(info.value)
    assert "No space left on device (ENOSPC)" in str(info.value)


@pytest.mark.anyio
async def test_metrics_past_the_size_limit_leave_no_torn_line(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    pad = "x" * (LIMIT // 3)
    await writer.write(1, {"note": pad})
    await writer.write(2, {"note": pad})
    with file_size_limit(), pytest.raises(MetricsWriteError, match=r"File too large \(EFBIG\)"):
        await writer.write(3, {"note": pad})  # a part of it fits: the tail is cut off again
    await writer.write(4, {"loss": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 4]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 4]
