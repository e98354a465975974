"""Bad input on the socket: each bad line gets an error naming what to fix; nothing else breaks."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from dispatcher.testing.simulator import Behaviour
from tests.helpers import REPLY_WAIT_S, build_config, chat, fakes, provider_entry, wire

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]

# (the line sent, the id the reply must echo, words the message must contain)
BAD_LINES = [
    pytest.param(b"{not json", None, ["JSON"], id="invalid-json"),
    pytest.param(b"\xff\xfe\xfd", None, ["JSON"], id="not-utf8"),
    pytest.param(b"[1, 2, 3]", None, ["object"], id="json-array"),
    pytest.param(b'"just a string"', None, ["object"], id="json-string"),
    pytest.param({"op": "frobnicate", "id": "u1"}, "u1", ["frobnicate", "chat"], id="unknown-op"),
    pytest.param({"id": "u2"}, "u2", ["op"], id="missing-op"),
    pytest.param({"op": "ping"}, None, ["id"], id="missing-id"),
    pytest.param({"op": "chat", "id": 7, "messages": USER}, None, ["id"], id="id-not-a-string"),
    pytest.param({"op": "chat", "id": "u3"}, "u3", ["messages"], id="chat-missing-messages"),
    pytest.param(
        {"op": "chat", "id": "u4", "messages": []}, "u4", ["messages"], id="empty-messages"
    ),
    pytest.param(
        {"op": "chat", "id": "u5", "messages": "hi"}, "u5", ["messages"], id="messages-a-string"
    ),
    pytest.param(
        {"op": "chat", "id": "u6", "messages": [{"content": "hi"}]},
        "u6",
        ["role"],
        id="message-without-role",
    ),
    pytest.param(
        {"op": "chat", "id": "u7", "messages": [{"role": "user", "content": 42}]},
        "u7",
        ["content"],
        id="content-a-number",
    ),
    pytest.param(
        {"op": "chat", "id": "u8", "messages": USER, "max_tokens": "many"},
        "u8",
        ["max_tokens"],
        id="max-tokens-a-string",
    ),
    pytest.param(
        {"op": "chat", "id": "u9", "messages": USER, "temperature": 9.5},
        "u9",
        ["temperature"],
        id="temperature-out-of-range",
    ),
    pytest.param(
        {"op": "chat", "id": "u10", "messages": USER, "stream": "yes"},
        "u10",
        ["stream"],
        id="stream-not-a-bool",
    ),
    pytest.param(
        {"op": "chat", "id": "u11", "messages": USER, "task": "urgent"},
        "u11",
        ["task"],
        id="unknown-task",
    ),
    pytest.param(
        {"op": "chat", "id": "u12", "messages": USER, "providers": []},
        "u12",
        ["providers"],
        id="empty-providers",
    ),
    pytest.param({"op": "embed", "id": "u13"}, "u13", ["input"], id="embed-missing-input"),
    pytest.param({"op": "embed", "id": "u14", "input": []}, "u14", ["input"], id="embed-empty"),
    pytest.param(
        {"op": "embed", "id": "u15", "input": ["a", ""]}, "u15", ["input"], id="embed-blank"
    ),
    pytest.param({"op": "cancel", "id": "u16"}, "u16", ["target"], id="cancel-missing-target"),
    pytest.param({"op": "result", "id": "u17", "job": 5}, "u17", ["job"], id="result-job-a-number"),
]


def as_line(payload: bytes | dict[str, Any]) -> bytes:
    return (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n"


@pytest.mark.parametrize(("payload", "echo", "words"), BAD_LINES)
async def test_bad_line_gets_bad_request_naming_what_to_fix(
    start_daemon: Any, payload: bytes | dict[str, Any], echo: str | None, words: list[str]
) -> None:
    """A malformed line is answered with bad_request, its id when readable, and the field at fault."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(as_line(payload))
            reply = await w.recv()
    assert reply["event"] == "error"
    assert reply["code"] == "bad_request"
    assert reply.get("id") == echo
    for word in words:
        assert word in reply["message"], (word, reply["message"])
    assert f["a"].stats.requests == 0


async def test_connection_stays_usable_after_bad_lines(start_daemon: Any) -> None:
    """After a run of bad lines, the same connection still answers ping and chat."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            for param in BAD_LINES:
                await w.send_raw(as_line(param.values[0]))
            errors = [await w.recv() for _ in BAD_LINES]
            pong = await w.ping("still-here")
            await w.send(chat("and a real job", id="real"))
            answer = await w.recv()
    assert {e["event"] for e in errors} == {"error"}
    assert pong == {"event": "pong", "id": "still-here"}
    assert answer["event"] == "result"
    assert "and a real job" in answer["content"]


async def test_bad_lines_do_not_disturb_another_client(start_daemon: Any) -> None:
    """A client sending garbage and an oversized line does not affect another client's job."""
    async with fakes(a=Behaviour(name="a", latency_s=0.2)) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_frame_bytes": 1024})
        async with (
            start_daemon(config) as running,
            wire(running.socket) as good,
            wire(running.socket) as bad,
        ):
            await good.send(chat("undisturbed", id="g"))
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            await bad.send_raw(b"{oops\n")
            await bad.recv()
            await bad.send_raw(b'{"op": "ping", "id": "huge", "pad": "' + b"x" * 4096 + b'"}\n')
            await bad.recv()
            answer = await good.recv()
            pong = await good.ping("good-ping")
    assert answer["event"] == "result"
    assert answer["id"] == "g"
    assert "undisturbed" in answer["content"]
    assert pong == {"event": "pong", "id": "good-ping"}


async def test_line_over_max_frame_bytes_gets_frame_too_large(start_daemon: Any) -> None:
    """A line longer than daemon.max_frame_bytes is answered frame_too_large naming the limit."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_frame_bytes": 1024})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(b'{"op": "ping", "id": "huge", "pad": "' + b"x" * 4096 + b'"}\n')
            reply = await w.recv()
    assert reply["event"] == "error"
    assert reply["code"] == "frame_too_large"
    assert "1,024" in reply["message"]


async def test_connection_closes_after_frame_too_large(start_daemon: Any) -> None:
    """After frame_too_large the daemon closes that connection, since the line cannot be resynced."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_frame_bytes": 1024})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(b'{"op": "ping", "id": "huge", "pad": "' + b"x" * 4096 + b'"}\n')
            await w.recv()
            closed = await w.closed_by_peer()
    assert closed


async def test_oversized_line_without_newline_is_refused(start_daemon: Any) -> None:
    """A client streaming bytes past the limit with no newline at all still gets frame_too_large."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_frame_bytes": 1024})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(b"x" * 4096)
            reply = await w.recv()
    assert reply["code"] == "frame_too_large"


async def test_line_under_max_frame_bytes_is_served(start_daemon: Any) -> None:
    """A line just under a small max_frame_bytes is still served normally."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_frame_bytes": 1024})
        async with start_daemon(config) as running, wire(running.socket) as w:
            line = json.dumps({"op": "ping", "id": "fits", "pad": ""}).encode()
            padding = b"y" * (1000 - len(line))
            await w.send_raw(line[:-2] + padding + b'"}\n')
            reply = await w.recv()
    assert reply == {"event": "pong", "id": "fits"}


async def test_new_connection_works_after_frame_too_large(start_daemon: Any) -> None:
    """The daemon keeps accepting after closing a connection for an oversized line."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_frame_bytes": 1024})
        async with start_daemon(config) as running:
            async with wire(running.socket) as w:
                await w.send_raw(b"z" * 4096 + b"\n")
                await w.recv()
            async with wire(running.socket) as again:
                pong = await again.ping("fresh")
    assert pong == {"event": "pong", "id": "fresh"}


async def test_unknown_provider_pin_is_refused_naming_the_known_ones(start_daemon: Any) -> None:
    """A chat pinned to a provider that does not exist is refused listing the real providers."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("hi", id="p", providers=["ghost"]))
            reply = await w.recv()
    assert reply["event"] == "error"
    assert reply["code"] == "no_provider"
    assert reply["id"] == "p"
    assert "ghost" in reply["message"]
    assert "a" in reply["message"]
