"""Server processes never outlive the run that started them: the kernel kills a server whose
parent died (even by SIGKILL, where no atexit hook runs), and a later run reaps the process
group an earlier one recorded. Real processes (a sleeping python stands in for vLLM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncrl.sync.deployment import (
    PGID_SUFFIX,
    is_server_process,
    process_group_members,
    reap_stale_groups,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc, prctl")

SLEEPER = "import sys, time; time.sleep(120)"
# a stand-in for vLLM: an API server whose engine is its own child process
SERVER = (
    "import subprocess, sys, time; "
    f"engine = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); "
    "print(engine.pid, flush=True); time.sleep(120)"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _spawn_from_child(tmp_path: Path) -> tuple[subprocess.Popen[str], int, int]:
    """A python process that starts SERVER through the manager's launcher; returns it, the
    server's group id and its engine's pid."""
    parent_code = f"""
import os, sys, time
from pathlib import Path
from asyncrl.sync.deployment import _spawn
proc = _spawn([sys.executable, "-c", {SERVER!r}], dict(os.environ),
              Path({str(tmp_path)!r}) / "vllm-1.log")
print(proc.pid, flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pgid = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while len(process_group_members(pgid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # launcher, server, engine
    members = process_group_members(pgid)
    assert len(members) == 3, members
    engine = max(members)  # started last
    return parent, pgid, engine


def test_server_and_engine_die_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    parent, pgid, engine = _spawn_from_child(tmp_path)
    try:
        assert (tmp_path / f"vllm-1{PGID_SUFFIX}").read_text().strip() == str(pgid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_dead(engine), "the engine outlived the SIGKILLed parent"
        assert _wait_dead(pgid)
        assert process_group_members(pgid) == []
    finally:
        parent.kill()
        parent.wait()


def test_the_group_goes_when_the_server_dies(tmp_path: Path) -> None:
    parent, pgid, engine = _spawn_from_child(tmp_path)
    try:
        server = next(p for p in process_group_members(pgid) if p not in (pgid, engine))
        os.kill(server, signal.SIGKILL)  # the API server crashes: its engine must not linger
        assert _wait_dead(engine), "the engine outlived its server"
    finally:
        parent.kill()
        parent.wait()


# an orphaned vLLM worker as it really looks: retitled, nothing vLLM-like on its command line
RETITLED = (
    "import ctypes, time; ctypes.CDLL(None).prctl(15, b'VL' + b'LM::Worker'); "  # PR_SET_NAME
    "time.sleep(120)"
)


def test_a_retitled_engine_process_is_recognised_and_reaped(tmp_path: Path) -> None:
    worker = subprocess.Popen([sys.executable, "-c", RETITLED], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker.pid}/comm").read_bytes().strip() != b"VLLM::Worker":
            assert time.monotonic() < deadline, "the stand-in did not retitle itself"
            time.sleep(0.05)
        assert b"vllm" not in Path(f"/proc/{worker.pid}/cmdline").read_bytes().lower()
        assert is_server_process(worker.pid)
        assert not is_server_process(os.getpid())
        (tmp_path / f"vllm-1{PGID_SUFFIX}").write_text(f"{worker.pid}\n")
        assert reap_stale_groups(tmp_path) == [worker.pid]
        worker.wait(timeout=10)
        assert worker.returncode == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_a_later_run_reaps_the_group_an_earlier_one_recorded(tmp_path: Path) -> None:
    # an orphaned "engine": its command line names vllm, its group leader is gone
    engine = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, "vllm.v1.engine"], start_new_session=True
    )
    bystander = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    try:
        (tmp_path / f"vllm-1{PGID_SUFFIX}").write_text(f"{engine.pid}\n")
        (tmp_path / f"vllm-2{PGID_SUFFIX}").write_text(f"{bystander.pid}\n")  # a recycled pid
        (tmp_path / f"vllm-3{PGID_SUFFIX}").write_text("not a pid\n")
        assert process_group_members(engine.pid) == [engine.pid]
        assert reap_stale_groups(tmp_path) == [engine.pid]
        engine.wait(timeout=10)
        assert engine.returncode == -signal.SIGKILL
        assert _alive(bystander.pid), "a process that is not a vLLM server was killed"
        assert list(tmp_path.glob(f"*{PGID_SUFFIX}")) == []  # records are consumed
    finally:
        for proc in (engine, bystander):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
