"""Sticky-session pins shared by every instance: scoped session key -> channel and credential.

A pin is written when a session is placed or moves, before the request's answer reaches the
client (one round trip, on first turns and moves only), so the next turn finds it on any
instance; a first placement is SET NX, and of two at once the first stays and both instances
follow it. Its TTL is renewed now and then by later turns (in the background); an instance that
has no pin of its own reads it once. While Redis is away nothing is queued: pins are a placement
hint, and each instance keeps its own table meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis

from proxyd.redis_store.store import FAILURES, RIDE, RedisStore, Ride, cancelling

log = structlog.get_logger("proxyd.redis_store.sessions")


class RedisSessions:
    """GET, SET and PEXPIRE of `<prefix>sticky:<hash of the scoped key>`, with `ttl` seconds."""

    def __init__(self, store: RedisStore, ttl: float) -> None:
        self._store = store
        self._ttl_ms = max(1, int(ttl * 1000))
        self._tasks: set[asyncio.Task[None]] = set()

    def _key(self, scoped: str) -> str:
        digest = hashlib.blake2b(scoped.encode(errors="surrogatepass"), digest_size=16)
        return self._store.prefix + "sticky:" + digest.hexdigest()

    def prefetch(self, scoped: str) -> None:
        """Have this request's admission read the session's pin in its own round trip (the
        ADMIT script and a GET in one pipeline); `get` then takes the answer from there."""
        RIDE.set(Ride(scoped, self._key(scoped)))

    async def get(self, scoped: str) -> tuple[str, int] | None:
        """The shared pin of a session, or None (none, malformed, or Redis away): what the
        request's admission read with it (see `prefetch`), else one GET."""
        store = self._store
        ride = RIDE.get()
        if ride is not None and ride.scoped == scoped:
            RIDE.set(None)
            if ride.done:
                return _pin(ride.reply)
        if store.fallback_active:
            return None
        try:
            raw = await store.client.get(self._key(scoped))
        except FAILURES as exc:
            if cancelling():
                raise asyncio.CancelledError from exc
            store.mark_down(exc)
            return None
        return _pin(raw)

    async def place(
        self, scoped: str, channel_id: str, credential: int, first: bool
    ) -> tuple[str, int] | None:
        """Share a placement (`first`: SET NX, a live pin stays) or a move (SET): the pin Redis
        holds after, or None while Redis is away (the request goes on; nothing is queued)."""
        store = self._store
        if store.fallback_active or store.closed:
            return None
        name, pin = self._key(scoped), (channel_id, credential)
        try:
            if await store.client.set(
                name, f"{channel_id}\x1f{credential}", px=self._ttl_ms, nx=first
            ):
                return pin
            return _pin(await store.client.get(name)) or pin  # placed first elsewhere
        except FAILURES as exc:
            if cancelling():
                raise asyncio.CancelledError from exc
            store.mark_down(exc)
            return None

    def renew(self, scoped: str) -> None:
        """Slide the shared pin's TTL (in the background)."""
        self._spawn(lambda c: c.pexpire(self._key(scoped), self._ttl_ms))

    def _spawn(self, op: Callable[[Redis], Awaitable[object]]) -> None:
        store = self._store
        if store.fallback_active or store.closed:
            return

        async def run() -> None:
            try:
                await op(store.client)
            except FAILURES as exc:
                store.mark_down(exc)
            except Exception:  # a background write must log, never kill the loop's task
                log.exception("sticky_pin_write_failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the writes in flight (before the store closes)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)


def _pin(raw: object) -> tuple[str, int] | None:
    """A stored pin (`<channel id>\x1f<credential index>`), or None (absent or malformed)."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    channel_id, _, credential = text.rpartition("\x1f")
    if not channel_id or not credential.isdigit():
        return None
    return channel_id, int(credential)
