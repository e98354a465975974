"""The upstream answer wire: what providers send back, decoded into our Structs.

Answers from every provider are parsed the same way. Reasoning text is read from
``reasoning_content`` (or its alias ``reasoning``); a null ``content`` reads as "".

Error handling: an answer that arrived with HTTP 200 but is not a usable answer
(not JSON, wrong shape, no choices, an ``error`` object) raises `AnswerFormatError`
with a message naming what was wrong and a short excerpt of the body.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar, get_args

import msgspec

from dispatcher.contract.config import AdapterName
from dispatcher.contract.protocol import Usage
from dispatcher.providers.headers import parse_error_message

_EXCERPT_CHARS: Final = 200
ADAPTERS: Final[frozenset[str]] = frozenset(get_args(AdapterName))


def require_adapter(adapter: str) -> None:
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {sorted(ADAPTERS)}")


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
_encoder: Final = msgspec.json.Encoder()

_T = TypeVar("_T")


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
    require_adapter(adapter)
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
    require_adapter(adapter)
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
