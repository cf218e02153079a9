"""A worker's end of its channel to the supervisor: requests with replies, and notifications.

Requests carry an `id` and get a reply with the same `id`; the supervisor's own requests to the
worker (apply a push, snapshot the metrics) arrive with an `op` and are answered by handlers.
Never carries a request or response body, nor a key's secret.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from typing import Any

import structlog

from proxyd.supervisor.frames import FrameBuffer, FrameError, Message, encode

log = structlog.get_logger("proxyd.worker")

Handler = Callable[[Message], Message]


class SupervisorGone(Exception):
    """The channel to the supervisor closed (the supervisor exited): this worker stops."""


class _Protocol(asyncio.Protocol):
    def __init__(self, link: Link) -> None:
        self.link = link
        self.frames = FrameBuffer()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.frames.feed(data)
        except FrameError:
            log.exception("supervisor_channel_garbled")
            self.link.lost()
            return
        for message in messages:
            self.link.received(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost()


class Link:
    """The channel to the supervisor of this worker (slot `slot` of `workers`)."""

    def __init__(self, sock: socket.socket, *, slot: int, workers: int) -> None:
        self.sock = sock
        self.slot = slot
        self.workers = workers
        self.handlers: dict[str, Handler] = {}
        self.on_lost: Callable[[], None] | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._out = bytearray()  # frames of this turn of the loop, written together

    def _write(self, frame: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out += frame

    def _flush(self) -> None:
        if self._transport is not None and not self._closed and self._out:
            self._transport.write(bytes(self._out))
        self._out.clear()

    async def start(self) -> None:
        """Attach the socket to the running loop."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(lambda: _Protocol(self), sock=self.sock)
        self._transport = transport

    def close(self) -> None:
        """Close the channel (the supervisor reads that as this worker's end)."""
        self._flush()
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def notify(self, message: Message) -> None:
        """Send a message that needs no answer (a release, a settlement, a readiness note)."""
        if self._transport is None or self._closed:
            return
        self._write(encode(message))

    async def request(self, message: Message) -> Message:
        """Send a request (its `id` is set here) and wait for its reply."""
        if self._transport is None or self._closed:
            raise SupervisorGone("no channel to the supervisor")
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        message["id"] = rid
        self._write(encode(message))
        try:
            return await future
        finally:
            self._pending.pop(rid, None)

    def received(self, message: Message) -> None:
        op = message.get("op")
        if op is None:
            future = self._pending.get(message.get("id", -1))
            if future is not None and not future.done():
                future.set_result(message)
            return
        handler = self.handlers.get(op)
        reply: Message
        try:
            reply = handler(message) if handler is not None else {"error": f"no handler {op}"}
        except Exception as exc:  # one bad message must not stop the channel
            log.exception("supervisor_request_failed", op=op)
            reply = {"error": type(exc).__name__}
        reply["id"] = message["id"]
        self.notify(reply)

    def lost(self) -> None:
        was_open = not self._closed
        self._closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SupervisorGone("the supervisor closed the channel"))
        if was_open and self.on_lost is not None:
            self.on_lost()


def reply_value(reply: Message) -> Any:
    """Raise for an error reply (a programming error between our two ends)."""
    if "error" in reply:
        raise RuntimeError(f"supervisor: {reply['error']}")
    return reply
