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
        self._data = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Add `data`; return every message now complete, in order."""
        self._data += data
        out: list[Message] = []
        buf = self._data
        start = 0
        while len(buf) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, start)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes")
            end = start + _HEADER.size + size
            if len(buf) < end:
                break
            message = orjson.loads(bytes(buf[start + _HEADER.size : end]))
            if not isinstance(message, dict):
                raise FrameError("a frame must hold a JSON object")
            out.append(message)
            start = end
        if start:
            del buf[:start]
        return out
