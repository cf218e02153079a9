"""Redis, shared by all instances: limit buckets, concurrency leases, balances, and a broadcast.

The only module that imports redis (`redis.asyncio`). Every shared change is one Lua script, so
instances never race. While Redis is unreachable each instance falls back to its local limits
and ledger (`fallback_active`, a warning per transition), queues what Redis must still learn,
and replays it when Redis answers again. Never lets a shared balance go below zero.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxyd.balances import BalanceView, LocalLedger, Reservation, insufficient_quota
from proxyd.buckets import duration_text
from proxyd.limits import LimitGrant, LocalLimits, concurrency_limited, rate_limited
from proxyd.redis_scripts import SCRIPTS, UNIT
from proxyd.state import KeyRecord, VersionConflict

log = structlog.get_logger("proxyd.redis")

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
Op = Callable[[], Awaitable[object]]


class RedisUnavailable(Exception):
    """Redis cannot be used now; the caller uses its local fallback."""


def _cancelling() -> bool:
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
        lease_seconds: float = 300.0,
        replay_max: int = 100_000,
    ) -> None:
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.prefix = prefix
        self.fallback_active = False
        self.lease_ms = int(lease_seconds * 1000)
        self.instance = uuid.uuid4().hex[:12]
        self.scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(lua) for name, lua in SCRIPTS.items()
        }
        self.leases: dict[str, tuple[str, bool]] = {}  # live lease -> (its zset, pexpire it)
        self.on_recover: list[Callable[[], None]] = []
        self.retry_interval = retry_interval
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
        except _FAILURES as exc:
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
        await self.client.aclose()

    async def drain(self) -> None:
        """Wait until the background writes started so far have ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def new_lease(self) -> str:
        """A lease id unique across instances."""
        return f"{self.instance}:{next(self._lease_ids)}"

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script; raises RedisUnavailable (after switching to fallback) when it cannot."""
        if self.fallback_active:
            raise RedisUnavailable
        try:
            return await self.scripts[name](keys=keys, args=args)
        except _FAILURES as exc:
            if _cancelling():  # the caller left (e.g. the client hung up): Redis is fine
                raise asyncio.CancelledError from exc
            self.mark_down(exc)
            raise RedisUnavailable from exc

    def mark_down(self, exc: BaseException) -> None:
        """Switch to the local fallback (once) and start reconnecting."""
        if self.fallback_active or self.closed:
            return
        self.fallback_active = True
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
            result = await self.scripts[name](keys=keys, args=args)
            if done is not None:
                done(result)
            return result

        if self.fallback_active:
            self.defer(op)
            return
        task = asyncio.get_running_loop().create_task(self._run(op))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, op: Op) -> None:
        try:
            await op()
        except _FAILURES as exc:
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

    async def _reconnect_loop(self) -> None:
        while not await self.pause(self.retry_interval):
            try:
                await self.client.ping()
                replayed = 0
                while self._pending:
                    await self._pending[0]()
                    self._pending.popleft()
                    replayed += 1
            except _FAILURES:
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


def _bucket_headers(kind: str, rate: int, level: int, cap: int, out: dict[str, str]) -> None:
    out[f"x-ratelimit-limit-{kind}"] = str(rate)
    out[f"x-ratelimit-remaining-{kind}"] = str(max(0, level // UNIT))
    reset_ms = -(-(cap * UNIT - level) // rate) if level < cap * UNIT else 0
    out[f"x-ratelimit-reset-{kind}"] = duration_text(reset_ms * 1000)


class RedisLimits:
    """Per-key limits shared by every instance; the local limits while Redis is away."""

    shared = True

    def __init__(self, store: RedisStore, local: LocalLimits | None = None) -> None:
        self.store = store
        self.local = local or LocalLimits()

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self.store.prefix}lim:{{{key_id}}}:"
        return [base + "r", base + "t", base + "c"]

    @staticmethod
    def _rates(key: KeyRecord) -> list[int]:
        return [
            key.rpm or 0,
            key.burst_requests or key.rpm or 0,
            key.tpm or 0,
            key.burst_tokens or key.tpm or 0,
        ]

    async def acquire(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """Take one request, the tokens and a slot in Redis, or raise the 429; never partial."""
        if self.store.fallback_active or not (key.rpm or key.tpm or key.max_concurrency):
            return self.local.acquire_now(key, tokens)
        keys = self._keys(key.id)
        cap = key.max_concurrency or 0
        lease = self.store.new_lease() if cap else ""
        args = [*self._rates(key), tokens, cap, lease, self.store.lease_ms]
        try:
            result = await self.store.call("acquire", keys, args)
        except RedisUnavailable:
            return self.local.acquire_now(key, tokens)
        except BaseException:
            if lease:  # cancelled mid-call: the slot may have been taken; free it
                self.store.submit("release", keys, [*self._rates(key), 0, 0, lease])
            raise
        status, wait_r, wait_t, level_r, level_t, _ = (int(x) for x in result)
        headers: dict[str, str] = {}
        if key.rpm:
            _bucket_headers("requests", key.rpm, level_r, key.burst_requests or key.rpm, headers)
        if key.tpm:
            _bucket_headers("tokens", key.tpm, level_t, key.burst_tokens or key.tpm, headers)
        if status == 1:
            raise rate_limited(wait_r * 1000, wait_t * 1000, headers)
        if status == 2:
            raise concurrency_limited(cap)
        if lease:
            self.store.leases[lease] = (keys[2], True)
        return LimitGrant(key.id, tokens, headers, lease=lease or None, remote=True, key=key)

    def release(self, grant: LimitGrant, *, tokens: int | None) -> None:
        """End a grant once; shared work runs in the background (see LocalLimits.release)."""
        if not grant.remote:
            self.local.release(grant, tokens=tokens)
            return
        if grant.released:
            return
        grant.released = True
        if grant.lease is not None:
            self.store.leases.pop(grant.lease, None)
        back_r = 1 if tokens is None else 0
        back_t = grant.tokens if tokens is None else grant.tokens - tokens
        if grant.key is not None and (back_r or back_t or grant.lease):
            args = [*self._rates(grant.key), back_r, back_t, grant.lease or ""]
            self.store.submit("release", self._keys(grant.key_id), args)

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """Live shared state of a key for the control API (local while Redis is away)."""
        try:
            result = await self.store.call("view", self._keys(key.id), self._rates(key))
        except RedisUnavailable:
            view = self.local.view_now(key)
            view["fallback"] = True
            return view
        level_r, level_t, in_flight = (int(x) for x in result)
        return {
            "requests": _remote_bucket(key.rpm, key.burst_requests, level_r),
            "tokens": _remote_bucket(key.tpm, key.burst_tokens, level_t),
            "in_flight": in_flight if key.max_concurrency else None,
            "max_concurrency": key.max_concurrency,
            "shared": True,
            "fallback": False,
        }


def _remote_bucket(rate: int | None, burst: int | None, level: int) -> dict[str, Any] | None:
    if not rate:
        return None
    cap = burst or rate
    reset_ms = -(-(cap * UNIT - level) // rate) if level < cap * UNIT else 0
    return {
        "limit": rate,
        "capacity": cap,
        "remaining": max(0, level // UNIT),
        "reset_seconds": reset_ms / 1000,
    }


class RedisLedger:
    """Account balances shared by every instance; the local ledger while Redis is away.

    The local ledger mirrors what Redis last said about each account, so a fallback starts from
    the available balance this instance saw. Work done locally (charges, credits, sets) is
    replayed into Redis on recovery; Redis clamps replayed charges at zero and the shortfall is
    counted, so no interleaving drives a shared balance negative.
    """

    shared = True

    def __init__(self, store: RedisStore, local: LocalLedger | None = None) -> None:
        self.store = store
        self.local = local or LocalLedger()

    def _keys(self, account_id: str) -> list[str]:
        base = f"{self.store.prefix}acct:{{{account_id}}}:"
        return [base + "b", base + "l", base + "e", base + "cr"]

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """Set `amount` aside in Redis, or raise 429 `insufficient_quota` setting nothing aside."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        if self.store.fallback_active:
            return self.local.reserve_now(account_id, amount)
        keys = self._keys(account_id)[:3]
        lease = self.store.new_lease()
        try:
            result = await self.store.call("reserve", keys, [amount, lease, self.store.lease_ms])
        except RedisUnavailable:
            return self.local.reserve_now(account_id, amount)
        except BaseException:  # cancelled mid-call: the reservation may exist; release it
            self.store.submit("settle", keys, [lease, 0])
            raise
        ok, balance, reserved, version = (int(x) for x in result)
        self.local.mirror(account_id, balance - reserved, version)
        if not ok:
            raise insufficient_quota()
        self.store.leases[lease] = (keys[2], False)
        return Reservation(account_id, amount, lease=lease, remote=True)

    def settle(self, reservation: Reservation, cost_nanos: int) -> int:
        """Release and charge in the background; the shortfall is counted when Redis answers."""
        if reservation.settled:
            return 0
        if not reservation.remote:  # admitted during a fallback: charge Redis too, clamped there
            self.local.settle(reservation, cost_nanos, record=False)
            lease = ""
        else:
            reservation.settled = True
            lease = reservation.lease or ""
            self.store.leases.pop(lease, None)
        account_id = reservation.account_id

        def done(charge: Any) -> None:
            shortfall = cost_nanos - int(charge)
            if shortfall > 0:
                self.local.record_shortfall(account_id, shortfall)

        self.store.submit("settle", self._keys(account_id)[:3], [lease, cost_nanos], done)
        return 0

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        """Replace the balance everywhere; VersionConflict when `version` is below the current."""
        if not await self._set(account_id, version, balance_nanos, strict=False):
            raise VersionConflict("balance", version, self.local.view_now(account_id).version)

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        """Set a start-up balance only if Redis holds an older version or none (False if not).

        Every instance seeds from its config at start; an equal version must not undo charges.
        """
        return await self._set(account_id, version, balance_nanos, strict=True)

    async def _set(
        self, account_id: str, version: int, balance_nanos: int, *, strict: bool
    ) -> bool:
        if balance_nanos < 0:
            raise ValueError("a balance cannot be negative")
        keys = self._keys(account_id)[:1]
        args = [version, balance_nanos, int(strict)]
        try:
            result = await self.store.call("set", keys, args)
        except RedisUnavailable:
            fresh = True
            if strict:
                fresh = await self.local.seed_balance(account_id, version, balance_nanos)
            else:
                await self.local.set_balance(account_id, version, balance_nanos)
            self.store.submit("set", keys, args)
            return fresh
        applied, current, balance, reserved = (int(x) for x in result)
        self.local.mirror(account_id, balance - reserved, current)
        return applied == 1

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add `amount_nanos` once per `credit_id` across all instances."""
        if amount_nanos < 0:
            raise ValueError("a credit cannot be negative")
        keys = [self._keys(account_id)[0], self._keys(account_id)[3]]
        try:
            result = await self.store.call("credit", keys, [credit_id, amount_nanos])
        except RedisUnavailable:
            fresh = await self.local.credit(account_id, credit_id, amount_nanos)
            self.store.submit("credit", keys, [credit_id, amount_nanos])
            return fresh
        applied, balance, reserved, version = (int(x) for x in result)
        self.local.mirror(account_id, balance - reserved, version)
        return applied == 1

    async def view(self, account_id: str) -> BalanceView:
        """The shared balance, reservations and version (the local mirror while Redis is away)."""
        if self.store.fallback_active:
            return self.local.view_now(account_id)
        try:
            raw = await self.store.client.hmget(self._keys(account_id)[0], ["bal", "res", "ver"])
        except _FAILURES as exc:
            self.store.mark_down(exc)
            return self.local.view_now(account_id)
        balance, reserved, version = raw
        return BalanceView(
            int(balance or 0), int(reserved or 0), int(version) if version is not None else -1
        )


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
                await self.store.scripts["keep_latest"](keys=[latest], args=[str(version), payload])
            return await self.store.client.publish(channel, message)

        if self.store.fallback_active:
            self.store.defer(op)
            return
        try:
            await op()
        except _FAILURES as exc:
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
                    if self.store.closed or _cancelling():
                        return
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["channel"].decode(), message["data"])
            except _FAILURES as exc:
                self.subscribed.clear()
                if _cancelling():
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
