"""The wire protocol on a raw Unix socket: framing, id echo, completion order, detach and result."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.testing.simulator import Behaviour
from tests.helpers import REPLY_WAIT_S, build_config, chat, fakes, provider_entry, wire

pytestmark = pytest.mark.anyio


async def test_ping_echoes_the_id(start_daemon: Any) -> None:
    """A ping is answered with pong carrying the request's id."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            reply = await w.ping("my-ping")
    assert reply == {"event": "pong", "id": "my-ping"}


async def test_result_echoes_the_id_and_carries_the_contract_fields(start_daemon: Any) -> None:
    """A chat result on the wire has the id and every field DESIGN.md lists."""
    async with fakes(a=Behaviour(name="a", model="m-a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("hello", id="c-1"))
            reply = await w.recv()
    assert reply["event"] == "result"
    assert reply["id"] == "c-1"
    for key in ("job", "provider", "model", "class", "content", "usage", "latency_ms", "attempts"):
        assert key in reply, key
    assert set(reply["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_error_reply_always_carries_retryable(start_daemon: Any) -> None:
    """An error on the wire has code, message and retryable, as DESIGN.md lists them."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send({"op": "result", "id": "e-1", "job": "no-such-job"})
            reply = await w.recv()
    assert reply["event"] == "error"
    assert {"code", "message", "retryable"} <= set(reply)


async def test_result_always_carries_cached(start_daemon: Any) -> None:
    """A fresh (uncached) result on the wire says cached: false rather than leaving it out."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("hello", id="c-2", cache=False))
            reply = await w.recv()
    assert reply["event"] == "result"
    assert reply.get("cached") is False


async def test_status_on_the_wire_carries_the_contract_fields(start_daemon: Any) -> None:
    """A status reply has every field DESIGN.md lists, for every provider."""
    async with fakes(a=Behaviour(name="a"), b=Behaviour(name="b", rpm=40)) as f:
        config = build_config({"a": provider_entry(f["a"]), "b": provider_entry(f["b"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send({"op": "status", "id": "st"})
            reply = await w.recv()
    assert reply["event"] == "status"
    assert reply["id"] == "st"
    assert {"providers", "queued", "uptime_s"} <= set(reply)
    fields = {"state", "in_flight", "queued", "concurrency", "rpm", "tokens", "latency_ms", "ok"}
    fields |= {"failed", "rate_limited"}
    for name in ("a", "b"):
        assert fields <= set(reply["providers"][name]), name


async def test_socket_file_is_group_accessible_only(start_daemon: Any) -> None:
    """The socket is created with mode 0660 by default: owner and group, nobody else."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running:
            mode = stat.S_IMODE(os.stat(running.socket).st_mode)
    assert mode == 0o660


async def test_socket_parent_directory_is_created(start_daemon: Any, tmp_path: Path) -> None:
    """A socket path in a directory that does not exist yet is served, the directory created."""
    path = tmp_path / "run" / "dispatcher" / "d.sock"
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config, socket=str(path)) as running, wire(running.socket) as w:
            reply = await w.ping("in-new-dir")
    assert reply == {"event": "pong", "id": "in-new-dir"}


async def test_stale_socket_file_is_replaced(start_daemon: Any, tmp_path: Path) -> None:
    """A socket file left behind by a crashed daemon, with nobody listening, is replaced."""
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens on it
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config, socket=str(path)) as running, wire(running.socket) as w:
            reply = await w.ping("replaced")
    assert reply == {"event": "pong", "id": "replaced"}


async def test_replies_come_in_completion_order(start_daemon: Any) -> None:
    """A ping sent after a slow chat on the same connection is answered first."""
    async with fakes(a=Behaviour(name="a", latency_s=0.3)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("slow", id="slow"))
            await w.send({"op": "ping", "id": "fast"})
            first = await w.recv()
            second = await w.recv()
    assert first["id"] == "fast"
    assert second["id"] == "slow"
    assert second["event"] == "result"


async def test_crlf_line_endings_are_accepted(start_daemon: Any) -> None:
    """A request terminated by \\r\\n is read like one ending in \\n."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(b'{"op": "ping", "id": "crlf"}\r\n')
            reply = await w.recv()
    assert reply == {"event": "pong", "id": "crlf"}


async def test_blank_lines_are_ignored(start_daemon: Any) -> None:
    """Empty lines between requests get no reply and do not disturb the next request."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(b"\n\n  \n")
            reply = await w.ping("after-blanks")
    assert reply == {"event": "pong", "id": "after-blanks"}


async def test_unknown_fields_in_a_request_are_ignored(start_daemon: Any) -> None:
    """A request with a field this daemon does not know is still served (forward compatibility)."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("hi", id="fwd", future_option={"x": 1}))
            reply = await w.recv()
    assert reply["event"] == "result"
    assert reply["id"] == "fwd"


async def test_detached_job_is_accepted_then_fetched_with_result(start_daemon: Any) -> None:
    """detach answers `accepted` with a job id at once; `result` on that id returns the answer."""
    async with fakes(a=Behaviour(name="a", latency_s=0.05)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("later", id="d-1", detach=True))
            accepted = await w.recv()
            await w.send({"op": "result", "id": "r-1", "job": accepted["job"]})
            result = await w.recv()
    assert accepted["event"] == "accepted"
    assert accepted["id"] == "d-1"
    assert result["event"] == "result"
    assert result["id"] == "r-1"
    assert result["job"] == accepted["job"]
    assert "later" in result["content"]


async def test_result_without_wait_reports_pending(start_daemon: Any) -> None:
    """result with wait=false on an unfinished job answers `pending` with its state."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("slow", id="d-2", detach=True))
            accepted = await w.recv()
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            await w.send({"op": "result", "id": "r-2", "job": accepted["job"], "wait": False})
            pending = await w.recv()
    assert pending == {"event": "pending", "id": "r-2", "job": accepted["job"], "state": "running"}


async def test_result_of_an_unknown_job_is_unknown_job(start_daemon: Any) -> None:
    """Asking for a job id the daemon never issued answers `unknown_job`."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send({"op": "result", "id": "r-3", "job": "no-such-job"})
            reply = await w.recv()
    assert reply["event"] == "error"
    assert reply["code"] == "unknown_job"
    assert reply["id"] == "r-3"


async def test_reusing_an_id_in_flight_is_refused(start_daemon: Any) -> None:
    """A second request with the id of one still running is refused; the first still answers."""
    async with fakes(a=Behaviour(name="a", latency_s=0.3)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("first", id="same"))
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            await w.send(chat("second", id="same"))
            refusal = await w.recv()
            answer = await w.recv()
    assert refusal["event"] == "error"
    assert refusal["code"] == "bad_request"
    assert "same" in refusal["message"]
    assert answer["event"] == "result"
    assert "first" in answer["content"]


async def test_cancel_of_a_queued_job_answers_cancelled_without_an_upstream_request(
    start_daemon: Any,
) -> None:
    """A job cancelled while it waits for a slot never reaches the provider."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("occupies the slot", id="busy"))
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            await w.send(chat("waits", id="queued"))
            with anyio.fail_after(REPLY_WAIT_S):
                while True:  # the status of a round trip later sees the job in the queue
                    await w.send({"op": "status", "id": "s"})
                    status = await w.recv()
                    if status["queued"] == 1:
                        break
            await w.send({"op": "cancel", "id": "x", "target": "queued"})
            replies = {}
            for _ in range(2):
                reply = await w.recv()
                replies[reply["id"]] = reply
    assert replies["x"]["event"] == "accepted"
    assert replies["queued"]["event"] == "error"
    assert replies["queued"]["code"] == "cancelled"
    assert f["a"].stats.requests == 1


async def test_cancel_pipelined_right_after_its_request_finds_it(start_daemon: Any) -> None:
    """A cancel written in the same packet as the request it targets cancels that request."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(
                json.dumps(chat("doomed", id="j")).encode()
                + b"\n"
                + json.dumps({"op": "cancel", "id": "c", "target": "j"}).encode()
                + b"\n"
            )
            first = await w.recv()
    assert first["id"] == "c"
    assert first["event"] == "accepted"


async def test_duplicate_ids_in_one_packet_are_refused(start_daemon: Any) -> None:
    """Two requests with the same id written back to back: the second is refused."""
    async with fakes(a=Behaviour(name="a", latency_s=0.2)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            line = json.dumps(chat("twice", id="dup")).encode() + b"\n"
            await w.send_raw(line + line)
            replies = [await w.recv(), await w.recv()]
    assert sorted(r["event"] for r in replies) == ["error", "result"]


async def test_requests_sent_before_a_half_close_are_still_answered(start_daemon: Any) -> None:
    """A client that writes a chat and shuts down its writing side (socat, nc -N) still gets the answer."""
    async with fakes(a=Behaviour(name="a", latency_s=0.05)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(chat("one shot", id="then-eof"))
            await w.stream.send_eof()
            reply = await w.recv()
    assert reply["event"] == "result"
    assert reply["id"] == "then-eof"


async def test_status_sent_before_a_half_close_is_still_answered(start_daemon: Any) -> None:
    """`echo '{"op":"status","id":"s"}' | socat - UNIX-CONNECT:sock` prints the status."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send({"op": "status", "id": "s"})
            await w.stream.send_eof()
            reply = await w.recv()
    assert reply["event"] == "status"
    assert reply["id"] == "s"
