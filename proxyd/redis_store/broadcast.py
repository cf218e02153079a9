"""Pushed state between instances over Redis pub/sub, with the latest state kept in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from proxyd.redis_store.store import FAILURES, RedisStore, cancelling

log = structlog.get_logger("proxyd.redis")


class Broadcast:
    """Pushed state between instances over Redis pub/sub; an instance skips its own messages.

    A message published with a version is also kept in Redis as that kind's latest state
    (never replaced by an older version). Each time this instance (re)subscribes it reads the
    latest state of every kind and hands it to the callbacks, so what others pushed while it was
    cut off from Redis (a revoked key, say) arrives on reconnection instead of being lost.
    Messages published while Redis is away are sent on recovery.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._callbacks: dict[str, list[Callable[[bytes], None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._origin = store.instance.encode() + b"|"
        self.subscribed = asyncio.Event()

    def _channel(self, kind: str) -> str:
        return f"{self.store.prefix}bcast:{kind}"

    def subscribe(self, channel_kind: str, callback: Callable[[bytes], None]) -> None:
        """Call `callback(payload)` for each message of `channel_kind` from another instance."""
        self._callbacks.setdefault(self._channel(channel_kind), []).append(callback)

    def _latest(self, kind: str) -> str:
        return f"{self.store.prefix}latest:{kind}"

    async def publish(
        self, channel_kind: str, payload: bytes, *, version: int | None = None
    ) -> None:
        """Send `payload` to every other instance (queued while Redis is away).

        With a `version` (a non-negative int), `payload` is also kept as the kind's latest
        state unless a newer version is kept already.
        """
        channel, message = self._channel(channel_kind), self._origin + payload
        latest = self._latest(channel_kind)

        async def op() -> object:
            if version is not None:
                await self.store.evalsha("keep_latest", [latest], [str(version), payload])
            return await self.store.client.publish(channel, message)

        if self.store.fallback_active:
            self.store.defer(op)
            return
        try:
            await op()
        except FAILURES as exc:
            self.store.mark_down(exc)
            self.store.defer(op)

    async def start(self) -> None:
        """Start listening (subscribe first)."""
        self._task = asyncio.create_task(self._listen())

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)

    async def _listen(self) -> None:
        while not self.store.closed:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                channels: set[str] = set()
                while True:
                    missing = set(self._callbacks) - channels
                    if missing:
                        await pubsub.subscribe(*missing)
                        channels |= missing
                        await self._catch_up(missing)  # after subscribing: nothing falls between
                        self.subscribed.set()
                    message = await pubsub.get_message(timeout=0.5)
                    if self.store.closed or cancelling():
                        return
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["channel"].decode(), message["data"])
            except FAILURES as exc:
                self.subscribed.clear()
                if cancelling():
                    raise asyncio.CancelledError from exc
                self.store.mark_down(exc)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await self.store.pause(self.store.retry_interval)

    async def _catch_up(self, channels: set[str]) -> None:
        """Hand the latest kept state of each channel's kind to its callbacks."""
        head = self._channel("")
        for channel in sorted(channels):
            body = await self.store.client.hget(self._latest(channel.removeprefix(head)), "b")
            if isinstance(body, bytes):
                self._deliver(channel, body)

    def _dispatch(self, channel: str, data: bytes) -> None:
        if data.startswith(self._origin):
            return
        self._deliver(channel, data.partition(b"|")[2])

    def _deliver(self, channel: str, payload: bytes) -> None:
        for callback in self._callbacks.get(channel, ()):
            try:
                callback(payload)
            except Exception:  # one broken subscriber must not stop invalidations for others
                log.exception("broadcast_callback_failed", channel=channel)
