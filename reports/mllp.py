"""MLLP framing: ``0x0B`` message ``0x1C 0x0D``, decoded from a byte stream.

TCP delivers a stream, not messages: one ``read`` may hold half a frame, several frames, or the
bytes some interface engines put between frames (newlines, keep-alive NULs). The decoder keeps
what it has not yet framed and never loses a byte of a complete frame to a chunk boundary.
What it cannot frame is not silently swallowed either: junk between frames, a frame cut short by
a new start byte, and a frame over the size limit come out as :class:`Discarded` so the caller
can log it (and, for an oversized message, still answer the sender).

Pure and transport-free: the asyncio listener feeds it whatever ``read`` returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "END_BLOCK",
    "START_BLOCK",
    "Discarded",
    "Frame",
    "FrameDecoder",
    "frame",
]

START_BLOCK: Final = 0x0B
END_BLOCK: Final = 0x1C
CARRIAGE_RETURN: Final = 0x0D
DEFAULT_MAX_FRAME: Final = 32 * 1024 * 1024
_HEAD_KEPT: Final = 64 * 1024


@dataclass(frozen=True)
class Frame:
    """One complete message, without the framing bytes."""

    data: bytes


@dataclass(frozen=True)
class Discarded:
    """Bytes that did not form a frame; ``head`` keeps at most the first 64 KiB of them."""

    reason: str
    size: int
    head: bytes


def frame(message: bytes) -> bytes:
    """Wrap one message for sending; a message holding a framing byte cannot be framed."""
    if bytes([START_BLOCK]) in message or bytes([END_BLOCK]) in message:
        raise ValueError("message contains an MLLP start or end block byte")
    return bytes([START_BLOCK]) + message + bytes([END_BLOCK, CARRIAGE_RETURN])


class FrameDecoder:
    """Incremental MLLP decoder: ``feed`` chunks, get complete frames and discards in order.

    End of a frame is ``0x1C 0x0D``. A ``0x1C`` followed by any other byte also ends the frame
    (some senders omit the carriage return); the byte after it is then treated as the start of
    what follows. A ``0x0B`` inside a frame means the sender gave up on the previous message and
    started again: the unfinished part is discarded, never delivered as a message.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame <= 0:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._in_frame = False
        self._oversize = 0  # > 0 while skipping the rest of an oversized frame
        self._oversize_head = b""
        self._junk = 0
        self._junk_head = bytearray()
        self._pending_end = False  # the last byte seen was 0x1C, the next decides

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held right now (lost if the connection closes)."""
        return len(self._buf) + self._oversize

    def feed(self, data: bytes) -> list[Frame | Discarded]:
        out: list[Frame | Discarded] = []
        i, n = 0, len(data)
        while i < n:
            if self._pending_end:
                self._pending_end = False
                self._finish(out)
                if data[i] == CARRIAGE_RETURN:
                    i += 1
                continue
            if not self._in_frame:
                start = data.find(START_BLOCK, i)
                stop = n if start < 0 else start
                self._note_junk(data[i:stop])
                if start < 0:
                    break
                self._flush_junk(out)
                self._in_frame = True
                i = start + 1
                continue
            # Inside a frame: copy up to the next framing byte.
            end = data.find(END_BLOCK, i)
            restart = data.find(START_BLOCK, i)
            if restart >= 0 and (end < 0 or restart < end):
                self._append(data[i:restart])
                size = len(self._buf) + self._oversize
                head = self._oversize_head or bytes(self._buf[:_HEAD_KEPT])
                self._reset_frame()
                out.append(Discarded("frame interrupted by a new start block", size, head))
                self._in_frame = True
                i = restart + 1
                continue
            if end < 0:
                self._append(data[i:])
                break
            self._append(data[i:end])
            self._pending_end = True
            i = end + 1
        return out

    def close(self) -> list[Frame | Discarded]:
        """End of stream: a frame ended by a lone ``0x1C`` is delivered, the rest reported."""
        out: list[Frame | Discarded] = []
        if self._pending_end:
            self._pending_end = False
            self._finish(out)
        if self._in_frame:
            size = len(self._buf) + self._oversize
            head = self._oversize_head or bytes(self._buf[:_HEAD_KEPT])
            self._reset_frame()
            out.append(Discarded("stream ended inside a frame", size, head))
        self._flush_junk(out)
        return out

    def _append(self, chunk: bytes) -> None:
        if self._oversize:
            self._oversize += len(chunk)
            return
        self._buf += chunk
        if len(self._buf) > self.max_frame:
            self._oversize = len(self._buf)
            self._oversize_head = bytes(self._buf[:_HEAD_KEPT])
            self._buf = bytearray()

    def _finish(self, out: list[Frame | Discarded]) -> None:
        if self._oversize:
            out.append(
                Discarded(
                    f"frame of {self._oversize} bytes exceeds the limit of {self.max_frame}",
                    self._oversize,
                    self._oversize_head,
                )
            )
        else:
            out.append(Frame(bytes(self._buf)))
        self._reset_frame()

    def _reset_frame(self) -> None:
        self._buf = bytearray()
        self._in_frame = False
        self._oversize = 0
        self._oversize_head = b""

    def _note_junk(self, chunk: bytes) -> None:
        if chunk:
            self._junk += len(chunk)
            room = _HEAD_KEPT - len(self._junk_head)
            if room > 0:
                self._junk_head += chunk[:room]

    def _flush_junk(self, out: list[Frame | Discarded]) -> None:
        if self._junk:
            out.append(Discarded("bytes outside any frame", self._junk, bytes(self._junk_head)))
            self._junk = 0
            self._junk_head = bytearray()
