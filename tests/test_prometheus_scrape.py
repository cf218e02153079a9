"""A real Prometheus server scrapes proxyd's /metrics: the series arrive through its query API,
their count stays flat while 1,000 distinct keys send requests, and the alert rules evaluate."""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxyd.billing.record import UsageRecord
from proxyd.observability.metrics import Metrics

pytestmark = pytest.mark.slow

ALERTS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"
KEY_PREFIX = "tenant-key-"
MODELS = ("gpt-4o", "claude-sonnet")
AiohttpServer = Callable[..., Awaitable[Any]]


@dataclass
class ScrapeTarget:
    """What Prometheus scrapes (`address` serves GET /metrics) and how to send it traffic."""

    address: str
    send: Callable[[Sequence[str]], Awaitable[None]]  # one finished request per key id


def traffic_record(i: int, key_id: str) -> UsageRecord:
    """Request number i: a fixed mix of models, streaming and failures, any key."""
    failed = i % 10 == 0
    return UsageRecord(
        request_id=f"req-{key_id}-{i}",
        created_at=1_700_000_000.0 + i,
        key_id=key_id,
        account_id=f"acct-{key_id}",
        model=MODELS[i % 2],
        endpoint="/v1/chat/completions" if i % 3 else "/v1/messages",
        channel_id="primary",
        stream=bool(i % 4),
        status_code=502 if failed else 200,
        error_type="upstream_error" if failed else None,
        prompt_tokens=100,
        completion_tokens=0 if failed else 50,
        cached_tokens=10,
        reasoning_tokens=5,
        cost_nanos=1000,
        latency_ms=200 + i % 1000,
        ttft_ms=50,
        client_ip=f"10.{i % 200}.{i % 7}.1",
    )


@pytest.fixture
async def scrape_target(aiohttp_server: AiohttpServer) -> ScrapeTarget:
    """A small app serving Metrics.render(); swap in the real proxyd app and HTTP traffic here."""
    metrics = Metrics()
    sent = 0

    async def handle(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def send(key_ids: Sequence[str]) -> None:
        nonlocal sent
        for key_id in key_ids:
            metrics.request_started()
            metrics.observe_request(traffic_record(sent, key_id))
            metrics.request_finished()
            sent += 1

    app = web.Application()
    app.router.add_get("/metrics", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return ScrapeTarget(f"127.0.0.1:{server.port}", send)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def prometheus(tmp_path: Path, scrape_target: ScrapeTarget) -> AsyncIterator[str]:
    """Debian's `prometheus` scraping the target every second, with proxyd's alert rules."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus not found: install Debian's package `prometheus`")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "proxyd", "static_configs": [{"targets": [scrape_target.address]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                if proc.returncode is not None:
                    pytest.fail(f"prometheus exited: {log.read_text()[-2000:]}")
                try:
                    async with session.get(f"{base}/-/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"prometheus not ready after 15 s: {log.read_text()[-2000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    """GET one Prometheus HTTP API call and return its `data`."""
    async with session.get(url, params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return body["data"]


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    data = await api(session, f"{base}/api/v1/query", query=promql)
    return list(data["result"])


async def scalar(session: aiohttp.ClientSession, base: str, promql: str) -> float | None:
    """The single value of an instant query, or None when the vector is empty."""
    result = await query(session, base, promql)
    return float(result[0]["value"][1]) if result else None


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll Prometheus through `check` every 0.25 s until it holds; fail after 20 seconds."""
    for _ in range(80):
        if await check():
            return
        await asyncio.sleep(0.25)
    pytest.fail("condition not met within 20 s")


async def scraped_total(session: aiohttp.ClientSession, base: str, n: int) -> None:
    """Wait until Prometheus has scraped a total of `n` requests from the target."""

    async def done() -> bool:
        return await scalar(session, base, 'sum(proxyd_requests_total{job="proxyd"})') == n

    await until(done)


async def all_series(session: aiohttp.ClientSession, base: str) -> list[dict[str, str]]:
    """Every proxyd series Prometheus has stored for the job, over its whole history."""
    match = '{job="proxyd", __name__=~"proxyd_.+"}'
    return list(await api(session, f"{base}/api/v1/series", **{"match[]": match}))


async def test_prometheus_scrapes_the_expected_series_and_cardinality_stays_flat(
    scrape_target: ScrapeTarget, prometheus: str
) -> None:
    """After traffic from 1,000 keys the query API returns the series; 1,000 more keys add none."""
    base = prometheus
    await scrape_target.send([f"{KEY_PREFIX}{i}" for i in range(1000)])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{scrape_target.address}/metrics") as resp:
            text = await resp.text()
        assert any(f.name == "proxyd_requests" for f in text_string_to_metric_families(text))
        await scraped_total(session, base, 1000)
        assert await scalar(session, base, 'up{job="proxyd"}') == 1

        kinds = await query(session, base, "sum by (kind) (proxyd_tokens_total)")
        by_kind = {r["metric"]["kind"]: float(r["value"][1]) for r in kinds}
        assert by_kind == {
            "prompt": 100_000,
            "completion": 45_000,
            "cached": 10_000,
            "reasoning": 5_000,
        }
        cost = await query(session, base, "proxyd_cost_nanos_total")
        assert {r["metric"]["model"]: float(r["value"][1]) for r in cost} == {
            "gpt-4o": 500_000,
            "claude-sonnet": 500_000,
        }
        failed = 'sum(proxyd_requests_total{status_class="5xx", error_type="upstream_error"})'
        assert await scalar(session, base, failed) == 100
        p50 = await scalar(
            session,
            base,
            "histogram_quantile(0.5, sum by (le) (proxyd_request_duration_seconds_bucket))",
        )
        assert p50 is not None
        assert math.isfinite(p50)
        assert 0.25 < p50 <= 1.0
        assert await scalar(session, base, "sum(proxyd_requests_in_flight)") == 0

        series_before = await all_series(session, base)
        count_before = await scalar(session, base, 'count({__name__=~"proxyd_.+"})')

        await scrape_target.send([f"{KEY_PREFIX}{i}" for i in range(1000, 2000)])
        await scraped_total(session, base, 2000)
        series_after = await all_series(session, base)
        count_after = await scalar(session, base, 'count({__name__=~"proxyd_.+"})')

    assert len(series_after) == len(series_before)
    assert count_after == count_before
    leaked = [s for s in series_after if any(KEY_PREFIX in v for v in s.values())]
    assert leaked == []
    assert not any(
        name in s for s in series_after for name in ("key_id", "account_id", "request_id")
    )


async def test_alert_rules_evaluate_cleanly_against_real_scrapes(
    scrape_target: ScrapeTarget, prometheus: str
) -> None:
    """Prometheus loads deploy/prometheus/alerts.yml and evaluates every rule without error."""
    await scrape_target.send([f"{KEY_PREFIX}{i}" for i in range(50)])
    async with aiohttp.ClientSession() as session:
        await scraped_total(session, prometheus, 50)
        rules: list[dict[str, Any]] = []

        async def evaluated() -> bool:
            data = await api(session, f"{prometheus}/api/v1/rules")
            rules[:] = [rule for group in data["groups"] for rule in group["rules"]]
            return bool(rules) and all(
                r.get("lastEvaluation", "0001").startswith("2") for r in rules
            )

        await until(evaluated)
    assert {r["name"] for r in rules} >= {"ProxydDown", "ProxydHighErrorRatio"}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert "ProxydDown" not in firing
