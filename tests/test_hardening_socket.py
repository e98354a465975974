"""Issue 13 on the Unix socket: no client can stop, stall or bloat the daemon, or get an
answer it cannot match.

Each test reproduces one attack at a small scale: the mechanism, not the 100,000 jobs.
"""

from __future__ import annotations

import errno
import io
import json
from typing import Any

import anyio
import pytest
from anyio.abc import ByteSendStream, SocketListener, SocketStream

from dispatcher.client.connection import ConnectionLost
from dispatcher.contract.protocol import (
    MIN_TIMEOUT_S,
    ChatRequest,
    HealthRequest,
    Pong,
    RequestDecoder,
    RequestError,
)
from dispatcher.ingress import unix_server
from dispatcher.ingress.line_writer import LineWriter, PeerGone
from dispatcher.scheduler.job import Job
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import (
    REPLY_WAIT_S,
    Running,
    build_config,
    chat,
    fakes,
    provider_entry,
    until,
    wire,
)

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]


def events(log_output: io.StringIO, name: str) -> list[dict[str, Any]]:
    """The daemon's log events called ``name``, in order."""
    found = []
    for line in log_output.getvalue().splitlines():
        entry = json.loads(line)
        if entry.get("event") == name:
            found.append(entry)
    return found


def connection_of(running: Running) -> unix_server.Connection:
    """The one connection the daemon serves now."""
    server = running.daemon.server
    assert server is not None
    (conn,) = server.connections
    return conn


# -- 1. accept overload ------------------------------------------------------------------


class FlakyListener(SocketListener):
    """The real listener, except that its first ``failures`` accepts fail as anyio's
    would when the process is out of descriptors (EMFILE wrapped in BrokenResourceError)."""

    failures = 3
    failed = 0
    all_failed: anyio.Event

    def __init__(self, inner: SocketListener) -> None:
        self.inner = inner

    @classmethod
    async def from_socket(cls, sock_or_fd: Any) -> FlakyListener:
        return cls(await SocketListener.from_socket(sock_or_fd))

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes

    async def accept(self) -> SocketStream:
        if FlakyListener.failed < FlakyListener.failures:
            FlakyListener.failed += 1
            if FlakyListener.failed == FlakyListener.failures:
                FlakyListener.all_failed.set()
            await anyio.lowlevel.checkpoint()
            raise anyio.BrokenResourceError from OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_accept_out_of_descriptors_is_logged_once_and_retried(
    start_daemon: Any, log_output: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accept failing with EMFILE is logged once per burst and retried; the daemon
    keeps serving and the next client is answered."""
    monkeypatch.setattr(unix_server, "SocketListener", FlakyListener)
    monkeypatch.setattr(FlakyListener, "failed", 0)
    monkeypatch.setattr(FlakyListener, "all_failed", anyio.Event(), raising=False)
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running:
            with anyio.fail_after(REPLY_WAIT_S):
                await FlakyListener.all_failed.wait()
            async with wire(running.socket) as w:
                pong = await w.ping("after-emfile")
    assert pong == {"event": "pong", "id": "after-emfile"}
    failed = events(log_output, "server.accept_failed")
    assert len(failed) == 1, failed
    assert failed[0]["error"] == "EMFILE"
    assert events(log_output, "server.accept_recovered")[0]["failed"] == 3


# -- 2a. requests in flight per connection ---------------------------------------------


async def test_requests_past_max_in_flight_get_overloaded_at_once(start_daemon: Any) -> None:
    """Past max_in_flight_per_connection, each further request is answered overloaded at
    once with retry_after_s; cancel still works, and capacity comes back as answers go."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(*[Fault(kind="hang")] * 3)
        config = build_config(
            {"a": provider_entry(f["a"])}, daemon={"max_in_flight_per_connection": 3}
        )
        async with start_daemon(config) as running, wire(running.socket) as w:
            for i in range(3):
                await w.send(chat("hold", id=f"c{i}"))
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 3)
            await w.send(chat("one too many", id="c3"))
            refused_chat = await w.recv()
            refused_ping = await w.ping("p1")
            await w.send({"op": "cancel", "id": "k", "target": "c0"})
            cancel_replies = [await w.recv(), await w.recv()]
            pong = await w.ping("p2")
    for refused, request_id in ((refused_chat, "c3"), (refused_ping, "p1")):
        assert refused["event"] == "error"
        assert refused["code"] == "overloaded"
        assert refused["id"] == request_id
        assert refused["retry_after_s"] > 0
        assert "max_in_flight_per_connection" in refused["message"]
    assert {(r["id"], r["event"]) for r in cancel_replies} == {("k", "accepted"), ("c0", "error")}
    assert pong == {"event": "pong", "id": "p2"}
    assert f["a"].stats.requests == 3


# -- 2b. replies waiting for a reader that never reads --------------------------------


class StuckStream(ByteSendStream):
    """A peer that never reads: every send waits forever."""

    async def send(self, item: bytes) -> None:
        await anyio.Event().wait()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_line_writer_never_holds_more_than_max_buffered() -> None:
    """Bytes waiting for a peer that never reads stay under max_buffered: the write that
    would pass it closes the writer and raises PeerGone."""
    line = b"x" * 99 + b"\n"
    writer = LineWriter(StuckStream(), timeout_s=60, high_water=1 << 30, max_buffered=1000)
    written = 0

    async def flood() -> None:
        nonlocal written
        for _ in range(100):
            await writer.write(line)
            written += 1
            await anyio.lowlevel.checkpoint()  # the first send starts and sticks

    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with pytest.raises(PeerGone, match="1,000 bytes"):
            await flood()
        tg.cancel_scope.cancel()
    assert written == 10
    assert writer.closed


async def test_status_flood_from_a_non_reader_is_dropped_at_max_reply_bytes(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """A client that pipelines status requests and never reads is dropped once
    max_reply_bytes of replies wait for it; its attached job is cancelled, a detached
    one goes on, and the daemon serves others."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="hang"), Fault(kind="hang"))
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_reply_bytes": 64 * 1024})
        async with start_daemon(config) as running:
            scheduler = running.daemon.scheduler
            assert scheduler.journal is not None
            async with wire(running.socket) as w:
                await w.send(chat("attached", id="attached"))
                await w.send(chat("detached", id="detached", detach=True))
                assert (await w.recv())["event"] == "accepted"
                with anyio.fail_after(REPLY_WAIT_S):
                    await f["a"].wait_until(lambda s: s.in_flight == 2)
                (attached,) = connection_of(running).jobs.values()
                status = json.dumps({"op": "status", "id": "s"}).encode() + b"\n"
                with anyio.move_on_after(REPLY_WAIT_S):  # the daemon hangs up first
                    try:
                        for _ in range(200):  # far more than 64 KiB of status replies
                            await w.send_raw(status * 100)
                    except (anyio.BrokenResourceError, OSError):
                        pass
                await until(lambda: not running.daemon.server.connections)
            await until(lambda: attached.outcome is not None)
            (detached,) = (j for j in scheduler.active.values() if j is not attached)
            async with wire(running.socket) as other:
                pong = await other.ping("other")
    assert attached.outcome is not None
    assert attached.outcome.code == "cancelled"
    assert detached.outcome is None
    assert pong == {"event": "pong", "id": "other"}
    (dropped,) = events(log_output, "connection.dropped")
    assert "65,536 bytes" in dropped["reason"]


# -- 2c. mass cancellation yields -------------------------------------------------------


async def test_mass_cancellation_on_hang_up_lets_another_client_be_served(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a connection with thousands of queued jobs hangs up, its jobs are cancelled in
    chunks: another client's ping is answered before the cancelling is over."""
    total = 3000
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="hang"))
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running, wire(running.socket) as other:
            scheduler = running.daemon.scheduler
            cancelled: list[Job] = []
            started = anyio.Event()
            cancel = scheduler.cancel

            def counting(job: Job, reason: Any = None) -> None:
                cancelled.append(job)
                started.set()
                cancel(job, reason)

            monkeypatch.setattr(scheduler, "cancel", counting)
            assert await other.ping("warm") == {"event": "pong", "id": "warm"}
            flooder = await anyio.connect_unix(running.socket)
            lines = b"".join(
                json.dumps(chat("q", id=f"j{i}")).encode() + b"\n" for i in range(total)
            )
            await flooder.send(lines)
            conns = running.daemon.server.connections
            await until(lambda: sum(len(c.jobs) for c in conns) == total, timeout_s=30)
            await flooder.aclose()
            with anyio.fail_after(REPLY_WAIT_S):
                await started.wait()
                pong = await other.ping("during")
            at_pong = len(cancelled)
            await until(lambda: len(cancelled) >= total, timeout_s=30)
    assert pong == {"event": "pong", "id": "during"}
    assert at_pong < total, "the loop served nobody until every job was cancelled"


# -- 3. slow clients --------------------------------------------------------------------


async def test_trickled_partial_line_is_dropped_after_the_timeout_from_its_first_byte(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line trickled one byte at a time is dropped PARTIAL_LINE_TIMEOUT_S after its
    first byte, however often a byte arrives."""
    monkeypatch.setattr(unix_server, "PARTIAL_LINE_TIMEOUT_S", 0.5)
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with (
            start_daemon(config) as running,
            wire(running.socket) as w,
            anyio.create_task_group() as tg,
        ):

            async def trickle() -> None:
                for byte in b'{"op": "ping", "id": "slow"' * 10:
                    try:
                        await w.send_raw(bytes([byte]))
                    except (anyio.BrokenResourceError, OSError):
                        return
                    await anyio.sleep(0.05)

            first_byte = anyio.current_time()
            tg.start_soon(trickle)
            with anyio.fail_after(3.0):  # before the fix: only after idle_timeout_s
                reply = await w.recv()
                closed = await w.closed_by_peer()
            elapsed = anyio.current_time() - first_byte
            tg.cancel_scope.cancel()
    assert closed
    assert 0.5 <= elapsed < 3.0
    assert reply["event"] == "error"
    assert "line 1" in reply["message"]
    assert "0.5 s" in reply["message"]


async def test_connection_past_max_connections_per_uid_is_refused(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection past max_connections_per_uid gets an overloaded line naming the cap
    and is closed; that uid's open connections and other uids are unaffected."""
    uids = iter([1001, 1001, 1001, 1002])
    monkeypatch.setattr(unix_server, "peer_uid", lambda _stream: next(uids))
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"max_connections_per_uid": 2})
        async with (
            start_daemon(config) as running,
            wire(running.socket) as first,
            wire(running.socket) as second,
        ):
            assert (await first.ping("1"))["event"] == "pong"
            assert (await second.ping("2"))["event"] == "pong"
            async with wire(running.socket) as third:
                refusal = await third.recv()
                closed = await third.closed_by_peer()
            async with wire(running.socket) as other_user:
                other = await other_user.ping("4")
            still = await first.ping("1b")
    assert refusal["event"] == "error"
    assert refusal["code"] == "overloaded"
    assert refusal["retry_after_s"] > 0
    assert "uid 1001" in refusal["message"]
    assert "max_connections_per_uid" in refusal["message"]
    assert closed
    assert other == {"event": "pong", "id": "4"}
    assert still == {"event": "pong", "id": "1b"}


# -- 4. tiny deadlines ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param({"op": "chat", "id": "t", "messages": USER, "timeout_s": 1e-6}, id="chat"),
        pytest.param({"op": "embed", "id": "t", "input": "x", "timeout_s": 0.5}, id="embed"),
        pytest.param({"op": "health", "id": "t", "timeout_s": 0.2}, id="health"),
    ],
)
async def test_timeout_below_the_floor_is_refused(
    start_daemon: Any, request_line: dict[str, Any]
) -> None:
    """A timeout_s under MIN_TIMEOUT_S is refused bad_request naming the field and the
    floor, and nothing reaches a provider."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send(request_line)
            reply = await w.recv()
    assert reply["event"] == "error"
    assert reply["code"] == "bad_request"
    assert reply["id"] == "t"
    assert "timeout_s" in reply["message"]
    assert f"{MIN_TIMEOUT_S:g} s" in reply["message"]
    assert f["a"].stats.requests == 0


def test_timeout_at_the_floor_is_accepted() -> None:
    """timeout_s equal to the floor decodes, for a job and for health."""
    decoder = RequestDecoder()
    line = json.dumps({"op": "chat", "id": "t", "messages": USER, "timeout_s": MIN_TIMEOUT_S})
    assert isinstance(decoder.decode(line.encode()), ChatRequest)
    health = decoder.decode(b'{"op": "health", "id": "h", "timeout_s": 1}')
    assert isinstance(health, HealthRequest)


# -- 5. undecodable lines ---------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(
            b'{"op": "chat", "id": "u1", "messages": [{"role": "user", "content": "\xff"}]}',
            id="invalid-utf8-in-a-field",
        ),
        pytest.param(
            b'{"op": "chat", "id": "u1", "messages": [{"role": "user", "content": "hi"}], '
            b'"temperature": 1e400}',
            id="number-out-of-range",
        ),
        pytest.param(b'{"op": "ping", "id": "u1", "n": [1e400, "\xfe"], oops}', id="not-json"),
        pytest.param(b'{"op": "ping", "id": "u\\u0031",}', id="escaped-id"),
    ],
)
def test_undecodable_line_echoes_its_id(line: bytes) -> None:
    """A line that is not valid UTF-8 or JSON, or has a number out of range, still gets
    its id back when the line names one."""
    with pytest.raises(RequestError) as refused:
        RequestDecoder().decode(line)
    assert refused.value.request_id == "u1"


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b'{"op": "ping", "id": "\xff"}', id="the-id-itself-invalid-utf8"),
        pytest.param(
            b'{"op": "chat", "id": "a", "messages": [{"tool_calls": [{"id": "b"}]}], oops}',
            id="two-ids",
        ),
        pytest.param(b"\xff\xfe\xfd", id="no-id"),
    ],
)
def test_line_without_a_recoverable_id_is_named_by_number(line: bytes) -> None:
    """When no single valid id can be read, the error says which line of the connection
    it was instead of guessing."""
    with pytest.raises(RequestError) as refused:
        RequestDecoder().decode(line, line_number=4)
    assert refused.value.request_id is None
    assert refused.value.message.startswith("line 4 of this connection")


async def test_undecodable_lines_on_the_wire_get_id_or_line_number(start_daemon: Any) -> None:
    """Over the socket, an undecodable line's error carries its id, or its line number
    counting every line the connection sent, blank ones included."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, wire(running.socket) as w:
            await w.send_raw(b'{"op": "chat", "id": "big", "messages": [], "temperature": 1e400}\n')
            await w.send_raw(b'{"op": "status", "id": "bad", "x": "\xff"\n')
            await w.send_raw(b"\n\xff\xfe\n")
            replies = [await w.recv() for _ in range(3)]
    assert [(r["id"], r["code"]) for r in replies[:2]] == [
        ("big", "bad_request"),
        ("bad", "bad_request"),
    ]
    assert "id" not in replies[2]
    assert replies[2]["message"].startswith("line 4 of this connection")


async def test_a_request_on_a_connection_the_daemon_closed_fails_at_once(
    start_daemon: Any,
) -> None:
    """An idle connection closed by the daemon (idle_timeout_s) gives the next request a
    ConnectionLost, not a wait for a reply that cannot come."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"idle_timeout_s": 0.3})
        async with start_daemon(config) as running, running.client() as client:
            await until(lambda: client.closed)
            with anyio.fail_after(5), pytest.raises(ConnectionLost):
                await client.call({"op": "ping"})
            async with running.client() as fresh:
                assert isinstance(await fresh.call({"op": "ping"}), Pong)
