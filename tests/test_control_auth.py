"""Who may call the control API: the admin token (401) and the source address allowlist (403)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxyd.control.api import create_control_app
from proxyd.control.auth import address_allowed, parse_allowlist, token_matches
from proxyd.control.openapi import OPERATIONS, PREFIX
from proxyd.state.store import StateStore
from tests.test_control_api import TOKEN, MemoryLedger, MemoryLimits, key

EVERY_ROUTE = [(op.method, PREFIX + op.path.replace("{id}", "k1")) for op in OPERATIONS]
UNAUTHORIZED = "A valid admin token is required: Authorization: Bearer <token>."
PUSH = {"version": 1, "keys": [key("k1")]}


async def control(
    aiohttp_client: Any, allow_cidrs: list[str]
) -> tuple[TestClient[Any, Any], StateStore]:
    store = StateStore(environ={})
    app = create_control_app(
        store=store,
        ledger=MemoryLedger(),
        limits=MemoryLimits(),
        channel_health=list,
        admin_token=TOKEN,
        allow_cidrs=allow_cidrs,
    )
    return await aiohttp_client(app), store


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN}x",
    ],
)
async def test_missing_or_wrong_token_is_401(
    aiohttp_client: Any, authorization: str | None
) -> None:
    """Without exactly `Bearer <admin token>` every call is 401 and no push is applied."""
    client, store = await control(aiohttp_client, ["127.0.0.0/8"])
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in EVERY_ROUTE:
        response = await client.request(method, path, json=PUSH, headers=headers)
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        # one fixed message: nothing of what was sent is echoed
        assert body["error"]["message"] == UNAUTHORIZED
    assert store.current.keys_version == -1


async def test_right_token_passes(aiohttp_client: Any) -> None:
    """The right token from inside the allowlist reaches the handler (scheme case-insensitive)."""
    client, store = await control(aiohttp_client, ["127.0.0.1/32"])
    for scheme in ("Bearer", "bearer"):
        response = await client.put(
            PREFIX + "/keys", json=PUSH, headers={"Authorization": f"{scheme} {TOKEN}"}
        )
        assert response.status == 200
    assert store.current.keys_version == 1


@pytest.mark.parametrize("allow", [["10.0.0.0/8"], ["::1/128"], []])
async def test_outside_the_allowlist_is_403_even_with_the_token(
    aiohttp_client: Any, allow: list[str]
) -> None:
    """From an address outside the allowlist every route is 403, the document included."""
    client, store = await control(aiohttp_client, allow)
    for method, path in EVERY_ROUTE:
        response = await client.request(
            method, path, json=PUSH, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status == 403, (method, path)
        assert "not allowed" in (await response.json())["error"]["message"]
    response = await client.get(PREFIX + "/no-such-route")
    assert response.status == 403
    assert store.current.keys_version == -1


def test_address_matching() -> None:
    """IPv4-mapped IPv6 peers match IPv4 networks; unparsable or absent peers never match."""
    networks = parse_allowlist(["127.0.0.0/8", "fd00::/8"])
    assert address_allowed("127.0.0.1", networks)
    assert address_allowed("::ffff:127.0.0.2", networks)
    assert address_allowed("fd00::1%eth0", networks)
    assert not address_allowed("128.0.0.1", networks)
    assert not address_allowed("::1", networks)
    assert not address_allowed("localhost", networks)
    assert not address_allowed(None, networks)
    assert parse_allowlist(["10.1.2.3/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError, match="not-a-net"):
        parse_allowlist(["not-a-net"])


def test_token_matching() -> None:
    """Only the Bearer scheme with the exact token matches."""
    assert token_matches("Bearer abc", b"abc")
    assert token_matches("BEARER abc", b"abc")
    assert not token_matches("Bearer abcd", b"abc")
    assert not token_matches("Bearer ", b"abc")
    assert not token_matches("Token abc", b"abc")
    assert not token_matches(None, b"abc")
    assert not token_matches("Bearer ünïcode", b"abc")


def test_empty_admin_token_is_refused() -> None:
    """The app cannot be built without a token: an empty one would let anybody in."""
    with pytest.raises(ValueError, match="admin token"):
        create_control_app(
            store=StateStore(),
            ledger=MemoryLedger(),
            limits=MemoryLimits(),
            channel_health=list,
            admin_token="",
            allow_cidrs=["127.0.0.0/8"],
        )
