"""Errors the server makes itself, HTTP/1.0 streams and the Server header, against real proxyd."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxyd.mockprovider import create_mock_app
from proxyd.protocol.sse import EventSplitter
from tests.conftest import SECRET, StartServer, server_url
from tests.served import free_port, serve


async def exchange(port: int, data: bytes, *, limit: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; everything read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), limit)
    finally:
        writer.close()


def split(raw: bytes) -> tuple[int, dict[str, str], list[str], bytes]:
    """Status, headers (lower-cased names), the header names in order, and the body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    names = [line.split(":", 1)[0].lower() for line in lines[1:]]
    headers = {n: line.split(":", 1)[1].strip() for n, line in zip(names, lines[1:], strict=True)}
    return status, headers, names, body


def assert_openai_error(raw: bytes, status: int) -> dict[str, Any]:
    code, headers, names, body = split(raw)
    assert code == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    assert "server" not in names
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def assert_anthropic_error(raw: bytes, status: int) -> dict[str, Any]:
    code, headers, names, body = split(raw)
    assert code == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    assert "server" not in names
    doc: dict[str, Any] = orjson.loads(body)
    assert doc["type"] == "error"
    assert set(doc["error"]) == {"type", "message"}
    return doc


CLOSE = b"Host: t\r\nConnection: close\r\n"


async def test_every_server_made_error_is_json_in_the_callers_format(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Unknown path, wrong method, bad HTTP, oversized head: JSON, x-request-id, no Server."""
    mock = await start_server(create_mock_app())
    async with serve(tmp_path, server_url(mock), {"max_head_bytes": 16384}) as px:
        port = px.port
        err = assert_openai_error(
            await exchange(port, b"GET /v2/nothing HTTP/1.1\r\n" + CLOSE + b"\r\n"), 404
        )
        assert err["code"] == "not_found"
        assert "/v2/nothing" in err["message"]
        raw = await exchange(
            port, b"GET /v2/nothing HTTP/1.1\r\nanthropic-version: 2023-06-01\r\n" + CLOSE + b"\r\n"
        )
        assert assert_anthropic_error(raw, 404)["error"]["type"] == "not_found_error"
        raw = await exchange(port, b"GET /v1/messages HTTP/1.1\r\n" + CLOSE + b"\r\n")
        assert assert_anthropic_error(raw, 405)["error"]["type"] == "invalid_request_error"
        assert split(raw)[1]["allow"] == "POST"
        raw = await exchange(port, b"DELETE /v1/chat/completions HTTP/1.1\r\n" + CLOSE + b"\r\n")
        assert assert_openai_error(raw, 405)["code"] == "method_not_allowed"

        # Bad HTTP: the connection closes after the answer; the wire format is guessed from
        # the raw head (path, anthropic-version) because nothing could be parsed.
        raw = await exchange(port, b"\x16\x03\x01garbage\r\n\r\n")
        assert assert_openai_error(raw, 400)["type"] == "invalid_request_error"
        assert split(raw)[1]["connection"] == "close"
        raw = await exchange(port, b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nbad header\r\n\r\n")
        assert_anthropic_error(raw, 400)
        long_line = b"X-Long: " + b"a" * 9000 + b"\r\n"
        raw = await exchange(
            port, b"POST /v1/messages HTTP/1.1\r\nHost: t\r\n" + long_line + b"\r\n"
        )
        assert assert_anthropic_error(raw, 431)["error"]["message"].startswith("The request line")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(200))
        raw = await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
        assert assert_openai_error(raw, 431)["code"] == "header_too_large"
        big = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 4000) for i in range(6))  # 24 KB > 16 KB
        raw = await exchange(
            port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n"
        )
        assert_openai_error(raw, 431)
        # the same head trickled in pieces is refused as soon as it passes the cap
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: t\r\n")
        for i in range(6):
            writer.write(b"X-%d: %s\r\n" % (i, b"c" * 4000))
            await writer.drain()
            await asyncio.sleep(0.02)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert_anthropic_error(raw, 431)
        async with (
            aiohttp.ClientSession() as session,
            session.get(px.metrics_url + "/healthz") as resp,
        ):
            assert "Server" not in resp.headers  # the metrics listener too
        assert await px.value("proxyd_client_errors_total", status="431") == 4
        assert await px.value("proxyd_client_errors_total", status="400") == 2


def stream_request(path: bytes, body: dict[str, Any], version: bytes = b"HTTP/1.0") -> bytes:
    data = orjson.dumps(body)
    return (
        b"POST %s %s\r\nAuthorization: Bearer %s\r\nanthropic-version: 2023-06-01\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path, version, SECRET.encode(), len(data), data)
    )


async def test_an_http10_client_gets_a_clean_close_delimited_sse_stream(
    tmp_path: Path, start_server: StartServer
) -> None:
    """HTTP/1.0 streams (both formats): no chunk-size lines, whole events, ended by close."""
    mock = await start_server(create_mock_app(chunks=12))
    async with serve(tmp_path, server_url(mock)) as px:
        for path, model in (
            (b"/v1/chat/completions", "mock-gpt"),
            (b"/v1/messages", "mock-claude"),
        ):
            body = {
                "model": model,
                "stream": True,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "Hi"}],
            }
            raw = await exchange(px.port, stream_request(path, body))
            status, headers, names, payload = split(raw)
            assert status == 200
            assert raw.startswith(b"HTTP/1.0 200 ")
            assert "transfer-encoding" not in names
            assert "content-length" not in names
            assert "server" not in names
            assert headers["content-type"].startswith("text/event-stream")
            splitter = EventSplitter()
            events = splitter.feed(payload)
            assert splitter.pending() == b""  # nothing but whole events, no chunk framing
            assert len(events) >= 12
            for event in events:
                for line in event.strip(b"\n").split(b"\n"):
                    assert line.startswith((b"data: ", b"event: ")), line
            if model == "mock-gpt":
                assert events[-1] == b"data: [DONE]\n\n"
                text = "".join(
                    (orjson.loads(e[6:])["choices"] or [{"delta": {}}])[0]["delta"].get("content")
                    or ""
                    for e in events[:-1]
                )
            else:
                assert events[-1].startswith(b"event: message_stop")
                text = "".join(
                    orjson.loads(e.split(b"data: ", 1)[1])["delta"].get("text", "")
                    for e in events
                    if e.startswith(b"event: content_block_delta")
                )
            assert len(text.split()) >= 11
        # and HTTP/1.1 keeps its chunked framing
        raw = await exchange(
            px.port,
            stream_request(
                b"/v1/chat/completions",
                {
                    "model": "mock-gpt",
                    "stream": True,
                    "messages": [{"role": "user", "content": "x"}],
                },
                b"HTTP/1.1\r\nHost: t\r\nConnection: close",
            ),
        )
        assert split(raw)[1]["transfer-encoding"] == "chunked"


async def test_no_server_header_unless_configured(
    tmp_path: Path, start_server: StartServer
) -> None:
    """server.server_header: absent by default (checked above); when set, on every response."""
    mock = await start_server(create_mock_app(chunks=3))
    control = free_port()
    settings = {
        "server_header": "relay",
        "admin_token": "server-header-admin-token",
        "control_listen": f"127.0.0.1:{control}",
    }
    async with serve(tmp_path, server_url(mock), settings) as px:
        # the control API and the per-process metrics listener follow the same setting
        async with aiohttp.ClientSession() as session:
            for url in (
                f"http://127.0.0.1:{control}/control/v1/state",
                px.metrics_url + "/healthz",
            ):
                async with session.get(url) as resp:
                    assert resp.headers.getall("Server") == ["relay"], url
        body = {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        for request in (
            stream_request(
                b"/v1/chat/completions", body, b"HTTP/1.1\r\nHost: t\r\nConnection: close"
            ),
            b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer %s\r\n%s\r\n"
            % (SECRET.encode(), CLOSE),
            b"GET /v1/models HTTP/1.1\r\n" + CLOSE + b"\r\n",  # 401
            b"GET /nowhere HTTP/1.1\r\n" + CLOSE + b"\r\n",  # 404
            b"garbage\r\n\r\n",  # 400
        ):
            _, headers, names, _ = split(await exchange(px.port, request))
            assert names.count("server") == 1
            assert headers["server"] == "relay"
