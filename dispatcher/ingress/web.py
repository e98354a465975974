"""An aiohttp application served as one anyio task, on TCP and/or a Unix socket.

Resource handling: at most ``max_connections`` connections at once across the
service's listeners; one more is answered at once with a 503 (``Retry-After: 1``)
and closed, without ever reaching aiohttp. A connection must deliver a request's
line and headers within ``header_timeout_s`` of opening, or of its previous
answer (aiohttp's keep-alive timer runs from the start of a connection), or it is
dropped; an idle keep-alive connection lives that long too. Bodies are the
handlers' to bound (see ``HttpFront``); a body left unread gets ``LINGER_S``.

Error handling: a request aiohttp cannot parse gets a 400 in OpenAI's format that
echoes nothing of it (aiohttp's own quotes the bad line, which may be an
``Authorization`` header), and is logged as one event without its bytes.

Client tokens live in :mod:`dispatcher.ingress.tokens` (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import anyio
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

from dispatcher.contract.config import parse_listen
from dispatcher.ingress.openai_errors import malformed_response, over_capacity_bytes
from dispatcher.ingress.tokens import MIN_TOKEN_CHARS, ClientTokens
from dispatcher.ingress.unix import bind_unix_socket

__all__ = ["MIN_TOKEN_CHARS", "ClientTokens", "WebService", "is_unix_connection"]

log = structlog.get_logger("dispatcher.web")

SHUTDOWN_TIMEOUT_S: Final = 2.0  # handlers still open when the service stops get this long
LINGER_S: Final = 1.0  # a body we answered without reading may go on arriving this long
REFUSAL_LINGER_S: Final = 1.0  # a refused connection is closed after its 503, at the latest
REFUSAL_LOG_EVERY_S: Final = 10.0  # one log line per this long while connections are refused


def is_unix_connection(request: web.BaseRequest) -> bool:
    """True when the request came over a Unix socket (its file mode guards it)."""
    transport = request.transport
    if transport is None:
        return False
    return not isinstance(transport.get_extra_info("sockname"), tuple)


# -- connections ------------------------------------------------------------------------


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, counted against the cap, echoing nothing of a bad request."""

    def __init__(self, manager: web.Server, *, cap: ConnectionCap, **options: Any) -> None:
        super().__init__(manager, **options)
        self.cap = cap

    def connection_lost(self, exc: BaseException | None) -> None:
        self.cap.live.discard(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, cut the line
            raise ConnectionError("the response has begun; cannot send an error instead")
        if status >= 500:
            log.error("http.handler_failed", status=status, error=exc)
        else:
            # Never the exception's text: aiohttp quotes the bad line, maybe an Authorization.
            log.info("http.malformed_request", status=status, problem=type(exc).__name__)
        return malformed_response(status)


class _Refusal(asyncio.Protocol):
    """A connection past the cap: a 503 at once, a FIN, and a close soon after."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self._closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        transport.write(self.answer)
        if transport.can_write_eof():
            transport.write_eof()
        # Not closed at once: a client that already sent its request would get a reset
        # instead of the 503. It reads the answer and closes; we close after REFUSAL_LINGER_S.
        self._closer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read

    def eof_received(self) -> bool:
        if self.transport is not None:
            self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closer is not None:
            self._closer.cancel()
        self.transport = None


class ConnectionCap:
    """The protocol factory of a service's listeners: aiohttp's handler, or a refusal past ``limit``."""

    def __init__(
        self,
        server: web.Server,
        *,
        name: str,
        limit: int,
        handler_options: Mapping[str, Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.name = name
        self.limit = limit
        self.handler_options = dict(handler_options)
        self.clock = clock
        # A handler leaves the set at connection_lost, or when it is collected if its
        # connection was never made: no count to forget to release.
        self.live: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self.refused = 0
        self._refused_unlogged = 0
        self._logged_at: float | None = None
        self._answer = over_capacity_bytes(limit)

    def __repr__(self) -> str:
        return f"<ConnectionCap {self.name} {self.open}/{self.limit} refused {self.refused}>"

    @property
    def open(self) -> int:
        return len(self.live)

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.live) >= self.limit:
            self._note_refusal()
            return _Refusal(self._answer)
        handler = _Connection(
            self.server, cap=self, loop=asyncio.get_running_loop(), **self.handler_options
        )
        self.live.add(handler)
        return handler

    def _note_refusal(self) -> None:
        self.refused += 1
        self._refused_unlogged += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning(
                f"{self.name}.connections_refused",
                refused=self._refused_unlogged,
                limit=self.limit,
                answer="503 with Retry-After: 1",
            )
            self._logged_at = now
            self._refused_unlogged = 0


class _CappedSite(web.SockSite):
    """aiohttp's SockSite, serving through a :class:`ConnectionCap` instead of the bare server."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, cap: ConnectionCap) -> None:
        super().__init__(runner, sock)
        self.cap = cap
        self.sock = sock

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.cap, sock=self.sock, backlog=self._backlog)


async def _start_site(
    runner: web.BaseRunner, sock: socket.socket, cap: ConnectionCap
) -> _CappedSite:
    """A started site on ``sock``; the socket is closed if it cannot start."""
    try:
        site = _CappedSite(runner, sock, cap)
        await site.start()
    except BaseException:
        sock.close()
        raise
    return site


async def _bind_tcp(host: str, port: int) -> socket.socket:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, *_, address = infos[0]
    return socket.create_server(address[:2], family=family)


# -- the service ------------------------------------------------------------------------


class WebService:
    """An aiohttp app on a TCP address and/or a Unix socket, run as one anyio task.

    ``run`` reports the bound addresses through ``task_status.started`` only once
    every listener is up, serves until cancelled, and on the way out closes the
    listeners, gives open handlers ``SHUTDOWN_TIMEOUT_S`` and removes the socket file.
    ``access`` says who may use it, for the ``listening`` log line.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        name: str,
        listen: str | None,
        socket_path: str | None,
        socket_mode: int = 0o660,
        socket_group: str | None = None,
        max_connections: int = 256,
        header_timeout_s: float = 10.0,
        access: str | None = None,
    ) -> None:
        self.app = app
        self.name = name
        self.listen = listen
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.access = access
        self.addresses: list[str] = []
        self.cap: ConnectionCap | None = None
        self._sites: list[web.BaseSite] = []
        self._stop_accepting = anyio.Event()
        self.listeners_closed = anyio.Event()  # set once stop_accepting has taken effect
        self._serving = False

    def __repr__(self) -> str:
        cap = f" {self.cap.open}/{self.cap.limit} connections" if self.cap else ""
        return f"<WebService {self.name} {' '.join(self.addresses) or 'not serving'}{cap}>"

    async def run(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        runner = web.AppRunner(
            self.app,
            access_log=None,  # no access log: nothing that could carry a header is written
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        assert runner.server is not None
        self.cap = ConnectionCap(
            runner.server,
            name=self.name,
            limit=self.max_connections,
            handler_options={
                "access_log": None,
                # From the connection's start and after each answer: the headers' deadline.
                "keepalive_timeout": self.header_timeout_s,
                "lingering_time": LINGER_S,
            },
        )
        bound_socket = False
        try:
            if self.listen:
                host, port = parse_listen(self.listen, key=f"{self.name}.listen")
                sock = await _bind_tcp(host, port)
                site: web.BaseSite = await _start_site(runner, sock, self.cap)
                self._sites.append(site)
                bound = sock.getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                self.addresses.append(f"http://{shown}:{bound[1]}")
            if self.socket_path:
                sock = bind_unix_socket(self.socket_path, self.socket_mode, self.socket_group)
                bound_socket = True
                site = await _start_site(runner, sock, self.cap)
                self._sites.append(site)
                self.addresses.append(f"unix:{self.socket_path}")
            log.info(
                f"{self.name}.listening",
                addresses=self.addresses,
                access=self.access,
                max_connections=self.max_connections,
                header_timeout_s=self.header_timeout_s,
            )
            self._serving = True
            task_status.started(list(self.addresses))
            await self._stop_accepting.wait()
            for site in self._sites:
                await site.stop()
            self._remove_socket(bound_socket)
            bound_socket = False
            self.listeners_closed.set()
            await anyio.sleep_forever()
        finally:
            self._serving = False
            self.listeners_closed.set()
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            self._remove_socket(bound_socket)
            self.addresses = []

    async def stop_accepting(self) -> None:
        """Close the listeners and return once they are closed; open requests go on."""
        self._stop_accepting.set()
        if self._serving:
            await self.listeners_closed.wait()

    def _remove_socket(self, bound: bool) -> None:
        if bound and self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
