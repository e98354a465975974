"""structlog set-up: events as dotted names with key-value pairs, keys redacted.

JSON lines when stdout is not a terminal (journald, files, pipes), a readable
console rendering on one. A processor masks anything that looks like an API
key, plus every secret the daemon loaded (registered with :func:`add_secret`)
and that secret's base64 forms, wherever it appears in the event.

aiohttp's own loggers (and asyncio's) go through the same processors: their
records are rendered as events on the same stream, redacted, never printed raw
to stderr by logging's last-resort handler.

Cost: every job logs one line, so the chain is kept cheap. Short strings already
redacted are remembered (event names, provider and class names repeat on every
line), the memory cleared whenever a new secret is registered; the fields our own
processors add (time, level) are not scanned; and every logger writes through one
shared writer per stream. (The JSON stays the standard library's, byte for byte:
scripts grep it.)
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, Final, TextIO

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

# Loggers of libraries that can print request data; routed through the processors.
FOREIGN_LOGGERS: Final = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "asyncio",
)
_HANDLER_NAME: Final = "dispatcher.redacting"

_secrets: set[str] = set()
_pattern = re.compile("|".join(_KEY_PATTERNS), re.IGNORECASE)

# Redacted forms of short strings seen lately; cleared whenever the patterns change.
_redacted: dict[str, str] = {}
_REMEMBERED_LEN: Final = 64  # job ids and names, not prompts or error texts
_REMEMBERED_MAX: Final = 4096
# Fields our own processors add, from our clock and our level names: never a secret.
_OWN_FIELDS: Final = frozenset({"timestamp", "level", "logger"})


def base64_forms(secret: str) -> set[str]:
    """The secret as it reads inside base64 text: standard and urlsafe, padded or not.

    Base64 packs 3 bytes into 4 characters, so a secret inside a larger encoded
    blob (``b64("Bearer " + key)``, a JSON body) reads differently depending on
    its offset modulo 3. For each offset this yields the characters that depend
    on the secret's bytes alone, besides the whole encodings of the secret itself.
    """
    raw = secret.encode()
    forms: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        start = -(-8 * offset // 6)  # the first character made of the secret's bits only
        end = 8 * (offset + len(raw)) // 6  # past the last one
        forms.add(encoded[start:end])
        if offset == 0:
            forms.add(encoded)  # padded
            forms.add(encoded.rstrip("="))
    urlsafe = {f.translate(str.maketrans("+/", "-_")) for f in forms}
    return {f for f in forms | urlsafe if len(f) >= 6}


def _literals() -> Iterator[str]:
    for secret in _secrets:
        yield secret
        yield from base64_forms(secret)


def add_secret(value: str) -> None:
    """Never log this exact string (a key the daemon loaded), nor its base64 forms."""
    global _pattern
    if len(value) >= 6 and value not in _secrets:
        _secrets.add(value)
        # Longest first: at one position the whole form wins over a shorter core.
        literal = "|".join(re.escape(s) for s in sorted(set(_literals()), key=len, reverse=True))
        _pattern = re.compile(f"{literal}|" + "|".join(_KEY_PATTERNS), re.IGNORECASE)
        _redacted.clear()  # what was clean may hold the new secret


def redact_text(text: str) -> str:
    known = _redacted.get(text)
    if known is not None:
        return known
    clean = _pattern.sub(REDACTED, text)
    if len(text) <= _REMEMBERED_LEN:
        if len(_redacted) >= _REMEMBERED_MAX:
            _redacted.clear()
        _redacted[text] = clean
    return clean


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
        if key not in _OWN_FIELDS:
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
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *shared,
        structlog.processors.format_exc_info,
        redact_processor,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # One writer for every logger: the lazy proxies build a logger on every call.
        logger_factory=_SharedWriter(structlog.WriteLogger(out)),
        cache_logger_on_first_use=False,
    )
    _route_foreign_loggers(out, numeric_level, shared, renderer)


class _SharedWriter:
    """A logger factory handing out one writer, instead of a new one per log call."""

    __slots__ = ("_writer",)

    def __init__(self, writer: structlog.WriteLogger) -> None:
        self._writer = writer

    def __call__(self, *_: Any) -> structlog.WriteLogger:
        return self._writer


def _route_foreign_loggers(out: TextIO, level: int, shared: list[Any], renderer: Any) -> None:
    """aiohttp's and asyncio's records become redacted events on ``out``, not raw stderr."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        # asyncio's debug lines ("Using selector") are noise; its warnings are not.
        logger.setLevel(max(level, logging.WARNING) if name == "asyncio" else level)
        logger.propagate = False  # the root logger (and its last-resort stderr) never sees them
