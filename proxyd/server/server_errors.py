"""Errors the server makes itself (unknown path, wrong method, bad HTTP, over capacity), as JSON.

Each is rendered in the caller's wire format, guessed from the path and headers: Anthropic's when
the path is under /v1/messages or an `anthropic-version` header came, else OpenAI's. Every one
carries `x-request-id`; none carries a `Server` header unless the operator configured one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from proxyd.errors import ErrorType, ProxydError
from proxyd.protocol import anthropic as anthropic_wire
from proxyd.protocol import openai as openai_wire
from proxyd.protocol.endpoints import Protocol
from proxyd.server.handlers import new_request_id
from proxyd.server.respond import WholeResponse, head_bytes, header_lines

_MESSAGES = b"/v1/messages"


def wire_for(path: str, headers: Mapping[str, str]) -> Protocol:
    """The wire format of a caller who asked for `path` with `headers`."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return "anthropic"
    return "openai"


def wire_for_head(head: bytes) -> Protocol:
    """`wire_for` from the raw bytes of a request head that could not be parsed."""
    line, _, rest = head.partition(b"\n")
    parts = line.split(b" ", 2)
    if len(parts) > 1 and parts[1].startswith(_MESSAGES):
        return "anthropic"
    return "anthropic" if b"\nanthropic-version:" in (b"\n" + rest.lower()) else "openai"


def error_headers(
    err: ProxydError, request_id: str, server_header: str | None = None
) -> list[tuple[str, str]]:
    """The headers of a server-made error: JSON, the request id, Retry-After when given.

    `server_header` only for raw writes: a WholeResponse adds the configured one itself.
    """
    headers = [("Content-Type", "application/json"), ("x-request-id", request_id)]
    headers.extend(err.headers.items())
    if err.retry_after is not None:
        headers.append(("Retry-After", str(max(1, int(-(-err.retry_after // 1))))))
    if server_header:
        headers.append(("Server", server_header))
    return headers


def error_body(protocol: Protocol, err: ProxydError) -> bytes:
    """`err` as a JSON body in `protocol`'s format."""
    if protocol == "anthropic":
        return anthropic_wire.error_body(err)
    return openai_wire.error_body(err)


def error_response(protocol: Protocol, err: ProxydError, *, close: bool) -> WholeResponse:
    """A whole JSON error response; `close` ends the connection after it."""
    response = WholeResponse(
        err.status, error_body(protocol, err), error_headers(err, new_request_id())
    )
    if close:
        response.force_close()
    return response


def error_bytes(protocol: Protocol, err: ProxydError, server_header: str | None) -> bytes:
    """A whole HTTP/1.1 error response with `Connection: close`, for a raw transport write."""
    body = error_body(protocol, err)
    lines = header_lines(error_headers(err, new_request_id(), server_header))
    return head_bytes(err.status, lines, len(body), http10=False, keep_alive=False) + body


def _allowed_methods(app: web.Application, skip: object) -> dict[str, frozenset[str]]:
    """Every plain path of the app's router and the methods it answers."""
    allowed: dict[str, set[str]] = {}
    for resource in app.router.resources():
        path = resource.get_info().get("path")
        if resource is skip or not isinstance(path, str):
            continue
        allowed.setdefault(path, set()).update(route.method for route in resource)
    return {path: frozenset(methods) for path, methods in allowed.items()}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_unmatched_route(app: web.Application) -> None:
    """Route every path and method nobody else answers to a JSON 404 or 405 (call it last).

    Registered as the app's last resource at start-up, after every route of the app factory, so
    it costs nothing on matched requests (the router tries it only when all others missed).
    """
    table: dict[str, frozenset[str]] = {}

    async def unmatched(request: web.Request) -> web.StreamResponse:
        if not table:
            table.update(_allowed_methods(request.app, resource))
        protocol = wire_for(request.path, request.headers)
        methods = table.get(request.path)
        if methods:
            allow = ", ".join(sorted(methods))
            err = ProxydError(
                f"The method {request.method} is not allowed on {request.path}; use {allow}.",
                status=405,
                error_type=ErrorType.METHOD_NOT_ALLOWED,
                headers={"Allow": allow},
            )
        else:
            err = ProxydError(
                f"Unknown request URL: {request.method} {request.path}.",
                status=404,
                error_type=ErrorType.NOT_FOUND,
            )
        return error_response(protocol, err, close=False)

    resource = app.router.add_resource("/{unmatched_path:.*}", name="proxyd-unmatched")
    resource.add_route("*", unmatched)


def server_header_hook(
    value: str | None,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook: aiohttp's own `Server` header replaced, or removed."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        if value is None:
            headers.popall("Server", None)
        else:
            headers["Server"] = value

    return hook
