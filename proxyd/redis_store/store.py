"""The one Redis client of an instance, and the switch to local fallback and back.

Every shared operation runs through `RedisStore.call`; while Redis is away the store says so,
queues what must reach Redis, and replays it on recovery.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxyd.redis_store.channel import ScriptChannel
from proxyd.redis_store.scripts import SCRIPTS

log = structlog.get_logger("proxyd.redis")

FAILURES = (RedisError, OSError, asyncio.TimeoutError)  # what "Redis is away" looks like
Op = Callable[[], Awaitable[object]]


class Ride:
    """A read that rides on the request's admission round trip: `key` is GET in the same
    pipeline as the ADMIT script; `reply` holds what Redis answered once `done`."""

    __slots__ = ("done", "key", "reply", "scoped")

    def __init__(self, scoped: str, key: str) -> None:
        self.scoped = scoped  # whose read (the sticky session's scoped key)
        self.key = key
        self.reply: object = None
        self.done = False


# The read the current request (its task) wants carried by its admission, if any
# (`proxyd.redis_store.admit.RedisAdmission` passes it to `RedisStore.call`).
RIDE: ContextVar[Ride | None] = ContextVar("proxyd_redis_ride", default=None)


class RedisUnavailable(Exception):
    """Redis cannot be used now; the caller uses its local fallback."""


def cancelling() -> bool:
    """Whether the current task is being cancelled (redis-py may turn that into an error)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RedisStore:
    """One Redis client for the shared limits, ledger and broadcast, and the fallback switch."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "proxyd:",
        timeout: float = 0.5,
        retry_interval: float = 1.0,
        retry_max_interval: float = 10.0,
        lease_seconds: float = 300.0,
        replay_max: int = 100_000,
        retries: int = 2,
        healthy_checks: int = 3,
        pool_probe: int = 4,
    ) -> None:
        # A connection broken by a Redis restart fails once and is reconnected: each command is
        # retried `retries` times (10 ms, 20 ms, ... with jitter) before the store falls back.
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        )
        self.prefix = prefix
        self.fallback_active = False
        self.lease_ms = int(lease_seconds * 1000)
        self.instance = uuid.uuid4().hex[:12]
        self.scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(lua) for name, lua in SCRIPTS.items()
        }
        # the script calls' own connection (None for TLS: redis-py carries them too)
        self.channel = ScriptChannel.for_client(self.client, timeout=timeout, retries=retries)
        self.leases: dict[str, tuple[str, bool]] = {}  # live lease -> (its zset, pexpire it)
        self.on_recover: list[Callable[[], None]] = []
        self.retry_interval = retry_interval
        self.retry_max_interval = max(retry_interval, retry_max_interval)
        self.healthy_checks = healthy_checks
        self.pool_probe = pool_probe
        self.fallbacks = 0  # times the store switched to the local fallback
        self._lease_ids = itertools.count()
        self._pending: deque[Op] = deque()
        self._replay_max = replay_max
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnect: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.closed = False
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Check Redis once (falling back when it does not answer) and start lease refreshes."""
        try:
            await self.client.ping()
        except FAILURES as exc:
            self.mark_down(exc)
        self._refresher = asyncio.create_task(self._refresh_leases())

    async def close(self) -> None:
        """Stop background work, let in-flight writes end, and close the connections.

        redis-py can swallow a cancellation that lands mid-command, so the loops also stop on
        `closed`, and nothing here waits for them without a time limit.
        """
        self.closed = True
        self._stop.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        loops = {t for t in (self._reconnect, self._refresher) if t is not None}
        for task in loops:
            task.cancel()
        if loops:
            await asyncio.wait(loops, timeout=2.0)
        if self.channel is not None:
            await self.channel.aclose()
        await self.client.aclose()

    async def drain(self) -> None:
        """Wait until the background writes started so far have ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def new_lease(self) -> str:
        """A lease id unique across instances."""
        return f"{self.instance}:{next(self._lease_ids)}"

    async def call(
        self, name: str, keys: list[str], args: list[Any], *, read: Ride | None = None
    ) -> Any:
        """Run a script; raises RedisUnavailable (after switching to fallback) when it cannot.

        `read` (a pending GET, see `Ride`) goes in the same pipeline: one round trip for both.
        """
        if self.fallback_active:
            raise RedisUnavailable
        try:
            if read is not None and not read.done:
                return await self._call_with_read(name, keys, args, read)
            return await self.evalsha(name, keys, args)
        except FAILURES as exc:
            if cancelling():  # the caller left (e.g. the client hung up): Redis is fine
                raise asyncio.CancelledError from exc
            self.mark_down(exc)
            raise RedisUnavailable from exc

    async def evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run script `name` (loading it where Redis forgot it); raises what Redis raised.

        Background writes and their replays call this; requests go through `call`."""
        if self.channel is not None:
            script = self.scripts[name]
            return await self.channel.evalsha(script.sha, SCRIPTS[name], keys, args)
        return await self.scripts[name](keys=keys, args=args)

    async def _call_with_read(self, name: str, keys: list[str], args: list[Any], ride: Ride) -> Any:
        """The script and the ride's GET in one write: one round trip for both."""
        script = self.scripts[name]
        if self.channel is not None:
            result, ride.reply = await self.channel.evalsha(
                script.sha, SCRIPTS[name], keys, args, get=ride.key
            )
            ride.done = True
            return result
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.get(ride.key)
        result, reply = await pipe.execute(raise_on_error=False)
        ride.done = True
        ride.reply = None if isinstance(reply, Exception) else reply
        if isinstance(result, NoScriptError):  # Redis lost its scripts (a restart): load, again
            return await script(keys=keys, args=args)
        if isinstance(result, Exception):
            raise result
        return result

    def mark_down(self, exc: BaseException) -> None:
        """Switch to the local fallback (once) and start reconnecting."""
        if self.fallback_active or self.closed:
            return
        self.fallback_active = True
        self.fallbacks += 1
        if self.channel is not None:  # reconnect afresh once Redis is back
            self.channel.close()
        log.warning("redis_fallback", reason=f"{type(exc).__name__}: {exc}"[:200])
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    def defer(self, op: Op) -> None:
        """Keep `op` for when Redis is back (bounded: the oldest is dropped, with an error)."""
        if len(self._pending) >= self._replay_max:
            self._pending.popleft()
            log.error("redis_replay_dropped", queued=len(self._pending))
        self._pending.append(op)

    def submit(
        self, name: str, keys: list[str], args: list[Any], done: Callable[[Any], None] | None = None
    ) -> None:
        """Run a script in the background, or queue it for replay while Redis is away."""

        async def op() -> object:
            result = await self.evalsha(name, keys, args)
            if done is not None:
                done(result)
            return result

        self.run(op)

    def run(self, op: Op) -> None:
        """Run `op` (script calls through `scripts`) in the background, or queue it for replay
        while Redis is away; an op that fails on Redis is queued and run again on recovery."""
        if self.fallback_active:
            self.defer(op)
            return
        task = asyncio.get_running_loop().create_task(self._run(op))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, op: Op) -> None:
        try:
            await op()
        except FAILURES as exc:
            self.mark_down(exc)
            self.defer(op)
        except Exception:  # a background write must log, never kill the loop's task
            log.exception("redis_background_write_failed")

    async def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True at once when the store is closing."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return self.closed
        return True

    async def healthy(self) -> bool:
        """Whether Redis answers on fresh connections, `healthy_checks` times in a row.

        Stale connections (a restart broke them) are dropped first; each check pings on
        `pool_probe` connections at once, so one lucky ping does not declare a recovery.
        """
        await self.client.connection_pool.disconnect(inuse_connections=False)
        for check in range(self.healthy_checks):
            if check and await self.pause(min(0.1, self.retry_interval)):
                return False
            try:
                await asyncio.gather(*(self.client.ping() for _ in range(self.pool_probe)))
            except FAILURES:
                return False
        return True

    async def _reconnect_loop(self) -> None:
        """Back off (doubling up to `retry_max_interval`) until the pool is healthy, replay, and
        only then leave the fallback."""
        delay = self.retry_interval
        while not await self.pause(delay):
            delay = min(delay * 2, self.retry_max_interval)
            try:
                if not await self.healthy():
                    continue
                replayed = 0
                while self._pending:
                    await self._pending[0]()
                    self._pending.popleft()
                    replayed += 1
            except FAILURES:
                continue
            self.fallback_active = False
            self._reconnect = None
            log.warning("redis_recovered", replayed=replayed)
            for callback in self.on_recover:
                callback()
            return

    async def _refresh_leases(self) -> None:
        while not await self.pause(self.lease_ms / 3000):
            if self.fallback_active or not self.leases:
                continue
            groups: dict[tuple[str, bool], list[str]] = {}
            for lease, where in self.leases.items():
                groups.setdefault(where, []).append(lease)
            try:
                for (zset, pexpire), leases in groups.items():
                    await self.call("refresh", [zset], [self.lease_ms, int(pexpire), *leases])
            except RedisUnavailable:
                continue
