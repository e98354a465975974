"""The Unix socket front: NDJSON requests in, replies out, one task per connection.

Resource handling: each connection owns a task group holding its line writer
(the one task that writes to the socket) and one task per request in flight;
when the client goes away the group is cancelled and every job it was waiting
for is cancelled upstream (detached jobs go on).

Error handling: a bad line gets an ``error`` reply for that line and the
connection stays usable; a line over ``max_frame_bytes`` gets
``frame_too_large`` and the connection is closed, since the rest of that line
cannot be told apart from the next request.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from dispatcher.contract.config import DaemonConfig
from dispatcher.contract.errors import (
    DispatcherError,
    FrameTooLarge,
    Overloaded,
    UnknownJob,
)
from dispatcher.contract.protocol import (
    Accepted,
    CancelRequest,
    ChatRequest,
    Chunk,
    EmbedRequest,
    Health,
    HealthRequest,
    Pending,
    PingRequest,
    Pong,
    ProbeResult,
    Reply,
    RequestDecoder,
    RequestError,
    ResultRequest,
    StatusRequest,
    encode_line,
    error_reply,
)
from dispatcher.ingress.line_writer import LineWriter, PeerGone
from dispatcher.ingress.unix import bind_unix_socket, peer_uid
from dispatcher.scheduler.job import Job
from dispatcher.scheduler.loop import KnownJob, Scheduler

log = structlog.get_logger("dispatcher.server")

PERSIST_TIMEOUT_S = 60.0  # the journal commits in milliseconds; this only bounds a sick disk
WRITE_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 5.0
YIELD_EVERY_LINES = 8  # let other connections run after this many buffered lines  # replies still buffered when a connection ends get this long
HALF_CLOSE_POLL_S = 1.0  # after a half-close, how often to check the peer is still there  # a client that reads nothing for this long is dropped
PARTIAL_LINE_TIMEOUT_S = 30.0  # a started line must be finished within this
ROOT_UID = 0


class Server:
    """Accepts connections on one listening Unix socket. ``__init__`` does no I/O."""

    def __init__(
        self,
        scheduler: Scheduler,
        config: DaemonConfig,
        path: str,
        *,
        inherited: socket.socket | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.path = path
        self._inherited = inherited
        self._ids = itertools.count(1)
        self.connections: set[Connection] = set()
        self._listener: SocketListener | None = None

    def __repr__(self) -> str:
        return f"<Server {self.path} connections {len(self.connections)}/{self.config.max_connections}>"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sock = self._inherited or bind_unix_socket(
            self.path, int(self.config.socket_mode, 8), self.config.socket_group
        )
        self._listener = await SocketListener.from_socket(sock)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                # stop_accepting closes the listener; open connections carry on
                with contextlib.suppress(anyio.ClosedResourceError):
                    await self._listener.serve(self._handle, task_group=tg)
        finally:
            await self._listener.aclose()
            self._remove_socket_file()

    async def stop_accepting(self) -> None:
        """Close the listening socket; connections already open keep being served.

        Closing (rather than cancelling the accept) lets anyio settle its pending
        accept future itself, which uvloop otherwise may try to complete twice.
        """
        if self._listener is not None:
            await self._listener.aclose()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        if self._inherited is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _handle(self, stream: SocketStream) -> None:
        uid = peer_uid(stream)
        conn = Connection(self, stream, uid, next(self._ids))
        if len(self.connections) >= self.config.max_connections:
            await conn.refuse(
                error_reply(None, Overloaded("too many connections; retry later", retry_after_s=1))
            )
            await stream.aclose()
            return
        self.connections.add(conn)
        try:
            await conn.serve()
        except Exception as exc:
            # A bug in serving one connection must never take the listener and every
            # other client down with it; that client's jobs are cancelled like a hang-up.
            log.error("connection.crashed", client=conn.client, error=repr(exc), exc_info=exc)
        finally:
            self.connections.discard(conn)
            with contextlib.suppress(Exception):
                await stream.aclose()


class Connection:
    """One client connection: reads lines, runs requests, writes replies in completion order."""

    def __init__(self, server: Server, stream: SocketStream, uid: int, number: int) -> None:
        self.server = server
        self.scheduler = server.scheduler
        self.stream = stream
        self.uid = uid
        self.client = f"{uid}:{number}"
        self.jobs: dict[str, Job] = {}  # request id -> job, for cancel
        self._writer = LineWriter(stream, timeout_s=WRITE_TIMEOUT_S, on_written=self._on_written)
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._outstanding = 0  # requests read whose final reply is not sent yet
        self._replied = anyio.Event()

    def __repr__(self) -> str:
        return f"<Connection {self.client} jobs {len(self.jobs)}>"

    async def serve(self) -> None:
        config = self.server.config
        reader = BufferedByteReceiveStream(self.stream)
        decoder = RequestDecoder()
        handled = 0
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            await tg.start(self._writer.run)
            while not self._closed:
                try:
                    line = await self._read_line(reader, config.max_frame_bytes)
                except anyio.DelimiterNotFound:
                    await self.send(
                        error_reply(
                            None,
                            FrameTooLarge(
                                f"a line exceeded max_frame_bytes ({config.max_frame_bytes:,} "
                                "bytes); split the work into smaller requests"
                            ),
                        )
                    )
                    break
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    # The client stopped sending. A half-close (shutdown(SHUT_WR)) still
                    # wants its answers; a full close does not.
                    if self._outstanding and not self._peer_gone():
                        await self._finish_after_half_close()
                    break
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
                if line is None:
                    break
                if line.strip():
                    self._dispatch(line, decoder, tg)
                    handled += 1
                    if handled % YIELD_EVERY_LINES == 0:
                        # Lines already buffered are read without waiting: without this,
                        # one client's flood would hold the loop from every other client.
                        await anyio.lowlevel.checkpoint()
            await self._writer.flush(FLUSH_TIMEOUT_S)
            tg.cancel_scope.cancel()

    async def refuse(self, reply: Reply) -> None:
        """Send ``reply`` as the only line of this connection (at most ``FLUSH_TIMEOUT_S``)."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._writer.run)
            await self.send(reply)
            await self._writer.flush(FLUSH_TIMEOUT_S)
            tg.cancel_scope.cancel()

    def _peer_gone(self) -> bool:
        """True once the peer closed both directions (POLLHUP), not just its sending side."""
        try:
            sock = self.stream.extra(SocketAttribute.raw_socket)
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError, anyio.TypedAttributeLookupError):
            return True
        return any(mask & (select.POLLHUP | select.POLLERR) for _fd, mask in events)

    async def _finish_after_half_close(self) -> None:
        """Deliver the answers still owed, checking now and then that the peer is still there."""
        while self._outstanding and not self._peer_gone():
            self._replied = anyio.Event()
            with anyio.move_on_after(HALF_CLOSE_POLL_S):
                await self._replied.wait()

    async def _read_line(self, reader: BufferedByteReceiveStream, limit: int) -> bytes | None:
        """The next line; None when the connection should close for idleness or a stalled line."""
        while True:
            with anyio.move_on_after(self._idle_limit(reader)) as scope:
                line = await reader.receive_until(b"\n", limit + 1)  # a full line + its newline
                if len(line) > limit:  # its newline arrived in the same read as the excess
                    raise anyio.DelimiterNotFound(limit)
                return line
            if scope.cancelled_caught and (reader.buffer or not self.jobs):
                return None

    def _idle_limit(self, reader: BufferedByteReceiveStream) -> float:
        return PARTIAL_LINE_TIMEOUT_S if reader.buffer else self.server.config.idle_timeout_s

    def _dispatch(self, line: bytes, decoder: RequestDecoder, tg: anyio.abc.TaskGroup) -> None:
        self._outstanding += 1  # every line gets exactly one final reply
        try:
            request = decoder.decode(line)
        except RequestError as exc:
            tg.start_soon(self.send, error_reply(exc.request_id, exc))
            return
        match request:
            case ChatRequest() | EmbedRequest():
                self._start_job(request, len(line), tg)
            case CancelRequest():
                tg.start_soon(self.send, self._cancel(request))
            case ResultRequest():
                tg.start_soon(self._result, request)
            case StatusRequest():
                tg.start_soon(self.send, self.scheduler.status(request.id))
            case PingRequest():
                tg.start_soon(self.send, Pong(id=request.id))
            case HealthRequest():
                tg.start_soon(self._health, request)

    def _start_job(
        self, request: ChatRequest | EmbedRequest, size: int, tg: anyio.abc.TaskGroup
    ) -> None:
        """Submit now, so a `cancel` or a reused id on the next line already sees the job."""
        if request.id in self.jobs:
            error = RequestError(
                f"id {request.id!r} is already in flight on this connection; "
                "use a new id per request",
                request_id=request.id,
            )
            tg.start_soon(self.send, error_reply(request.id, error))
            return
        stream = isinstance(request, ChatRequest) and request.stream
        try:
            job = self.scheduler.submit(
                request,
                client=self.client,
                uid=self.uid,
                on_chunk=self._send_chunk if stream else None,
                size=size,
            )
        except KnownJob as known:
            tg.start_soon(self._follow_known, request, known.job_id)
            return
        except DispatcherError as exc:
            tg.start_soon(self.send, error_reply(request.id, exc))
            return
        if not request.detach:
            self.jobs[request.id] = job
        tg.start_soon(self._follow, request, job)

    async def _follow_known(self, request: ChatRequest | EmbedRequest, job_id: str) -> None:
        job = await self.scheduler.resolve(job_id)
        if job is None:
            error = UnknownJob(f"the job for key {request.key!r} has expired from the journal")
            await self.send(error_reply(request.id, error))
            return
        if not request.detach:
            self.jobs[request.id] = job
        await self._follow(request, job)

    async def _follow(self, request: ChatRequest | EmbedRequest, job: Job) -> None:
        """Persist (when journaled), acknowledge a detached job, or wait for the answer."""
        try:
            if job.durable:
                await self._persisted(job)
            if request.detach:
                await self.send(Accepted(id=request.id, job=job.id))
                return
            await _wait_final(job)
        finally:
            if self.jobs.get(request.id) is job:
                del self.jobs[request.id]
            if job.outcome is None and not job.durable:
                self.scheduler.cancel(job)  # the client left; stop the work upstream
        await self.send(job.reply(request.id))

    async def _persisted(self, job: Job) -> None:
        """Wait until the job's row is committed, queueing it first if nobody has."""
        with anyio.fail_after(PERSIST_TIMEOUT_S):  # the queueing wait too: a full journal
            if not job.persisted.is_set() and self.scheduler.journal is not None:
                await self.scheduler.journal.accept(job)
            await job.persisted.wait()

    def _cancel(self, request: CancelRequest) -> Reply:
        job = self.jobs.get(request.target)
        if job is None:
            found = self.scheduler.lookup(request.target)
            job = found if found is not None and self._may_see(found) else None
        if job is None:
            return error_reply(
                request.id,
                UnknownJob(
                    f"nothing to cancel: {request.target!r} is neither a request in flight "
                    "on this connection nor one of your jobs"
                ),
            )
        self.scheduler.cancel(job)
        return Accepted(id=request.id, job=job.id)

    async def _result(self, request: ResultRequest) -> None:
        job = await self.scheduler.resolve(request.job)
        if job is None or not self._may_see(job):
            await self.send(
                error_reply(
                    request.id,
                    UnknownJob(
                        f"no job {request.job!r}; it may have expired or belong to another user"
                    ),
                )
            )
            return
        if job.outcome is None and not request.wait:
            await self.send(Pending(id=request.id, job=job.id, state=job.state))
            return
        await _wait_final(job)
        await self.send(job.reply(request.id))

    async def _health(self, request: HealthRequest) -> None:
        """Send one tiny job pinned to each provider, concurrently, and report each outcome."""
        names = request.providers or list(self.scheduler.limits)
        results: dict[str, ProbeResult] = {}

        async def probe(name: str) -> None:
            results[name] = await self.scheduler.probe(name, timeout_s=request.timeout_s)

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(probe, name)
        await self.send(Health(id=request.id, providers={n: results[n] for n in names}))

    def _may_see(self, job: Job) -> bool:
        return self.uid in (job.uid, ROOT_UID)

    async def _send_chunk(self, chunk: Chunk) -> None:
        await self.send(chunk)

    async def send(self, reply: Reply) -> bool:
        """Write one reply (coalesced with others); on a dead or stuck client, close the
        connection and return False."""
        try:
            await self._writer.write(encode_line(reply), counted=not isinstance(reply, Chunk))
        except PeerGone:
            self.close()
            return False
        return True

    def _on_written(self, finals: int) -> None:
        self._outstanding -= finals  # counted once written (or unwritable)
        self._replied.set()

    def close(self) -> None:
        self._closed = True
        self._writer.close()
        if self._scope is not None:
            self._scope.cancel()


async def _wait_final(job: Job) -> None:
    """Wait for the job's one final answer; the scheduler guarantees it by the job's deadline."""
    limit = None if job.deadline is None else job.deadline - job.accepted_at + 60.0
    with anyio.fail_after(limit):
        await job.done.wait()
