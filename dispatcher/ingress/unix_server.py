"""The Unix socket front: NDJSON requests in, replies out, one task per connection.

Resource handling: the server holds at most ``max_connections`` connections, and
at most ``max_connections_per_uid`` of one Unix user; a connection past either
cap gets one ``overloaded`` line saying which, and is closed. Each connection
owns a task group holding its line writer (the one task that writes to the
socket), its answer task (which writes the answers of the jobs it waits for, as
each job ends, so a queued job costs no task of its own) and one task per other
request in flight (a detached or journaled job until it is committed, a status, a
probe); at most ``max_in_flight_per_connection`` requests in all; replies waiting
for the client to read
them are bounded by ``max_reply_bytes``. When the client goes away, or is
dropped, every job it was waiting for is cancelled upstream (detached and
journaled jobs go on), ``CANCEL_CHUNK`` jobs at a time so other clients are
served meanwhile.

Error handling: a bad line gets an ``error`` reply for that line and the
connection stays usable; a line over ``max_frame_bytes`` gets
``frame_too_large`` and the connection is closed, since the rest of that line
cannot be told apart from the next request. A failing ``accept`` for lack of
descriptors or memory is logged (``server.accept_failed``, once per burst) and
retried after ``ACCEPT_RETRY_S``; the daemon keeps serving.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import select
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVarTuple

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus

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
    Error,
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
from dispatcher.core.keys import KnownJob
from dispatcher.ingress.identity import Identities
from dispatcher.ingress.line_writer import LineWriter, PeerGone
from dispatcher.ingress.unix import bind_unix_socket, peer_uid
from dispatcher.scheduler import probe as probes
from dispatcher.scheduler import replay
from dispatcher.scheduler.job import Job
from dispatcher.scheduler.loop import Scheduler

log = structlog.get_logger("dispatcher.server")
Ts = TypeVarTuple("Ts")

PERSIST_TIMEOUT_S = 60.0  # the journal commits in milliseconds; this only bounds a sick disk
WRITE_TIMEOUT_S = 30.0  # a client that reads nothing for this long is dropped
FLUSH_TIMEOUT_S = 5.0  # replies still buffered when a connection ends get this long
YIELD_EVERY_LINES = 8  # let other connections run after this many buffered lines
HALF_CLOSE_POLL_S = 1.0  # after a half-close, how often to check the peer is still there
PARTIAL_LINE_TIMEOUT_S = 30.0  # a started line must be finished within this, from its first byte
ACCEPT_RETRY_S = 0.1  # after accept() failed for lack of descriptors or memory (as trio does)
CANCEL_CHUNK = 256  # a dropped connection cancels this many jobs, then lets the loop run
OVERLOADED_RETRY_S = 1.0
ROOT_UID = 0

# accept() errors that mean "not now" (out of descriptors, buffers or memory), not "never"
ACCEPT_OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Server:
    """Accepts connections on one listening Unix socket. ``__init__`` does no I/O.

    Resource handling: :meth:`run` owns the listening socket and a task group with
    one task per connection; at most ``max_connections`` are served, at most
    ``max_connections_per_uid`` per Unix user, and one past a cap is refused with an
    ``overloaded`` line. :meth:`stop_accepting` closes the listener and leaves the
    open connections be.

    Error handling: an ``accept`` that fails with EMFILE, ENFILE, ENOBUFS or ENOMEM
    is logged once per burst (``server.accept_failed``) and retried every
    ``ACCEPT_RETRY_S``, and the listener recovers when descriptors free up; any
    other accept error ends :meth:`run` (after :meth:`stop_accepting`, quietly). A
    crash while serving one connection is logged and ends only that connection.
    """

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
        self.identities = Identities(scheduler.config.clients)  # replaced on SIGHUP
        self._inherited = inherited
        self._ids = itertools.count(1)
        self.connections: set[Connection] = set()
        self.per_uid: collections.Counter[int] = collections.Counter()
        self.accept_failures = 0  # accept() calls that failed for lack of resources
        self._listener: SocketListener | None = None

    def __repr__(self) -> str:
        return (
            f"<Server {self.path} connections {len(self.connections)}/"
            f"{self.config.max_connections} uids {len(self.per_uid)}>"
        )

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
                    await self._accept_loop(self._listener, tg)
        finally:
            # The file goes first: under cancellation the await below raises at once,
            # and a daemon that failed to start must leave no stale socket behind.
            self._remove_socket_file()
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()

    async def _accept_loop(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        """Accept until the listener is closed, riding out a shortage of descriptors.

        The failing connection stays in the backlog, so the listener stays readable:
        without the pause this would spin. One log line per burst, one when it ends.
        """
        failed_in_burst = 0
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                code = _accept_errno(exc)
                if code not in ACCEPT_OVERLOAD_ERRNOS:
                    raise
                self.accept_failures += 1
                if not failed_in_burst:
                    log.error(
                        "server.accept_failed",
                        error=errno.errorcode.get(code, str(code)),
                        connections=len(self.connections),
                        retry_in_s=ACCEPT_RETRY_S,
                    )
                failed_in_burst += 1
                await anyio.sleep(ACCEPT_RETRY_S)
                continue
            if failed_in_burst:
                log.info("server.accept_recovered", failed=failed_in_burst)
                failed_in_burst = 0
            tg.start_soon(self._handle, stream)

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
        refusal = self._refusal(uid)
        if refusal is not None:
            log.info("connection.refused", client=conn.client, reason=refusal.message)
            await conn.refuse(error_reply(None, refusal))
            await stream.aclose()
            return
        self.connections.add(conn)
        self.per_uid[uid] += 1
        try:
            await conn.serve()
        except Exception as exc:
            # A bug in serving one connection must never take the listener and every
            # other client down with it; that client's jobs are cancelled like a hang-up.
            log.error("connection.crashed", client=conn.client, error=repr(exc), exc_info=exc)
        finally:
            self.connections.discard(conn)
            self.per_uid[uid] -= 1
            if self.per_uid[uid] <= 0:
                del self.per_uid[uid]
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _refusal(self, uid: int) -> Overloaded | None:
        """Why a new connection from ``uid`` cannot be served now, or None if it can."""
        config = self.config
        if len(self.connections) >= config.max_connections:
            return Overloaded(
                f"too many connections ({config.max_connections:,}, max_connections); retry later",
                retry_after_s=OVERLOADED_RETRY_S,
            )
        if self.per_uid[uid] >= config.max_connections_per_uid:
            return Overloaded(
                f"too many connections from uid {uid} ({config.max_connections_per_uid:,}, "
                "max_connections_per_uid); close some of yours or retry later",
                retry_after_s=OVERLOADED_RETRY_S,
            )
        return None


def _accept_errno(exc: BaseException) -> int | None:
    """The errno behind a failed accept; anyio wraps it in BrokenResourceError."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, OSError) and candidate.errno is not None:
            return candidate.errno
    return None


class Connection:
    """One client connection: reads lines, runs requests, writes replies in completion order.

    Resource handling: at most ``max_in_flight_per_connection`` requests are served
    at once; each request past that is answered ``overloaded`` at once (a
    ``cancel`` is always served: it holds nothing and frees capacity). Replies wait
    for the client in the line writer, at most ``max_reply_bytes`` of them; past
    that the client is dropped. A started line must end within
    ``PARTIAL_LINE_TIMEOUT_S`` of its first byte, and an idle connection with
    nothing in flight is closed after ``idle_timeout_s``. However the connection
    ends, the jobs it waited for are cancelled ``CANCEL_CHUNK`` at a time with a
    checkpoint between chunks (detached and journaled jobs go on).

    Error handling: every non-blank line gets exactly one final reply (an ``error``
    for a bad one, with its ``id`` when it can be recovered, else its line number in
    the message), unless the client hangs up or is dropped first.
    """

    def __init__(self, server: Server, stream: SocketStream, uid: int, number: int) -> None:
        self.server = server
        self.scheduler = server.scheduler
        self.stream = stream
        self.uid = uid
        self.client = f"{uid}:{number}"
        self.jobs: dict[str, Job] = {}  # request id -> job, for cancel
        self._answers: collections.deque[Job] = collections.deque()  # ended, not yet written
        self._answer_ready = anyio.Event()
        self._writer = LineWriter(
            stream,
            timeout_s=WRITE_TIMEOUT_S,
            on_written=self._on_written,
            max_buffered=server.config.max_reply_bytes,
        )
        self._closed = False
        self._reading: anyio.CancelScope | None = None
        self._outstanding = 0  # requests read whose final reply is not sent yet
        self._in_flight = 0  # requests being served: read, final reply not yet queued
        self._replied = anyio.Event()
        self._inbox = bytearray()  # bytes read and not yet split into lines
        self._line_started = 0.0  # when the first byte of the line in _inbox arrived
        self.lines = 0  # lines read, blank ones included: a line's number for errors

    def __repr__(self) -> str:
        return (
            f"<Connection {self.client} jobs {len(self.jobs)} in flight {self._in_flight}/"
            f"{self.server.config.max_in_flight_per_connection} {self._writer!r}>"
        )

    async def serve(self) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self._writer.run)
            tg.start_soon(self._answer)
            with anyio.CancelScope() as self._reading:
                if not self._closed:
                    await self._read_requests(tg)
            if not self._closed:
                await self._writer.flush(FLUSH_TIMEOUT_S)
            self._closed = True
            self._writer.close()  # nobody is left to read what the cancelled jobs answer
            await self._cancel_jobs()
            tg.cancel_scope.cancel()

    async def _read_requests(self, tg: anyio.abc.TaskGroup) -> None:
        config = self.server.config
        decoder = RequestDecoder()
        handled = 0
        while not self._closed:
            try:
                line = await self._read_line(config.max_frame_bytes)
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
                return
            except (anyio.EndOfStream, anyio.IncompleteRead):
                # The client stopped sending. A half-close (shutdown(SHUT_WR)) still
                # wants its answers; a full close does not.
                if self._outstanding and not self._peer_gone():
                    await self._finish_after_half_close()
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return
            if line is None:
                return
            if line.strip():
                self._dispatch(line, decoder, tg)
                handled += 1
                if handled % YIELD_EVERY_LINES == 0:
                    # Lines already buffered are read without waiting: without this,
                    # one client's flood would hold the loop from every other client.
                    await anyio.lowlevel.checkpoint()

    async def _cancel_jobs(self) -> None:
        """Cancel the jobs this connection waited for, a chunk at a time.

        Cancelling each job's task instead would run every one of them in a single
        turn of the event loop: 100,000 of them froze every other client for seconds.
        """
        jobs = list(self.jobs.values())
        for done, job in enumerate(jobs, 1):
            if job.outcome is None and not job.durable:
                self.scheduler.cancel(job)  # the client left; stop the work upstream
            if done % CANCEL_CHUNK == 0:
                await anyio.lowlevel.checkpoint()

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

    async def _read_line(self, limit: int) -> bytes | None:
        """The next line, without its newline; None when the connection should close.

        An empty inbox waits ``idle_timeout_s`` for a first byte, again and again
        while jobs are in flight. A started line gets ``PARTIAL_LINE_TIMEOUT_S`` in
        all, counted from its first byte, however slowly the rest trickles in.
        Raises ``DelimiterNotFound`` for a line over ``limit`` bytes, and
        ``EndOfStream`` (nothing pending) or ``IncompleteRead`` (a partial line)
        when the client stops sending.
        """
        inbox = self._inbox
        searched = 0
        while True:
            end = inbox.find(b"\n", searched)
            if end >= 0:
                if end > limit:  # its newline arrived in the same read as the excess
                    raise anyio.DelimiterNotFound(limit)
                line = bytes(inbox[:end])
                del inbox[: end + 1]
                self._line_started = anyio.current_time()  # what is left came with it
                self.lines += 1
                return line
            if len(inbox) > limit:
                raise anyio.DelimiterNotFound(limit)
            searched = len(inbox)
            if inbox:
                deadline = self._line_started + PARTIAL_LINE_TIMEOUT_S
            else:
                deadline = anyio.current_time() + self.server.config.idle_timeout_s
            with anyio.CancelScope(deadline=deadline) as scope:
                try:
                    data = await self.stream.receive()
                except anyio.EndOfStream:
                    if inbox:
                        raise anyio.IncompleteRead from None
                    raise
            if scope.cancelled_caught:
                if inbox:
                    log.info(
                        "connection.partial_line_timeout",
                        client=self.client,
                        buffered=len(inbox),
                        timeout_s=PARTIAL_LINE_TIMEOUT_S,
                    )
                    await self.send(
                        error_reply(
                            None,
                            RequestError(
                                f"line {self.lines + 1} of this connection was not finished "
                                f"within {PARTIAL_LINE_TIMEOUT_S:g} s of its first byte; "
                                "the connection is closed"
                            ),
                        ),
                        final=False,
                    )
                    return None
                if not self.jobs:
                    return None
                continue
            if not inbox:
                self._line_started = anyio.current_time()
            inbox += data

    def _dispatch(self, line: bytes, decoder: RequestDecoder, tg: anyio.abc.TaskGroup) -> None:
        self._outstanding += 1  # every line gets exactly one final reply
        try:
            request = decoder.decode(line, line_number=self.lines)
        except RequestError as exc:
            tg.start_soon(self.send, error_reply(exc.request_id, exc))
            return
        limit = self.server.config.max_in_flight_per_connection
        if self._in_flight >= limit and not isinstance(request, CancelRequest):
            # Answered at once, holding nothing: the bound on what one connection may
            # hold. A cancel is let through: it is answered at once and frees capacity.
            tg.start_soon(self.send, self._overloaded(request.id, limit))
            return
        match request:
            case ChatRequest() | EmbedRequest():
                self._start_job(request, len(line), tg)
            case CancelRequest():
                self._spawn(tg, self.send, self._cancel(request))
            case ResultRequest():
                self._spawn(tg, self._result, request)
            case StatusRequest():
                self._spawn(tg, self.send, self.scheduler.status(request.id))
            case PingRequest():
                self._spawn(tg, self.send, Pong(id=request.id))
            case HealthRequest():
                self._spawn(tg, self._health, request)

    def _overloaded(self, request_id: str, limit: int) -> Error:
        return error_reply(
            request_id,
            Overloaded(
                f"this connection already has {limit:,} requests in flight "
                "(max_in_flight_per_connection); wait for some answers or retry later",
                retry_after_s=OVERLOADED_RETRY_S,
            ),
        )

    def _spawn(
        self,
        tg: anyio.abc.TaskGroup,
        serve: Callable[[*Ts], Awaitable[object]],
        *args: *Ts,
    ) -> None:
        """Serve one request in its own task; it counts as in flight until that ends."""
        self._in_flight += 1
        tg.start_soon(self._counted, serve, *args)

    async def _counted(self, serve: Callable[[*Ts], Awaitable[object]], *args: *Ts) -> None:
        try:
            await serve(*args)
        finally:
            self._in_flight -= 1

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
            self._spawn(tg, self.send, error_reply(request.id, error))
            return
        stream = isinstance(request, ChatRequest) and request.stream
        try:
            job = self.scheduler.submit(
                request,
                client=self.job_client(),
                uid=self.uid,
                on_chunk=self._send_chunk if stream else None,
                size=size,
            )
        except KnownJob as known:
            self._spawn(tg, self._follow_known, request, known.job_id)
            return
        except DispatcherError as exc:
            self._spawn(tg, self.send, error_reply(request.id, exc))
            return
        if not request.detach:
            self.jobs[request.id] = job
        if job.request is request and not request.detach and not job.durable:
            # A job of our own that ends in memory: its answer is queued for the answer
            # task when it ends, with no task per job (one was ~8 KB of a queued job).
            self._in_flight += 1
            if job.outcome is not None:  # answered already (the cache)
                self._answered(job)
            else:
                job.on_finish = self._answered
            return
        self._spawn(tg, self._follow, request, job)

    def _answered(self, job: Job) -> None:
        """A job this connection waits for has its answer: queue it for :meth:`_answer`."""
        self._answers.append(job)
        self._answer_ready.set()

    async def _answer(self) -> None:
        """Write the answers :meth:`_answered` queued, in the order the jobs ended."""
        while True:
            while self._answers:
                job = self._answers.popleft()
                request_id = job.request.id
                if self.jobs.get(request_id) is job:
                    del self.jobs[request_id]
                try:
                    await self.send(job.reply(request_id))
                finally:
                    self._in_flight -= 1
            self._answer_ready = anyio.Event()
            if not self._answers:
                await self._answer_ready.wait()

    async def _follow_known(self, request: ChatRequest | EmbedRequest, job_id: str) -> None:
        job = await replay.resolve(self.scheduler, job_id)
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
        job = await replay.resolve(self.scheduler, request.job)
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
            results[name] = await probes.probe(self.scheduler, name, timeout_s=request.timeout_s)

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(probe, name)
        await self.send(Health(id=request.id, providers={n: results[n] for n in names}))

    def _may_see(self, job: Job) -> bool:
        return self.uid in (job.uid, ROOT_UID)

    def job_client(self) -> str:
        """Whose jobs this connection sends: ``client:NAME`` when its user is a configured
        client (looked up per job, so a reload applies at once), else the connection."""
        name = self.server.identities.client_for(self.uid)
        return self.client if name is None else f"client:{name}"

    async def _send_chunk(self, chunk: Chunk) -> None:
        await self.send(chunk)

    async def send(self, reply: Reply, *, final: bool = True) -> bool:
        """Write one reply (coalesced with others); on a dead, stuck or too slow client
        (``max_reply_bytes`` waiting for it), close the connection and return False.

        ``final``: the reply is a line's one final answer (a chunk never is).
        """
        counted = final and not isinstance(reply, Chunk)
        try:
            await self._writer.write(encode_line(reply), counted=counted)
        except PeerGone as gone:
            self.close(str(gone))
            return False
        return True

    def _on_written(self, finals: int) -> None:
        self._outstanding -= finals  # counted once written (or unwritable)
        self._replied.set()

    def close(self, reason: str = "closed") -> None:
        """Drop the client: stop reading and writing; :meth:`serve` then cancels its jobs."""
        if not self._closed:
            log.info("connection.dropped", client=self.client, jobs=len(self.jobs), reason=reason)
        self._closed = True
        self._writer.close()
        if self._reading is not None:
            self._reading.cancel()


async def _wait_final(job: Job) -> None:
    """Wait for the job's one final answer; the scheduler guarantees it by the job's deadline."""
    limit = None if job.deadline is None else job.deadline - job.accepted_at + 60.0
    with anyio.fail_after(limit):
        await job.done.wait()
