"""structlog set-up: events as dotted names with key-value pairs, keys redacted.

JSON lines when stdout is not a terminal (journald, files, pipes), a readable
console rendering on one. A processor masks anything that looks like an API
key, plus every secret the daemon loaded (registered with :func:`add_secret`),
wherever it appears in the event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Shapes of real provider keys and bearer tokens: long runs of key-ish characters
# with a known prefix, Zhipu's "<32 hex>.<16 chars>", or anything after "Bearer ".
_KEY_PATTERNS = [
    r"(?<![A-Za-z0-9])(?:sk|nvapi|pk|rk|ak)-[A-Za-z0-9_\-]{16,}",  # not inside "task-..."
    r"[0-9a-f]{32}\.[A-Za-z0-9]{16}",
    r"bearer\s+[A-Za-z0-9._\-]{8,}",
    r"(?:api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9._\-]{8,}",
]
REDACTED = "[REDACTED]"

_secrets: set[str] = set()
_pattern = re.compile("|".join(_KEY_PATTERNS), re.IGNORECASE)


def add_secret(value: str) -> None:
    """Never log this exact string (a key the daemon loaded)."""
    global _pattern
    if len(value) >= 6 and value not in _secrets:
        _secrets.add(value)
        literal = "|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True))
        _pattern = re.compile(f"{literal}|" + "|".join(_KEY_PATTERNS), re.IGNORECASE)


def redact_text(text: str) -> str:
    return _pattern.sub(REDACTED, text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = _redact(value)
    return event_dict


def configure(
    level: str = "info", stream: TextIO | None = None, *, json: bool | None = None
) -> None:
    """Set up structlog once per process; ``json`` defaults to "stdout is not a terminal"."""
    out = stream or sys.stdout
    as_json = (not out.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
