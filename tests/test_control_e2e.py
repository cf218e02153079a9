"""A control plane drives a real proxyd: start empty, push state, serve, revoke, reprice, swap.

The client app and the control app share one store, ledger and limiter, as `proxyd serve` wires
them; the providers are scripted fake servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from proxyd.config import Config
from proxyd.control.api import create_control_app
from proxyd.control.openapi import PREFIX
from tests.conftest import SECRET, StartProxy, StartServer, channel, key, server_url
from tests.fakes import FakeProvider, Step, chat_body, chat_events
from tests.test_control_api import AUTH, TOKEN

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CLIENT_AUTH = {"Authorization": f"Bearer {SECRET}"}


async def start_empty(
    tmp_path: Path, start_proxy: StartProxy, aiohttp_client: Any
) -> tuple[TestClient[Any, Any], TestClient[Any, Any]]:
    """proxyd with no state at all, and its control API."""
    config = Config.model_validate(
        {
            "billing": {
                "database_url": f"sqlite:///{tmp_path}/usage.sqlite3",
                "spool_dir": str(tmp_path / "spool"),
                "flush_interval_seconds": 0.05,
            }
        }
    )
    client, parts = await start_proxy(config)
    control_app = create_control_app(
        store=parts.store,
        ledger=parts.ledger,
        limits=parts.limits,
        channel_health=list,
        admin_token=TOKEN,
        allow_cidrs=["127.0.0.0/8"],
    )
    return client, await aiohttp_client(control_app)


async def push(control: TestClient[Any, Any], method: str, path: str, body: Any) -> Any:
    response = await control.request(method, PREFIX + path, json=body, headers=AUTH)
    assert response.status in (200, 201), await response.text()
    return await response.json()


async def test_start_empty_push_state_then_serve(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """Empty proxyd refuses; after channels, prices, keys and a balance it serves and bills."""
    fake = FakeProvider(Step(body=chat_body("hello", prompt=7, completion=2)))
    upstream = server_url(await start_server(fake.app()))
    client, control = await start_empty(tmp_path, start_proxy, aiohttp_client)

    refused = await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_AUTH)
    assert refused.status == 401

    await push(control, "PUT", "/channels", {"version": 1, "channels": [channel("c1", upstream)]})
    prices = {"gpt-test": {"input": "1", "output": "2"}}
    await push(control, "PUT", "/prices", {"version": 1, "discount": "1", "prices": prices})
    await push(control, "PUT", "/keys", {"version": 1, "keys": [key("k1")]})
    await push(control, "PUT", "/accounts/acct-1/balance", {"version": 1, "balance_nanos": 10**9})

    served = await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_AUTH)
    assert served.status == 200
    assert (await served.json())["choices"][0]["message"]["content"] == "hello"
    assert len(fake.seen) == 1
    view = await push(control, "GET", "/keys/k1", None)
    # 7 prompt tokens at 1/M and 2 completion tokens at 2/M: 11,000 nanos
    assert view["balance"]["balance_nanos"] == 10**9 - 11_000

    await push(control, "PUT", "/prices", {"version": 2, "discount": "1", "prices": {}})
    unpriced = await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_AUTH)
    assert unpriced.status == 404  # a model without a price is not served
    prices = {"gpt-test": {"input": "10", "output": "20"}}
    await push(control, "PUT", "/prices", {"version": 3, "discount": "0.5", "prices": prices})
    repriced = await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_AUTH)
    assert repriced.status == 200
    view = await push(control, "GET", "/keys/k1", None)
    assert view["balance"]["balance_nanos"] == 10**9 - 11_000 - 55_000

    await push(control, "DELETE", "/keys/k1", None)
    revoked = await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_AUTH)
    assert revoked.status == 401
    assert len(fake.seen) == 2


async def test_channel_swap_does_not_break_a_stream_in_flight(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """A stream that started on channel A finishes intact after A is pushed away; then B serves."""
    words = [f"w{i} " for i in range(8)]
    events = chat_events(words)
    old = FakeProvider(Step(events=events, stall_between=0.05))
    new = FakeProvider(Step(body=chat_body("from-b")))
    old_url = server_url(await start_server(old.app()))
    new_url = server_url(await start_server(new.app()))
    client, control = await start_empty(tmp_path, start_proxy, aiohttp_client)
    await push(control, "PUT", "/channels", {"version": 1, "channels": [channel("a", old_url)]})
    prices = {"gpt-test": {"input": "1", "output": "1"}}
    await push(control, "PUT", "/prices", {"version": 1, "prices": prices})
    await push(control, "PUT", "/keys", {"version": 1, "keys": [key("k1")]})
    await push(control, "PUT", "/accounts/acct-1/balance", {"version": 1, "balance_nanos": 10**9})

    stream = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        headers=CLIENT_AUTH,
    )
    assert stream.status == 200
    first = await stream.content.readany()
    assert first
    await push(control, "PUT", "/channels", {"version": 2, "channels": [channel("b", new_url)]})
    rest = await stream.read()
    assert first + rest == b"".join(events)

    after = await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_AUTH)
    assert (await after.json())["choices"][0]["message"]["content"] == "from-b"
    assert (len(old.seen), len(new.seen)) == (1, 1)
