"""A line writer that coalesces: many tasks write, one task sends, few system calls.

Writers only append to a buffer; the task running :meth:`LineWriter.run` owns
the stream and sends everything buffered in one ``send``, so lines added while
a send is in flight leave together in the next one. On this kind of host a
socket system call costs more than everything else a reply needs, so under
load this roughly halves the daemon's CPU per job.

The buffer belongs to the writer, not to whichever task wrote last: a writer
cancelled at any point leaves its line queued, whole, and never takes other
tasks' lines with it.

Backpressure: past ``high_water`` buffered bytes, writers wait for the peer to
read; a peer that reads nothing for ``timeout_s`` is given up on. Whatever the
writers do, the bytes waiting for the peer (buffered, or in the send under way)
never pass ``max_buffered``: the write that would pass it closes the writer.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import ByteSendStream, TaskStatus


class PeerGone(Exception):
    """The peer stopped reading or hung up; nothing more can be written."""


class LineWriter:
    """``__init__`` does no I/O; the owner runs :meth:`run` in its task group."""

    def __init__(
        self,
        stream: ByteSendStream,
        *,
        timeout_s: float = 30.0,
        high_water: int = 4 * 1024 * 1024,
        max_buffered: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self._stream = stream
        self._timeout_s = timeout_s
        self._high_water = high_water
        self._max_buffered = max_buffered  # None: only high_water and timeout_s bound it
        self._in_send = 0  # bytes of the send under way
        self._on_written = on_written  # told how many counted lines each send carried
        self._buffer = bytearray()
        self._counted = 0  # counted lines in the buffer
        self._sending = False
        self._queued = anyio.Event()  # the buffer is no longer empty
        self._progress = anyio.Event()  # a send ended or the writer closed; replaced when set
        self._scope: anyio.CancelScope | None = None
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<LineWriter buffered {len(self._buffer)} sending {self._in_send} "
            f"closed {self.closed}>"
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send what writers queue, many lines per send, until closed or cancelled.

        Resource handling: this task is the only one that touches the stream. When
        it ends (cancelled, or the peer is gone) the writer is closed: lines still
        buffered are dropped and, like the lines of a send cut short, reported to
        ``on_written`` as unwritable, so every counted line is reported exactly once.

        Error handling: a send that fails, or is not taken within ``timeout_s``,
        closes the writer; later writes raise :class:`PeerGone`.
        """
        with anyio.CancelScope() as self._scope:
            task_status.started()
            try:
                while not self.closed:
                    if not self._buffer:
                        # No deadline: an idle connection lives as long as its owner.
                        self._queued = anyio.Event()
                        await self._queued.wait()
                        continue
                    await self._send_buffered()
            finally:
                self.close()

    async def _send_buffered(self) -> None:
        data, counted = bytes(self._buffer), self._counted
        self._buffer.clear()
        self._counted = 0
        self._sending = True
        self._in_send = len(data)
        try:
            with anyio.fail_after(self._timeout_s):
                await self._stream.send(data)
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.close()
        finally:
            self._sending = False
            self._in_send = 0
            self._report(counted)
            self._notify()

    async def write(self, line: bytes, *, counted: bool = True) -> None:
        """Queue ``line``; it leaves with the next send. Raises :class:`PeerGone` once closed.

        Returns at once unless more than ``high_water`` bytes are buffered; then it
        waits for the peer to read, at most ``timeout_s``. A caller cancelled while
        it waits leaves its line queued: it still goes out. A line that would take
        the bytes waiting for the peer past ``max_buffered`` closes the writer (the
        peer reads too slowly to be worth the memory) and raises :class:`PeerGone`.
        """
        if self.closed:
            self._report(counted)  # unwritable: still reported, once
            raise PeerGone("the connection is closed")
        limit = self._max_buffered
        if limit is not None and self._in_send + len(self._buffer) + len(line) > limit:
            self._report(counted)
            self.close()
            raise PeerGone(f"more than {limit:,} bytes of replies were waiting for the peer")
        self._buffer += line
        self._counted += counted
        self._queued.set()
        if len(self._buffer) > self._high_water:
            await self._wait_below_high_water()

    async def flush(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until everything queued so far has been sent."""
        with anyio.move_on_after(timeout_s):
            while (self._buffer or self._sending) and not self.closed:
                await self._progress.wait()

    def close(self) -> None:
        """Stop writing; what is still buffered is dropped and reported as unwritable."""
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()
        dropped, self._counted = self._counted, 0
        self._buffer.clear()
        self._report(dropped)
        self._notify()

    async def _wait_below_high_water(self) -> None:
        with anyio.move_on_after(self._timeout_s):
            while len(self._buffer) > self._high_water and not self.closed:
                await self._progress.wait()
        if len(self._buffer) > self._high_water:
            self.close()  # the peer read nothing for timeout_s
        if self.closed:
            raise PeerGone("the peer stopped reading")

    def _report(self, counted: int) -> None:
        if counted and self._on_written is not None:
            self._on_written(counted)

    def _notify(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()
