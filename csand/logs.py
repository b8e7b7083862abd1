"""structlog set-up: one JSON object per line (console rendering on a terminal), redacted.

Redaction is a processor, so it covers every event, whatever code emitted it: configured secrets
are replaced wherever they appear, keys that name a secret are blanked, and email addresses
(plain or URL-encoded, as in an AN filter query) are masked to ``a***@example.org``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

# Anything shaped like local@domain, valid or not ("ann@gmail" is still someone's address).
_EMAIL = re.compile(r"([^\s@\"'<>(),;:=/?&%])[^\s@\"'<>(),;:=/?&]*(@+|%40)([^\s\"'<>(),;&]+)")
_SECRET_KEYS = re.compile(r"(api_?key|token|secret|password|authorization)", re.IGNORECASE)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def mask_email(text: str) -> str:
    return _EMAIL.sub(lambda m: f"{m.group(1)}***{m.group(2)}{m.group(3)}", text)


def mask_data(value: Any) -> Any:
    """``value`` with :func:`mask_email` applied to every string in it, through dicts and lists:
    what the operator commands print, unless asked to ``--reveal``."""
    if isinstance(value, str):
        return mask_email(value)
    if isinstance(value, dict):
        return {k: mask_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_data(v) for v in value]
    return value


class Redactor:
    """structlog processor: secrets out, emails masked, recursively through values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({*self.secrets, *(s for s in secrets if s and len(s) >= 4)},
                              key=len, reverse=True)

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            return mask_email(value)
        if isinstance(value, dict):
            return {k: ("***" if _SECRET_KEYS.search(str(k)) and v else self._scrub(v))
                    for k, v in value.items()}
        if isinstance(value, list | tuple | set):
            return [self._scrub(v) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self._scrub(str(value))

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        return self._scrub(dict(event))


redactor = Redactor()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
              secrets: Iterable[str] = ()) -> None:
    stream = stream or sys.stdout
    redactor.add_secrets(secrets)
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True) if console
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (uvicorn, httpx) come out the same way:
    # JSON, redacted. httpx logs request URLs (with email filters) at INFO: warnings only.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True),
                           structlog.processors.format_exc_info, redactor],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        library = logging.getLogger(noisy)
        library.setLevel(logging.WARNING)
        library.handlers = []  # a library's own handlers would bypass JSON and redaction
        library.propagate = True


def open_private(path: Path) -> TextIO:
    """``path`` opened for appending; created owner-only (0600) whatever the umask."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a",
                     encoding="utf-8")


def get_logger(name: str) -> Any:
    """A lazy logger: it picks up :func:`configure` even when created at import time."""
    return structlog.get_logger(component=name)
