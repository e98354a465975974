"""Per-provider request building and answer parsing for OpenAI-compatible endpoints.

Everything here is pure: functions take bytes, dicts and header mappings and return
msgspec Structs. No I/O, no clock (callers pass ``now_epoch``), no logging.

Provider quirks handled here:

- ``openai``: the plain chat-completions body; when streaming, asks for usage on the
  final chunk with ``stream_options.include_usage``.
- ``zhipu``: thinking is switched on with a top-level ``"thinking": {"type": "enabled"}``;
  nothing extra is sent when thinking is off.
- ``hunyuan``: always ``"enable_enhancement": true`` at the top level; no thinking.
- ``nvidia``: thinking goes in a top-level ``chat_template_kwargs``. ``extra_body`` is an
  OpenAI SDK parameter, never an HTTP field, so it never appears in a body built here.
- ``siliconflow``: embeddings with ``encoding_format: "float"``.

Answers from every provider are parsed the same way. Reasoning text is read from
``reasoning_content`` (or its alias ``reasoning``); a null ``content`` reads as "".

Error handling: an answer that arrived with HTTP 200 but is not a usable answer
(not JSON, wrong shape, no choices, an ``error`` object) raises `AnswerFormatError`
with a message naming what was wrong and a short excerpt of the body.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, TypeVar, get_args

import msgspec

from dispatcher.config import AdapterName
from dispatcher.protocol import Usage

__all__ = [
    "ADAPTERS",
    "AdapterName",
    "AnswerFormatError",
    "ChatAnswer",
    "EmbedAnswer",
    "RateLimitInfo",
    "SSEDecoder",
    "StreamDelta",
    "Usage",
    "build_chat_body",
    "build_embed_body",
    "encode_body",
    "parse_chat_answer",
    "parse_embed_answer",
    "parse_error_message",
    "rate_limit_headers",
    "retry_after_seconds",
]

ADAPTERS: Final[frozenset[str]] = frozenset(get_args(AdapterName))

_EXCERPT_CHARS: Final = 200
_ERROR_MESSAGE_CHARS: Final = 300
# One SSE line larger than this means the upstream is not speaking SSE at all.
_MAX_SSE_LINE_BYTES: Final = 4 * 1024 * 1024


# --------------------------------------------------------------------------- results


class ChatAnswer(msgspec.Struct, kw_only=True):
    """A complete (non-streamed) chat answer."""

    content: str
    reasoning: str | None
    usage: Usage
    model: str | None
    finish_reason: str | None


class StreamDelta(msgspec.Struct, kw_only=True):
    """The useful content of one SSE event of a streamed chat answer.

    ``usage`` is whatever the chunk reported; some providers repeat a running total on
    every chunk, so a consumer keeps the last one seen.
    """

    content: str = ""
    reasoning: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    model: str | None = None


class EmbedAnswer(msgspec.Struct, kw_only=True):
    """Embedding vectors, ordered by the answer's ``index`` (the order of the inputs)."""

    embeddings: list[list[float]]
    usage: Usage
    model: str | None


class RateLimitInfo(msgspec.Struct, kw_only=True):
    """The request-rate limits a provider advertised in its ``x-ratelimit-*`` headers."""

    limit: int | None
    remaining: int | None
    reset_s: float | None


class AnswerFormatError(ValueError):
    """The upstream answered with success, but the body is not a valid answer."""


# --------------------------------------------------------------------------- wire shapes
# Wire Structs accept unknown fields (msgspec's default) and make every field optional,
# so a provider adding fields or leaving some out never breaks decoding.


class _WireUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _WireMessage(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _WireChoice(msgspec.Struct):
    message: _WireMessage | None = None
    finish_reason: str | None = None


class _WireChatAnswer(msgspec.Struct):
    choices: list[_WireChoice] | None = None
    usage: _WireUsage | None = None
    model: str | None = None
    error: Any = None


class _WireStreamChoice(msgspec.Struct):
    delta: _WireMessage | None = None
    # A few servers put the text of the last chunk under `message` instead of `delta`.
    message: _WireMessage | None = None
    finish_reason: str | None = None


class _WireChunk(msgspec.Struct):
    choices: list[_WireStreamChoice] | None = None
    usage: _WireUsage | None = None
    model: str | None = None
    error: Any = None


class _WireEmbedding(msgspec.Struct):
    embedding: list[float]
    index: int | None = None


class _WireEmbedAnswer(msgspec.Struct):
    data: list[_WireEmbedding] | None = None
    usage: _WireUsage | None = None
    model: str | None = None
    error: Any = None


_chat_decoder: Final = msgspec.json.Decoder(_WireChatAnswer)
_chunk_decoder: Final = msgspec.json.Decoder(_WireChunk)
_embed_decoder: Final = msgspec.json.Decoder(_WireEmbedAnswer)
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()

_T = TypeVar("_T")


# --------------------------------------------------------------------------- requests


def _require_adapter(adapter: str) -> None:
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {sorted(ADAPTERS)}")


def build_chat_body(
    adapter: AdapterName,
    *,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int | None,
    temperature: float | None,
    stream: bool,
    thinking: bool,
) -> dict[str, Any]:
    """Build the JSON body of a chat-completions request for *adapter*.

    ``max_tokens`` and ``temperature`` are sent only when not None. ``thinking`` is
    honoured by zhipu and nvidia and ignored by the others. Raises ValueError for an
    unknown adapter or an empty message list.
    """
    _require_adapter(adapter)
    if not messages:
        raise ValueError("a chat request needs at least one message")
    body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if adapter == "openai":
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif adapter == "zhipu":
        if thinking:
            body["thinking"] = {"type": "enabled"}
    elif adapter == "hunyuan":
        body["enable_enhancement"] = True
    elif adapter == "nvidia" and thinking:
        body["chat_template_kwargs"] = {"enable_thinking": True, "clear_thinking": False}
    return body


def build_embed_body(adapter: AdapterName, *, model: str, inputs: list[str]) -> dict[str, Any]:
    """Build the JSON body of an embeddings request (always a list input, float vectors).

    Raises ValueError for an unknown adapter or an empty input list.
    """
    _require_adapter(adapter)
    if not inputs:
        raise ValueError("an embeddings request needs at least one input")
    return {"model": model, "input": list(inputs), "encoding_format": "float"}


def encode_body(body: dict[str, Any]) -> bytes:
    """Encode a request body as compact JSON bytes."""
    return _encoder.encode(body)


# --------------------------------------------------------------------------- answers


def _excerpt(payload: bytes) -> str:
    text = payload[: _EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    if len(text) > _EXCERPT_CHARS:
        text = text[:_EXCERPT_CHARS] + "…"
    return repr(text)


def _usage(wire: _WireUsage | None) -> Usage:
    if wire is None:
        return Usage()
    prompt = wire.prompt_tokens or 0
    completion = wire.completion_tokens or 0
    total = wire.total_tokens or (prompt + completion)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def _reasoning(message: _WireMessage) -> str:
    return message.reasoning_content or message.reasoning or ""


def _finish_reason(value: str | None) -> str | None:
    # Some providers send "" on chunks that have not finished.
    return value or None


def _decode_answer(decoder: msgspec.json.Decoder[_T], payload: bytes, what: str) -> _T:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise AnswerFormatError(
            f"{what} is not a valid answer ({exc}); body: {_excerpt(payload)}"
        ) from None


def parse_chat_answer(adapter: AdapterName, payload: bytes) -> ChatAnswer:
    """Parse a non-streamed chat-completions answer.

    Raises AnswerFormatError when the body is not JSON of the expected shape, carries an
    ``error`` object, or has no choices or no message in its first choice.
    """
    _require_adapter(adapter)
    wire = _decode_answer(_chat_decoder, payload, "chat answer")
    if wire.error is not None:
        raise AnswerFormatError(f"chat answer carries an error: {parse_error_message(payload)}")
    if not wire.choices:
        raise AnswerFormatError(f"chat answer has no choices; body: {_excerpt(payload)}")
    choice = wire.choices[0]
    if choice.message is None:
        raise AnswerFormatError(
            f"chat answer's first choice has no message; body: {_excerpt(payload)}"
        )
    return ChatAnswer(
        content=choice.message.content or "",
        reasoning=_reasoning(choice.message) or None,
        usage=_usage(wire.usage),
        model=wire.model,
        finish_reason=_finish_reason(choice.finish_reason),
    )


def parse_embed_answer(adapter: AdapterName, payload: bytes) -> EmbedAnswer:
    """Parse an embeddings answer, ordering the vectors by their ``index``.

    Raises AnswerFormatError when the body is not JSON of the expected shape, carries an
    ``error`` object, has no data, or its indexes are not exactly 0..n-1.
    """
    _require_adapter(adapter)
    wire = _decode_answer(_embed_decoder, payload, "embeddings answer")
    if wire.error is not None:
        raise AnswerFormatError(
            f"embeddings answer carries an error: {parse_error_message(payload)}"
        )
    if not wire.data:
        raise AnswerFormatError(f"embeddings answer has no data; body: {_excerpt(payload)}")
    indexed = [
        (item.index if item.index is not None else position, item.embedding)
        for position, item in enumerate(wire.data)
    ]
    indexed.sort(key=lambda pair: pair[0])
    if [index for index, _ in indexed] != list(range(len(indexed))):
        raise AnswerFormatError(
            f"embeddings answer indexes are not 0..{len(indexed) - 1}; body: {_excerpt(payload)}"
        )
    return EmbedAnswer(
        embeddings=[vector for _, vector in indexed],
        usage=_usage(wire.usage),
        model=wire.model,
    )


# --------------------------------------------------------------------------- streaming

_LINE_BREAK: Final = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Turn the raw bytes of a streamed chat answer into `StreamDelta` values.

    Feed bytes as they arrive, split anywhere (even inside a line or a UTF-8
    character); each call returns the deltas of the lines it completed. Lines end
    with ``\\n``, ``\\r\\n`` or ``\\r``. Each ``data:`` line holds one JSON chunk.
    Comments (``: keep-alive``), blank lines, other fields (``event:``, ``id:``) and
    chunks with nothing useful (role-only deltas, empty choices without usage) give
    nothing. ``data: [DONE]`` sets `done`; anything after it is ignored. A bare line
    starting with ``{`` is read as data too, since some servers send an error object
    without the ``data:`` prefix.

    Error handling: a data line that is not a JSON chunk, or a chunk carrying an
    ``error`` object, raises AnswerFormatError. A line over 4 MiB raises it as well.
    """

    def __init__(self, adapter: AdapterName) -> None:
        _require_adapter(adapter)
        self.adapter: AdapterName = adapter
        self.done = False
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already known to hold no line break

    def __repr__(self) -> str:
        state = "done" if self.done else f"buffered {len(self._buffer)}B"
        return f"<SSEDecoder {self.adapter} {state}>"

    def feed(self, data: bytes) -> list[StreamDelta]:
        """Take the next bytes of the stream; return the deltas of every completed line."""
        if self.done:
            return []
        self._buffer += data
        deltas: list[StreamDelta] = []
        start = 0
        try:
            # A list, not the iterator: a live scanner pins the bytearray's size.
            for match in list(_LINE_BREAK.finditer(self._buffer, self._scanned)):
                if match.group() == b"\r" and match.end() == len(self._buffer):
                    break  # a "\n" may follow in the next feed; decide then
                line = bytes(self._buffer[start : match.start()])
                start = match.end()
                if self._line(line, deltas):
                    self._buffer.clear()
                    return deltas
        finally:
            # Drop the lines handled (a bad one included, so an error is raised once).
            del self._buffer[:start]
            # Rescan a trailing "\r": it may be the first half of "\r\n".
            self._scanned = len(self._buffer) - self._buffer.endswith(b"\r")
        if self._scanned > _MAX_SSE_LINE_BYTES:
            self._buffer.clear()
            self._scanned = 0
            raise AnswerFormatError(
                f"stream line longer than {_MAX_SSE_LINE_BYTES} bytes without a line break"
            )
        return deltas

    def close(self) -> list[StreamDelta]:
        """End of stream: parse a last line that had no line break."""
        deltas: list[StreamDelta] = []
        if not self.done and self._buffer:
            for line in _LINE_BREAK.split(bytes(self._buffer)):
                if self._line(line, deltas):
                    break
        self._buffer.clear()
        self._scanned = 0
        return deltas

    def _line(self, line: bytes, deltas: list[StreamDelta]) -> bool:
        """Handle one line, appending its delta if any; True once the stream is done."""
        if line.startswith(b"{"):
            value = line
        else:
            field, colon, value = line.partition(b":")
            if not colon or field != b"data":
                return False  # blank line, comment (empty field name), or a field we do not use
            if value.startswith(b" "):
                value = value[1:]
        value = value.strip()
        if value == b"[DONE]":
            self.done = True
        elif value and (delta := self._chunk(value)) is not None:
            deltas.append(delta)
        return self.done

    def _chunk(self, value: bytes) -> StreamDelta | None:
        try:
            chunk = _chunk_decoder.decode(value)
        except msgspec.DecodeError as exc:
            raise AnswerFormatError(
                f"stream data line is not a valid chunk ({exc}); line: {_excerpt(value)}"
            ) from None
        if chunk.error is not None:
            raise AnswerFormatError(f"stream carries an error: {parse_error_message(value)}")
        content = reasoning = ""
        finish_reason = None
        if chunk.choices:
            choice = chunk.choices[0]
            part = choice.delta or choice.message
            if part is not None:
                content = part.content or ""
                reasoning = _reasoning(part)
            finish_reason = _finish_reason(choice.finish_reason)
        usage = _usage(chunk.usage) if chunk.usage is not None else None
        if not (content or reasoning or usage or finish_reason):
            return None
        return StreamDelta(
            content=content,
            reasoning=reasoning,
            usage=usage,
            finish_reason=finish_reason,
            model=chunk.model,
        )


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
