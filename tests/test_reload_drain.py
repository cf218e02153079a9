"""SIGHUP under a hammer of new connections, plain and TLS: none is reset, every one answered."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from proxyd.mockprovider import create_mock_app
from tests.conftest import StartServer, server_url
from tests.procs import Proxyd, state
from tests.test_tls import client_context, issue

pytestmark = pytest.mark.slow

CLIENTS = 32  # connections at once, each opened, used for one request and closed, in a loop
RELOADS = 2
PAUSES = (0.0, 0.0, 0.0, 0.02, 0.1, 0.3)  # before the handshake, and before the request
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # keep-alive, as clients ask


async def _one(port: int, tls: ssl.SSLContext | None, rng: random.Random) -> str:
    """One new connection and its request: "ok" or what went wrong (an exception's name)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port))  # accepted by the kernel now
        sock.setblocking(False)
        await asyncio.sleep(rng.choice(PAUSES))  # sitting in the queue, or accepted, unspoken
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls, server_hostname="127.0.0.1" if tls else None
        )
        try:
            await asyncio.sleep(rng.choice(PAUSES))
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").lower().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            body = await reader.readexactly(int(headers["content-length"]))
            if not lines[0].startswith("http/1.1 200") or body != b'{"status": "ok"}':
                return f"answer {lines[0]!r} {body[:40]!r}"
            if headers.get("connection") == "close" and await reader.read() != b"":
                return "more after Connection: close"
        finally:
            writer.close()
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    return "ok"


@pytest.mark.parametrize("scheme", ["http", "https", "metrics"])
async def test_new_connections_across_sighups_are_never_reset(
    tmp_path: Path, start_server: StartServer, scheme: str
) -> None:
    """Connections opened without pause across two SIGHUPs (each retiring both workers), some
    dawdling before the handshake or the request: every one answered 200, none reset or closed
    unanswered. Before the drain waited for TLS handshakes (ba504bd), the TLS run saw
    `ConnectionResetError` in handshakes every time; before a connection accepted ahead of the
    close was served (85cd44f), plain ones were closed unanswered. `metrics`: the same on each
    worker's own `server.metrics_listen` port, which the supervisor now binds once per slot;
    before, each worker bound its own SO_REUSEPORT socket and a retiring one reset the
    connections queued on it."""
    mock = await start_server(create_mock_app(instant=True))
    server: dict[str, object] = {"head_timeout_seconds": 3}
    tls = None
    if scheme == "https":
        ca = trustme.CA()
        cert, key = issue(ca, tmp_path / "tls")
        server |= {"tls_cert": cert, "tls_key": key}
        tls = client_context(ca)
    proxyd = Proxyd(tmp_path, state(server_url(mock)), server=server)
    await proxyd.start()
    outcomes: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    async def hammer(seed: int) -> None:
        rng = random.Random(seed)
        port = proxyd.metrics + seed % 2 if scheme == "metrics" else proxyd.listen
        while not done.is_set():
            outcomes[await _one(port, tls, rng)] += 1

    try:
        assert proxyd.proc is not None
        tasks = [asyncio.create_task(hammer(seed)) for seed in range(CLIENTS)]
        await asyncio.sleep(0.2)
        for _ in range(RELOADS):
            before = set(proxyd.worker_pids())
            proxyd.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            now = before
            while time.monotonic() < deadline:  # both replaced, the old ones drained and gone
                now = set(proxyd.worker_pids())
                if len(now) == 2 and not before & now:
                    break
                await asyncio.sleep(0.05)
            assert len(now) == 2, proxyd.log.read_text()[-3000:]
            assert not before & now, proxyd.log.read_text()[-3000:]
        await asyncio.sleep(0.2)
        done.set()
        await asyncio.gather(*tasks)
        assert outcomes["ok"] > 100
        assert set(outcomes) == {"ok"}, dict(outcomes)
        assert await proxyd.stop() == 0
    finally:
        done.set()
        await proxyd.kill()


def _listening(port: int) -> set[int]:
    """The socket inodes listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state_code, inode = fields[1], fields[3], int(fields[9])
        if state_code == "0A" and local == f"0100007F:{port:04X}":
            found.add(inode)
    return found


def _socket_inodes(pid: int) -> set[int]:
    """The socket inodes process `pid` holds."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    return held


async def test_each_workers_metrics_port_is_one_socket_the_supervisor_binds(
    tmp_path: Path, start_server: StartServer
) -> None:
    """`server.metrics_listen` under --workers: slot k's port is one listening socket the
    supervisor bound, which a reload's new worker takes over, as the client port is. Before,
    each worker bound its own SO_REUSEPORT socket on the port: a reload put a second socket on
    it, and the old one's queued connections were reset when it closed."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = Proxyd(tmp_path, state(server_url(mock)))
    await proxyd.start()
    try:
        assert proxyd.proc is not None
        supervisor = _socket_inodes(proxyd.proc.pid)
        before = [_listening(proxyd.metrics + slot) for slot in (0, 1)]
        assert all(len(inodes) == 1 and inodes <= supervisor for inodes in before), before
        workers = set(proxyd.worker_pids())
        proxyd.proc.send_signal(signal.SIGHUP)
        for _ in range(400):  # 20 s at most: both replaced, the old ones gone
            if not workers & set(proxyd.worker_pids()):
                break
            await asyncio.sleep(0.05)
        assert not workers & set(proxyd.worker_pids())
        assert [_listening(proxyd.metrics + slot) for slot in (0, 1)] == before
        assert await proxyd.stop() == 0
    finally:
        await proxyd.kill()
