"""Upstream names to addresses, cached (what aiohttp's `ttl_dns_cache` gave).

A lookup runs `getaddrinfo` in the loop's thread pool; with a handful of upstream hosts and the
cache, that happens about once per host per TTL instead of once per new connection. Callers of
one name at one time share one lookup. A name whose every address refused is looked up afresh.
"""

from __future__ import annotations

import asyncio
import socket

# (family, IP) of one getaddrinfo answer
Address = tuple[int, str]


class Resolver:
    """A TTL cache in front of the loop's getaddrinfo, one in-flight lookup per name."""

    def __init__(self, ttl: float = 300.0) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[list[Address]]] = {}
        self._running: set[asyncio.Task[list[Address]]] = set()  # the loop keeps weak refs only
        self.lookups = 0  # getaddrinfo calls made (the tests count them)

    async def addresses(self, host: str, port: int) -> list[Address]:
        """The addresses of `host`:`port`, from the cache while fresh; raises OSError."""
        key = (host, port)
        loop = asyncio.get_running_loop()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > loop.time():
            return hit[1]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = loop.create_future()
            task = loop.create_task(self._lookup(loop, key))
            self._running.add(task)
            task.add_done_callback(lambda t: self._settle(key, t))
        return await asyncio.shield(pending)

    async def _lookup(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> list[Address]:
        self.lookups += 1
        infos = await loop.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
        return [(family, str(addr[0])) for family, _, _, _, addr in infos]

    def _settle(self, key: tuple[str, int], task: asyncio.Task[list[Address]]) -> None:
        self._running.discard(task)
        pending = self._pending.pop(key)
        if task.cancelled():
            pending.cancel()
            return
        error = task.exception()
        if error is not None:
            pending.set_exception(error)
            pending.exception()  # retrieved: nobody may be waiting any more
            return
        found = task.result()
        if found:
            self._cache[key] = (asyncio.get_running_loop().time() + self.ttl, found)
        pending.set_result(found)

    def forget(self, host: str, port: int) -> None:
        """Look `host` up afresh next time (none of its addresses answered)."""
        self._cache.pop((host, port), None)

    def clear(self) -> None:
        self._cache.clear()
