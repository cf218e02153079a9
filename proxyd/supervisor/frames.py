"""Length-prefixed orjson messages over the socketpair between the supervisor and a worker.

Pure module: bytes in, dicts out. A message is a JSON object; never a request or response body.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

_HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 2**20  # a metrics snapshot of a busy worker is well under a megabyte

Message = dict[str, Any]


class FrameError(Exception):
    """The peer sent something that is not a frame of ours; the channel is closed."""


def encode(message: Message) -> bytes:
    """One frame: a 4-byte big-endian length, then the JSON body."""
    body = orjson.dumps(message)
    return _HEADER.pack(len(body)) + body


class FrameBuffer:
    """Collects received bytes and hands back the whole messages among them."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data = b""  # the start of a frame still incomplete

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add `data`; return every message now complete, in order.

        Whole frames are parsed where they lie (a receive buffer the caller reuses, or bytes):
        only an incomplete frame's start is copied, to wait for the rest.
        """
        view = memoryview(self._data + data if self._data else data)
        out: list[Message] = []
        n = len(view)
        start = 0
        try:
            while n - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(view, start)
                if size > MAX_FRAME:
                    raise FrameError(f"frame of {size} bytes")
                end = start + _HEADER.size + size
                if n < end:
                    break
                message = orjson.loads(view[start + _HEADER.size : end])
                if type(message) is not dict:
                    raise FrameError("a frame must hold a JSON object")
                out.append(message)
                start = end
            self._data = view[start:].tobytes() if start < n else b""
        finally:
            view.release()
        return out
