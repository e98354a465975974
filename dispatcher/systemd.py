"""Talk to systemd: readiness and watchdog notifications, and socket activation.

Standard library only. :class:`Notifier` speaks the ``sd_notify(3)`` datagram
protocol over ``$NOTIFY_SOCKET``; :func:`listen_fds` and
:func:`listen_fd_names` implement ``sd_listen_fds(3)`` and
``sd_listen_fds_with_names(3)``. Outside systemd every call is a quiet no-op,
so the daemon runs the same way from a terminal, a test or a unit.

Typical use in the daemon::

    notifier = Notifier()
    names = listen_fd_names()       # read before listen_fds() clears the variables
    sockets = listen_fds()          # [] unless started by dispatcher.socket
    ...                             # bind or adopt the socket, start the actors
    notifier.ready("serving")
    interval = notifier.watchdog_interval()   # ping every `interval` seconds
    ...
    notifier.reloading()            # on SIGHUP, then notifier.ready() when done
    notifier.stopping()             # on SIGTERM, before draining
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "listen_fd_names", "listen_fds"]

#: The first file descriptor systemd passes to a socket-activated service.
SD_LISTEN_FDS_START = 3

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _parse_int(value: str | None) -> int | None:
    """Return `value` as an int, or None unless it is a non-empty string of ASCII digits."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def _notify_address(value: str | None) -> str | None:
    """Translate $NOTIFY_SOCKET into a socket address: a path, or '@name' as an abstract name."""
    if value is None or len(value) < 2:
        return None
    if value[0] == "/":
        return value
    if value[0] == "@":
        return "\0" + value[1:]
    return None  # relative paths and vsock: addresses are not supported


class Notifier:
    """Send ``sd_notify(3)`` states to systemd over ``$NOTIFY_SOCKET``.

    The socket is a path or an abstract name written ``@name``. When the
    variable is unset or unusable the notifier is disabled and every call is a
    no-op, so callers never test for systemd themselves.

    Resource handling: ``__init__`` only reads the environment; the datagram
    socket is created on the first send and released by :meth:`close` (or by
    leaving a ``with`` block). After :meth:`close` nothing more is sent.

    Error handling: a state that is not ``NAME=value`` on one line is a
    programming error and raises :exc:`ValueError`, even when disabled. A failed
    send (systemd gone, queue full, socket missing) is dropped quietly: the
    socket is non-blocking so that a notification never stalls the event loop,
    and the notifier logs nothing itself.
    """

    __slots__ = ("_address", "_closed", "_socket", "_watchdog_pid", "_watchdog_usec", "enabled")

    enabled: bool

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _notify_address(env.get("NOTIFY_SOCKET"))
        self.enabled = self._address is not None
        self._socket: socket.socket | None = None
        self._closed = False
        self._watchdog_usec = _parse_int(env.get("WATCHDOG_USEC"))
        watchdog_pid = env.get("WATCHDOG_PID")
        # An unparsable WATCHDOG_PID never matches a real pid (which is positive).
        self._watchdog_pid = None if watchdog_pid is None else (_parse_int(watchdog_pid) or -1)

    def __repr__(self) -> str:
        if not self.enabled:
            return "<Notifier disabled>"
        address = self._address or ""
        shown = "@" + address[1:] if address.startswith("\0") else address
        interval = self.watchdog_interval()
        watchdog = "off" if interval is None else f"{interval:g}s"
        state = " closed" if self._closed else ""
        return f"<Notifier {shown} watchdog {watchdog}{state}>"

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def notify(self, *states: str) -> None:
        """Send the states, e.g. ``notify("READY=1", "STATUS=serving")``, as one datagram."""
        for state in states:
            name, equals, _ = state.partition("=")
            if not equals or not name:
                raise ValueError(f"sd_notify state {state!r} must have the form NAME=value")
            if "\n" in state:
                raise ValueError(f"sd_notify state {state!r} must fit on one line")
        if not states or self._address is None or self._closed:
            return
        payload = "\n".join(states).encode()
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(payload, self._address)
        except OSError:
            return

    def ready(self, status: str | None = None) -> None:
        """Tell systemd that start-up (or a reload) is complete, with an optional status line."""
        if status is None:
            self.notify("READY=1")
        else:
            self.notify("READY=1", "STATUS=" + _one_line(status))

    def reloading(self) -> None:
        """Tell systemd a reload has begun; call :meth:`ready` when it is done.

        Sends ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` in microseconds) beside
        ``RELOADING=1``, as systemd 253 and later require for ``Type=notify-reload``.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Tell systemd the service is shutting down (draining)."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """Set the free-form status line shown by ``systemctl status``; newlines become spaces."""
        self.notify("STATUS=" + _one_line(text))

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for `seconds` more before the start, reload or stop timeout fires."""
        self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog(self) -> None:
        """Ping the watchdog: ``WATCHDOG=1``."""
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Return the seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.

        None when ``WATCHDOG_USEC`` is unset or invalid, or when ``WATCHDOG_PID``
        names another process.
        """
        usec = self._watchdog_usec
        if usec is None or usec <= 0:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Release the socket; later notifications are dropped."""
        self._closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    """Join the lines of `text` with spaces, since one notify state is one line."""
    return " ".join(text.splitlines())


def _listen_count(env: Mapping[str, str]) -> int:
    """Return how many descriptors systemd passed to this process, per LISTEN_PID and LISTEN_FDS."""
    if _parse_int(env.get("LISTEN_PID")) != os.getpid():
        return 0
    count = _parse_int(env.get("LISTEN_FDS"))
    return 0 if count is None else count


def listen_fds(
    environ: Mapping[str, str] | None = None, *, unset: bool = True
) -> list[socket.socket]:
    """Return the sockets systemd passed by socket activation, as in ``sd_listen_fds(3)``.

    The descriptors start at :data:`SD_LISTEN_FDS_START` (3), are wrapped with
    ``socket.socket(fileno=fd)`` (family and type are read from the descriptor)
    and are made close-on-exec. Returns ``[]`` when ``LISTEN_PID`` is not this
    process or ``LISTEN_FDS`` is absent or invalid.

    With `unset` and the real environment (`environ` None), ``LISTEN_PID``,
    ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from :data:`os.environ`
    whatever the outcome, so children do not inherit them: call
    :func:`listen_fd_names` first if the names matter. A mapping passed as
    `environ` is never modified.

    Raises :exc:`OSError` if a passed descriptor is not a socket (for example
    a FIFO from ``ListenFIFO=``); the descriptors are then left open.
    """
    env = os.environ if environ is None else environ
    try:
        count = _listen_count(env)
    finally:
        if unset and environ is None:
            for name in _LISTEN_VARIABLES:
                os.environ.pop(name, None)
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
    except OSError:
        for sock in sockets:
            sock.detach()  # hand the descriptor back untouched rather than close it
        raise
    return sockets


def listen_fd_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """Return the names of the passed descriptors (``FileDescriptorName=``), in order.

    Each defaults to ``"unknown"`` when ``LISTEN_FDNAMES`` is absent, as in
    ``sd_listen_fds_with_names(3)``; ``[]`` when not socket-activated. Raises
    :exc:`ValueError` when ``LISTEN_FDNAMES`` does not name every descriptor.
    """
    env = os.environ if environ is None else environ
    count = _listen_count(env)
    if count == 0:
        return []
    raw = env.get("LISTEN_FDNAMES")
    if raw is None:
        return ["unknown"] * count
    names = raw.split(":")
    if len(names) != count:
        raise ValueError(
            f"LISTEN_FDNAMES names {len(names)} descriptors but LISTEN_FDS passes {count}"
        )
    return names
