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

from dispatcher.contract.chat import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
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
    tool_calls: list[ToolCall] | None = None


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
    tool_calls: list[ToolCallDelta] | None = None


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


class _WireFunction(msgspec.Struct):
    name: str | None = None
    # JSON text in OpenAI's API; a few providers send the object itself.
    arguments: str | dict[str, Any] | None = None


class _WireToolCall(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: _WireFunction | None = None


class _WireMessage(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_WireToolCall] | None = None


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


def _arguments(function: _WireFunction | None) -> str | None:
    if function is None or function.arguments is None:
        return None
    if isinstance(function.arguments, dict):
        return _encoder.encode(function.arguments).decode()
    return function.arguments


def _tool_calls(wire: list[_WireToolCall] | None) -> list[ToolCall] | None:
    """Complete calls in OpenAI's form; an id a provider left out is made up from the index."""
    if not wire:
        return None
    calls = []
    for position, call in enumerate(wire):
        name = call.function.name if call.function is not None else None
        if not name:
            raise AnswerFormatError(f"tool call {position} has no function name")
        calls.append(
            ToolCall(
                id=call.id or f"call_d{position}",  # a provider that sent no id
                function=FunctionCall(name=name, arguments=_arguments(call.function) or ""),
            )
        )
    return calls


def tool_call_deltas(wire: list[_WireToolCall] | None) -> list[ToolCallDelta] | None:
    """Streamed call pieces in OpenAI's form; a piece with no index is the n-th call."""
    if not wire:
        return None
    deltas = []
    for position, call in enumerate(wire):
        function = call.function
        name = function.name if function is not None else None
        arguments = _arguments(function)
        deltas.append(
            ToolCallDelta(
                index=call.index if call.index is not None else position,
                id=call.id,
                type="function" if call.id or call.type else None,
                function=FunctionCallDelta(name=name, arguments=arguments)
                if name is not None or arguments is not None
                else None,
            )
        )
    return deltas


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
        tool_calls=_tool_calls(choice.message.tool_calls),
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
