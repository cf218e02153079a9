"""The lean path of the hot script calls: one pipelined connection, hiredis's parser, no pool.

Admission (ADMIT) and a request's end (FINISH) are two script calls per request. Through
redis-py's client each paid for a pool checkout, the retry wrapper, command packing in Python
and the response-callback machinery: about 4x the instructions of the call itself (a trivial
script: 438k instructions a call through redis-py, 98k over a bare protocol with hiredis).
`ScriptChannel` sends them on one connection of its own instead: `hiredis.pack_command` packs,
`hiredis.Reader` parses, and replies are matched to callers in order (Redis answers a connection's
commands in the order they came). Calls made in one turn of the event loop leave in one write.
(A request's end is sent at once, not held back to share the next admission's write: Redis
then runs it while the client turns around, instead of in front of that admission; measured
with `benchmarks.timeline --redis`, admission took 277 µs against 342-360 µs held back 1 ms.)

Failures look as they do through redis-py, so `RedisStore` handles both alike:
- a connection that cannot be made or is lost before its replies came raises
  `redis.exceptions.ConnectionError`; the call is tried again on a new connection `retries`
  times (10 ms, 20 ms, … with jitter, as the client's retry policy), then the error is raised;
- a reply later than `timeout` raises `redis.exceptions.TimeoutError` for every call waiting on
  that connection and closes it (replies on it could no longer be matched); it is not retried,
  so a stalled Redis costs one `timeout` before the store falls back, not three;
- an error reply raises `redis.exceptions.ResponseError`, except NOSCRIPT (Redis restarted and
  forgot the script), which loads the script and sends the call once more;
- a caller that leaves (its task cancelled) does not disturb the others: its reply is read and
  dropped.

Only plain TCP and Unix-socket connections take this path (`ScriptChannel.for_client` answers
None for TLS and other connection classes; the store then uses redis-py for everything).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# hiredis's stub types the command as a 1-tuple; any tuple of str, bytes and numbers packs
pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


class _Call:
    """One request on the wire: `count` replies expected, gathered into `replies`."""

    __slots__ = ("count", "future", "replies", "sent")

    def __init__(self, future: asyncio.Future[Any], count: int, sent: float) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []
        self.sent = sent


class _Connection(asyncio.Protocol):
    """One connection's transport, reader and the calls waiting on it, oldest first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.waiting: deque[_Call] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = loop.create_future()  # done once the socket is closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass

    def send(self, payload: bytes, count: int) -> asyncio.Future[Any]:
        """Queue `payload` (its `count` commands) for this turn's write; the future of its
        replies (a list when `count` > 1)."""
        if self.closed:
            raise RedisConnectionError("the connection to Redis closed")
        loop = self.loop
        future = loop.create_future()
        self.waiting.append(_Call(future, count, loop.time()))
        out = self._out
        out.append(payload)
        if len(out) == 1:
            loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_later(self.timeout, self._check)
        return future

    def _flush(self) -> None:
        out = self._out
        if self.closed or self.transport is None:
            out.clear()
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _check(self) -> None:
        """The oldest call waited `timeout`: Redis stalled, fail every call on this connection."""
        self._timer = None
        if not self.waiting or self.closed:
            return
        late = self.waiting[0].sent + self.timeout - self.loop.time()
        if late > 0:
            self._timer = self.loop.call_later(late, self._check)
            return
        self.abort(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := reader.gets()) is not False:
                call = waiting[0]
                if call.count == 1:
                    waiting.popleft()
                    future = call.future
                    if not future.done():
                        if call.replies:
                            call.replies.append(reply)
                            reply = call.replies
                        future.set_result(reply)
                else:
                    call.count -= 1
                    call.replies.append(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked
            self.abort(RedisConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def abort(self, error: Exception) -> None:
        """Close the connection and fail every call still waiting on it with `error`."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(error)


class ScriptChannel:
    """Script calls (and a GET riding with one) on a connection of their own; see the module."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 0.5,
        retries: int = 2,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.db, self.username, self.password = db, username, password
        self.timeout = timeout
        self.retries = retries
        self.connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self.shut = False  # `aclose` ran: no new connection is opened

    @classmethod
    def for_client(cls, client: Redis, *, timeout: float, retries: int) -> ScriptChannel | None:
        """A channel to the server `client` talks to, or None where this path does not apply
        (TLS or another connection class: redis-py then carries every call)."""
        pool = client.connection_pool
        kw = pool.connection_kwargs
        common: dict[str, Any] = {
            "db": int(kw.get("db") or 0),
            "username": kw.get("username"),
            "password": kw.get("password"),
            "timeout": timeout,
            "retries": retries,
        }
        if pool.connection_class is Connection:
            return cls(host=kw.get("host", "localhost"), port=int(kw.get("port", 6379)), **common)
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(path=kw["path"], **common)
        return None

    def close(self) -> _Connection | None:
        """Drop the connection (calls waiting on it fail); the next call opens a new one.
        Answers the connection dropped, if any (its `lost` is done once its socket closed)."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.abort(RedisConnectionError("the channel was closed"))
        return conn

    async def aclose(self) -> None:
        """Drop the connection for good and wait (a moment at most) until its socket is closed;
        a call made afterwards (a request ending during shutdown) fails as if Redis were away,
        instead of opening a connection nobody would close."""
        self.shut = True
        conn = self.close()
        if conn is not None and conn.transport is not None:
            await asyncio.wait([conn.lost], timeout=1.0)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                if self.path is not None:
                    await loop.create_unix_connection(lambda: conn, self.path)
                else:
                    await loop.create_connection(lambda: conn, self.host, self.port)  # NODELAY
                await self._hello(conn)
        except (OSError, TimeoutError) as exc:
            await self._drop(conn, exc)
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        except RedisConnectionError as exc:  # refused AUTH or SELECT
            await self._drop(conn, exc)
            raise
        except BaseException as exc:  # cancelled: close without waiting
            conn.abort(RedisConnectionError(str(exc)))
            raise
        if self.shut:  # closed while this connect ran
            await self._drop(conn, RedisConnectionError("the channel was closed"))
            raise RedisConnectionError("the channel was closed")
        self.connection = conn  # here, not in a waiter: one that left would leave it unowned
        return conn

    @staticmethod
    async def _drop(conn: _Connection, exc: BaseException) -> None:
        """Close a connection that failed to open, and let its socket close."""
        conn.abort(RedisConnectionError(str(exc)))
        if conn.transport is not None:
            await asyncio.wait([conn.lost], timeout=1.0)

    async def _hello(self, conn: _Connection) -> None:
        """AUTH and SELECT as the URL asks; a refusal is a connection error (fall back)."""
        hello: list[tuple[Any, ...]] = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            hello.append(("AUTH", *auth))
        if self.db:
            hello.append(("SELECT", self.db))
        for command in hello:
            reply = await conn.send(pack(command), 1)
            if isinstance(reply, hiredis.ReplyError):
                raise RedisConnectionError(f"Redis refused {command[0]}: {reply}")

    async def _open(self) -> _Connection:
        """The live connection, or a new one (one connect shared by every caller waiting)."""
        if self.shut:
            raise RedisConnectionError("the channel was closed")
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        task = self._connecting
        try:
            conn = await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and not (me is not None and me.cancelling()):
                # `close()` dropped the attempt (the store fell back): a failure, not this
                # caller's cancellation, which would close its client's connection
                raise RedisConnectionError("the connection attempt was dropped") from None
            raise
        finally:
            if self._connecting is task and task.done():
                self._connecting = None
        return conn

    async def request(self, payload: bytes, count: int = 1) -> Any:
        """Send `payload` (`count` commands) and return its reply (a list when `count` > 1),
        trying again on a new connection when the connection fails (see the module)."""
        attempt = 0
        while True:
            conn = self.connection
            try:
                if conn is None or conn.closed:
                    conn = await self._open()
                return await conn.send(payload, count)
            except RedisConnectionError:
                if attempt >= self.retries or self.shut:
                    raise
                attempt += 1
                await asyncio.sleep(min(0.1, 0.01 * 2**attempt) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter

    async def evalsha(
        self,
        sha: str,
        lua: str,
        keys: list[str],
        args: list[Any],
        *,
        get: str | None = None,
    ) -> Any:
        """Run a script by its digest (loading it when Redis forgot it). With `get`, a GET of
        that key rides in the same write: the answer is then (script reply, GET reply), the
        GET's error reply, if any, as None."""
        command = pack(("EVALSHA", sha, len(keys), *keys, *args))
        if get is None:
            reply = await self.request(command)
            if isinstance(reply, hiredis.ReplyError):
                reply = await self._again(reply, sha, lua, command)
            return reply
        reply, read = await self.request(command + pack(("GET", get)), 2)
        if isinstance(reply, hiredis.ReplyError):
            reply = await self._again(reply, sha, lua, command)
        return reply, None if isinstance(read, hiredis.ReplyError) else read

    async def _again(self, error: hiredis.ReplyError, sha: str, lua: str, command: bytes) -> Any:
        """NOSCRIPT: load the script and send the call once more; other errors raise."""
        if not str(error).startswith("NOSCRIPT"):
            raise ResponseError(str(error))
        loaded = await self.request(pack(("SCRIPT", "LOAD", lua)))
        if isinstance(loaded, hiredis.ReplyError) or loaded.decode() != sha:
            raise ResponseError(f"Redis did not load the script: {loaded!r}")
        reply = await self.request(command)
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply
