"""The wire protocol: newline-delimited JSON over a Unix stream socket.

Requests are a tagged union on ``op``, replies a tagged union on ``event``.
Wire Structs accept unknown fields and only ever gain optional ones, so old
clients keep working against new daemons and the other way round.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import msgspec

from dispatcher.contract.chat import (
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from dispatcher.contract.errors import ClientError, DispatcherError, ErrorCode

TaskClass = Literal["realtime", "bulk", "complex", "default"]
JobState = Literal["queued", "running", "retrying", "done", "failed"]

MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TimeoutS = Annotated[float, msgspec.Meta(gt=0.0, le=86_400.0)]
MIN_TIMEOUT_S = 1.0
"""The shortest ``timeout_s`` a request may ask for: a shorter deadline cannot reach a
provider, yet it would still spend a rate-limit token and count against the circuit.
Checked by :class:`RequestDecoder` rather than in ``TimeoutS``, so a journaled job from
before the floor still decodes on replay."""
Priority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # MAX_ID_CHARS


class _Request(msgspec.Struct, tag_field="op", kw_only=True):
    id: Id


class _Submit(_Request, kw_only=True):
    """What every job request may carry besides its content."""

    providers: list[str] | None = None
    priority: Priority = 0
    timeout_s: TimeoutS | None = None
    # None: the default rule (embeddings and deterministic chat are cached); True or
    # False: the job's own choice.
    cache: bool | None = None
    key: Id | None = None
    detach: bool = False


class ChatRequest(_Submit, tag="chat", kw_only=True):
    """A chat job. The OpenAI fields keep OpenAI's names and reach the provider as sent."""

    messages: list[dict[str, Any]]  # passed on as sent; checked against chat.Message
    task: TaskClass | None = None
    thinking: bool = False
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, msgspec.Meta(ge=-100, le=100)]] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    extra: dict[str, Any] | None = None  # provider body fields passed through as-is


class EmbedRequest(_Submit, tag="embed", kw_only=True):
    input: str | list[str]


class CancelRequest(_Request, tag="cancel"):
    target: Id


class ResultRequest(_Request, tag="result"):
    job: Id
    wait: bool = True


class StatusRequest(_Request, tag="status"):
    pass


class PingRequest(_Request, tag="ping"):
    pass


class HealthRequest(_Request, tag="health"):
    """Probe every enabled provider with a tiny request, through its limits."""

    providers: list[str] | None = None
    timeout_s: TimeoutS = 30.0


Request = (
    ChatRequest
    | EmbedRequest
    | CancelRequest
    | ResultRequest
    | StatusRequest
    | PingRequest
    | HealthRequest
)
JobRequest = ChatRequest | EmbedRequest
OPS = ("chat", "embed", "cancel", "result", "status", "ping", "health")


# -- replies -------------------------------------------------------------------------


class Usage(msgspec.Struct, kw_only=True):
    """Token counts reported by the provider (zeros when it reported none)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Reply(msgspec.Struct, tag_field="event", kw_only=True, omit_defaults=True):
    id: str | None = None


class Accepted(_Reply, tag="accepted"):
    job: str


class Chunk(_Reply, tag="chunk"):
    delta: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class Result(_Reply, tag="result"):
    job: str
    provider: str
    model: str
    class_: str = msgspec.field(name="class")
    content: str | None = None
    embeddings: list[list[float]] | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    latency_ms: float = 0.0
    attempts: int = 0
    finish_reason: str | None = None  # the upstream's: stop, length, tool_calls, content_filter
    # None only before it is set: the daemon always sends true or false (omit_defaults
    # leaves out fields equal to their default, and a client must always see this one).
    cached: bool | None = None
    # Embeddings: how many of the texts came from the per-text cache (absent: none).
    cached_texts: int | None = None


class ProviderStatus(msgspec.Struct, kw_only=True):
    state: str
    kind: str
    in_flight: int
    queued: int
    concurrency: int
    rpm: int
    tokens: int | None
    latency_ms: float
    ok: int
    failed: int
    rate_limited: int
    learned_rpm: float | None = None
    circuit: str = "closed"
    blocked_for_s: float = 0.0
    daily_tokens_left: int | None = None
    problem: str | None = None
    learned: str | None = None  # what was learned and from what: "30/min from a 429 at 12:01:07"
    fleet: FleetUse | None = None  # the whole fleet's use of this key (shared ledger only)


class FleetUse(msgspec.Struct, kw_only=True):
    in_flight: int
    window_spent: int
    daily_tokens: int


class LedgerStatus(msgspec.Struct, kw_only=True):
    """Where the limits are kept: local (this daemon), shared (Redis) or degraded."""

    mode: str
    instances: int = 1  # daemons seen alive, this one included


class CacheHits(msgspec.Struct, kw_only=True):
    hits: int = 0
    misses: int = 0


class CacheStatus(msgspec.Struct, kw_only=True):
    """The caches: hits and misses per kind (chat: whole answers; embed: texts), the
    per-text embedding cache's size, and how many texts an embeddings request carried."""

    kinds: dict[str, CacheHits] = msgspec.field(default_factory=dict)
    embed_texts: int = 0  # vectors in the embedding cache
    embed_bytes: int = 0  # their bytes (float32), against [cache] embed_max_bytes
    embed_requests: int = 0  # embeddings requests sent upstream
    texts_per_request: float = 0.0  # their average number of texts
    coalesced: int = 0  # jobs that shared another identical job's upstream call


class RecentJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    job: str
    cls: str
    outcome: str  # "ok" or the error code
    provider: str | None = None
    latency_ms: float | None = None
    attempts: int = 0
    client: str | None = None  # whose job: "client:NAME" or "uid:N"


class Status(_Reply, tag="status"):
    providers: dict[str, ProviderStatus]
    queued: int
    running: int = 0
    uptime_s: float = 0.0
    classes: dict[str, int] = msgspec.field(default_factory=dict)
    jobs_done: int = 0
    jobs_failed: int = 0
    recent: list[RecentJob] = msgspec.field(default_factory=list)  # newest first
    ledger: LedgerStatus | None = None
    rss_bytes: int | None = None  # the daemon's resident memory, where the OS tells it
    cache: CacheStatus | None = None


class Pong(_Reply, tag="pong"):
    pass


class ProbeResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    ok: bool
    latency_ms: float | None = None
    model: str | None = None
    error: str | None = None


class Health(_Reply, tag="health"):
    providers: dict[str, ProbeResult]


class Pending(_Reply, tag="pending"):
    job: str
    state: JobState


class Error(_Reply, tag="error"):
    code: ErrorCode
    message: str
    retryable: bool | None = None  # always sent, like Result.cached
    job: str | None = None
    retry_after_s: float | None = None
    upstream_status: int | None = None  # the provider's HTTP status, when it refused the job


Reply = Accepted | Chunk | Result | Status | Pong | Pending | Error | Health


def error_reply(request_id: str | None, exc: DispatcherError, job: str | None = None) -> Error:
    return Error(
        id=request_id,
        code=exc.code,
        message=exc.message,
        retryable=exc.retryable,
        job=job,
        retry_after_s=exc.retry_after_s,
        upstream_status=getattr(exc, "upstream_status", None),
    )


# -- codec ---------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode_line(message: msgspec.Struct) -> bytes:
    """One message as one ``\\n``-terminated line."""
    buffer = bytearray()
    _encoder.encode_into(message, buffer)
    buffer.extend(b"\n")
    return bytes(buffer)


class RequestDecoder:
    """Decodes request lines; one per connection (msgspec decoders are reusable and cheap)."""

    def __init__(self) -> None:
        self._typed = msgspec.json.Decoder(Request)
        self._loose = msgspec.json.Decoder()
        self._id_only = msgspec.json.Decoder(_IdOnly)

    def decode(self, line: bytes, *, line_number: int | None = None) -> Request:
        """The request on this line, or a ``ClientError`` whose message says what to fix.

        The error's ``request_id`` attribute carries the line's ``id`` whenever it can
        be recovered, even from a line that is not valid UTF-8 or JSON, so the reply
        can still echo it. When it cannot, and ``line_number`` (the line's number on
        its connection, from 1) is given, the message says which line it was.
        """
        try:
            request: Request = self._typed.decode(line)
        except msgspec.ValidationError as exc:
            error = self._explain(line, str(exc))
        except msgspec.DecodeError as exc:
            error = RequestError(
                f"the line is not valid JSON ({exc}); send one JSON object per line",
                request_id=self._recover_id(line),
            )
        except UnicodeDecodeError:
            error = RequestError(
                "the line is not valid UTF-8; send UTF-8 encoded JSON",
                request_id=self._recover_id(line),
            )
        except RecursionError:
            error = RequestError(
                "the JSON is nested too deeply; flatten it", request_id=self._recover_id(line)
            )
        else:
            _check(request)
            return request
        if error.request_id is None and line_number is not None:
            error = RequestError(f"line {line_number} of this connection: {error.message}")
        raise error

    def _recover_id(self, line: bytes) -> str | None:
        """The line's top-level ``id``, read as leniently as possible; None if unreadable.

        First with a decoder that looks at ``id`` only and skips every other field
        unchecked (a ``1e400`` or invalid UTF-8 elsewhere does not matter); then, for
        a line that is not JSON at all, from the raw bytes, but only when the line
        names a single ``id`` (a nested one, as in a tool call, must not be echoed)
        and that id is itself valid UTF-8 (a mangled one matches nothing the client
        sent).
        """
        try:
            found = self._id_only.decode(line).id
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            return found if isinstance(found, str) else None
        ids = {m["id"] for m in _RAW_ID.finditer(line)}
        if len(ids) != 1:
            return None
        try:  # strict: an id that is not valid UTF-8 could never match the client's own
            raw = json.loads(b'"' + ids.pop() + b'"')
            raw.encode()  # nor could one with a lone surrogate
        except (ValueError, AttributeError):
            return None
        return raw if isinstance(raw, str) and 0 < len(raw) <= MAX_ID_CHARS else None

    def _explain(self, line: bytes, message: str) -> RequestError:
        request_id = self._recover_id(line)
        try:
            loose = self._loose.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            loose = None
        if isinstance(loose, dict):
            op = loose.get("op")
            if "op" in loose and op not in OPS:
                return RequestError(
                    f"unknown op {op!r}; use one of {', '.join(OPS)}", request_id=request_id
                )
        elif loose is not None:
            return RequestError(
                f"expected a JSON object with 'op' and 'id', got {type(loose).__name__}"
            )
        match = re.match(r"(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", message)
        what = match["what"] if match else message
        path = match["path"] if match else ""
        if m := re.match(r"Object missing required field `(?P<key>[^`]+)`", what):
            key = f"{path}.{m['key']}" if path else m["key"]
            return RequestError(f"missing required field '{key}'", request_id=request_id)
        where = f"field '{path}'" if path else "the request"
        return RequestError(f"{where}: {what[0].lower()}{what[1:]}", request_id=request_id)


class _IdOnly(msgspec.Struct):
    """A request line as far as its ``id``: every other field is skipped unchecked."""

    id: Any = None


MAX_ID_CHARS = 256
# A JSON string member named "id": its value's characters, escapes kept.
_RAW_ID = re.compile(rb'"id"\s*:\s*"(?P<id>(?:[^"\\\x00-\x1f]|\\.){1,1024})"')


class RequestError(ClientError):
    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _check(request: Request) -> None:
    """Rules msgspec's types cannot say: non-empty messages, well-formed roles, the
    timeout floor."""
    timeout_s = getattr(request, "timeout_s", None)
    if timeout_s is not None and timeout_s < MIN_TIMEOUT_S:
        raise RequestError(
            f"field 'timeout_s' is {timeout_s:g}, below the floor of {MIN_TIMEOUT_S:g} s: "
            "a deadline that short cannot reach a provider; send at least "
            f"{MIN_TIMEOUT_S:g} or leave it out",
            request_id=request.id,
        )
    match request:
        case ChatRequest(messages=messages):
            if not messages:
                raise RequestError(
                    "'messages' is empty; send at least one {role, content} message",
                    request_id=request.id,
                )
            for i, message in enumerate(messages):
                _check_message(i, message, request.id)
            _check_tools(request)
            if request.providers is not None and not request.providers:
                raise RequestError(
                    "'providers' is an empty list; leave it out or name at least one provider",
                    request_id=request.id,
                )
        case EmbedRequest(input=inputs):
            items = [inputs] if isinstance(inputs, str) else inputs
            if not items or any(not item for item in items):
                raise RequestError(
                    "'input' must be a non-empty string or a list of non-empty strings",
                    request_id=request.id,
                )
        case _:
            pass


def _check_message(i: int, message: dict[str, Any], request_id: str) -> None:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise RequestError(
            f"messages[{i}] has no 'role'; use system, user, assistant or tool",
            request_id=request_id,
        )
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise RequestError(
            f"messages[{i}].content must be a string or a list of parts", request_id=request_id
        )
    try:
        shaped = msgspec.convert(message, Message)
    except msgspec.ValidationError as exc:
        match = re.match(r"(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", str(exc))
        what, path = (match["what"], match["path"]) if match else (str(exc), None)
        where = f"messages[{i}].{path}" if path else f"messages[{i}]"
        raise RequestError(f"{where}: {_lower(what)}", request_id=request_id) from None
    if shaped.role == "tool" and not shaped.tool_call_id:
        raise RequestError(
            f"messages[{i}] is a tool result without 'tool_call_id'; "
            "give the id of the assistant's tool call it answers",
            request_id=request_id,
        )


def _check_tools(request: ChatRequest) -> None:
    tools = request.tools or []
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise RequestError(
            "two tools have the same function name; give each tool its own name",
            request_id=request.id,
        )
    choice = request.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise RequestError(
            "'tool_choice' is set but there are no 'tools'; send the tools with the request",
            request_id=request.id,
        )
    if not isinstance(choice, str) and choice is not None and choice.function.name not in names:
        raise RequestError(
            f"'tool_choice' names {choice.function.name!r}, which is not among the tools "
            f"({', '.join(names)})",
            request_id=request.id,
        )
    reserved = sorted(set(request.extra or {}) & RESERVED_BODY_FIELDS)
    if reserved:
        raise RequestError(
            f"'extra' may not set {', '.join(reserved)}: the daemon owns those fields; "
            "use the request's own fields instead",
            request_id=request.id,
        )


# Body fields the daemon itself sets; `extra` and extra_body may not override them.
RESERVED_BODY_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n"})


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]
