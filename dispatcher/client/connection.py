"""An async client for the daemon's socket, used by the CLI and by programs.

    async with Client.connect(path) as client:
        reply = await client.call({"op": "chat", "messages": [...]})
        async for event in client.request({"op": "chat", "stream": True, ...}):
            ...

Many requests may be in flight on one connection; a reader task routes each
reply to its request by ``id``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream, TaskGroup, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from dispatcher.contract.protocol import Accepted, Chunk, Error, Pong, Reply
from dispatcher.ingress.line_writer import LineWriter, PeerGone
from dispatcher.ingress.unix import peer_uid

MAX_REPLY_BYTES = 256 * 1024 * 1024
SERVICE_USER = "dispatcher"  # the unit's User=
BACKLOG_RETRY_S = 0.01
PER_REQUEST_BUFFER = 256


class DaemonNotRunning(Exception):
    """Nothing is listening on the socket; the message says how to start the daemon."""


async def _connect_unix(path: str) -> UNIXSocketStream:
    """Connect to a Unix socket without the event loop's sock_connect.

    A Unix connect never waits for a network: it succeeds or fails at once, or says
    EAGAIN while the listener's backlog is full. uvloop's sock_connect, cancelled by a
    deadline, can later fail inside the loop with InvalidStateError; this cannot.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                await anyio.sleep(BACKLOG_RETRY_S)  # a full backlog: retry until the deadline
        return await UNIXSocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


class UntrustedDaemon(Exception):
    """Whoever listens on the socket is not root, us, nor the dispatcher service's user."""


def trusted_uids(environ: Mapping[str, str] = os.environ) -> set[int]:
    """Who may serve us: root, ourselves, the service's user, and $DISPATCHER_TRUSTED_UIDS."""
    uids = {0, os.getuid()}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    for item in environ.get("DISPATCHER_TRUSTED_UIDS", "").split(","):
        if item.strip().isdigit():
            uids.add(int(item))
    return uids


def untrusted_peer(path: str, uid: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the daemon on ``path`` must not get our prompts, or None when it may.

    Anyone who can create the socket path first (a world-writable directory) could
    listen there, read what we send and forge the answers: SO_PEERCRED names the
    process that really listens.
    """
    if uid < 0 or uid in trusted_uids(environ):
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "no such user"
    return (
        f"{path} is served by uid {uid} ({name}), not by root, you or the "
        f"{SERVICE_USER} service: refusing to send it anything; if that daemon is yours to "
        f"trust, set DISPATCHER_TRUSTED_UIDS={uid}"
    )


class ConnectionLost(Exception):
    """The daemon closed the connection before answering."""


class Client:
    def __init__(self, stream: SocketStream, tg: TaskGroup) -> None:
        self._stream = stream
        self._tg = tg
        self._ids = itertools.count(1)
        self._prefix = f"c{os.getpid()}-"
        self._waiting: dict[str, MemoryObjectSendStream[Reply]] = {}
        self._decoder = msgspec.json.Decoder(Reply)
        self._encoder = msgspec.json.Encoder()
        self._writer = LineWriter(stream)
        self.closed = False

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str, *, timeout_s: float = 5.0) -> AsyncIterator[Client]:
        try:
            with anyio.fail_after(timeout_s):
                stream = await _connect_unix(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"no dispatcher is listening on {path}; start one with "
                f"`dispatcher serve --socket {path}` (add --simulate to try it without keys), "
                "or point $DISPATCHER_SOCKET at the right socket"
            ) from exc
        except PermissionError as exc:
            raise DaemonNotRunning(
                f"permission denied on {path}; ask for membership of the socket's group "
                "(see the README's deployment section)"
            ) from exc
        problem = untrusted_peer(path, peer_uid(stream))
        if problem is not None:
            await stream.aclose()
            raise UntrustedDaemon(problem)
        # The stream closes after the task group, outside its cancelled scope: closing
        # inside it would raise Cancelled and mask whatever the caller raised.
        async with stream, anyio.create_task_group() as tg:
            client = cls(stream, tg)
            await tg.start(client._writer.run)
            tg.start_soon(client._read_replies)
            try:
                yield client
                await client._writer.flush(timeout_s)  # what was sent still leaves
            finally:
                tg.cancel_scope.cancel()

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def _read_replies(self) -> None:
        reader = BufferedByteReceiveStream(self._stream)
        try:
            while True:
                line = await reader.receive_until(b"\n", MAX_REPLY_BYTES)
                reply = self._decoder.decode(line)
                target = self._waiting.get(reply.id or "")
                if target is not None:
                    await target.send(reply)
                elif isinstance(reply, Error):
                    # An error not tied to a request (frame too large, overloaded): tell everyone.
                    for waiting in list(self._waiting.values()):
                        await waiting.send(reply)
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            OSError,
        ):
            pass
        finally:
            self.closed = True
            for waiting in self._waiting.values():
                waiting.close()

    async def send(self, payload: Mapping[str, Any]) -> None:
        try:
            await self._writer.write(self._encoder.encode(payload) + b"\n")
        except PeerGone as exc:
            raise ConnectionLost("the daemon closed the connection") from exc

    async def request(self, payload: Mapping[str, Any]) -> AsyncIterator[Reply]:
        """Send one request; yield its replies up to and including the final one."""
        body = dict(payload)
        body.setdefault("id", self.new_id())
        request_id = str(body["id"])
        send, receive = anyio.create_memory_object_stream[Reply](PER_REQUEST_BUFFER)
        self._waiting[request_id] = send
        detached = bool(body.get("detach")) or body.get("op") == "cancel"
        try:
            if self.closed:  # the reader is gone (the daemon closed an idle connection): no
                # reply could ever reach this request, so say so instead of waiting
                raise ConnectionLost("the daemon closed this connection; connect again")
            await self.send(body)
            async with receive:
                async for reply in receive:
                    yield reply
                    if isinstance(reply, Chunk) or (isinstance(reply, Accepted) and not detached):
                        continue
                    return
            raise ConnectionLost("the daemon closed the connection before answering")
        finally:
            self._waiting.pop(request_id, None)
            send.close()
            receive.close()

    async def call(self, payload: Mapping[str, Any]) -> Reply:
        """Send one request and return its final reply (chunks are skipped)."""
        final: Reply | None = None
        async for reply in self.request(payload):
            final = reply
        assert final is not None
        return final


async def answers_ping(path: str, *, timeout_s: float = 2.0) -> bool:
    """Whether a daemon serves on ``path`` right now: a ping answered within ``timeout_s``.

    For start-up waits (the demo, benchmarks, tests): every way a daemon that is not
    there yet, or not any more, can show itself counts as "no".
    """
    try:
        with anyio.fail_after(timeout_s):
            async with Client.connect(path, timeout_s=timeout_s) as client:
                return isinstance(await client.call({"op": "ping"}), Pong)
    except (DaemonNotRunning, ConnectionLost, OSError, TimeoutError, anyio.BrokenResourceError):
        return False
