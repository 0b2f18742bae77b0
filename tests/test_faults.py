"""Failpoints (asyncrl.chaos.faults): parsing, the N-th hit, raise, and a real SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from asyncrl.chaos import faults
from asyncrl.chaos.faults import ENV_VAR, Failpoint, InjectedFault, failpoint, parse_failpoints
from asyncrl.errors import AsyncRLError, ConfigError


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    faults.reset()
    yield
    faults.reset()


def test_parse_entries() -> None:
    assert parse_failpoints("state.before_rename=kill") == {
        "state.before_rename": Failpoint("state.before_rename", "kill", None)
    }
    assert parse_failpoints(" a=raise@2 , b-c_d.e=kill@10 ,") == {
        "a": Failpoint("a", "raise", 2),
        "b-c_d.e": Failpoint("b-c_d.e", "kill", 10),
    }
    assert parse_failpoints("") == {}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("state.before_rename", "malformed"),
        ("a=explode", "unknown action 'explode'"),
        ("a=kill@0", "@N must be >= 1"),
        ("a=kill@x", "malformed"),
        ("a=kill@-1", "malformed"),
        ("a b=kill", "malformed"),
        ("=kill", "malformed"),
        ("a=kill,a=raise", "named more than once"),
    ],
)
def test_malformed_value_is_config_error_naming_the_entry(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=ENV_VAR) as info:
        parse_failpoints(value)
    assert needle in str(info.value)


def test_unset_or_unnamed_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    failpoint("anything")
    monkeypatch.setenv(ENV_VAR, "")
    failpoint("anything")
    monkeypatch.setenv(ENV_VAR, "other=raise")
    failpoint("anything")


def test_malformed_env_raises_at_first_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "x=boom")
    with pytest.raises(ConfigError, match="unknown action"):
        failpoint("x")
    with pytest.raises(ConfigError):
        faults.check_failpoints()


def test_raise_every_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "disk=raise")
    for _ in range(3):
        with pytest.raises(InjectedFault) as info:
            failpoint("disk")
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, AsyncRLError)
    assert err.errno == errno.EIO and "'disk'" in str(err) and "hit 3" in str(err)


def test_raise_on_nth_hit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "p=raise@3,q=raise@1")
    failpoint("p")
    failpoint("p")
    with pytest.raises(InjectedFault, match="hit 3"):
        failpoint("p")
    failpoint("p")  # only the 3rd
    with pytest.raises(InjectedFault):
        failpoint("q")  # counted per name


def test_changed_value_is_reparsed_and_counts_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "p=raise@2")
    failpoint("p")
    monkeypatch.setenv(ENV_VAR, "p=raise@2 ")  # another value: parsed afresh, counts reset
    failpoint("p")
    with pytest.raises(InjectedFault):
        failpoint("p")
    assert faults.check_failpoints() == {"p": Failpoint("p", "raise", 2)}


def test_kill_sends_sigkill_to_the_process_itself() -> None:
    code = (
        "from asyncrl.chaos.faults import failpoint\n"
        "failpoint('here'); print('first hit passed', flush=True)\n"
        "failpoint('here'); print('not reached', flush=True)\n"
    )
    env = {**os.environ, ENV_VAR: "here=kill@2"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "first hit passed\n"
