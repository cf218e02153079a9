"""Several instances sharing the real Redis: revocations, pushes, limits and balances."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from proxyd.app import create_control
from tests.conftest import SECRET, StartProxy, StartServer, channel, key, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body
from tests.test_redis_store import REDIS, TcpProxy

pytestmark = pytest.mark.redis

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def _instances(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    aiohttp_client: Any,
    n: int = 2,
    **key_extra: Any,
) -> tuple[list[Any], list[Any], list[Any]]:
    fake = FakeProvider(Step(body=chat_body("ok")))
    server = await start_server(fake.app())
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    clients, parts_list, controls = [], [], []
    for i in range(n):
        home = tmp_path / f"i{i}"
        home.mkdir()
        config = make_config(
            home,
            [channel("c1", server_url(server))],
            keys=[key(**key_extra)],
            redis={"url": "redis://127.0.0.1:6379/0", "prefix": prefix},
            server={"admin_token": TOKEN},
        )
        client, parts = await start_proxy(config)
        await asyncio.wait_for(parts.broadcast.subscribed.wait(), 5)
        clients.append(client)
        parts_list.append(parts)
        controls.append(await aiohttp_client(create_control(parts)))
    return clients, parts_list, controls


async def test_revocation_reaches_every_instance(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """A key revoked through one instance gets 401 on the other's next request."""
    clients, _, controls = await _instances(tmp_path, start_server, start_proxy, aiohttp_client)
    a, b = clients
    assert (await b.post("/v1/chat/completions", headers=AUTH, json=CHAT)).status == 200
    resp = await controls[0].delete(
        "/control/v1/keys/k1", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert resp.status in (200, 204)
    assert (await a.post("/v1/chat/completions", headers=AUTH, json=CHAT)).status == 401
    for _ in range(50):
        status = (await b.post("/v1/chat/completions", headers=AUTH, json=CHAT)).status
        if status == 401:
            break
        await asyncio.sleep(0.02)
    assert status == 401


async def test_price_push_reaches_every_instance(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """A price table pushed to one instance is in force on the other."""
    _, parts, controls = await _instances(tmp_path, start_server, start_proxy, aiohttp_client)
    body = {"version": 7, "discount": "0.5", "prices": {"gpt-test": {"input": "9", "output": "9"}}}
    resp = await controls[0].put(
        "/control/v1/prices", headers={"Authorization": f"Bearer {TOKEN}"}, json=body
    )
    assert resp.status == 200
    for _ in range(50):
        if parts[1].store.current.prices_version == 7:
            break
        await asyncio.sleep(0.02)
    assert parts[1].store.current.prices_version == 7
    assert parts[1].store.current.prices["gpt-test"].discount == "0.5"


async def test_rate_limit_is_shared(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """rpm is one budget for all instances, not one per instance."""
    clients, _, _ = await _instances(tmp_path, start_server, start_proxy, aiohttp_client, rpm=4)
    statuses = []
    for i in range(8):
        resp = await clients[i % 2].post("/v1/chat/completions", headers=AUTH, json=CHAT)
        statuses.append(resp.status)
    assert statuses.count(200) == 4
    assert statuses.count(429) == 4


async def test_revocation_made_while_an_instance_was_cut_off_reaches_it(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """An instance that missed a revocation's broadcast (no Redis) picks it up on reconnection."""
    fake = FakeProvider(Step(body=chat_body("ok")))
    server = await start_server(fake.app())
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    proxy = TcpProxy()
    await proxy.start()
    instances = []
    for i, url in enumerate([REDIS, f"redis://127.0.0.1:{proxy.port}/0"]):
        home = tmp_path / f"i{i}"
        home.mkdir()
        config = make_config(
            home,
            [channel("c1", server_url(server))],
            keys=[key()],
            redis={"url": url, "prefix": prefix},
            server={"admin_token": TOKEN},
        )
        client, parts = await start_proxy(config)
        await asyncio.wait_for(parts.broadcast.subscribed.wait(), 5)
        instances.append((client, parts))
    (_, a_parts), (b, b_parts) = instances
    control = await aiohttp_client(create_control(a_parts))
    await proxy.stop()
    for _ in range(100):
        if not b_parts.broadcast.subscribed.is_set():
            break
        await asyncio.sleep(0.02)
    resp = await control.delete("/control/v1/keys/k1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status in (200, 204)
    await asyncio.sleep(0.2)
    assert (await b.post("/v1/chat/completions", headers=AUTH, json=CHAT)).status == 200  # stale
    await proxy.start()
    for _ in range(250):
        status = (await b.post("/v1/chat/completions", headers=AUTH, json=CHAT)).status
        if status == 401:
            break
        await asyncio.sleep(0.02)
    assert status == 401
    await proxy.stop()
