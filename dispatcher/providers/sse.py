"""Server-sent events from a streaming upstream, decoded into deltas."""

from __future__ import annotations

import re
from typing import Final

import msgspec

from dispatcher.contract.config import AdapterName
from dispatcher.providers.headers import parse_error_message
from dispatcher.providers.wire import (
    AnswerFormatError,
    StreamDelta,
    _chunk_decoder,
    _excerpt,
    _finish_reason,
    _reasoning,
    _usage,
    require_adapter,
    tool_call_deltas,
)

# One SSE line larger than this means the upstream is not speaking SSE at all.
_MAX_SSE_LINE_BYTES: Final = 4 * 1024 * 1024


# --------------------------------------------------------------------------- streaming

_LINE_BREAK: Final = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Turn the raw bytes of a streamed chat answer into `StreamDelta` values.

    Feed bytes as they arrive, split anywhere (even inside a line or a UTF-8
    character); each call returns the deltas of the lines it completed. Lines end
    with ``\\n``, ``\\r\\n`` or ``\\r``. Each ``data:`` line holds one JSON chunk.
    Comments (``: keep-alive``), blank lines, other fields (``event:``, ``id:``) and
    chunks with nothing useful (role-only deltas, empty choices without usage) give
    nothing. ``data: [DONE]`` sets `done`; anything after it is ignored. A bare line
    starting with ``{`` is read as data too, since some servers send an error object
    without the ``data:`` prefix.

    Error handling: a data line that is not a JSON chunk, or a chunk carrying an
    ``error`` object, raises AnswerFormatError. A line over 4 MiB raises it as well.
    """

    def __init__(self, adapter: AdapterName) -> None:
        require_adapter(adapter)
        self.adapter: AdapterName = adapter
        self.done = False
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already known to hold no line break

    def __repr__(self) -> str:
        state = "done" if self.done else f"buffered {len(self._buffer)}B"
        return f"<SSEDecoder {self.adapter} {state}>"

    def feed(self, data: bytes) -> list[StreamDelta]:
        """Take the next bytes of the stream; return the deltas of every completed line."""
        if self.done:
            return []
        self._buffer += data
        deltas: list[StreamDelta] = []
        start = 0
        try:
            # A list, not the iterator: a live scanner pins the bytearray's size.
            for match in list(_LINE_BREAK.finditer(self._buffer, self._scanned)):
                if match.group() == b"\r" and match.end() == len(self._buffer):
                    break  # a "\n" may follow in the next feed; decide then
                line = bytes(self._buffer[start : match.start()])
                start = match.end()
                if self._line(line, deltas):
                    self._buffer.clear()
                    return deltas
        finally:
            # Drop the lines handled (a bad one included, so an error is raised once).
            del self._buffer[:start]
            # Rescan a trailing "\r": it may be the first half of "\r\n".
            self._scanned = len(self._buffer) - self._buffer.endswith(b"\r")
        if self._scanned > _MAX_SSE_LINE_BYTES:
            self._buffer.clear()
            self._scanned = 0
            raise AnswerFormatError(
                f"stream line longer than {_MAX_SSE_LINE_BYTES} bytes without a line break"
            )
        return deltas

    def close(self) -> list[StreamDelta]:
        """End of stream: parse a last line that had no line break."""
        deltas: list[StreamDelta] = []
        if not self.done and self._buffer:
            for line in _LINE_BREAK.split(bytes(self._buffer)):
                if self._line(line, deltas):
                    break
        self._buffer.clear()
        self._scanned = 0
        return deltas

    def _line(self, line: bytes, deltas: list[StreamDelta]) -> bool:
        """Handle one line, appending its delta if any; True once the stream is done."""
        if line.startswith(b"{"):
            value = line
        else:
            field, colon, value = line.partition(b":")
            if not colon or field != b"data":
                return False  # blank line, comment (empty field name), or a field we do not use
            if value.startswith(b" "):
                value = value[1:]
        value = value.strip()
        if value == b"[DONE]":
            self.done = True
        elif value and (delta := self._chunk(value)) is not None:
            deltas.append(delta)
        return self.done

    def _chunk(self, value: bytes) -> StreamDelta | None:
        try:
            chunk = _chunk_decoder.decode(value)
        except msgspec.DecodeError as exc:
            raise AnswerFormatError(
                f"stream data line is not a valid chunk ({exc}); line: {_excerpt(value)}"
            ) from None
        if chunk.error is not None:
            raise AnswerFormatError(f"stream carries an error: {parse_error_message(value)}")
        content = reasoning = ""
        finish_reason = None
        calls = None
        if chunk.choices:
            choice = chunk.choices[0]
            part = choice.delta or choice.message
            if part is not None:
                content = part.content or ""
                reasoning = _reasoning(part)
                calls = tool_call_deltas(part.tool_calls)
            finish_reason = _finish_reason(choice.finish_reason)
        usage = _usage(chunk.usage) if chunk.usage is not None else None
        if not (content or reasoning or usage or finish_reason or calls):
            return None
        return StreamDelta(
            content=content,
            reasoning=reasoning,
            usage=usage,
            finish_reason=finish_reason,
            model=chunk.model,
            tool_calls=calls,
        )
