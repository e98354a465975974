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

from typing import Any

from dispatcher.contract.config import AdapterName
from dispatcher.providers.wire import _encoder, require_adapter

# --------------------------------------------------------------------------- requests


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
    require_adapter(adapter)
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
    require_adapter(adapter)
    if not inputs:
        raise ValueError("an embeddings request needs at least one input")
    return {"model": model, "input": list(inputs), "encoding_format": "float"}


def encode_body(body: dict[str, Any]) -> bytes:
    """Encode a request body as compact JSON bytes."""
    return _encoder.encode(body)
