"""proxyd started with a control-plane snapshot URL: unready until the snapshot loads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from proxyd.config import Config
from tests.conftest import SECRET, StartProxy, StartServer, channel, key, server_url
from tests.fakes import FakeProvider, Step, chat_body


async def test_ready_only_after_the_snapshot_url_answers(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """/readyz says why it is not ready until the control plane serves a snapshot; then traffic."""
    fake = FakeProvider(Step(body=chat_body("ok")))
    upstream = await start_server(fake.app())
    snapshot: dict[str, Any] = {
        "keys": {"version": 1, "keys": [key()]},
        "prices": {"version": 1, "prices": {"gpt-test": {"input": "1", "output": "1"}}},
        "channels": {"version": 1, "channels": [channel("c1", server_url(upstream))]},
        "balances": {"acct-1": {"version": 1, "balance_nanos": 10**12}},
    }
    serving = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if not serving.is_set():
            return web.Response(status=503)
        assert request.headers["Authorization"] == "Bearer cp-token"
        return web.json_response(snapshot)

    plane = web.Application()
    plane.router.add_get("/snapshot", handle)
    cp = await start_server(plane)
    config = Config.model_validate(
        {
            "billing": {
                "database_url": f"sqlite:///{tmp_path}/u.sqlite3",
                "spool_dir": str(tmp_path / "spool"),
            },
            "control_plane": {
                "snapshot_url": server_url(cp) + "/snapshot",
                "snapshot_token": "cp-token",
            },
        }
    )
    client, _ = await start_proxy(config)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "state" in (await resp.json())["reason"]
    serving.set()
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status == 200
