"""Fake OpenAI-compatible LLM providers: aiohttp servers on 127.0.0.1 with fault hooks.

Each :class:`FakeProvider` behaves like one free-tier provider of SEED.md: it answers
chat completions (plain or streamed as SSE) or embeddings in the OpenAI wire format,
sleeps its service time while holding a concurrency slot, and enforces its hard
limits (concurrency, requests per sliding window, tokens per day) by answering 429
with ``Retry-After``. A chat fake speaks the agent-grade parts of the wire too: it
answers ``tools`` with tool calls (plain, or streamed as OpenAI streams them, index by
index), a ``role: "tool"`` result with text that quotes it, and ``response_format``
json_object / json_schema with JSON content; a fake whose :attr:`Behaviour.capabilities`
lacks one of these answers a request needing it with 400, as a provider without the
feature does. Tests script faults (an error status, a hang, a reset, a stream
cut short, extra latency) or draw them at seeded random rates. :class:`Simulator`
runs the five SEED providers at once, latencies multiplied by a time scale; it backs
``dispatcher serve --simulate`` and the benchmarks. Their behaviours,
:data:`SEED_BEHAVIOURS`, derive from the config's built-in table
(:data:`dispatcher.contract.config.BUILTIN_PROVIDERS`), so the two cannot drift apart.

Order of checks for every request: method and path (405/404), auth (401), body and
capabilities (400), scripted fault, else down, else random fault, then concurrency (429), requests per
window (429), tokens per day (429), then the answer. A request that gets 429 does not
count toward the window nor spend tokens.

Resource handling: ``start()`` binds the listening socket; ``aclose()`` (or leaving
``async with``) wakes every hung or sleeping request, drops its connection, and waits
for the handlers to end, so shutdown is prompt and clean with requests still open.
A client that disconnects cancels its handler, which frees its slot at once.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import math
import random
import re
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

import anyio
import msgspec
from aiohttp import web

from dispatcher.contract.chat import CAPABILITIES, Capability
from dispatcher.contract.config import BUILTIN_PROVIDERS, ProviderConfig

__all__ = [
    "SEED_BEHAVIOURS",
    "SEED_JITTER",
    "SEED_OVERRIDES",
    "SEED_RANDOM_SEEDS",
    "Behaviour",
    "FakeProvider",
    "Fault",
    "ProviderStats",
    "Simulator",
    "behaviour_from_config",
    "estimate_tokens",
    "seed_behaviours",
]

KEEP_LAST: Final = 1000
"""How many request bodies and header sets :class:`ProviderStats` keeps."""

DAY_S: Final = 86_400.0
_SHUTDOWN_TIMEOUT_S: Final = 5.0
_WORDS_PER_CHUNK: Final = 4
_JSON_PIECES: Final = 3
"""How many pieces a streamed JSON text (tool arguments, JSON content) is cut into."""
_MAX_SCHEMA_DEPTH: Final = 32

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()


class Behaviour(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one fake provider behaves; times are already multiplied by the time scale."""

    name: str
    kind: Literal["chat", "embed"] = "chat"
    model: str = "fake-model"
    latency_s: float = 0.0
    """Mean service time of a non-streamed answer."""
    jitter: float = 0.0
    """Relative +- uniform jitter on the latency, e.g. 0.1."""
    concurrency: int = 0
    """0 = unlimited; a request beyond it gets 429 at once."""
    rpm: int = 0
    """0 = unlimited; more than ``rpm`` accepted requests in any ``window_s`` window -> 429."""
    window_s: float = 60.0
    daily_tokens: int = 0
    """0 = unlimited; input tokens accepted per day (embeddings input, chat prompt)."""
    thinking: bool = False
    """Whether the provider returns reasoning when asked for it."""
    api_key: str | None = None
    """If set, a request without ``Authorization: Bearer <api_key>`` gets 401."""
    stream_chunk_interval_s: float = 0.0
    """Delay between SSE chunks; 0 spreads ``latency_s`` over the chunks."""
    capabilities: tuple[Capability, ...] = CAPABILITIES
    """What a chat fake accepts beyond plain chat ("tools", "json_object", "json_schema");
    a request that needs anything else gets 400. The default accepts everything."""
    embed_dims: int = 1024
    seed: int = 0
    max_inputs: int = 0
    """0 = unlimited; an embeddings request with more texts than this gets 413."""


class Fault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One misbehaviour applied to one request."""

    kind: Literal["status", "hang", "reset", "drop_midstream", "slow"]
    status: int = 500
    """For ``kind="status"``: the status answered at once."""
    retry_after: float | None = None
    """Adds a ``Retry-After`` header (seconds, fractions kept) to a status fault."""
    after_chunks: int = 1
    """drop_midstream: drop the connection after this many content chunks."""
    delay_s: float = 0.0
    """slow: extra latency."""


@dataclass(slots=True)
class ProviderStats:
    """Counters of one fake provider, mutated as requests arrive and end."""

    requests: int = 0
    """Every HTTP request received, faulted ones included."""
    ok: int = 0
    """2xx answers completed (a stream counts once it has sent ``[DONE]``)."""
    rate_limited: int = 0
    """429s answered, by limit enforcement, script, down or random fault."""
    errors: int = 0
    """Other non-2xx answered."""
    dropped: int = 0
    """Connections dropped without a complete answer (hang, reset, drop_midstream, shutdown)."""
    in_flight: int = 0
    """Requests inside the handler now, rejected ones included for their short stay."""
    max_in_flight: int = 0
    """Highest ``in_flight`` seen: how much concurrency the clients offered."""
    serving: int = 0
    """Requests admitted and holding a concurrency slot now."""
    tool_requests: int = 0
    """Chat requests received that use tools (``tools``, or ``tool_calls`` / role "tool"
    messages), refused or not."""
    json_requests: int = 0
    """Chat requests received with a ``response_format`` other than text, refused or not."""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    """Decoded JSON object bodies received (the last :data:`KEEP_LAST`)."""
    headers: list[dict[str, str]] = field(default_factory=list)
    """Request headers as received (the last :data:`KEEP_LAST`)."""
    times: list[float] = field(default_factory=list)
    """``time.monotonic()`` arrival of every request."""
    texts: int = 0
    """Embeddings texts answered (the inputs of every 2xx embeddings answer)."""
    prompt_tokens: int = 0
    """Prompt tokens of every answer's ``usage``: what the provider bills."""
    completion_tokens: int = 0
    """Completion tokens of every answer's ``usage``."""


# ---------------------------------------------------------------------------
# Pure helpers


_CJK_RE: Final = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_PIECE_RE: Final = re.compile(r"(?<=\s)(?=\S)")
_WORD_RE: Final = re.compile(r"[^\W_]+")
_FUNCTION_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def estimate_tokens(text: str) -> int:
    """Estimate tokens as one per CJK character plus ceil(other characters / 4)."""
    cjk = len(_CJK_RE.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


def _retry_after_s(seconds: float) -> int:
    """Whole seconds until capacity frees, rounded up, at least 1."""
    return max(1, math.ceil(seconds))


def _format_seconds(seconds: float) -> str:
    """A ``Retry-After`` value: an integer when whole, else the fraction as given."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _split_pieces(text: str, words: int = _WORDS_PER_CHUNK) -> list[str]:
    """Split ``text`` into pieces of about ``words`` words that join back to ``text``."""
    parts = [p for p in _PIECE_RE.split(text) if p]
    return ["".join(parts[i : i + words]) for i in range(0, len(parts), words)]


def _message_text(content: object) -> str:
    """The text of a message ``content``: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _thinking_requested(body: Mapping[str, Any]) -> bool:
    """Whether the body asks for reasoning, zhipu style or nvidia style."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        return True
    kwargs = body.get("chat_template_kwargs")
    return isinstance(kwargs, dict) and bool(kwargs.get("enable_thinking"))


def _uses_tools(body: Mapping[str, Any]) -> bool:
    """Whether a chat body needs tool support: tools offered, or tool turns in the messages."""
    if body.get("tools") is not None:
        return True
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages
    )


def _json_format(body: Mapping[str, Any]) -> str | None:
    """The ``response_format`` type asked for when it is not plain text, else None."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    return None if kind == "text" else str(kind)


def _first_word(text: str) -> str:
    """The first word of ``text`` (letters and digits), or "x" when it has none."""
    match = _WORD_RE.search(text)
    return match.group() if match else "x"


def _split_even(text: str, parts: int = _JSON_PIECES) -> list[str]:
    """Cut ``text`` into at most ``parts`` non-empty pieces of about equal length."""
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _resolve_ref(root: Mapping[str, Any], ref: str) -> object:
    """The subschema a local ``$ref`` ("#/$defs/Name") points at; {} when it cannot."""
    if not ref.startswith("#"):
        return {}
    node: object = root
    for part in ref[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return {}
        node = node[key]
    return node


def _schema_instance(
    schema: object,
    word: str,
    root: Mapping[str, Any],
    *,
    untyped: str = "string",
    depth: int = 0,
) -> Any:
    """A deterministic minimal instance of a JSON Schema.

    Only required properties are filled: strings get ``word``, integers and numbers 1
    (moved inside minimum/maximum), booleans true, arrays ``minItems`` copies of their
    item (so usually []), enums and consts their first value; ``$ref`` (local),
    ``anyOf``/``oneOf``/``allOf`` follow their first non-null branch. A schema without
    a type is an object when it has properties, else ``untyped``. Formats and patterns
    are not honoured: the fake proves shapes, not content.
    """
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return word if untyped == "string" else {}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _schema_instance(
            _resolve_ref(root, ref), word, root, untyped=untyped, depth=depth + 1
        )
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(combinator)
        if isinstance(branches, list) and branches:
            typed = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            branch = (typed or branches)[0]
            return _schema_instance(branch, word, root, untyped=untyped, depth=depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema or "required" in schema else untyped
    match kind:
        case "object":
            properties = schema.get("properties")
            properties = properties if isinstance(properties, dict) else {}
            required = schema.get("required")
            names = (
                [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
            )
            return {
                name: _schema_instance(properties.get(name, {}), word, root, depth=depth + 1)
                for name in names
            }
        case "array":
            count = schema.get("minItems")
            count = count if type(count) is int and count > 0 else 0
            item = _schema_instance(schema.get("items", {}), word, root, depth=depth + 1)
            return [item] * count
        case "integer" | "number":
            value = 1
            if isinstance(schema.get("minimum"), int | float):
                value = max(value, math.ceil(schema["minimum"]))
            if isinstance(schema.get("exclusiveMinimum"), int | float):
                value = max(value, math.floor(schema["exclusiveMinimum"]) + 1)
            if isinstance(schema.get("maximum"), int | float):
                value = min(value, math.floor(schema["maximum"]))
            return value
        case "boolean":
            return True
        case "null":
            return None
        case _:
            text = word
            if type(schema.get("minLength")) is int:
                text = text.ljust(schema["minLength"], "x")
            if type(schema.get("maxLength")) is int:
                text = text[: schema["maxLength"]]
            return text


def _tools_to_call(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``function`` entries of the tools a chat body makes the model call, in order.

    None when ``tool_choice`` is "none" or the last message is a tool result (the model
    answers it with text); the named one when ``tool_choice`` names one; else the first
    two when parallel calls are allowed (the default) and two or more are offered, else
    the first.
    """
    functions = [tool["function"] for tool in body.get("tools") or ()]
    choice = body.get("tool_choice")
    if not functions or choice == "none" or body["messages"][-1].get("role") == "tool":
        return []
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return [f for f in functions if f["name"] == name][:1]
    parallel = body.get("parallel_tool_calls") is not False
    return functions[: 2 if parallel else 1]


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The contents of the tool results that end ``messages``, in order."""
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.append(_message_text(message.get("content")))
    return results[::-1]


def _chat_extras_problem(body: Mapping[str, Any]) -> str | None:
    """Why the tools, tool turns or response_format of a chat body are malformed, or None."""
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            return "tools must be a non-empty list"
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not _FUNCTION_NAME_RE.fullmatch(function["name"])
            ):
                return "every tool must be {type: function, function: {name: ...}}"
            if not isinstance(function.get("parameters", {}), dict | None):
                return f"tool {function['name']!r}: parameters must be a JSON Schema object"
            names.append(function["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        if tools is None:
            return "tool_choice is only allowed when tools are specified"
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                return "tool_choice must name a function: {type: function, function: {name: ...}}"
            if name not in names:
                return f"tool_choice names {name!r}, which is not among the tools"
        elif choice not in ("none", "auto", "required"):
            return "tool_choice must be 'none', 'auto', 'required' or a named function"
    if not isinstance(body.get("parallel_tool_calls", False), bool | None):
        return "parallel_tool_calls must be a boolean"
    for message in body["messages"]:
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id"), str):
            return "a message with role 'tool' needs a tool_call_id"
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            return "tool_calls must be a list"
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            return "response_format.type must be 'text', 'json_object' or 'json_schema'"
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                return "response_format json_schema needs json_schema.name"
            if not isinstance(spec.get("schema", {}), dict | None):
                return "response_format json_schema.schema must be an object"
    return None


def _embedding(text: str, dims: int, seed: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(math.fsum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error body."""
    if status == 429:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    elif status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status < 500:
        kind, code = "invalid_request_error", "invalid_request"
    else:
        kind, code = "server_error", "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _SlidingWindow:
    """Arrival times of accepted requests in the last ``window_s`` seconds."""

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()

    def used(self, now: float) -> int:
        self._expire(now)
        return len(self._times)

    def wait_s(self, now: float) -> float:
        """Seconds until one more request fits; 0 when it fits now."""
        if self.limit <= 0 or self.used(now) < self.limit:
            return 0.0
        return self._times[0] + self.window_s - now

    def record(self, now: float) -> None:
        if self.limit > 0:
            self._times.append(now)

    def __repr__(self) -> str:
        if self.limit <= 0:
            return "unlimited"
        return f"{len(self._times)}/{self.limit} per {self.window_s:g}s"


class _Rejection(msgspec.Struct, frozen=True):
    status: int
    message: str
    headers: dict[str, str] = {}


class _Call(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call the fake model makes."""

    id: str
    name: str
    arguments: str
    """JSON text."""

    def wire(self) -> dict[str, Any]:
        """The call as OpenAI puts it in ``message.tool_calls``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class _Answer(msgspec.Struct, frozen=True, kw_only=True):
    """What a chat request is answered with, before it is put on the wire."""

    content: str | None
    reasoning: str | None = None
    finish_reason: str = "stop"
    calls: tuple[_Call, ...] = ()
    is_json: bool = False
    """The content is JSON text: a stream cuts it by characters, not words."""


class _Dropped(Exception):
    """Internal: the connection was dropped without a complete answer."""


# ---------------------------------------------------------------------------
# The fake provider


class FakeProvider:
    """One fake OpenAI-compatible provider served by aiohttp.

    Construct it without I/O, then ``async with provider:`` (or ``await start()`` and
    ``await aclose()``). ``url`` is the chat (or embeddings) URL once started.
    """

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.stats = ProviderStats()
        self._script: collections.deque[Fault] = collections.deque()
        self._down: int | None = None
        self._rates: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 0.0)
        self._fault_rng = random.Random(behaviour.seed)
        self._latency_rng = random.Random(behaviour.seed + 1)
        self._window = _SlidingWindow(behaviour.rpm, behaviour.window_s)
        self._slot_ends: dict[int, float] = {}
        self._day_start = time.monotonic()
        self._tokens_today = 0
        self._ids = 0
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._closing: anyio.Event | None = None
        self._changed: anyio.Event | None = None

    # -- control hooks -----------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Queue faults for the next requests, one each, first in first out."""
        self._script.extend(faults)

    def set_fault_rates(
        self,
        *,
        status_500: float = 0.0,
        status_429: float = 0.0,
        retry_after: float = 1.0,
        status_503: float = 0.0,
    ) -> None:
        """Answer 500, 429 (with ``Retry-After: retry_after``) or 503 at these rates."""
        if min(status_500, status_429, status_503) < 0 or status_500 + status_429 + status_503 > 1:
            raise ValueError("fault rates must be >= 0 and sum to at most 1")
        self._rates = (status_500, status_429, retry_after, status_503)

    def set_down(self, status: int | None) -> None:
        """``None`` = healthy; else every request is answered with ``status``."""
        self._down = status

    async def wait_until(self, predicate: Callable[[ProviderStats], bool]) -> None:
        """Wait until ``predicate(stats)`` holds; stats are re-checked on every change."""
        while not predicate(self.stats):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        """The chat completions (or embeddings) URL; only once started."""
        path = "/chat/completions" if self.behaviour.kind == "chat" else "/embeddings"
        return self.base_url + path

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``; only once started."""
        if self._base_url is None:
            raise RuntimeError(f"fake provider {self.behaviour.name!r} is not started")
        return self._base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and serve on ``host:port`` (0 = ephemeral); return :attr:`url`."""
        if self._runner is not None:
            raise RuntimeError(f"fake provider {self.behaviour.name!r} is already started")
        self._closing = anyio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._base_url = f"http://{bound_host}:{bound_port}/v1"
        return self.url

    async def aclose(self) -> None:
        """Drop every open request and stop serving; safe to call twice."""
        runner, self._runner = self._runner, None
        if self._closing is not None:
            self._closing.set()
        if runner is not None:
            await runner.cleanup()
        self._base_url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        b = self.behaviour
        where = self._base_url or "stopped"
        slots = f"{self.stats.serving}/{b.concurrency or 'inf'}"
        return (
            f"<FakeProvider {b.name} {where} slots {slots} window {self._window!r}"
            f" requests {self.stats.requests} script {len(self._script)}"
            f" down {self._down}>"
        )

    # -- request handling --------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _count(self, status: int) -> None:
        if status == 429:
            self.stats.rate_limited += 1
        elif status >= 300:
            self.stats.errors += 1
        else:
            self.stats.ok += 1

    def _json(
        self, status: int, obj: object, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self._count(status)
        return web.Response(
            status=status,
            body=_encoder.encode(obj),
            content_type="application/json",
            headers=headers,
        )

    def _error(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return self._json(status, _error_body(status, message), headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.times.append(time.monotonic())
        stats.headers.append(dict(request.headers))
        del stats.headers[:-KEEP_LAST]
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        self._notify()
        answered = False
        try:
            response = await self._respond(request)
            answered = True
        except _Dropped:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the peer: the transport is gone
        else:
            return response
        finally:
            if not answered:  # dropped on purpose, client gone, or server closing
                stats.dropped += 1
            stats.in_flight -= 1
            self._notify()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``; raise :class:`_Dropped` if the server closes meanwhile."""
        assert self._closing is not None
        if seconds <= 0:
            if self._closing.is_set():
                raise _Dropped
            return
        with anyio.move_on_after(seconds):
            await self._closing.wait()
            raise _Dropped

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        if request.method != "POST":
            return self._error(405, f"method {request.method} not allowed")
        suffix = "/chat/completions" if b.kind == "chat" else "/embeddings"
        if not request.path.endswith(suffix):
            return self._error(404, f"no route for {request.path}")

        raw = await request.read()
        try:
            body: Any = _decoder.decode(raw)
        except msgspec.DecodeError:
            body = None
        if isinstance(body, dict):
            self.stats.bodies.append(body)
            del self.stats.bodies[:-KEEP_LAST]
            if b.kind == "chat":
                self.stats.tool_requests += _uses_tools(body)
                self.stats.json_requests += _json_format(body) is not None

        if b.api_key is not None and request.headers.get("Authorization") != f"Bearer {b.api_key}":
            return self._error(401, "invalid api key")
        invalid = self._validate(body)
        if invalid is not None:
            return self._error(400, invalid)
        if b.kind == "embed" and b.max_inputs:
            given = body["input"]
            count = 1 if isinstance(given, str) else len(given)
            if count > b.max_inputs:
                return self._error(413, f"{count} inputs, more than {b.max_inputs} per request")

        extra_delay_s = 0.0
        drop_after: int | None = None
        match self._next_fault():
            case Fault(kind="status", status=status, retry_after=retry_after):
                headers = (
                    {} if retry_after is None else {"Retry-After": _format_seconds(retry_after)}
                )
                return self._error(status, f"scripted fault {status}", headers)
            case Fault(kind="hang"):
                assert self._closing is not None
                await self._closing.wait()
                raise _Dropped
            case Fault(kind="reset"):
                raise _Dropped
            case Fault(kind="drop_midstream", after_chunks=after_chunks):
                if not body.get("stream"):
                    raise _Dropped
                drop_after = after_chunks
            case Fault(kind="slow", delay_s=delay_s):
                extra_delay_s = delay_s
            case None:
                pass

        now = time.monotonic()
        tokens = self._input_tokens(body)
        rejection = self._admit(now, tokens)
        if rejection is not None:
            return self._error(rejection.status, rejection.message, rejection.headers)

        self._ids += 1
        request_id = self._ids
        latency_s = self._latency_s() + extra_delay_s
        self._window.record(now)
        self._tokens_today += tokens
        self._slot_ends[request_id] = now + latency_s
        self.stats.serving += 1
        self._notify()
        try:
            if b.kind == "embed":
                await self._pause(latency_s)
                return self._embeddings_answer(body, tokens)
            if body.get("stream"):
                return await self._stream_answer(request, body, request_id, latency_s, drop_after)
            await self._pause(latency_s)
            return self._chat_answer(body, request_id)
        finally:
            del self._slot_ends[request_id]
            self.stats.serving -= 1
            self._notify()

    def _validate(self, body: object) -> str | None:
        """Why ``body`` is not a valid request of this provider's kind, or None."""
        if not isinstance(body, dict):
            return "request body must be a JSON object"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return "model is required"
        if self.behaviour.kind == "embed":
            given = body.get("input")
            inputs = [given] if isinstance(given, str) else given
            if (
                not isinstance(inputs, list)
                or not inputs
                or not all(isinstance(x, str) and x for x in inputs)
            ):
                return "input must be a non-empty string or a non-empty list of them"
            if body.get("encoding_format", "float") not in ("float", "base64"):
                return "encoding_format must be 'float' or 'base64'"
            return None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return "every message must be an object with a role"
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if limit is not None and (type(limit) is not int or limit < 1):
                return f"{key} must be a positive integer"
        if not isinstance(body.get("stream", False), bool):
            return "stream must be a boolean"
        capabilities = self.behaviour.capabilities
        if "tools" not in capabilities and _uses_tools(body):
            return f"{self.behaviour.model} does not support tools (function calling)"
        fmt = _json_format(body)
        if fmt in ("json_object", "json_schema") and fmt not in capabilities:
            return f"{self.behaviour.model} does not support response_format {fmt}"
        return _chat_extras_problem(body)

    def _next_fault(self) -> Fault | None:
        """The scripted fault, else the down status, else a random fault, else None."""
        if self._script:
            return self._script.popleft()
        if self._down is not None:
            return Fault(kind="status", status=self._down)
        status_500, status_429, retry_after, status_503 = self._rates
        if status_500 or status_429 or status_503:
            draw = self._fault_rng.random()
            if draw < status_500:
                return Fault(kind="status", status=500)
            if draw < status_500 + status_429:
                return Fault(kind="status", status=429, retry_after=retry_after)
            if draw < status_500 + status_429 + status_503:
                return Fault(kind="status", status=503)
        return None

    def _input_tokens(self, body: Mapping[str, Any]) -> int:
        if self.behaviour.kind == "embed":
            given = body["input"]
            inputs: list[str] = [given] if isinstance(given, str) else given
            return sum(estimate_tokens(x) for x in inputs)
        return sum(estimate_tokens(_message_text(m.get("content"))) for m in body["messages"])

    def _admit(self, now: float, tokens: int) -> _Rejection | None:
        """Concurrency, then requests per window, then tokens per day; None = admitted."""
        b = self.behaviour
        if b.concurrency and self.stats.serving >= b.concurrency:
            frees_in = min(self._slot_ends.values(), default=now) - now
            return _Rejection(
                429,
                f"concurrency limit {b.concurrency} reached",
                {"Retry-After": str(_retry_after_s(frees_in)), **self._rate_headers(now)},
            )
        wait_s = self._window.wait_s(now)
        if wait_s > 0:
            return _Rejection(
                429,
                f"rate limit {b.rpm} requests per {b.window_s:g} s reached",
                {"Retry-After": str(_retry_after_s(wait_s)), **self._rate_headers(now)},
            )
        if b.daily_tokens:
            if now - self._day_start >= DAY_S:
                self._day_start += DAY_S * ((now - self._day_start) // DAY_S)
                self._tokens_today = 0
            if self._tokens_today + tokens > b.daily_tokens:
                resets_in = self._day_start + DAY_S - now
                return _Rejection(
                    429,
                    f"daily token limit {b.daily_tokens} reached",
                    {"Retry-After": str(_retry_after_s(resets_in)), **self._rate_headers(now)},
                )
        return None

    def _rate_headers(self, now: float) -> dict[str, str]:
        b = self.behaviour
        if not b.rpm:
            return {}
        return {
            "x-ratelimit-limit-requests": str(b.rpm),
            "x-ratelimit-remaining-requests": str(max(0, b.rpm - self._window.used(now))),
        }

    def _latency_s(self) -> float:
        b = self.behaviour
        if not b.jitter:
            return b.latency_s
        return max(0.0, b.latency_s * (1.0 + self._latency_rng.uniform(-b.jitter, b.jitter)))

    # -- answers -----------------------------------------------------------

    def _compose(self, body: Mapping[str, Any], request_id: int) -> _Answer:
        """What a chat request is answered with: tool calls, JSON content or text.

        Text is cut to ``max_tokens`` words (finish_reason "length"); tool calls and
        JSON content are never cut, so they always parse (real models may cut them,
        but a fake that sends broken JSON on purpose would be a fault, not a default).
        """
        b = self.behaviour
        messages: list[dict[str, Any]] = body["messages"]
        text = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                text = _message_text(message.get("content"))
                break
        word = _first_word(text)
        reasoning = None
        if b.thinking and _thinking_requested(body):
            reasoning = f"[{b.name}] thinking step by step about: {text[:40]}"

        functions = _tools_to_call(body)
        if functions:
            calls: list[_Call] = []
            for index, function in enumerate(functions):
                parameters = function.get("parameters") or {}
                minimal = _schema_instance(parameters, word, parameters, untyped="object")
                call_id = f"call_{b.name}_{request_id}_{index}"
                arguments = _encoder.encode(minimal).decode()
                calls.append(_Call(id=call_id, name=function["name"], arguments=arguments))
            return _Answer(
                content=None, reasoning=reasoning, finish_reason="tool_calls", calls=tuple(calls)
            )

        results = _tool_results(messages)
        said = f"the tool said {'; '.join(results)}" if results else text[:80]
        content = f"[{b.name}] {b.model} answers: {said}"

        fmt = _json_format(body)
        if fmt is not None:  # validated: json_object or json_schema
            if fmt == "json_object":
                instance: Any = {"answer": content}
            else:
                schema = body["response_format"]["json_schema"].get("schema") or {}
                instance = _schema_instance(schema, word, schema, untyped="object")
            json_text = _encoder.encode(instance).decode()
            return _Answer(content=json_text, reasoning=reasoning, is_json=True)

        finish_reason = "stop"
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if limit is not None and len(content.split()) > limit:
            content = " ".join(content.split()[:limit])
            finish_reason = "length"
        return _Answer(content=content, reasoning=reasoning, finish_reason=finish_reason)

    def _usage(self, body: Mapping[str, Any], answer: _Answer) -> dict[str, int]:
        prompt = self._input_tokens(body)
        completion = (
            estimate_tokens(answer.content or "")
            + estimate_tokens(answer.reasoning or "")
            + sum(estimate_tokens(call.name + call.arguments) for call in answer.calls)
        )
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _answer_headers(self) -> dict[str, str]:
        return self._rate_headers(time.monotonic())

    def _chat_answer(self, body: Mapping[str, Any], request_id: int) -> web.Response:
        answer = self._compose(body, request_id)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.reasoning is not None:
            message["reasoning_content"] = answer.reasoning
        if answer.calls:
            message["tool_calls"] = [call.wire() for call in answer.calls]
        completion = {
            "id": f"chatcmpl-{self.behaviour.name}-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
            "usage": self._usage(body, answer),
        }
        return self._json(200, completion, self._answer_headers())

    async def _stream_answer(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        request_id: int,
        latency_s: float,
        drop_after: int | None,
    ) -> web.StreamResponse:
        answer = self._compose(body, request_id)
        # (delta, whether it counts as a content chunk for drop_midstream)
        role = {"role": "assistant", "content": None if answer.calls else ""}
        deltas: list[tuple[dict[str, Any], bool]] = [(role, False)]
        if answer.reasoning is not None:
            deltas += [({"reasoning_content": p}, False) for p in _split_pieces(answer.reasoning)]
        for index, call in enumerate(answer.calls):
            first = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append(({"tool_calls": [first]}, True))
            deltas += [
                ({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, True)
                for piece in _split_even(call.arguments)
            ]
        if answer.content is not None:
            pieces = (
                _split_even(answer.content) if answer.is_json else _split_pieces(answer.content)
            )
            deltas += [({"content": p}, True) for p in pieces]
        interval_s = self.behaviour.stream_chunk_interval_s or latency_s / (len(deltas) + 1)
        self._slot_ends[request_id] = time.monotonic() + interval_s * (len(deltas) + 1)

        base = {
            "id": f"chatcmpl-{self.behaviour.name}-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
        }
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        response.headers.update(self._answer_headers())
        try:
            await response.prepare(request)
            content_sent = 0
            for delta, is_content in deltas:
                if drop_after is not None and content_sent >= drop_after:
                    raise _Dropped
                await self._pause(interval_s)
                chunk = {
                    **base,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
                await response.write(b"data: " + _encoder.encode(chunk) + b"\n\n")
                content_sent += is_content
            if drop_after is not None:
                raise _Dropped
            await self._pause(interval_s)
            final = {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": answer.finish_reason}],
                "usage": self._usage(body, answer),
            }
            await response.write(b"data: " + _encoder.encode(final) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError as exc:
            raise _Dropped from exc
        self._count(200)
        return response

    def _embeddings_answer(self, body: Mapping[str, Any], tokens: int) -> web.Response:
        b = self.behaviour
        given = body["input"]
        inputs: list[str] = [given] if isinstance(given, str) else given
        as_base64 = body.get("encoding_format") == "base64"
        self.stats.texts += len(inputs)
        self.stats.prompt_tokens += tokens
        data = []
        for index, text in enumerate(inputs):
            vector = _embedding(text, b.embed_dims, b.seed)
            embedding: list[float] | str = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        answer = {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self._json(200, answer, self._answer_headers())


# ---------------------------------------------------------------------------
# The five providers of SEED.md, derived from the config's built-in table


def behaviour_from_config(name: str, provider: ProviderConfig) -> Behaviour:
    """A fake that keeps the promises of ``provider``'s config, capabilities included."""
    return Behaviour(
        name=name,
        kind=provider.kind,
        model=provider.model,
        latency_s=provider.latency_s,
        concurrency=provider.concurrency,
        rpm=provider.rpm,
        daily_tokens=provider.daily_tokens,
        thinking=provider.thinking,
        capabilities=tuple(provider.capabilities),
    )


SEED_JITTER: Final = 0.1
"""The seed fakes' relative latency jitter (+-10 %); the config has no such field."""

SEED_RANDOM_SEEDS: Final[Mapping[str, int]] = {
    "zhipu": 1,
    "hunyuan": 2,
    "nvidia1": 3,
    "nvidia2": 4,
    "siliconflow": 5,
}
"""Each seed fake's random seed, fixed per provider so ``dispatcher bench`` repeats."""

SEED_OVERRIDES: Final[Mapping[str, Mapping[str, Any]]] = {
    # SiliconFlow publishes no concurrency limit, only rpm and daily tokens: the
    # config's concurrency = 5 is the daemon's own cap, the fake enforces none.
    "siliconflow": {"concurrency": 0},
}
"""Where a seed fake deliberately differs from its provider's built-in config entry.

Not overrides but worth knowing: zhipu and hunyuan publish no rpm, and the config's
``rpm = 0`` (no cap) gives their fakes none either; every fake keeps the default
60 s window, and siliconflow's bge-large-zh-v1.5 answers the default 1024 dimensions.
"""


def seed_behaviours(
    providers: Mapping[str, ProviderConfig] = BUILTIN_PROVIDERS,
) -> dict[str, Behaviour]:
    """The seed fakes at time scale 1: one per provider of ``providers``, plus the overrides."""
    behaviours: dict[str, Behaviour] = {}
    for name, provider in providers.items():
        behaviour = msgspec.structs.replace(
            behaviour_from_config(name, provider),
            jitter=SEED_JITTER,
            seed=SEED_RANDOM_SEEDS.get(name, zlib.crc32(name.encode())),
        )
        behaviours[name] = msgspec.structs.replace(behaviour, **SEED_OVERRIDES.get(name, {}))
    return behaviours


SEED_BEHAVIOURS: Final[dict[str, Behaviour]] = seed_behaviours()
"""The SEED.md providers at time scale 1 (RPM windows are always 60 s)."""


class Simulator:
    """Several fake providers started and stopped together.

    Latencies and stream intervals are multiplied by ``time_scale``; RPM windows and
    the daily token budget keep their real length, as the real providers do.
    ``api_key``, when given, is required by every provider.
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        behaviours: Mapping[str, Behaviour] | None = None,
        api_key: str | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.time_scale = time_scale
        self.providers: dict[str, FakeProvider] = {}
        for name, behaviour in (SEED_BEHAVIOURS if behaviours is None else behaviours).items():
            scaled = msgspec.structs.replace(
                behaviour,
                latency_s=behaviour.latency_s * time_scale,
                stream_chunk_interval_s=behaviour.stream_chunk_interval_s * time_scale,
                api_key=behaviour.api_key if api_key is None else api_key,
            )
            self.providers[name] = FakeProvider(scaled)
        self.urls: dict[str, str] = {}

    async def start(self, host: str = "127.0.0.1") -> dict[str, str]:
        """Start every provider on an ephemeral port; return ``urls``."""
        try:
            for name, provider in self.providers.items():
                self.urls[name] = await provider.start(host)
        except BaseException:
            await self.aclose()
            raise
        return self.urls

    async def aclose(self) -> None:
        """Stop every provider."""
        for provider in self.providers.values():
            await provider.aclose()
        self.urls.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        names = ", ".join(self.providers)
        return f"<Simulator x{self.time_scale:g} {names} {'running' if self.urls else 'stopped'}>"
