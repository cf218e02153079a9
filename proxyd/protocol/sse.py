"""Splits an upstream byte stream into whole server-sent events, whatever the read boundaries.

Pure module. It copies nothing it does not have to: a read that holds exactly whole events is
passed on as the same bytes object.
"""

from __future__ import annotations

from collections.abc import Callable

_SEP = b"\n\n"
_CRLF_SEP = b"\r\n\r\n"


def chunk_frame(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunked-encoding frame (what aiohttp's writer would send)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def unframed(data: bytes) -> bytes:
    """`data` as it is: the body of an HTTP/1.0 response ends when the connection closes."""
    return data


def framing(http11: bool) -> Callable[[bytes], bytes]:
    """How a streamed body's writes are framed: chunked for HTTP/1.1, as they are for 1.0."""
    return chunk_frame if http11 else unframed


class EventSplitter:
    """Feed reads in; get back whole events (each with its blank-line terminator)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Return the events completed by `data`, in order; keep any partial tail."""
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
            if data.endswith(b"\r"):  # a CRLF split across reads: keep the CR for the next one
                self._buf = b"\r"
                data = data[:-1]
            data = data.replace(b"\r", b"\n")
        end = data.rfind(_SEP)
        if end < 0:
            self._buf = data + self._buf
            return []
        end += 2
        if end < len(data):
            self._buf = data[end:] + self._buf
            data = data[:end]
        if data.find(_SEP) == end - 2:
            return [data]
        events = []
        start = 0
        while start < end:
            cut = data.find(_SEP, start) + 2
            events.append(data[start:cut])
            start = cut
        return events

    def pending(self) -> bytes:
        """The bytes of an incomplete event still held (at the end of a stream: a cut event)."""
        return self._buf
