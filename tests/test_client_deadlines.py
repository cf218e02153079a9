"""Client connection deadlines (head, body, idle) and the connection cap, against real proxyd."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxyd.mockprovider import create_mock_app
from tests.conftest import SECRET, StartServer, server_url
from tests.fakes import FakeProvider, Step, chat_body
from tests.served import Served, free_port, serve
from tests.test_server_errors import assert_anthropic_error, assert_openai_error, split

AUTH = b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
CHAT = orjson.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "Hi"}]})


async def until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit)
    return data, time.monotonic() - start


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """Send `data` one byte at a time until the server closes the connection."""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)
    except (ConnectionError, OSError):
        return


async def silent_then_closed(port: int) -> float:
    """Connect and send nothing; how long until the server closed (asserting it sent nothing).

    A close that reaches the client as a reset rather than an end of stream counts as closed
    too: it happened once in a full CI run (control or metrics port, ConnectionResetError),
    never when run alone; what is checked is that the connection was cut, with nothing sent,
    at its deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    try:
        data, took = await until_closed(reader, 10)
    except ConnectionResetError:
        data, took = b"", time.monotonic() - start
    writer.close()
    assert data == b""
    return took


async def trickled_head(port: int, head: bytes) -> tuple[bytes, float]:
    """Trickle `head` a byte every 10 ms; what the server sent before closing, and when."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sender = asyncio.create_task(trickle(writer, head, 0.01))
    data, took = await until_closed(reader, 10)
    await sender
    writer.close()
    return data, took


def body_head(length: int, path: bytes = b"/v1/chat/completions") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: t\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path, AUTH, length)
    )


async def test_each_phase_is_cut_at_its_deadline_and_counted(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Silent, trickled-head, trickled-body and idle connections close at their deadlines."""
    mock = await start_server(create_mock_app(instant=True))
    settings = {"head_timeout_seconds": 1, "body_timeout_seconds": 1.5, "idle_timeout_seconds": 2}
    async with serve(tmp_path, server_url(mock), settings) as px:
        port = px.port
        # accepted, never a byte: closed silently at the head deadline
        assert 0.8 < await silent_then_closed(port) < 3

        # a head trickled a byte every 10 ms: 408 in Anthropic's format at the head deadline
        head = b"POST /v1/messages HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 50
        data, took = await trickled_head(port, head)
        assert 0.8 < took < 3
        assert assert_anthropic_error(data, 408)["error"]["message"].startswith("The request head")

        # the body trickled after a whole head: the handler answers 408 (OpenAI format) and
        # the connection closes; the request's billing row says so
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(body_head(len(CHAT)))
        sender = asyncio.create_task(trickle(writer, CHAT, 0.1))
        data, took = await until_closed(reader, 10)
        sender.cancel()
        writer.close()
        assert 1.2 < took < 4
        error = assert_openai_error(data, 408)
        assert error["code"] == "client_timeout"
        assert split(data)[1]["connection"] == "close"
        body_request_id = split(data)[1]["x-request-id"]

        # keep-alive: a second request inside the idle deadline is served, then the idle
        # connection is closed at the idle deadline after the last response
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = 0.0
        for _ in range(2):
            writer.write(body_head(len(CHAT)) + CHAT)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(split(head)[1]["content-length"])
            assert split(head)[0] == 200
            await reader.readexactly(length)
            answered = time.monotonic()
            await asyncio.sleep(1.2)  # past the head deadline, inside the idle one
        data, _ = await until_closed(reader, 10)
        idle = time.monotonic() - answered
        writer.close()
        assert data == b""
        assert 1.8 < idle < 4  # closed 2 s after the last response

        assert await px.value("proxyd_client_connections_cut_total", phase="head") == 2
        assert await px.value("proxyd_client_connections_cut_total", phase="body") == 1
        assert await px.value("proxyd_client_connections_cut_total", phase="idle") == 1
        assert await px.value("proxyd_client_errors_total", status="408") == 1
        await asyncio.sleep(0.5)  # the writer's flush interval
    with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
        row = db.execute(
            "select status_code, error_type from usage_records where request_id = ?",
            (body_request_id,),
        ).fetchone()
    assert row == (408, "client_timeout")


async def test_past_the_connection_cap_a_clear_503(
    tmp_path: Path, start_server: StartServer
) -> None:
    """server.max_connections: the next connection gets 503 JSON, Retry-After, then close."""
    mock = await start_server(create_mock_app(instant=True))
    async with serve(tmp_path, server_url(mock), {"max_connections": 3}) as px:
        held = [await asyncio.open_connection("127.0.0.1", px.port) for _ in range(3)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: t\r\n" + AUTH + b"\r\n")
        data, _ = await until_closed(reader, 10)
        writer.close()
        doc = assert_anthropic_error(data, 503)
        assert doc["error"]["type"] == "overloaded_error"
        assert split(data)[1]["retry-after"] == "1"
        assert split(data)[1]["connection"] == "close"
        assert await px.value("proxyd_client_connections_refused_total") == 1
        assert await px.value("proxyd_client_connections") >= 3
        for _, w in held:
            w.close()
        await asyncio.sleep(0.3)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                px.url + "/v1/chat/completions",
                data=CHAT,
                headers={"Authorization": f"Bearer {SECRET}"},
            ) as resp,
        ):
            assert resp.status == 200


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


async def normal_load(px: Served, count: int, concurrency: int) -> list[float]:
    """`count` whole chat completions, `concurrency` at a time; each one's latency."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                queue.pop()
                start = time.monotonic()
                async with session.post(
                    px.url + "/v1/chat/completions",
                    data=CHAT,
                    headers={"Authorization": f"Bearer {SECRET}"},
                ) as resp:
                    await resp.read()
                    assert resp.status == 200
                latencies.append(time.monotonic() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_slow_clients_are_cut_while_normal_traffic_keeps_its_latency(
    tmp_path: Path, start_server: StartServer
) -> None:
    """200 head and 10 body tricklers (a byte a second) cut at their deadlines; p99 < 2x quiet."""
    mock = await start_server(create_mock_app(instant=True))
    settings = {"head_timeout_seconds": 2, "body_timeout_seconds": 3}
    async with serve(tmp_path, server_url(mock), settings) as px:
        await normal_load(px, 50, 10)  # warm-up
        quiet = p99(await normal_load(px, 300, 10))
        fds_before = open_fds(px.proc.pid)

        async def head_trickler() -> float:
            # timed from before the connect: the deadline runs from the server's accept, which
            # the connect precedes (stamped after it, the time read 1.47 s once in CI: this
            # loop resumed the 200 connects 0.53 s late, all at once)
            start = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            sender = asyncio.create_task(
                trickle(writer, b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X: y\r\n" * 99, 1.0)
            )
            await asyncio.wait_for(reader.read(), 30)
            sender.cancel()
            writer.close()
            return time.monotonic() - start

        async def body_trickler() -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(body_head(len(CHAT)))
            start = time.monotonic()
            sender = asyncio.create_task(trickle(writer, CHAT, 1.0))
            data = await asyncio.wait_for(reader.read(), 30)
            sender.cancel()
            writer.close()
            assert split(data)[0] == 408
            return time.monotonic() - start

        heads = [asyncio.create_task(head_trickler()) for _ in range(200)]
        bodies = [asyncio.create_task(body_trickler()) for _ in range(10)]
        await asyncio.sleep(0.3)
        assert await px.value("proxyd_client_connections") >= 200
        loaded = p99(await normal_load(px, 300, 10))
        head_times = await asyncio.gather(*heads)
        body_times = await asyncio.gather(*bodies)

        print(f"quiet p99 {quiet * 1000:.1f} ms, with 210 slow clients {loaded * 1000:.1f} ms")
        print(f"head cut after {min(head_times):.2f}-{max(head_times):.2f} s (deadline 2 s)")
        print(f"body cut after {min(body_times):.2f}-{max(body_times):.2f} s (deadline 3 s)")
        assert max(head_times) < 2 + 1.5
        assert min(head_times) > 1.5
        assert max(body_times) < 3 + 1.5
        assert min(body_times) > 2.5
        # 2x the quiet figure; 25 ms floor: a shared test machine's scheduling noise
        assert loaded <= 2 * max(quiet, 0.025)
        assert await px.value("proxyd_client_connections_cut_total", phase="head") == 200
        assert await px.value("proxyd_client_connections_cut_total", phase="body") == 10
        await asyncio.sleep(0.3)
        assert open_fds(px.proc.pid) <= fds_before + 5


async def test_a_request_on_its_way_at_drain_is_served(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGTERM closes the listener: a connection accepted before it whose request arrives just
    after is served (once, then closed), not dropped unanswered; an idle keep-alive connection is
    closed at once; a connection that never sends is closed at its head deadline; exit 0."""
    mock = await start_server(create_mock_app(instant=True))
    async with serve(tmp_path, server_url(mock), {"head_timeout_seconds": 3}) as px:
        on_its_way = await asyncio.open_connection("127.0.0.1", px.port)
        silent = await asyncio.open_connection("127.0.0.1", px.port)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", px.port)
        idle_writer.write(body_head(len(CHAT)) + CHAT)
        head = await idle_reader.readuntil(b"\r\n\r\n")
        await idle_reader.readexactly(int(split(head)[1]["content-length"]))
        assert split(head)[0] == 200
        await asyncio.sleep(0.2)  # every connection accepted
        px.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the listener is closed; the drain has begun
        reader, writer = on_its_way
        writer.write(body_head(len(CHAT)) + CHAT)
        data, _ = await until_closed(reader, 10)
        status, headers = split(data)[:2]
        assert status == 200
        assert headers["connection"] == "close"
        assert orjson.loads(data.split(b"\r\n\r\n", 1)[1])["object"] == "chat.completion"
        idle_data, _ = await until_closed(idle_reader, 1)
        assert idle_data == b""
        silent_data, waited = await until_closed(silent[0], 10)
        assert silent_data == b""
        assert waited < 4
        assert await asyncio.wait_for(px.proc.wait(), 10) == 0
        for w in (writer, silent[1], idle_writer):
            w.close()


async def test_a_request_with_its_handler_at_drain_is_answered_with_connection_close(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGTERM while a request waits for its provider: its answer says `Connection: close`
    before the server closes the connection, so a keep-alive client does not send its next
    request there. Before: a plain keep-alive answer, then the connection closed under it."""
    fake = FakeProvider(Step(body=chat_body("hello"), stall_before_headers=0.8))
    upstream = await start_server(fake.app())
    async with serve(tmp_path, server_url(upstream)) as px:
        reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
        writer.write(body_head(len(CHAT)) + CHAT)
        for _ in range(100):  # the request is with its handler, waiting for the provider
            if fake.seen:
                break
            await asyncio.sleep(0.01)
        px.proc.send_signal(signal.SIGTERM)
        data, _ = await until_closed(reader, 10)
        status, headers = split(data)[:2]
        assert status == 200
        assert headers["connection"] == "close"
        assert orjson.loads(data.split(b"\r\n\r\n", 1)[1])["object"] == "chat.completion"
        assert await asyncio.wait_for(px.proc.wait(), 10) == 0
        writer.close()


async def test_the_control_and_metrics_listeners_have_the_same_deadlines(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The control API and the metrics listener cut a silent or trickling connection at the
    head deadline too (before, they were aiohttp's plain runners: a connection that never sent
    a whole head stayed open), and still answer a proper request."""
    mock = await start_server(create_mock_app(instant=True))
    control = free_port()
    settings = {
        "head_timeout_seconds": 1,
        "admin_token": "a" * 24,
        "control_listen": f"127.0.0.1:{control}",
    }
    async with serve(tmp_path, server_url(mock), settings) as px:
        metrics = int(px.metrics_url.rsplit(":", 1)[1])
        for port in (control, metrics):
            assert 0.8 < await silent_then_closed(port) < 3
            head = b"GET /readyz HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 50
            data, took = await trickled_head(port, head)
            assert 0.8 < took < 3
            assert data.startswith(b"HTTP/1.1 408")
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": "Bearer " + "a" * 24}
            url = f"http://127.0.0.1:{control}/control/v1/channels"
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
            async with session.get(px.metrics_url + "/metrics") as resp:
                assert resp.status == 200
