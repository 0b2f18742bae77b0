"""Futures returned by the training client: awaitable and blocking (``.result(timeout)``).

Invariant: an error is never swallowed. A future that failed and whose error nobody read
(``result()``, ``await`` or ``exception()``) is logged at error level when it is
garbage-collected or when its client closes, whichever comes first (once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Generator
from typing import Any, Generic, TypeVar

from asyncrl.logging import get_logger

T = TypeVar("T")
log = get_logger("asyncrl.trainer")


class TrainFuture(Generic[T]):
    """The pending result of one training-client call."""

    __slots__ = ("__weakref__", "_future", "_op", "_reported", "_retrieved")

    def __init__(self, future: concurrent.futures.Future[T], op: str) -> None:
        self._future = future
        self._op = op
        self._retrieved = False
        self._reported = False

    @property
    def op(self) -> str:
        return self._op

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """Block until the call finishes; re-raise its error. ``TimeoutError`` on timeout."""
        try:
            value = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self._op} did not finish within {timeout}s") from None
        except BaseException:
            self._retrieved = True
            raise
        self._retrieved = True
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._future.exception(timeout)
        self._retrieved = True
        return exc

    def __await__(self) -> Generator[Any, None, T]:
        return self._await().__await__()

    async def _await(self) -> T:
        try:
            return await asyncio.wrap_future(self._future)
        finally:
            if self._future.done():
                self._retrieved = True

    def report_if_unread(self, where: str) -> None:
        """Log the error of a failed future nobody read (at most once)."""
        if self._reported or self._retrieved or not self._future.done():
            return
        if self._future.cancelled():
            return
        exc = self._future.exception()
        if exc is None:
            return
        self._reported = True
        log.error(
            "trainer_future_failed_unread",
            op=self._op,
            where=where,
            error=f"{type(exc).__name__}: {exc}",
            hint="call .result() or await the future to handle the error",
        )

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to log to
            self.report_if_unread("garbage_collected")

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<TrainFuture {self._op} {state}>"
