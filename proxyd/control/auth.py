"""Who may call the control API: a source address inside the allowlist and the admin token.

Checked on every route, the OpenAPI document included, before anything reads the body.
Never logs or echoes the token; the token comparison takes constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": {"message": message, "field": None}}),
        content_type="application/json",
        headers=headers,
    )


def parse_allowlist(cidrs: list[str]) -> tuple[Network, ...]:
    """The allowlist as networks; a bad entry raises ValueError naming it."""
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"control allowlist entry {cidr!r} is not a CIDR network") from exc
    return tuple(networks)


def address_allowed(remote: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether a peer address lies in one of `networks` (IPv4-mapped IPv6 counts as IPv4)."""
    if remote is None:
        return False
    try:
        address: Address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def token_matches(header: str | None, expected: bytes) -> bool:
    """Whether an Authorization header carries `Bearer <expected>`, compared in constant time."""
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected)


def auth_middleware(
    admin_token: str, allow_cidrs: list[str]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware refusing with 403 outside the allowlist and 401 without the admin token."""
    if not admin_token:
        raise ValueError("the control API needs a non-empty admin token")
    expected = admin_token.encode()
    networks = parse_allowlist(allow_cidrs)

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not address_allowed(request.remote, networks):
            return _refuse(403, "Your address is not allowed to use the control API.")
        if not token_matches(request.headers.get("Authorization"), expected):
            return _refuse(
                401,
                "A valid admin token is required: Authorization: Bearer <token>.",
                {"WWW-Authenticate": 'Bearer realm="proxyd-control"'},
            )
        return await handler(request)

    return authorize
