"""A keep-alive pool of h1 connections per (host, port, TLS context), with total and per-host caps.

Waiting for a free connection is first come, first served; at the total cap an idle connection
to another host is closed to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from proxyd.upstream.h1.errors import (
    Abandoned,
    ConnectError,
    ConnectTimeout,
    H1Error,
    PoolClosed,
    PoolTimeout,
)
from proxyd.upstream.h1.proxy import ProxyRoute, proxy_of
from proxyd.upstream.h1.resolve import Resolver
from proxyd.upstream.h1.wire import (
    Answer,
    Connection,
    Key,
    Target,
    request_head,
    target_of,
)


class Stream:
    """An answer whose head is in and whose body streams: `attach` a sink, or `read_all`."""

    __slots__ = ("_conn", "_pool", "_released", "headers", "status")

    def __init__(
        self, pool: H1Pool, conn: Connection, status: int, headers: list[tuple[str, str]]
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._released = False
        self.status = status
        self.headers = headers

    def attach(
        self, on_data: Callable[[bytes], None], on_end: Callable[[H1Error | None], None]
    ) -> None:
        """Every read of the body to `on_data` as it arrives, then its end to `on_end` (once)."""
        self._conn.attach(on_data, on_end)

    def pause_reading(self) -> None:
        """Stop reading from the upstream (the client is not keeping up)."""
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    async def read_all(self, limit: int | None = None) -> bytes:
        """The rest of the body (its first `limit` bytes; the connection is then dropped)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        parts: list[bytes] = []
        size = 0

        def on_data(data: bytes) -> None:
            nonlocal size
            if limit is not None and size + len(data) >= limit:
                parts.append(data[: limit - size])
                size = limit
                self.abort(Abandoned("enough of the body was read"))
                return
            parts.append(data)
            size += len(data)

        def on_end(error: H1Error | None) -> None:
            if done.done():
                return
            if error is not None and size != limit:
                done.set_exception(error)
            else:
                done.set_result(None)

        self.attach(on_data, on_end)
        await done
        return b"".join(parts)

    def abort(self, error: H1Error | None = None) -> None:
        """Drop the exchange: the sink ends with `error` and the connection closes."""
        self._conn.abort(error or Abandoned("the stream was abandoned"))

    def release(self) -> None:
        """Back to the pool when the body was read to its clean end, else closed. Idempotent."""
        if not self._released:
            self._released = True
            self._pool._release(self._conn, self._conn.reusable())


def _proxy_refused() -> ConnectError:
    """A 407 from an HTTP proxy forwarding a plain-http call: the proxy's answer about the
    operator's proxy login, never the upstream's, so it is a failed connection and never reaches
    a client. (A tunnel's own 407, to CONNECT, is python-socks' ProxyError.)"""
    return ConnectError("the proxy refused the request (407)")


@dataclass(slots=True)
class _Host:
    """The idle connections and the open count for one (host, port, TLS)."""

    idle: deque[Connection] = field(default_factory=deque)
    open: int = 0


class H1Pool:
    """Keep-alive connections per (host, port, TLS), with a total and a per-host cap."""

    def __init__(
        self,
        *,
        limit: int,
        limit_per_host: int = 0,
        keepalive_seconds: float = 30.0,
        acquire_timeout: float | None = None,
        dns_ttl: float = 300.0,
    ) -> None:
        self.limit = limit
        self.acquire_timeout = acquire_timeout  # the longest wait for a free connection
        self.limit_per_host = limit_per_host
        self.keepalive = keepalive_seconds
        self._hosts: dict[Key, _Host] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._prune_timer: asyncio.TimerHandle | None = None  # armed while any is idle
        self._targets: dict[str, Target] = {}  # parsed URLs; channels have a handful of them
        self._proxies: dict[str, ProxyRoute] = {}  # parsed proxy URLs
        self._live: set[Connection] = set()  # every open connection, idle or busy
        self._drained: asyncio.Future[None] | None = None  # while close() waits for the busy
        self._verifying: ssl.SSLContext | None = None
        self.resolver = Resolver(dns_ttl)  # upstream and proxy names, cached like aiohttp's

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or busy."""
        return self._open

    def idle_connections(self) -> int:
        """Connections in the pool waiting for a request."""
        return sum(len(h.idle) for h in self._hosts.values())

    async def post(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float | None,
        proxy: str | None = None,
    ) -> Answer:
        """POST `body` to `url` and return the whole answer; raise H1Error or BadTarget.

        `read_timeout` bounds every wait for bytes (the answer's head and each read after it).
        `proxy` (`http://`, `socks5://`, `socks5h://`, with optional `user:pass@`) carries the
        connection; `connect_timeout` covers the proxy's handshake too.
        """
        conn, head, forward = await self._connection(
            url, headers, body, ssl_context, connect_timeout, proxy
        )
        ok = False
        try:
            answer = await conn.send(head, body, read_timeout)
            if answer.status == 407 and forward:
                raise _proxy_refused()
            ok = conn.reusable()
            return answer
        finally:
            self._release(conn, ok)

    async def open(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float | None,
        proxy: str | None = None,
    ) -> Stream:
        """POST `body` to `url` and return once the answer's head is in; the body streams.

        `read_timeout` bounds the wait for the head only. The caller must `release` the stream.
        `proxy` as for `post`.
        """
        conn, head, forward = await self._connection(
            url, headers, body, ssl_context, connect_timeout, proxy
        )
        try:
            answer = await conn.send(head, body, read_timeout, stream=True)
        except BaseException:
            self._release(conn, False)
            raise
        if answer.status == 407 and forward:
            self._release(conn, False)
            raise _proxy_refused()
        return Stream(self, conn, answer.status, answer.headers)

    async def _connection(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        proxy: str | None,
    ) -> tuple[Connection, bytes, bool]:
        """A connection for `url` (pooled or new), the request head to write on it, and whether
        the request goes to an HTTP proxy itself (whose 407 is about the proxy login; through a
        tunnel a 407 is the upstream's answer)."""
        target = self._targets.get(url)
        if target is None:
            target = target_of(url)
            if len(self._targets) < 4096:
                self._targets[url] = target
        route: ProxyRoute | None = None
        forward = False
        if proxy is None:
            head = request_head(target, headers, len(body))
        else:
            route = self._proxies.get(proxy)
            if route is None:
                route = proxy_of(proxy)
                if len(self._proxies) < 4096:
                    self._proxies[proxy] = route
            if route.http and not target.tls:  # a plain request to the proxy, not a tunnel
                forward = True
                auth = route.authorization
                if auth is not None:
                    headers = {**headers, "Proxy-Authorization": auth}
                head = request_head(target, headers, len(body), absolute=True)
            else:
                head = request_head(target, headers, len(body))
        conn = await self._acquire(target, ssl_context, connect_timeout, proxy, route)
        return conn, head, forward

    async def _acquire(
        self,
        target: Target,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        proxy: str | None = None,
        route: ProxyRoute | None = None,
    ) -> Connection:
        if self._closed:
            raise PoolClosed("the upstream pool is closed")
        context: ssl.SSLContext | None = None
        if target.tls:
            if ssl_context is None:
                if self._verifying is None:
                    self._verifying = ssl.create_default_context()
                ssl_context = self._verifying
            context = ssl_context
        key = (target.host, target.port, context, proxy)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
        loop = asyncio.get_running_loop()
        now = loop.time()
        while host.idle:
            conn = host.idle.pop()  # the most recently used: the likeliest to be alive
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            self._drop(conn)
        while self._open >= self.limit or (
            self.limit_per_host and host.open >= self.limit_per_host
        ):
            if self._open >= self.limit and self._evict_idle():
                continue  # an idle connection to another host made room
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.acquire_timeout):
                    await waiter
            except TimeoutError:
                self._give_up(waiter)
                raise PoolTimeout("no upstream connection became free in time") from None
            except BaseException:
                self._give_up(waiter)
                raise
            if host.idle:
                conn = host.idle.pop()
                if not conn.closed:
                    return conn
                self._drop(conn)
        self._open += 1
        host.open += 1
        try:
            return await self._connect(loop, target, key, context, connect_timeout, route)
        except BaseException:
            self._open -= 1
            host.open -= 1
            self._wake()
            self._check_drained()
            raise

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        target: Target,
        key: Key,
        context: ssl.SSLContext | None,
        connect_timeout: float,
        route: ProxyRoute | None = None,
    ) -> Connection:
        def protocol() -> Connection:
            return Connection(loop, key, self.lost_idle)

        hostname = target.host if context is not None else None
        try:
            async with asyncio.timeout(connect_timeout):
                if route is None:
                    conn = await self._dial(protocol, target.host, target.port, context, hostname)
                elif route.http and not target.tls:  # requests go to the proxy itself
                    conn = await self._dial(protocol, route.host, route.port, None, None)
                else:  # a tunnel to the upstream; TLS to the upstream runs inside it
                    sock = await route.tunnel(target.host, target.port, connect_timeout)
                    _, conn = await loop.create_connection(
                        protocol, sock=sock, ssl=context, server_hostname=hostname
                    )
        except TimeoutError:
            raise ConnectTimeout("connecting to the upstream timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to the upstream: {type(exc).__name__}") from None
        if self._closed:  # the pool closed while this one connected: it is not handed out
            conn.counted = False  # the caller counts it out
            conn.terminate()
            raise PoolClosed("the upstream pool is closed")
        self._live.add(conn)
        return conn

    async def _dial(
        self,
        protocol: Callable[[], Connection],
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        hostname: str | None,
    ) -> Connection:
        """A connection to `host`:`port`, its addresses (cached) tried in order, as the loop's
        create_connection tries a name's; a TLS failure is final."""
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for family, ip in await self.resolver.addresses(host, port):
            try:
                _, conn = await loop.create_connection(
                    protocol, ip, port, family=family, ssl=context, server_hostname=hostname
                )
            except ssl.SSLError:
                raise
            except OSError as exc:
                last = exc
                continue
            return conn
        self.resolver.forget(host, port)  # none answered: look the name up afresh next time
        raise last if last is not None else OSError(f"no address for {host}")

    def _release(self, conn: Connection, reusable: bool) -> None:
        conn.release()
        host = self._hosts.get(conn.key)
        if reusable and host is not None and not self._closed:
            conn.idle_since = conn.loop.time()
            host.idle.append(conn)
            self._wake()
            if self._prune_timer is None:
                self._prune_timer = conn.loop.call_at(conn.idle_since + self.keepalive, self._tick)
            return
        conn.close()
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        """Close `conn` and count it out of its host and the total (once); wake one waiter."""
        conn.close()
        if not conn.counted:
            return
        conn.counted = False
        self._live.discard(conn)
        host = self._hosts.get(conn.key)
        if host is not None:
            host.open -= 1
        self._open -= 1
        self._wake()
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._open and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # the last busy connection of a closing pool

    def lost_idle(self, conn: Connection) -> None:
        """An idle connection the upstream closed: out of the pool at once."""
        host = self._hosts.get(conn.key)
        if host is not None:
            with contextlib.suppress(ValueError):  # already taken out of the pool
                host.idle.remove(conn)
        self._drop(conn)

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection of any host; False when none is idle."""
        oldest: _Host | None = None
        oldest_since = 0.0
        for host in self._hosts.values():
            if host.idle and (oldest is None or host.idle[0].idle_since < oldest_since):
                oldest, oldest_since = host, host.idle[0].idle_since
        if oldest is None:
            return False
        self._drop(oldest.idle.popleft())
        return True

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        """A waiter leaves the queue (cancelled or timed out). If it had just been handed a
        turn it will not take, the turn goes to the next waiter, so nobody is stranded."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self._wake()
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _tick(self) -> None:
        """The keep-alive timer: prune, then sleep until the next idle connection expires."""
        self._prune_timer = None
        self.prune()
        oldest = min((h.idle[0].idle_since for h in self._hosts.values() if h.idle), default=None)
        if oldest is not None and not self._closed:
            loop = asyncio.get_running_loop()
            self._prune_timer = loop.call_at(oldest + self.keepalive, self._tick)

    def prune(self) -> int:
        """Close idle connections past the keep-alive time; the number closed."""
        now = asyncio.get_running_loop().time()
        closed = 0
        for host in self._hosts.values():
            while host.idle and (
                host.idle[0].closed or now - host.idle[0].idle_since >= self.keepalive
            ):
                self._drop(host.idle.popleft())  # the left end has the longest idle
                closed += 1
        return closed

    async def close(self, grace: float = 0.0) -> None:
        """Close the pool: hand out no more connections, close the idle ones at once, give
        those in use `grace` seconds to finish their request (each closes as it ends), then
        terminate what is left: its request (or stream) fails with PoolClosed. Requests waiting
        for a connection, or still connecting, fail with PoolClosed."""
        self._closed = True
        if self._prune_timer is not None:
            self._prune_timer.cancel()
            self._prune_timer = None
        for host in self._hosts.values():
            while host.idle:
                self._drop(host.idle.pop())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolClosed("the upstream pool is closed"))
        self._waiters.clear()
        if self._open and grace > 0:
            self._drained = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._drained
        for conn in list(self._live):
            conn.terminate()
            self._drop(conn)
        await asyncio.sleep(0)  # let the transports run their close callbacks
