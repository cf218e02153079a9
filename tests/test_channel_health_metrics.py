"""Channel health is visible: a real proxyd exports `proxyd_channel_healthy` and the cooldown for
every channel, after failures and after recovery, and the shipped alerts fire on those series."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SECRET, StartProxy, StartServer, channel, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body
from tests.test_deploy import ALERTS, promtool

AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
BROKEN = Step(status=500, body=b'{"error": {"message": "down"}}')
HEALTH = ("proxyd_channel_healthy", "proxyd_channel_cooldown_remaining_seconds")

Scrape = dict[str, dict[str, float]]  # metric name -> channel -> value


async def scrape(client: Any) -> Scrape:
    """The channel health series of one real /metrics scrape."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    out: Scrape = {name: {} for name in HEALTH}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name][sample.labels["channel"]] = sample.value
    return out


async def start_two(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> tuple[Any, FakeProvider, FakeProvider]:
    """proxyd over a primary and a backup channel; one failure cools a channel for ~1 s."""
    primary, backup = FakeProvider(BROKEN), FakeProvider(BROKEN)
    a = await start_server(primary.app())
    b = await start_server(backup.app())
    config = make_config(
        tmp_path,
        [
            channel("primary", server_url(a), priority=10),
            channel("backup", server_url(b), priority=0),
        ],
        upstream={"failure_threshold": 1, "base_cooldown_seconds": 1.0},
    )
    client, _ = await start_proxy(config)
    return client, primary, backup


async def recover(client: Any, *fakes: FakeProvider) -> Scrape:
    """Heal the fakes, wait out the cooldowns, send trials until every channel is healthy."""
    for fake in fakes:
        fake.default = Step(body=chat_body("ok"))
    seen: Scrape = {}
    for _ in range(40):
        await asyncio.sleep(0.1)
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        await resp.read()
        seen = await scrape(client)
        if all(v == 1.0 for v in seen["proxyd_channel_healthy"].values()):
            return seen
    raise AssertionError(f"channels never recovered: {seen}")


async def test_health_series_after_failures_and_after_recovery(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Every channel has both series; a failing one reads 0 with a cooldown, then 1 with none."""
    client, primary, backup = await start_two(tmp_path, start_server, start_proxy)
    backup.default = Step(body=chat_body("from backup"))

    fresh = await scrape(client)
    assert fresh["proxyd_channel_healthy"] == {"primary": 1.0, "backup": 1.0}
    assert fresh["proxyd_channel_cooldown_remaining_seconds"] == {"primary": 0.0, "backup": 0.0}

    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200
    failed = await scrape(client)
    assert failed["proxyd_channel_healthy"] == {"primary": 0.0, "backup": 1.0}
    assert 0.5 < failed["proxyd_channel_cooldown_remaining_seconds"]["primary"] <= 1.0
    assert failed["proxyd_channel_cooldown_remaining_seconds"]["backup"] == 0.0

    healed = await recover(client, primary)
    assert healed["proxyd_channel_cooldown_remaining_seconds"] == {"primary": 0.0, "backup": 0.0}
    # The gauge reads healthy once the cooldown has run out, which may fall between a request
    # (still sent to the backup) and the scrape: the next request goes to the healed primary.
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200
    assert len(primary.seen) >= 2


def input_series(timeline: list[Scrape], instance: str) -> list[dict[str, str]]:
    """promtool input series holding each scraped value for ten minutes, in order."""
    channels = sorted(timeline[0]["proxyd_channel_healthy"])
    out = []
    for name in HEALTH:
        for cid in channels:
            values = " ".join(f"{scrape[name][cid]:g}x10" for scrape in timeline)
            labels = f'job="proxyd",instance="{instance}",channel="{cid}"'
            out.append({"series": f"{name}{{{labels}}}", "values": values})
    return out


def alert_test(timeline: list[Scrape], checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": input_series(timeline, "i1"),
        "alert_rule_test": checks,
    }


def fires(alert: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": x} for x in labels]}


@pytest.mark.slow
async def test_alerts_fire_on_real_scrapes_and_clear_after_recovery(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """promtool: the real series of one failing channel fire ProxydChannelDown, of all failing
    channels also ProxydNoHealthyChannel; the series scraped after recovery clear both."""
    client, primary, backup = await start_two(tmp_path, start_server, start_proxy)
    backup.default = Step(body=chat_body("from backup"))
    await (await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)).read()
    one_down = await scrape(client)
    await recover(client, primary)

    primary.default = backup.default = BROKEN
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 500  # both failed: the client gets an error, both channels cool down
    all_down = await scrape(client)
    assert all_down["proxyd_channel_healthy"] == {"primary": 0.0, "backup": 0.0}
    healed = await recover(client, primary, backup)

    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:  # promtool compares annotations exactly; test logic only
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    down = {"job": "proxyd", "severity": "warning"}
    none = {"job": "proxyd", "instance": "i1", "severity": "critical"}
    tests = [
        alert_test(
            [one_down, healed],
            [
                fires("ProxydChannelDown", "8m", down | {"channel": "primary"}),
                fires("ProxydNoHealthyChannel", "8m"),
                fires("ProxydChannelDown", "18m"),
            ],
        ),
        alert_test(
            [all_down, healed],
            [
                fires("ProxydChannelDown", "3m"),  # not before its `for: 5m`
                fires(
                    "ProxydChannelDown",
                    "8m",
                    down | {"channel": "backup"},
                    down | {"channel": "primary"},
                ),
                fires("ProxydNoHealthyChannel", "8m", none),
                fires("ProxydNoHealthyChannel", "18m"),
                fires("ProxydChannelDown", "18m"),
            ],
        ),
    ]
    unit = {
        "rule_files": [str(tmp_path / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": tests,
    }
    (tmp_path / "unit.yml").write_text(yaml.safe_dump(unit))
    result = promtool("test", "rules", str(tmp_path / "unit.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
