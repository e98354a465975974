"""Per-provider request building: each adapter's quirks, in one place.

Everything here is pure: functions take the request and return the JSON body.

Every OpenAI field a job carries (tools, tool_choice, parallel_tool_calls,
response_format, stop, top_p, seed, presence_penalty, frequency_penalty,
logit_bias, user) reaches the body under its OpenAI name, then the provider's
``extra_body`` is merged in, then the job's own ``extra``. Nothing is dropped in
silence: a field an adapter knows its provider refuses makes :func:`refusal`
name it, and the job is routed elsewhere or refused before anything is sent.

Provider quirks handled here:

- ``openai``: the plain chat-completions body; when streaming, asks for usage on the
  final chunk with ``stream_options.include_usage``.
- ``zhipu``: thinking is switched on with a top-level ``"thinking": {"type": "enabled"}``;
  nothing extra is sent when thinking is off. Zhipu names the end user ``user_id``, and
  its ``tool_choice`` takes only ``"auto"``.
- ``hunyuan``: always ``"enable_enhancement": true`` at the top level; no thinking.
- ``nvidia``: thinking goes in a top-level ``chat_template_kwargs``. ``extra_body`` is an
  OpenAI SDK parameter, never an HTTP field, so it never appears in a body built here.
- ``siliconflow``: embeddings with ``encoding_format: "float"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from dispatcher.contract.chat import OPENAI_CHAT_FIELDS
from dispatcher.contract.config import AdapterName, ProviderConfig
from dispatcher.contract.protocol import ChatRequest, JobRequest
from dispatcher.providers.wire import _encoder, require_adapter


def chat_body(
    adapter: AdapterName,
    *,
    model: str,
    request: ChatRequest,
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body for ``request`` at a provider of this adapter, every field the job set included."""
    options = {
        name: msgspec.to_builtins(value)
        for name in OPENAI_CHAT_FIELDS
        if (value := getattr(request, name)) is not None
    }
    body = build_chat_body(
        adapter,
        model=model,
        messages=request.messages,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        stream=request.stream,
        thinking=request.thinking,
        options=options,
    )
    body.update(extra_body or {})
    body.update(request.extra or {})
    return body


def refusals(
    providers: Mapping[str, ProviderConfig],
) -> Callable[[str, JobRequest], str | None]:
    """For admission: why the named provider would refuse a request, from its adapter."""

    def refuses(name: str, request: JobRequest) -> str | None:
        if not isinstance(request, ChatRequest):
            return None
        return refusal(providers[name].adapter, request)

    return refuses


def refusal(adapter: AdapterName, request: ChatRequest) -> str | None:
    """Why a provider of this adapter would refuse ``request`` as it is; None if it would not."""
    if adapter == "zhipu" and request.tool_choice not in (None, "auto"):
        return (
            "its tool_choice takes only 'auto' (Zhipu's API); drop tool_choice or "
            "pin a provider that can force a tool"
        )
    return None


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
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the JSON body of a chat-completions request for *adapter*.

    ``max_tokens`` and ``temperature`` are sent only when not None. ``thinking`` is
    honoured by zhipu and nvidia and ignored by the others. ``options`` are OpenAI
    fields already in JSON form, sent as they are except where the adapter spells
    them its own way. Raises ValueError for an unknown adapter or an empty message list.
    """
    require_adapter(adapter)
    if not messages:
        raise ValueError("a chat request needs at least one message")
    body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    body.update(options or {})
    if adapter == "openai":
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif adapter == "zhipu":
        if thinking:
            body["thinking"] = {"type": "enabled"}
        if "user" in body:
            body["user_id"] = body.pop("user")
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
