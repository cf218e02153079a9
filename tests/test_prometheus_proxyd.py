"""A real Prometheus scrapes a running proxyd while 1,000 distinct keys send it requests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartProxy, StartServer, channel, key, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body
from tests.test_prometheus_scrape import (
    ScrapeTarget,
    all_series,
    prometheus,
    query,
    scalar,
    scraped_total,
)

pytestmark = pytest.mark.slow
__all__ = ["prometheus"]  # the fixture, used by name below

KEYS = 2000


@pytest.fixture
async def scrape_target(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> ScrapeTarget:
    """proxyd itself, with KEYS keys, in front of a fake provider; `send` is real HTTP."""
    fake = FakeProvider(Step(body=chat_body("ok", prompt=11, completion=3)))
    server = await start_server(fake.app())
    secrets = [f"sk-tenant-{i:05d}-0123456789" for i in range(KEYS)]
    config = make_config(
        tmp_path,
        [channel("primary", server_url(server))],
        keys=[key(f"tenant-key-{i}", secret) for i, secret in enumerate(secrets)],
    )
    client, _ = await start_proxy(config)
    index = {f"tenant-key-{i}": s for i, s in enumerate(secrets)}

    async def send(key_ids: Sequence[str]) -> None:
        for key_id in key_ids:
            resp = await client.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {index[key_id]}"},
                json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert resp.status == 200
            await resp.read()

    assert client.server.port is not None
    return ScrapeTarget(f"127.0.0.1:{client.server.port}", send)


async def test_real_proxyd_series_and_flat_cardinality(
    scrape_target: ScrapeTarget, prometheus: str
) -> None:
    """Prometheus sees proxyd's real counters; 1,000 more keys add no series and no key label."""
    await scrape_target.send([f"tenant-key-{i}" for i in range(1000)])
    async with aiohttp.ClientSession() as session:
        await scraped_total(session, prometheus, 1000)
        tokens = await query(session, prometheus, "sum by (kind) (proxyd_tokens_total)")
        by_kind = {r["metric"]["kind"]: float(r["value"][1]) for r in tokens}
        assert by_kind["prompt"] == 11_000
        assert by_kind["completion"] == 3_000
        ok = 'sum(proxyd_requests_total{status_class="2xx", error_type="none"})'
        assert await scalar(session, prometheus, ok) == 1000
        assert await scalar(session, prometheus, "proxyd_state_keys") == KEYS
        assert await scalar(session, prometheus, "proxyd_ready") == 1
        before = len(await all_series(session, prometheus))

        await scrape_target.send([f"tenant-key-{i}" for i in range(1000, 2000)])
        await scraped_total(session, prometheus, 2000)
        series = await all_series(session, prometheus)
    assert len(series) == before
    assert not any("tenant-key-" in v for s in series for v in s.values())
