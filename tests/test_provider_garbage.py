"""A provider that answers garbage: bytes that are not HTTP fail over like a broken connection,
and with no channel left the client gets proxyd's JSON error in its own format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import SECRET, StartProxy, StartServer, channel, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body

AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def garbage_server() -> AsyncIterator[str]:
    """A TCP server that answers every request with bytes that are not HTTP, then closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"\x00\x01SSH-2.0-notanhttpserver\r\n\xff\xfe garbage \r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_garbage_fails_over_then_is_a_clean_error(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    garbage_server: str,
    stream: bool,
) -> None:
    """Garbage on the top channel: the backup serves the 200. Garbage everywhere: a JSON 502 or
    503 in the OpenAI format (Anthropic's for /v1/messages), with x-request-id."""
    backup = FakeProvider(Step(body=chat_body("from backup")))
    b = await start_server(backup.app())
    config = make_config(
        tmp_path,
        [channel("junk", garbage_server, priority=10), channel("backup", server_url(b))],
    )
    client, _ = await start_proxy(config)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "from backup"

    only = make_config(tmp_path / "only", [channel("junk", garbage_server)])
    client, _ = await start_proxy(only)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT | {"stream": stream})
    assert resp.status in (502, 503)
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    error = orjson.loads(await resp.read())["error"]
    assert error["code"] in ("upstream_connect_failure", "upstream_error")
    resp = await client.post(
        "/v1/messages",
        headers={"x-api-key": SECRET},
        json={"model": "gpt-test", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status in (502, 503)
    assert orjson.loads(await resp.read())["type"] == "error"
