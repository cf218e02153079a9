"""Fails loudly when aiohttp changes an internal that proxyd/server/connection.py relies on."""

from __future__ import annotations

import asyncio
import inspect

import orjson
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_protocol import RequestHandler

from proxyd.server.connection import (
    ClientRunner,
    ConnectionSettings,
    ConnectionStats,
    GuardedRequestHandler,
    GuardedServer,
)


def test_the_request_handler_internals_are_still_there() -> None:
    """RequestHandler's slots and methods that GuardedRequestHandler reads or overrides."""
    slots = set(RequestHandler.__slots__)
    for name in (
        "_waiter",
        "_messages",
        "_request_factory",
        "_request_handler",
        "_lingering_time",
        "_force_close",
        "_close",
        "_request_in_progress",
        "_keepalive_timeout",
        "_manager",
    ):
        assert name in slots, f"aiohttp's RequestHandler lost {name}"
    for method in ("_process_keepalive", "handle_error", "data_received", "connection_made"):
        assert callable(getattr(RequestHandler, method, None)), method
    params = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert params == ["self", "request", "status", "exc", "message"]
    assert "keepalive_timeout" in inspect.signature(RequestHandler.__init__).parameters
    # the request factory gets (message, payload, protocol, writer, task) and its result
    source = inspect.getsource(RequestHandler.start)
    assert "request_handler = self._request_handler" in source
    assert "self._request_factory(" in source
    assert "self._lingering_time" in source
    assert "message = ERROR" in source


def test_the_server_and_runner_hooks_are_still_there() -> None:
    """web.Server keeps its kwargs for the protocol; AppRunner builds it in _make_server."""
    source = inspect.getsource(web.Server.__call__)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in source
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    assert issubclass(GuardedServer, web.Server)


def test_keep_alive_is_a_cached_property_of_the_request() -> None:
    """BaseRequest.keep_alive is read from `_cache`, so the body deadline can turn it off."""
    request = make_mocked_request("POST", "/v1/chat/completions")
    assert request.keep_alive is True
    fresh = make_mocked_request("POST", "/v1/chat/completions")
    fresh._cache["keep_alive"] = False
    assert fresh.keep_alive is False


async def test_the_guarded_protocol_serves_through_a_real_runner() -> None:
    """ClientRunner makes GuardedRequestHandler protocols that answer and count connections."""
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app.router.add_get("/", hello)
    stats = ConnectionStats()
    runner = ClientRunner(app, ConnectionSettings(head_timeout=0.3), stats)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        assert isinstance(runner.server, GuardedServer)
        assert isinstance(runner.server(), GuardedRequestHandler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200 ")
        assert data.endswith(b"hi")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # cut at the head deadline
        writer.close()
        await asyncio.sleep(0.05)
        assert stats.cut["head"] == 1
        assert stats.open == 0
    finally:
        await runner.cleanup()


async def test_a_failing_handler_gets_a_json_500_not_aiohttps_page() -> None:
    """handle_error replaced: a handler's exception is a JSON 500 in the caller's format."""
    app = web.Application()

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_post("/v1/messages", broken)
    app.router.add_post("/v1/chat/completions", broken)
    runner = ClientRunner(app, ConnectionSettings(), ConnectionStats())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        for path, anthropic in ((b"/v1/messages", True), (b"/v1/chat/completions", False)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" % path)
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500 ")
            assert b"\r\nx-request-id: req_" in head
            assert b"\r\nContent-Type: application/json" in head
            assert b"a bug" not in body
            doc = orjson.loads(body)
            if anthropic:
                assert doc["error"]["type"] == "api_error"
            else:
                assert doc["error"]["type"] == "server_error"
    finally:
        await runner.cleanup()


async def test_a_body_deadline_reaches_any_handler_as_a_json_408() -> None:
    """A handler that lets RequestTimeout escape its body read still answers 408 JSON, closed."""
    app = web.Application()

    async def reads(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="read it all")

    app.router.add_post("/v1/messages/count_tokens", reads)
    stats = ConnectionStats()
    runner = ClientRunner(app, ConnectionSettings(body_timeout=0.3), stats)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: t\r\n")
        writer.write(b"Content-Length: 100\r\n\r\n{")
        data = await asyncio.wait_for(reader.read(), 5)  # read to the close
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b"\r\nConnection: close" in head
        assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
        assert stats.cut["body"] == 1
    finally:
        await runner.cleanup()
