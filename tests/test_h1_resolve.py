"""The h1 pool's name cache (aiohttp's ttl_dns_cache): one lookup per name per TTL, shared by
concurrent callers, forgotten when no address answers; addresses tried in order."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxyd.upstream.h1 import ConnectError, H1Pool
from tests.test_h1 import LOOPS, Wire, run_on

CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


async def _answer_and_close(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
    await r.readuntil(b"\r\n\r\n")
    await r.readexactly(2)
    w.write(CLOSE)
    await w.drain()


async def _post(pool: H1Pool, url: str) -> bytes:
    got = await pool.post(url, {}, b"{}", ssl_context=None, connect_timeout=2, read_timeout=2)
    return got.body


@pytest.mark.parametrize("loop", LOOPS)
def test_one_lookup_per_name_per_ttl_shared_by_concurrent_callers(loop: str) -> None:
    async def main() -> None:
        async with Wire(_answer_and_close) as wire:
            url = f"http://localhost:{wire.port}/v1"
            pool = H1Pool(limit=10, dns_ttl=0.3)
            assert await asyncio.gather(*(_post(pool, url) for _ in range(5))) == [b"ok"] * 5
            assert await _post(pool, url) == b"ok"  # a new connection: Connection: close
            assert wire.connections == 6
            assert pool.resolver.lookups == 1
            await asyncio.sleep(0.35)
            assert await _post(pool, url) == b"ok"
            assert pool.resolver.lookups == 2  # the TTL was over
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_addresses_are_tried_in_order(loop: str) -> None:
    """A name with two addresses, the first refusing: the second serves the request."""

    async def main() -> None:
        async with Wire(_answer_and_close) as wire:
            pool = H1Pool(limit=10)
            never = asyncio.get_running_loop().time() + 3600
            inet = int(socket.AF_INET)
            addresses = [(inet, "127.0.0.2"), (inet, "127.0.0.1")]
            pool.resolver._cache[("upstream.test", wire.port)] = (never, addresses)
            assert await _post(pool, f"http://upstream.test:{wire.port}/v1") == b"ok"
            assert wire.connections == 1
            assert pool.resolver.lookups == 0
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_name_none_of_whose_addresses_answer_is_looked_up_again(loop: str) -> None:
    """Every address refused: ConnectError, and the next request looks the name up afresh; a
    name that does not resolve is a ConnectError and is not cached."""

    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pool = H1Pool(limit=10)
        for expected in (1, 2):
            with pytest.raises(ConnectError):
                await _post(pool, f"http://localhost:{port}/v1")
            assert pool.resolver.lookups == expected
        for expected in (3, 4):
            with pytest.raises(ConnectError):
                await _post(pool, "http://no-such-host.invalid/v1")
            assert pool.resolver.lookups == expected
        assert pool.open_connections == 0
        await pool.close()

    run_on(loop, main)
