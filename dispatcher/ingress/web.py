"""An aiohttp application served as one anyio task, on TCP and/or a Unix socket."""

from __future__ import annotations

import contextlib
import os
from typing import Final

import anyio
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

from dispatcher.contract.config import is_loopback, parse_listen
from dispatcher.ingress.unix import bind_unix_socket

log = structlog.get_logger("dispatcher.web")

SHUTDOWN_TIMEOUT_S: Final = 2.0  # handlers still open when the service stops get this long


class WebService:
    """An aiohttp app on a TCP address and/or a Unix socket, run as one anyio task.

    ``run`` reports the bound addresses through ``task_status.started`` only once
    every listener is up, serves until cancelled, and on the way out closes the
    listeners, gives open handlers ``SHUTDOWN_TIMEOUT_S`` and removes the socket file.
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
    ) -> None:
        self.app = app
        self.name = name
        self.listen = listen
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.addresses: list[str] = []
        self._sites: list[web.BaseSite] = []
        self._stop_accepting = anyio.Event()
        self.listeners_closed = anyio.Event()  # set once stop_accepting has taken effect
        self._serving = False

    def __repr__(self) -> str:
        return f"<WebService {self.name} {' '.join(self.addresses) or 'not serving'}>"

    async def run(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        runner = web.AppRunner(
            self.app,
            access_log=None,  # no access log: nothing that could carry a header is written
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        bound_socket = False
        try:
            if self.listen:
                host, port = parse_listen(self.listen, key=f"{self.name}.listen")
                if not is_loopback(host):
                    log.warning(
                        f"{self.name}.not_loopback",
                        listen=self.listen,
                        problem="there is no authentication; anyone who can reach it can spend your quotas",
                    )
                site: web.BaseSite = web.TCPSite(runner, host, port)
                await site.start()
                self._sites.append(site)
                bound = runner.addresses[-1]
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                self.addresses.append(f"http://{shown}:{bound[1]}")
            if self.socket_path:
                sock = bind_unix_socket(self.socket_path, self.socket_mode, self.socket_group)
                bound_socket = True
                site = web.SockSite(runner, sock)
                await site.start()
                self._sites.append(site)
                self.addresses.append(f"unix:{self.socket_path}")
            log.info(f"{self.name}.listening", addresses=self.addresses)
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
