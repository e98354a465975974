"""The OpenAI wire on the HTTP front: model names to routes, OpenAI bodies to our requests
and our results back to OpenAI's completion, chunk and embeddings bodies."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from dispatcher.contract.errors import ClientError
from dispatcher.contract.protocol import (
    Result,
)
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
    """A ``chat.completion`` object for a finished chat job."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content or ""}
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
                "finish_reason": result.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": msgspec.to_builtins(result.usage),
        "dispatcher": _extension(result),
    }


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


def chat_payload(body: Mapping[str, Any], route: Route, request_id: str) -> dict[str, Any]:
    """The ``chat`` request for an OpenAI chat body; refuses what we would silently get wrong."""
    n = body.get("n")
    if n not in (None, 1):
        raise ClientError("n must be 1: the dispatcher returns one choice per request")
    if body.get("tools") or body.get("functions"):
        raise ClientError("tools and functions are not supported by the dispatcher's front")
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in (None, "text"):
        raise ClientError(
            "response_format other than text is not supported; ask for JSON in the prompt"
        )
    if body.get("logprobs"):
        raise ClientError("logprobs are not supported by the dispatcher's front")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    payload: dict[str, Any] = {
        "op": "chat",
        "id": request_id,
        "messages": body.get("messages"),
        "thinking": wants_thinking(body),
        "stream": body.get("stream") or False,
    }
    optional = {
        "task": route.task,
        "providers": route.providers,
        "max_tokens": max_tokens,
        "temperature": body.get("temperature"),
        # non-standard, for clients that pass them through extra_body
        "priority": body.get("priority"),
        "timeout_s": body.get("timeout_s"),
        "cache": body.get("cache"),
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


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
