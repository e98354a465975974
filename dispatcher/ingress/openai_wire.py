"""The OpenAI wire on the HTTP front: model names to routes, OpenAI bodies to our requests
and our results back to OpenAI's completion, chunk and embeddings bodies."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from dispatcher.contract.chat import OPENAI_CHAT_FIELDS, FunctionCallDelta, ToolCallDelta
from dispatcher.contract.errors import ClientError
from dispatcher.contract.protocol import Chunk, Result
from dispatcher.ingress.openai_errors import UnknownModel
from dispatcher.scheduler.loop import Scheduler

MODEL_PREFIX: Final = "dispatcher/"
EMBED_MODEL: Final = "dispatcher/embed"
CHAT_CLASSES: Final = ("realtime", "bulk", "complex", "default")

_encoder: Final = msgspec.json.Encoder()


# -- routing by model name ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request's ``model`` sends it: a chat class, or pinned providers."""

    task: str | None = None
    providers: list[str] | None = None


def route_chat(model: str | None, scheduler: Scheduler) -> Route:
    """The chat route for ``model``; a missing model means ``dispatcher/default``."""
    config = scheduler.config
    name = model or f"{MODEL_PREFIX}default"
    if name == "dispatcher":
        name = f"{MODEL_PREFIX}default"
    if name.startswith(MODEL_PREFIX):
        klass = name.removeprefix(MODEL_PREFIX)
        if klass in CHAT_CLASSES and klass in config.classes:
            return Route(task=klass)
        if name == EMBED_MODEL:
            raise ClientError(
                f"{EMBED_MODEL} is the embeddings model; use it with /v1/embeddings, "
                "or a dispatcher/<class> model for chat"
            )
    elif name in config.providers:
        if config.providers[name].kind != "chat":
            raise ClientError(
                f"{name} is an embeddings provider; use it with /v1/embeddings, "
                "or a chat model here"
            )
        return Route(providers=[name])
    raise UnknownModel(f"the model {name!r} does not exist; {_known_models(scheduler, 'chat')}")


def route_embed(model: str | None, scheduler: Scheduler) -> Route:
    """The embeddings route for ``model``; a missing model means ``dispatcher/embed``."""
    config = scheduler.config
    if model in (None, "", "dispatcher", EMBED_MODEL):
        return Route()
    assert model is not None
    provider = config.providers.get(model)
    if provider is not None:
        if provider.kind != "embed":
            raise ClientError(
                f"{model} is a chat provider; use {EMBED_MODEL} or an embeddings provider here"
            )
        return Route(providers=[model])
    if model.startswith(MODEL_PREFIX) and model.removeprefix(MODEL_PREFIX) in CHAT_CLASSES:
        raise ClientError(f"{model} is a chat model; use {EMBED_MODEL} for embeddings")
    raise UnknownModel(f"the model {model!r} does not exist; {_known_models(scheduler, 'embed')}")


def _known_models(scheduler: Scheduler, kind: Literal["chat", "embed"]) -> str:
    names = [m["id"] for m in model_list(scheduler, created=0) if m["kind"] == kind]
    return f"use one of {', '.join(names)}" if names else "no model of that kind is configured"


def model_list(scheduler: Scheduler, *, created: int) -> list[dict[str, Any]]:
    """The models the front offers: our classes, ``dispatcher/embed``, every enabled provider."""
    config, limits = scheduler.config, scheduler.limits
    models: list[dict[str, Any]] = []

    def add(name: str, kind: str, owner: str, **extra: Any) -> None:
        models.append(
            {"id": name, "object": "model", "created": created, "owned_by": owner, "kind": kind}
            | extra
        )

    for klass in CHAT_CLASSES:
        if klass in config.classes:
            add(
                f"{MODEL_PREFIX}{klass}",
                "chat",
                "dispatcher",
                providers=list(config.classes[klass].providers),
            )
    embedders = [n for n, p in config.providers.items() if p.kind == "embed"]
    if embedders:
        add(EMBED_MODEL, "embed", "dispatcher", providers=embedders)
    for name, provider in config.providers.items():
        if name in limits and limits[name].enabled:
            add(name, provider.kind, name, upstream_model=provider.model)
    return models


# -- bodies ---------------------------------------------------------------------------


def completion_body(result: Result, *, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object for a finished chat job.

    A model that only called tools has ``content: null`` and ``message.tool_calls``,
    as OpenAI answers; ``finish_reason`` is the provider's own.
    """
    calls = [msgspec.to_builtins(call) for call in result.tool_calls or ()]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if calls and not result.content else result.content or "",
    }
    if calls:
        message["tool_calls"] = calls
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    return {
        "id": f"chatcmpl-{result.job}",
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": msgspec.to_builtins(result.usage),
        "dispatcher": _extension(result),
    }


def finish_reason(result: Result) -> str:
    """The provider's finish_reason; one that reported none ended with calls or a stop."""
    return result.finish_reason or ("tool_calls" if result.tool_calls else "stop")


def chunk_delta(chunk: Chunk, *, first: bool) -> dict[str, Any]:
    """The ``delta`` of one streamed chunk, with tool call pieces exactly as OpenAI streams them.

    The first piece of each call carries ``index``, ``id``, ``type`` and
    ``function.name``; the pieces after it carry ``index`` and argument text only.
    """
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if chunk.reasoning:
        delta["reasoning_content"] = chunk.reasoning
    if chunk.tool_calls:
        if chunk.delta or first:
            delta["content"] = chunk.delta or None
        delta["tool_calls"] = msgspec.to_builtins(chunk.tool_calls)
    elif chunk.delta or not chunk.reasoning:
        delta["content"] = chunk.delta
    return delta


def whole_delta(result: Result) -> dict[str, Any] | None:
    """The one delta of a stream whose answer came with no chunk before it: all of it at once."""
    if not (result.content or result.reasoning or result.tool_calls):
        return None
    calls = [
        ToolCallDelta(
            index=index,
            id=call.id,
            type="function",
            function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
        )
        for index, call in enumerate(result.tool_calls or ())
    ]
    chunk = Chunk(delta=result.content or "", reasoning=result.reasoning, tool_calls=calls or None)
    return chunk_delta(chunk, first=True)


def embeddings_body(result: Result, *, encoding: str) -> dict[str, Any]:
    """An embeddings ``list`` object; ``base64`` packs little-endian float32 as OpenAI does."""
    data = []
    for index, vector in enumerate(result.embeddings or []):
        embedding: list[float] | str = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = result.usage
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens or usage.total_tokens,
            "total_tokens": usage.total_tokens or usage.prompt_tokens,
        },
        "dispatcher": _extension(result),
    }


def _extension(result: Result) -> dict[str, Any]:
    """Non-standard facts about the job; OpenAI clients keep unknown fields and ignore them."""
    return {
        "job": result.job,
        "provider": result.provider,
        "class": result.class_,
        "attempts": result.attempts,
        "latency_ms": result.latency_ms,
        "cached": result.cached,
    }


def chunk_event(
    completion_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any] | None,
    *,
    finish_reason: str | None = None,
    usage: Mapping[str, Any] | None = None,
) -> bytes:
    """One ``chat.completion.chunk`` as an SSE ``data:`` event."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + _encoder.encode(chunk) + b"\n\n"


DONE_EVENT: Final = b"data: [DONE]\n\n"


# -- mapping OpenAI bodies onto our requests --------------------------------------------

# OpenAI chat fields the `chat` op takes under the same name (validated there, sent on as is).
PASSED_FIELDS: Final = ("temperature", *OPENAI_CHAT_FIELDS)
# Fields the front reads itself: the route, the stream, the token limit, thinking, and the
# OpenAI options it honours only in their default form (refused otherwise, see below).
HANDLED_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "reasoning_effort",
        "n",
        "logprobs",
        "top_logprobs",
        "modalities",
        "store",
        "functions",
        "function_call",
        "audio",
        "prediction",
        "web_search_options",
    }
)
# Ours, for clients that send them through the SDK's ``extra_body``.
OWN_FIELDS: Final = frozenset({"priority", "timeout_s", "cache", "thinking"})


def chat_payload(body: Mapping[str, Any], route: Route, request_id: str) -> dict[str, Any]:
    """The ``chat`` request for an OpenAI chat body: every field mapped, passed on or refused.

    OpenAI's fields map onto the op's own (:data:`PASSED_FIELDS`, the token limit,
    ``reasoning_effort`` and ``thinking`` onto ``thinking``); :data:`OWN_FIELDS` are
    the daemon's extensions; any other non-null key (``top_k``, ``repetition_penalty``,
    ``min_p``, ...) goes to the provider as it is, in ``extra``. What the daemon cannot
    honour is refused with a message saying what to send instead; nothing is dropped.
    """
    _refuse_unsupported(body)
    payload: dict[str, Any] = {
        "op": "chat",
        "id": request_id,
        "messages": body.get("messages"),
        "thinking": wants_thinking(body),
        "stream": body.get("stream") or False,
    }
    optional: dict[str, Any] = {
        "task": route.task,
        "providers": route.providers,
        "max_tokens": _max_tokens(body),
        **{name: body.get(name) for name in PASSED_FIELDS},
        "priority": body.get("priority"),
        "timeout_s": body.get("timeout_s"),
        "cache": body.get("cache"),
    }
    extra = {
        key: value
        for key, value in body.items()
        if key not in HANDLED_FIELDS
        and key not in OWN_FIELDS
        and key not in PASSED_FIELDS
        and value is not None
    }
    optional["extra"] = extra or None
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    """Refuse, with what to do instead, the OpenAI options the daemon cannot honour."""
    n = body.get("n")
    if n not in (None, 1):
        raise ClientError(
            f"n is {n!r}, but the dispatcher returns one choice per request; "
            "leave n out (or 1) and send several requests"
        )
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise ClientError(
            "functions and function_call are OpenAI's deprecated form; send the functions as "
            "tools=[{'type': 'function', 'function': {...}}] and use tool_choice"
        )
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise ClientError(
            "logprobs and top_logprobs are not available through the dispatcher; leave them out"
        )
    modalities = body.get("modalities")
    if body.get("audio") is not None or (modalities is not None and modalities != ["text"]):
        raise ClientError(
            "audio output is not available through the dispatcher; leave out audio and "
            "modalities (or send modalities=['text'])"
        )
    for name in ("prediction", "web_search_options"):
        if body.get(name) is not None:
            raise ClientError(
                f"{name} is an OpenAI-only feature the dispatcher's providers lack; leave it out"
            )
    if body.get("store"):
        raise ClientError(
            "store is OpenAI's stored completions; the dispatcher keeps none: leave store out"
        )
    tools = body.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind != "function":
            raise ClientError(
                f"tools[{index}] has type {kind!r}; only function tools are supported: "
                "send {'type': 'function', 'function': {'name', 'description', 'parameters'}}"
            )
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in _FORMATS:
        raise ClientError(
            f"response_format has type {response_format.get('type')!r}; "
            f"use one of {', '.join(_FORMATS)}"
        )
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") != "function":
        raise ClientError(
            f"tool_choice of type {choice.get('type')!r} is not supported; send 'none', "
            "'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
        )


_FORMATS: Final = ("text", "json_object", "json_schema")


def _max_tokens(body: Mapping[str, Any]) -> Any:
    """``max_tokens`` or its newer name ``max_completion_tokens``; both must then agree."""
    old, new = body.get("max_tokens"), body.get("max_completion_tokens")
    if old is not None and new is not None and old != new:
        raise ClientError(
            f"max_tokens ({old!r}) and max_completion_tokens ({new!r}) disagree; send one of them"
        )
    return new if new is not None else old


def wants_thinking(body: Mapping[str, Any]) -> bool:
    """``thinking`` (ours: a bool, or zhipu's ``{"type": "enabled"}``) wins; else ``reasoning_effort``."""
    thinking = body.get("thinking")
    if isinstance(thinking, bool):
        return thinking
    if isinstance(thinking, Mapping):
        return thinking.get("type") == "enabled"
    if thinking is not None:
        raise ClientError("thinking must be true, false or {'type': 'enabled'}")
    effort = body.get("reasoning_effort")
    return effort is not None and effort != "none"


def embed_payload(body: Mapping[str, Any], route: Route, request_id: str) -> dict[str, Any]:
    """The ``embed`` request for an OpenAI embeddings body."""
    inputs = body.get("input")
    if isinstance(inputs, list) and any(not isinstance(item, str) for item in inputs):
        raise ClientError(
            "input must be a string or a list of strings; token arrays are not supported"
        )
    if body.get("dimensions") is not None:
        raise ClientError("dimensions is not supported: each embeddings model has a fixed size")
    payload: dict[str, Any] = {"op": "embed", "id": request_id, "input": inputs}
    optional = {
        "providers": route.providers,
        "priority": body.get("priority"),
        "timeout_s": body.get("timeout_s"),
        "cache": body.get("cache"),
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload
