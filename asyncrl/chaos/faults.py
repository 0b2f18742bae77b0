"""Named failpoints: kill or fail the process at a precise place, chosen by an env var.

    failpoint("state.before_rename")      # in the code: a no-op unless named below

    ASYNCRL_FAILPOINTS="state.before_rename=kill"            # SIGKILL on the first hit
    ASYNCRL_FAILPOINTS="loop.after_checkpoint=kill@2"       # ... on the 2nd hit only
    ASYNCRL_FAILPOINTS="a=raise,b=kill@3"                   # several, comma-separated

Actions: ``kill`` sends SIGKILL to the process itself (a crash: no cleanup, no ``finally``,
no flush); ``raise`` raises :class:`InjectedFault` (an ``OSError`` with errno EIO, so code
that handles I/O failures treats it as one). Without ``@N`` the action runs on every hit;
with ``@N`` only on the N-th hit of that name in this process.

Invariants:
- With the variable unset or empty, ``failpoint`` is one dict lookup and a comparison.
- The variable is parsed once per distinct value (a test may change it; ``reset`` also
  clears the hit counts); a malformed value is a ``ConfigError`` naming the bad entry, raised
  by the first ``failpoint`` call (or by ``check_failpoints`` up front).
- Failpoints in the tree (a name per place):
    ``state.before_rename``      train state: DCP payload written in ``.tmp-*``, no sidecar yet
    ``checkpoint.before_record`` checkpoint complete on disk, dataloader.json not yet updated
    ``loop.after_checkpoint``    the loop saved a step's checkpoint (fully recorded)
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
from dataclasses import dataclass

from asyncrl.errors import AsyncRLError, ConfigError

__all__ = [
    "ENV_VAR",
    "Failpoint",
    "InjectedFault",
    "check_failpoints",
    "failpoint",
    "parse_failpoints",
    "reset",
]

ENV_VAR = "ASYNCRL_FAILPOINTS"
ACTIONS = ("kill", "raise")
_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)=(?P<action>[a-z]+)(?:@(?P<nth>\d+))?$")


class InjectedFault(AsyncRLError, OSError):
    """Raised by a failpoint whose action is ``raise`` (errno EIO: an injected I/O error)."""


@dataclass(frozen=True)
class Failpoint:
    name: str
    action: str  # "kill" | "raise"
    nth: int | None = None  # None: every hit; N: only the N-th hit


def parse_failpoints(value: str) -> dict[str, Failpoint]:
    """``"a=kill,b=raise@2"`` -> {name: Failpoint}; ConfigError naming a malformed entry."""
    out: dict[str, Failpoint] = {}
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise ConfigError(
                f"{ENV_VAR}: entry {entry!r} is malformed; expected NAME=ACTION or "
                f"NAME=ACTION@N (ACTION one of {', '.join(ACTIONS)}, N >= 1), comma-separated"
            )
        name, action, nth = m["name"], m["action"], m["nth"]
        if action not in ACTIONS:
            raise ConfigError(
                f"{ENV_VAR}: entry {entry!r} has unknown action {action!r}; "
                f"expected one of {', '.join(ACTIONS)}"
            )
        if nth is not None and int(nth) < 1:
            raise ConfigError(f"{ENV_VAR}: entry {entry!r}: @N must be >= 1, got {nth}")
        if name in out:
            raise ConfigError(f"{ENV_VAR}: failpoint {name!r} is named more than once")
        out[name] = Failpoint(name, action, None if nth is None else int(nth))
    return out


class _State:
    def __init__(self) -> None:
        self.raw: str | None = None
        self.points: dict[str, Failpoint] = {}
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()  # failpoints run on the loop and in worker threads


_state = _State()


def _points(raw: str) -> dict[str, Failpoint]:
    if raw != _state.raw:
        points = parse_failpoints(raw)  # raises before the cache is touched
        _state.raw, _state.points, _state.hits = raw, points, {}
    return _state.points


def check_failpoints() -> dict[str, Failpoint]:
    """Parse ``ASYNCRL_FAILPOINTS`` now (ConfigError if malformed); the active failpoints."""
    with _state.lock:
        return dict(_points(os.environ.get(ENV_VAR, "")))


def failpoint(name: str) -> None:
    """Do what ``ASYNCRL_FAILPOINTS`` says for ``name`` (nothing, usually)."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    with _state.lock:
        point = _points(raw).get(name)
        if point is None:
            return
        hit = _state.hits.get(name, 0) + 1
        _state.hits[name] = hit
    if point.nth is not None and hit != point.nth:
        return
    if point.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(errno.EIO, f"injected fault at failpoint {name!r} (hit {hit})")


def reset() -> None:
    """Forget the parsed value and the hit counts (for tests)."""
    with _state.lock:
        _state.raw, _state.points, _state.hits = None, {}, {}
