"""structlog configuration, done once per process.

``configure_logging()`` picks a console renderer for humans (default) or JSON lines
(``json=True`` or ``ASYNCRL_LOG_FORMAT=json``). Library code only calls ``get_logger``;
the first call configures with defaults if the application did not.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


class _Stderr:
    """Resolves ``sys.stderr`` at each write, so redirections made later are honoured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json: bool | None = None, level: str | int | None = None) -> None:
    """Configure structlog (and stdlib logging) for the whole process. Safe to call again."""
    global _configured
    if json is None:
        json = os.environ.get("ASYNCRL_LOG_FORMAT", "console").lower() == "json"
    if level is None:
        level = os.environ.get("ASYNCRL_LOG_LEVEL", "INFO")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    """Return a structlog logger bound to ``name`` (configures defaults on first use)."""
    if not _configured:
        configure_logging()
    return structlog.get_logger(name).bind(logger=name)
