"""The h1 client through outbound proxies started by the test: HTTP (CONNECT, and absolute-form
for plain http) and SOCKS5 (RFC 1928, with RFC 1929 username/password), with and without
credentials, plain and TLS to the upstream through the tunnel (a throwaway CA), on both loops."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxyd.upstream.h1 import ConnectError, H1Pool
from tests.conftest import SECRET, StartProxy, StartServer, channel, key, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body, chat_events
from tests.test_h1 import LOOPS, run_on

USER, PASSWORD = "relay", "p@ss:w0rd"  # characters a URL must escape


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


_OPEN: list[asyncio.StreamWriter] = []  # every connection the test's servers opened or took
_SERVERS: list[asyncio.Server] = []


async def _listen(serve: Any, context: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    async def tracked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _OPEN.append(w)
        await serve(r, w)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0, ssl=context)
    _SERVERS.append(server)
    return server, server.sockets[0].getsockname()[1]


async def _dial(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    pair = await asyncio.open_connection(host, port)
    _OPEN.append(pair[1])
    return pair


async def _shutdown(pool: H1Pool) -> None:
    """Close the pool, then every server and connection of the test (uvloop's loop will not
    close over open transports)."""
    await pool.close()
    for server in _SERVERS:
        server.close()
    for writer in _OPEN:
        writer.transport.abort()
    _SERVERS.clear()
    _OPEN.clear()
    await asyncio.sleep(0)


@dataclass
class Upstream:
    """An HTTP/1.1 upstream that answers every POST with a JSON body (or an SSE stream for a
    path ending in /stream), keep-alive, and counts its connections."""

    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server, self.port = await _listen(self._serve, self.tls)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await r.readexactly(length)
                self.requests.append(head)
                if b"/stream " in head.split(b"\r\n", 1)[0]:
                    events = b"data: one\n\ndata: two\n\n"
                    w.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                    )
                    for chunk in (events[:11], events[11:]):
                        w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        await w.drain()
                    w.write(b"0\r\n\r\n")
                else:
                    w.write(b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}')
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()


def _fields(lines: list[str]) -> list[tuple[str, str, str]]:
    """A request head's header lines as (lowercase name, ":", value)."""
    out = []
    for ln in lines[1:]:
        name, sep, value = ln.partition(":")
        out.append((name.lower(), sep, value))
    return out


@dataclass
class HttpProxy:
    """A forward proxy: CONNECT tunnels, and absolute-form requests it forwards; with
    credentials set it answers 407 to a request without the right Proxy-Authorization."""

    credentials: tuple[str, str] | None = None
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, target, auth
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server, self.port = await _listen(self._serve)

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        if credentials is None:
            return f"http://127.0.0.1:{self.port}"
        user, password = (c.replace("@", "%40").replace(":", "%3A") for c in credentials)
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def _allowed(self, auth: str | None) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return auth == f"Basic {expected}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            auth = next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in lines[1:]
                    if ln.lower().startswith("proxy-authorization:")
                ),
                None,
            )
            self.seen.append((method, target, auth))
            if not self._allowed(auth):
                w.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await w.drain()
                w.close()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = await _dial(host, int(port))
                w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await w.drain()
                await _splice((r, w), upstream)
                return
            # absolute form: forward this request (and any later ones on the connection)
            hostport = target.split("://", 1)[1].split("/", 1)[0]
            host, port = hostport.rsplit(":", 1)
            upstream = await _dial(host, int(port))
            path = "/" + target.split("://", 1)[1].split("/", 1)[1]
            kept = [ln for ln in lines[1:] if not ln.lower().startswith("proxy-authorization:")]
            upstream[1].write(
                f"{method} {path} HTTP/1.1\r\n".encode() + "\r\n".join(kept).encode("latin-1")
            )
            await _splice((r, w), upstream)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()


@dataclass
class Socks5:
    """A SOCKS5 server (CONNECT only), with or without username/password authentication."""

    credentials: tuple[str, str] | None = None
    destinations: list[tuple[str, int]] = field(default_factory=list)  # as the client named them
    refused: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server, self.port = await _listen(self._serve)

    def url(self, scheme: str = "socks5", credentials: tuple[str, str] | None = None) -> str:
        if credentials is None:
            return f"{scheme}://127.0.0.1:{self.port}"
        user, password = (c.replace("@", "%40").replace(":", "%3A") for c in credentials)
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            version, count = await r.readexactly(2)
            methods = await r.readexactly(count)
            assert version == 5
            wanted = 2 if self.credentials is not None else 0
            if wanted not in methods:
                w.write(b"\x05\xff")
                await w.drain()
                w.close()
                return
            w.write(bytes([5, wanted]))
            if wanted == 2:  # RFC 1929
                _, ulen = await r.readexactly(2)
                user = (await r.readexactly(ulen)).decode()
                (plen,) = await r.readexactly(1)
                password = (await r.readexactly(plen)).decode()
                ok = (user, password) == self.credentials
                w.write(b"\x01\x00" if ok else b"\x01\x01")
                if not ok:
                    self.refused += 1
                    await w.drain()
                    w.close()
                    return
            _, cmd, _, atyp = await r.readexactly(4)
            assert cmd == 1
            if atyp == 1:
                host = ".".join(str(b) for b in await r.readexactly(4))
            elif atyp == 3:
                (n,) = await r.readexactly(1)
                host = (await r.readexactly(n)).decode()
            else:
                raise AssertionError(f"address type {atyp}")
            (port,) = struct.unpack("!H", await r.readexactly(2))
            self.destinations.append((host, port))
            upstream = await _dial("127.0.0.1" if host == "localhost" else host, port)
            w.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port))
            await w.drain()
            await _splice((r, w), upstream)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


def throwaway_tls() -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(server, client)


async def call(
    pool: H1Pool, url: str, proxy: str, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    answer = await pool.post(
        url,
        {"Content-Type": "application/json", "Authorization": "Bearer up"},
        b"{}",
        ssl_context=context,
        connect_timeout=3.0,
        read_timeout=3.0,
        proxy=proxy,
    )
    return answer.status, answer.body


async def stream(
    pool: H1Pool, url: str, proxy: str, context: ssl.SSLContext | None = None
) -> bytes:
    opened = await pool.open(
        url,
        {"Content-Type": "application/json"},
        b"{}",
        ssl_context=context,
        connect_timeout=3.0,
        read_timeout=3.0,
        proxy=proxy,
    )
    try:
        return await opened.read_all()
    finally:
        opened.release()


async def _upstream(tls: bool) -> tuple[Upstream, str, ssl.SSLContext | None, H1Pool]:
    """A started upstream (TLS with a throwaway CA, or plain), its base URL, the client's TLS
    context for it, and a pool to reach it with."""
    certs = throwaway_tls() if tls else None
    upstream = Upstream(tls=certs.server if certs else None)
    await upstream.start()
    host = "localhost" if tls else "127.0.0.1"
    base = f"{'https' if tls else 'http'}://{host}:{upstream.port}/v1"
    return upstream, base, certs.client if certs else None, H1Pool(limit=10)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("credentials", [None, (USER, PASSWORD)], ids=["open", "login"])
def test_http_proxy(loop: str, tls: bool, credentials: tuple[str, str] | None) -> None:
    """A whole answer and a stream through an HTTP proxy, reusing the proxied connection;
    https goes through a CONNECT tunnel (the upstream sees TLS from the client, the proxy only
    the tunnel), plain http as absolute-form requests to the proxy."""

    async def main() -> None:
        upstream, base, context, pool = await _upstream(tls)
        proxy = HttpProxy(credentials=credentials)
        await proxy.start()
        url = proxy.url(credentials)
        assert await call(pool, base + "/chat/completions", url, context) == (200, b'{"a":1}')
        assert await call(pool, base + "/chat/completions", url, context) == (200, b'{"a":1}')
        assert await stream(pool, base + "/stream", url, context) == b"data: one\n\ndata: two\n\n"
        assert upstream.connections == 1  # one proxied connection, kept alive for all three
        assert len(upstream.requests) == 3
        expected_auth = (
            None
            if credentials is None
            else "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        )
        if tls:
            assert proxy.seen == [("CONNECT", f"localhost:{upstream.port}", expected_auth)]
        else:
            assert proxy.seen[0] == ("POST", base + "/chat/completions", expected_auth)
        if tls:  # through a tunnel the proxy's credentials never reach the upstream
            for head in upstream.requests:
                assert b"proxy-authorization" not in head.lower()
        elif credentials is not None:  # each plain request carries them for the proxy to strip
            for head in upstream.requests[1:]:  # (this test proxy strips the first one only)
                assert f"Proxy-Authorization: {expected_auth}".encode() in head
        await _shutdown(pool)

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_http_proxy_refusing_the_credentials_is_a_connect_error(loop: str, tls: bool) -> None:
    """A 407 from the proxy (wrong or no credentials) fails the call as a connect error, and
    the message names no credential."""

    async def main() -> None:
        upstream = Upstream()
        await upstream.start()
        proxy = HttpProxy(credentials=(USER, PASSWORD))
        await proxy.start()
        pool = H1Pool(limit=10)
        scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
        url = f"{scheme}://{host}:{upstream.port}/v1/x"
        for credentials in ((USER, "wrong"), None):
            with pytest.raises(ConnectError) as caught:  # a refused tunnel, or a 407 answer
                await call(pool, url, proxy.url(credentials))
            assert "wrong" not in str(caught.value)
            with pytest.raises(ConnectError):  # a stream call too
                await stream(pool, url, proxy.url(credentials))
        assert upstream.connections == 0
        await _shutdown(pool)

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("credentials", [None, (USER, PASSWORD)], ids=["open", "login"])
def test_socks5_proxy(loop: str, tls: bool, credentials: tuple[str, str] | None) -> None:
    """A whole answer and a stream through SOCKS5, with and without a login, plain and TLS
    through the tunnel; the connection is kept alive through the proxy."""

    async def main() -> None:
        upstream, base, context, pool = await _upstream(tls)
        socks = Socks5(credentials=credentials)
        await socks.start()
        url = socks.url("socks5", credentials)
        assert await call(pool, base + "/chat/completions", url, context) == (200, b'{"a":1}')
        assert await stream(pool, base + "/stream", url, context) == b"data: one\n\ndata: two\n\n"
        assert upstream.connections == 1
        assert len(socks.destinations) == 1
        await _shutdown(pool)

    run_on(loop, main)


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_socks5h_lets_the_proxy_resolve_the_name(scheme: str) -> None:
    """socks5h sends the upstream's name to the proxy; socks5 resolves it first."""

    async def main() -> None:
        upstream, _, _, pool = await _upstream(tls=False)
        socks = Socks5()
        await socks.start()
        url = f"http://localhost:{upstream.port}/v1/x"
        assert await call(pool, url, socks.url(scheme)) == (200, b'{"a":1}')
        host, _ = socks.destinations[0]
        assert host == ("localhost" if scheme == "socks5h" else "127.0.0.1")
        await _shutdown(pool)

    asyncio.run(main())


def test_socks5_wrong_login_is_a_connect_error() -> None:
    async def main() -> None:
        upstream = Upstream()
        await upstream.start()
        socks = Socks5(credentials=(USER, PASSWORD))
        await socks.start()
        pool = H1Pool(limit=10)
        with pytest.raises(ConnectError) as caught:
            await call(
                pool, f"http://127.0.0.1:{upstream.port}/v1/x", socks.url("socks5", (USER, "nope"))
            )
        assert "nope" not in str(caught.value)
        assert (socks.refused, upstream.connections) == (1, 0)
        await _shutdown(pool)

    asyncio.run(main())


def test_direct_and_proxied_connections_never_mix() -> None:
    """The same upstream, direct and through a proxy: two connections, each reused only by
    requests asking for the same route."""

    async def main() -> None:
        upstream, _, _, pool = await _upstream(tls=False)
        socks = Socks5()
        await socks.start()
        url = f"http://127.0.0.1:{upstream.port}/v1/x"
        for _ in range(2):
            assert await call(pool, url, socks.url()) == (200, b'{"a":1}')
            answer = await pool.post(
                url, {}, b"{}", ssl_context=None, connect_timeout=3.0, read_timeout=3.0
            )
            assert answer.status == 200
        assert upstream.connections == 2
        assert len(socks.destinations) == 1
        await _shutdown(pool)

    asyncio.run(main())


async def test_a_channel_with_a_socks5_proxy_end_to_end(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """proxyd → SOCKS5 → provider: the channel's proxy carries whole answers and streams."""
    fake = FakeProvider().then(
        Step(body=chat_body("via proxy")), Step(events=chat_events(["a", "b"]))
    )
    server = await start_server(fake.app())
    socks = Socks5(credentials=(USER, PASSWORD))
    await socks.start()
    client, _ = await start_proxy(
        make_config(
            tmp_path,
            [channel("c1", server_url(server), proxy=socks.url("socks5", (USER, PASSWORD)))],
            keys=[key()],
        )
    )
    auth = {"Authorization": f"Bearer {SECRET}"}
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/chat/completions", headers=auth, json=body)
    assert resp.status == 200
    assert b"via proxy" in await resp.read()
    resp = await client.post("/v1/chat/completions", headers=auth, json={**body, "stream": True})
    assert resp.status == 200
    assert b"data: [DONE]" in await resp.read()
    assert len(fake.seen) == 2
    assert len(socks.destinations) == 1  # the proxied connection was kept alive
