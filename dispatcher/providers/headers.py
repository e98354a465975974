"""What an upstream's error bodies and headers say: a message, an error code (which limit a
429 hit), Retry-After, rate limits."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal

import msgspec

_ERROR_MESSAGE_CHARS: Final = 300
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


class RateLimitInfo(msgspec.Struct, kw_only=True):
    """The request-rate limits a provider advertised in its ``x-ratelimit-*`` headers."""

    limit: int | None
    remaining: int | None
    reset_s: float | None


# --------------------------------------------------------------------------- errors and headers

_HTML_TITLE: Final = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_WHITESPACE: Final = re.compile(r"\s+")


def _truncate(text: str, limit: int = _ERROR_MESSAGE_CHARS) -> str:
    text = _WHITESPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _as_text(value: Any) -> str | None:
    """A non-empty message string from a JSON value, or None."""
    if isinstance(value, str):
        return value.strip() or None
    if value is None or isinstance(value, bool):
        return None
    return _encoder.encode(value).decode()


def _message_from_json(data: Any) -> str | None:
    if isinstance(data, list) and data:
        return _message_from_json(data[0])
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        message = _message_from_json(error)
        code = error.get("code")
        if isinstance(code, (str, int)) and not isinstance(code, bool) and str(code):
            if message and str(code) not in message:
                return f"{message} (code {code})"
            return message or f"code {code}"
        return message or _as_text(error)
    if error is not None and (text := _as_text(error)):
        return text
    for key in ("message", "msg", "detail", "title", "error_msg"):
        if (text := _as_text(data.get(key))) is not None:
            return text
    return None


def parse_error_message(payload: bytes) -> str:
    """Best-effort human message from an upstream error body; never raises.

    Understands ``{"error": {"message": ..., "code": ...}}``, ``{"error": "..."}``,
    ``{"message": ...}``, ``{"msg": ...}`` (zhipu), ``{"detail": ...}`` (NVIDIA), an
    HTML error page (its title) and plain text. The result is at most 300 characters.
    """
    try:
        try:
            message = _message_from_json(_any_decoder.decode(payload))
        except msgspec.DecodeError:
            message = None
        if message:
            return _truncate(message)
        text = payload[: _ERROR_MESSAGE_CHARS * 8].decode("utf-8", errors="replace")
        if title := _HTML_TITLE.search(text):
            text = title.group(1)
        return _truncate(text) or "(empty body)"
    except Exception:  # this runs on error paths and must never raise
        return "(unreadable error body)"


def parse_error_code(payload: bytes) -> str | None:
    """The provider's own error code, ``{"error": {"code": "1302"}}`` (a string or an int),
    as a string; None when there is none. Never raises."""
    try:
        data = _any_decoder.decode(payload)
    except msgspec.DecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, bool) or not isinstance(code, (str, int)):
        return None
    return str(code).strip() or None


# The error codes that say which limit a 429 hit, per adapter. Zhipu: 1302 is
# concurrency ("并发数过高"), 1303 frequency ("频率过高").
_LIMIT_CODES: Final[dict[str, dict[str, Literal["rate", "concurrency"]]]] = {
    "zhipu": {"1302": "concurrency", "1303": "rate"},
}


def limit_kind(adapter: str, code: str | None) -> Literal["rate", "concurrency"] | None:
    """Which limit an error code says was hit at this adapter's provider; None: it does not say."""
    return None if code is None else _LIMIT_CODES.get(adapter, {}).get(code)


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased header names; the first value wins when a name repeats."""
    result: dict[str, str] = {}
    for name, value in headers.items():
        result.setdefault(str(name).lower(), str(value))
    return result


_NUMBER: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def _number(text: str) -> float | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def retry_after_seconds(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds to wait before retrying, from ``retry-after-ms`` or ``Retry-After``.

    ``retry-after-ms`` (milliseconds) wins when valid. ``Retry-After`` may be
    delta-seconds (int or float) or an HTTP-date, measured against *now_epoch*. A time
    in the past gives 0; a missing or unreadable value gives None.
    """
    lowered = _lower_keys(headers)
    if (ms := lowered.get("retry-after-ms")) is not None and (value := _number(ms)) is not None:
        return max(0.0, value / 1000.0)
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    if (value := _number(raw)) is not None:
        return max(0.0, value)
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no zone information
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|h|m|s)")
_DURATION_UNIT_S: Final[dict[str, float]] = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ns": 1e-9,
}


def _duration_s(text: str) -> float | None:
    """Seconds from "60", "0.5s", "6m0s", "1h2m3.5s", "20ms"; None when unreadable."""
    text = text.strip()
    if (plain := _number(text)) is not None:
        return plain if plain >= 0 else None
    if not text:
        return None
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]
        position = match.end()
    return total if position == len(text) else None


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def rate_limit_headers(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """The request limits from ``x-ratelimit-*-requests`` headers; None if none are readable."""
    lowered = _lower_keys(headers)
    limit = _count(lowered.get("x-ratelimit-limit-requests"))
    remaining = _count(lowered.get("x-ratelimit-remaining-requests"))
    reset = lowered.get("x-ratelimit-reset-requests")
    reset_s = _duration_s(reset) if reset is not None else None
    if limit is None and remaining is None and reset_s is None:
        return None
    return RateLimitInfo(limit=limit, remaining=remaining, reset_s=reset_s)
