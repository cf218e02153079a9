"""State on start: from a snapshot dict, or from a snapshot URL with backoff and re-polling."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxyd.control.bootstrap import Bootstrap, SnapshotInvalid, apply_snapshot, parse_snapshot
from proxyd.state.store import StateStore
from tests.test_control_api import MemoryLedger, channel, key

SNAP_TOKEN = "snapshot-token-0123456789"


def snapshot(version: int, balance: int = 1000, balance_version: int = 1) -> dict[str, Any]:
    return {
        "keys": {"version": version, "keys": [key(f"k{version}")]},
        "prices": {"version": version, "prices": {"gpt-test": {"input": "1", "output": "2"}}},
        "channels": {"version": version, "channels": [channel("a")]},
        "balances": {"acct-1": {"version": balance_version, "balance_nanos": balance}},
    }


@dataclass
class ControlPlane:
    """A scripted snapshot endpoint: plays `script` first, then serves `current`."""

    current: dict[str, Any]
    script: list[Callable[[], web.StreamResponse]] = field(default_factory=list)
    hits: int = 0
    stall_once: float = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if request.headers.get("Authorization") != f"Bearer {SNAP_TOKEN}":
            return web.Response(status=401)
        if self.stall_once:
            stall, self.stall_once = self.stall_once, 0.0
            await asyncio.sleep(stall)  # longer than the client waits
        if self.script:
            return self.script.pop(0)()
        return web.Response(body=orjson.dumps(self.current), content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/proxyd/snapshot", self.handle)
        return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def eventually(check: Callable[[], bool]) -> None:
    """Wait up to 5 s for a condition another task makes true."""
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110  # the condition has no event to wait on
            await asyncio.sleep(0.01)


@pytest.fixture
async def stop() -> AsyncIterator[list[Bootstrap]]:
    """Bootstraps to close when the test ends."""
    made: list[Bootstrap] = []
    yield made
    for b in made:
        await b.close()


async def test_url_down_then_up_loads_after_backoff(
    aiohttp_server: Any, stop: list[Bootstrap]
) -> None:
    """Refused connections, a 503, a timeout and a bad snapshot are retried until one loads."""
    port = free_port()
    store, ledger = StateStore(environ={}), MemoryLedger()
    boot = Bootstrap(
        store,
        ledger,
        url=f"http://127.0.0.1:{port}/proxyd/snapshot",
        token=SNAP_TOKEN,
        backoff_initial=0.02,
        backoff_max=0.1,
        jitter=0.0,
        request_timeout=0.3,
    )
    stop.append(boot)
    await boot.start()
    await eventually(lambda: boot.attempts >= 3)  # nothing listens yet
    assert (boot.loaded, store.loaded) == (False, False)
    assert "ClientConnectorError" in (boot.last_error or "")

    plane = ControlPlane(current=snapshot(1), stall_once=1.0)
    bad = {"keys": {"version": 1, "keys": [key("a", hash="XYZ")]}}
    plane.script = [
        lambda: web.Response(status=503),
        lambda: web.Response(body=orjson.dumps(bad), content_type="application/json"),
    ]
    await aiohttp_server(plane.app(), port=port)
    async with asyncio.timeout(5):
        await boot.wait_loaded()
    assert plane.hits == 4
    assert boot.last_error == "keys.keys[0].hash: String should match pattern '^[0-9a-f]{64}$'"
    assert store.loaded
    assert store.current.keys_version == 1
    assert "k1" in store.current.keys_by_id
    assert store.current.served("gpt-test")
    assert ledger.balances == {"acct-1": 1000}


async def test_repoll_picks_up_newer_versions_only(
    aiohttp_server: Any, stop: list[Bootstrap]
) -> None:
    """Re-polling applies newer sections, keeps newer pushes, and never resets a balance."""
    plane = ControlPlane(current=snapshot(1))
    server = await aiohttp_server(plane.app())
    store, ledger = StateStore(environ={}), MemoryLedger()
    boot = Bootstrap(
        store,
        ledger,
        url=str(server.make_url("/proxyd/snapshot")),
        token=SNAP_TOKEN,
        poll_interval=0.03,
    )
    stop.append(boot)
    await boot.start()
    async with asyncio.timeout(5):
        await boot.wait_loaded()
    assert store.current.keys_version == 1

    ledger.balances["acct-1"] -= 300  # requests were charged since the balance was set
    swaps: list[int] = []
    store.subscribe(lambda old, new: swaps.append(new.prices_version))
    polls = boot.polls
    await eventually(lambda: boot.polls >= polls + 2)
    assert swaps == []  # nothing newer: the state is left alone
    assert ledger.balances["acct-1"] == 700  # same balance version: not reset to 1000

    store.replace_keys(parse_snapshot(snapshot(9)).keys)  # type: ignore[arg-type]  # a push
    plane.current = snapshot(2, balance=5000, balance_version=2)
    await eventually(lambda: store.current.prices_version == 2)
    assert store.current.channels_version == 2
    assert store.current.keys_version == 9  # the newer push stays
    assert "k9" in store.current.keys_by_id
    await eventually(lambda: ledger.balances["acct-1"] == 5000)

    plane.script = [lambda: web.Response(status=500)] * 3  # the plane goes away: state stays
    polls = boot.polls
    await eventually(lambda: boot.polls >= polls + 3)
    assert boot.last_error == "snapshot URL answered 500"
    assert store.loaded
    assert store.current.prices_version == 2


async def test_wrong_snapshot_token_is_retried(aiohttp_server: Any, stop: list[Bootstrap]) -> None:
    """A 401 from the control plane is not a snapshot: not loaded, still retrying."""
    plane = ControlPlane(current=snapshot(1))
    server = await aiohttp_server(plane.app())
    boot = Bootstrap(
        StateStore(environ={}),
        MemoryLedger(),
        url=str(server.make_url("/proxyd/snapshot")),
        token="wrong",
        backoff_initial=0.01,
        jitter=0.0,
    )
    stop.append(boot)
    await boot.start()
    await eventually(lambda: plane.hits >= 3)
    assert not boot.loaded
    assert boot.last_error == "snapshot URL answered 401"


async def test_snapshot_dict_loads_at_once() -> None:
    """Without a URL the file's snapshot is applied by start(), balances included."""
    store, ledger = StateStore(environ={}), MemoryLedger()
    boot = Bootstrap(store, ledger, snapshot=snapshot(4))
    await boot.start()
    assert boot.loaded
    assert store.loaded
    assert store.current.keys_version == 4
    assert ledger.versions == {"acct-1": 1}
    await boot.close()


async def test_empty_start_is_loaded() -> None:
    """No file state and no URL: proxyd starts empty, ready, waiting for pushes."""
    store = StateStore(environ={})
    boot = Bootstrap(store, MemoryLedger())
    await boot.start()
    assert boot.loaded
    assert store.loaded
    assert store.current.keys_version == -1


async def test_invalid_snapshot_names_the_field_and_changes_nothing() -> None:
    """A snapshot the schemas or the store refuse raises with the field; nothing is applied."""
    with pytest.raises(SnapshotInvalid) as caught:
        parse_snapshot({"prices": {"version": 1, "prices": {"m": {"input": "x", "output": "1"}}}})
    assert caught.value.field == "prices.prices.m.input"
    store, ledger = StateStore(environ={}), MemoryLedger()
    missing_env = snapshot(1)
    missing_env["channels"]["channels"] = [channel("a", api_key=None, api_key_env="UNSET_VAR")]
    with pytest.raises(SnapshotInvalid) as caught:
        await apply_snapshot(store, ledger, parse_snapshot(missing_env))
    assert caught.value.field == "channels[0].api_key_env"
    assert not store.loaded
    assert store.current.keys_version == -1


def test_backoff_doubles_up_to_the_cap() -> None:
    """Delays double from the initial one, stop at the cap, and jitter stays within its spread."""
    boot = Bootstrap(StateStore(), MemoryLedger(), backoff_initial=0.5, backoff_max=8, jitter=0)
    assert [boot._delay(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]
    jittery = Bootstrap(StateStore(), MemoryLedger(), backoff_initial=1, backoff_max=8, jitter=0.25)
    delays = [jittery._delay(3) for _ in range(200)]
    assert all(3 <= d <= 5 for d in delays)
    assert len(set(delays)) > 1
    assert jittery._delay(10_000) <= 10
