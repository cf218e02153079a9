"""Fails loudly when aiohttp changes an internal that proxyd/server/connection.py (the guarded
protocol) or proxyd/server/respond.py (the response writer and FlowControl) relies on."""

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
from proxyd.server.respond import FlowControl


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
        "_current_request",
        "_keepalive_timeout",
        "_manager",
    ):
        assert name in slots, f"aiohttp's RequestHandler lost {name}"
    for method in (
        "_process_keepalive",
        "handle_error",
        "data_received",
        "connection_made",
        "close",
        "shutdown",
    ):
        assert callable(getattr(RequestHandler, method, None)), method
    # the drain: pre_shutdown closes every connection, then shutdown(timeout) waits for them
    assert "conn.close()" in inspect.getsource(web.Server.pre_shutdown)
    assert "self._server.pre_shutdown()" in inspect.getsource(web.BaseRunner.cleanup)
    # the handler's request, set while its handler runs (Connection: close at drain)
    assert "self._current_request = request" in inspect.getsource(RequestHandler._handle_request)
    assert inspect.iscoroutinefunction(RequestHandler.shutdown)
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


def test_the_writer_internals_are_still_there() -> None:
    """What proxyd/server/respond.py reads or sets: a response's sent flags, and the
    protocol's write pause that FlowControl exposes to the relay."""
    response = web.StreamResponse()
    for name, value in (("_eof_sent", False), ("_keep_alive", None)):
        assert hasattr(response, name), f"aiohttp's StreamResponse lost {name}"
        assert getattr(response, name) == value, f"StreamResponse.{name} starts differently"
    paused = inspect.getattr_static(RequestHandler, "writing_paused", None)
    assert isinstance(paused, property), "aiohttp's protocol lost its writing_paused property"
    drain = getattr(RequestHandler, "_drain_helper", None)
    assert drain is not None, "aiohttp's protocol lost _drain_helper"
    assert inspect.iscoroutinefunction(drain), "_drain_helper is no longer a coroutine"
    # write_eof must do nothing for a response whose _eof_sent proxyd set
    assert "if self._eof_sent:" in inspect.getsource(web.StreamResponse.write_eof)


async def test_flow_control_pauses_and_drains_with_a_real_client() -> None:
    """A stream written through FlowControl to a client that does not read: `paused` turns on
    once the transport's buffer passes its high-water mark, and `drain` returns once the
    client reads again."""
    flows: list[FlowControl] = []
    release = asyncio.Event()

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        flow = FlowControl(request)
        flows.append(flow)
        chunk = b"x" * 65536
        while not flow.paused:
            flow.write(chunk)
        release.set()
        await flow.drain()
        flow.write(b"end")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", flood)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(release.wait(), 10)  # the client has not read a byte yet
        assert flows[0].paused
        assert not flows[0].is_closing()
        data = b""
        while not data.endswith(b"end0\r\n\r\n"):  # reading lets drain() return (raw, then the end)
            more = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert more
            data += more
    finally:
        writer.close()
        await runner.cleanup()
