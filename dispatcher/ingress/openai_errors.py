"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, a fitting
status and an ``x-should-retry`` header the official clients obey."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from dispatcher.contract.errors import ClientError, DispatcherError, ErrorCode, NoProvider
from dispatcher.contract.protocol import (
    Error,
)

log = structlog.get_logger("dispatcher.http")


_encoder: Final = msgspec.json.Encoder()


# -- errors in OpenAI's shape ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    status: int
    type: str
    code: str


# Our stable wire codes, as OpenAI clients expect to see them.
ERROR_SHAPES: Final[Mapping[str, _Shape]] = {
    "bad_request": _Shape(400, "invalid_request_error", "bad_request"),
    "frame_too_large": _Shape(413, "invalid_request_error", "frame_too_large"),
    "unknown_job": _Shape(404, "invalid_request_error", "unknown_job"),
    "no_provider": _Shape(400, "invalid_request_error", "no_provider"),
    "context_too_long": _Shape(400, "invalid_request_error", "context_length_exceeded"),
    "overloaded": _Shape(429, "rate_limit_error", "overloaded"),
    "quota_exhausted": _Shape(429, "insufficient_quota", "quota_exhausted"),
    "upstream_failed": _Shape(502, "api_error", "upstream_failed"),
    "timeout": _Shape(504, "timeout_error", "timeout"),
    "cancelled": _Shape(499, "cancelled", "cancelled"),
    "internal": _Shape(500, "server_error", "internal"),
}


class UnknownModel(NoProvider):
    """The ``model`` names neither a class of ours nor a provider (OpenAI's 404 model_not_found)."""


class InvalidToken(ClientError):
    """No ``Authorization: Bearer`` client token, or not one of ours (OpenAI's 401 invalid_api_key).

    The message never quotes what was sent: a wrong token may be another secret.
    """


class SlowBody(ClientError):
    """The request body did not arrive within ``[http] body_timeout_s`` (408; the connection closes)."""


def shape_for(error: DispatcherError | Error) -> _Shape:
    """The status, type and code an error leaves with.

    A provider that refused the request itself (``upstream_failed``, not retryable) is
    the client's to fix, as OpenAI's own 400 would be: the upstream's 4xx status (400
    when it had none), ``invalid_request_error``, and no retry.
    """
    if isinstance(error, UnknownModel):
        return _Shape(404, "invalid_request_error", "model_not_found")
    if error.code == "upstream_failed" and not error.retryable:
        status = getattr(error, "upstream_status", None)
        if not (isinstance(status, int) and 400 <= status < 500):
            status = 400
        return _Shape(status, "invalid_request_error", "upstream_failed")
    return ERROR_SHAPES.get(error.code, ERROR_SHAPES["internal"])


def error_body(
    code: ErrorCode | str,
    message: str,
    *,
    openai_code: str | None = None,
    openai_type: str | None = None,
) -> dict[str, Any]:
    shape = ERROR_SHAPES.get(code, ERROR_SHAPES["internal"])
    return {
        "error": {
            "message": message,
            "type": openai_type or shape.type,
            "param": None,
            "code": openai_code or shape.code,
        }
    }


def error_body_for(error: DispatcherError | Error) -> dict[str, Any]:
    """The error body of ``error``, e.g. for a ``data:`` event once a stream has begun."""
    shape = shape_for(error)
    return error_body(error.code, error.message, openai_code=shape.code, openai_type=shape.type)


def error_response(
    code: ErrorCode | str,
    message: str,
    *,
    retryable: bool = False,
    retry_after_s: float | None = None,
    status: int | None = None,
    openai_code: str | None = None,
    openai_type: str | None = None,
    job: str | None = None,
) -> web.Response:
    """One error as OpenAI's body, status, ``Retry-After`` and ``x-should-retry``."""
    shape = ERROR_SHAPES.get(code, ERROR_SHAPES["internal"])
    headers = {"x-should-retry": "true" if retryable else "false"}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        headers["retry-after-ms"] = str(max(0, round(retry_after_s * 1000)))
    if job is not None:
        headers["x-request-id"] = job
    status = status or shape.status
    return web.json_response(
        error_body(code, message, openai_code=openai_code, openai_type=openai_type),
        status=status,
        reason="Client Closed Request" if status == 499 else None,  # nginx's name for it
        headers=headers,
        dumps=dumps,
    )


def response_for_error(error: DispatcherError | Error, *, job: str | None = None) -> web.Response:
    shape = shape_for(error)
    return error_response(
        error.code,
        error.message,
        retryable=bool(error.retryable),
        retry_after_s=error.retry_after_s,
        status=shape.status,
        openai_code=shape.code,
        openai_type=shape.type,
        job=job,
    )


def dumps(value: Any) -> str:
    return _encoder.encode(value).decode()


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves in OpenAI's error format: ours, aiohttp's (404, 405, 413) and bugs."""
    try:
        return await handler(request)
    except InvalidToken as exc:
        response = error_response(
            "bad_request",
            exc.message,
            status=401,
            openai_code="invalid_api_key",
            openai_type="invalid_request_error",
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="dispatcher"'
        return response
    except SlowBody as exc:
        response = error_response("bad_request", exc.message, status=408, openai_code="timeout")
        response.force_close()  # the rest of the body is not worth waiting for
        return response
    except DispatcherError as exc:
        return response_for_error(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        response = error_response(
            "frame_too_large",
            f"the request body is over the front's limit ({exc.text}); "
            "split the work into smaller requests",
        )
        response.force_close()  # an endless body is not read to its end
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such endpoint {request.path!r}; the front serves /v1/chat/completions, "
            "/v1/embeddings and /v1/models",
            405: f"{request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        openai_code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        return error_response("bad_request", message, status=exc.status, openai_code=openai_code)
    except Exception:
        log.exception("http.internal_error", path=request.path)
        return error_response(
            "internal", "the HTTP front failed on this request; see the daemon's log"
        )


def malformed_response(status: int) -> web.Response:
    """aiohttp's answer to a request it could not parse, without aiohttp's echo of the bad line.

    The line may be an ``Authorization`` header; only its status leaves.
    """
    message = (
        "the request is not valid HTTP/1.1 (a malformed request line or header)"
        if status < 500
        else "the HTTP front failed on this request; see the daemon's log"
    )
    code: ErrorCode = "bad_request" if status < 500 else "internal"
    response = error_response(code, message, status=status)
    response.force_close()
    return response


def over_capacity_bytes(limit: int) -> bytes:
    """A whole HTTP/1.1 503 for a connection past ``[http] max_connections``, before any request."""
    body = _encoder.encode(
        error_body(
            "overloaded",
            f"the HTTP front has its {limit} connections open; retry in a moment",
            openai_type="server_error",
        )
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "x-should-retry: true\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
