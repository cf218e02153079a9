"""Sticky sessions: the session id a client states, the bounded table, the router's hook, e2e."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxyd.redis_store.sessions import RedisSessions
from proxyd.redis_store.store import RedisStore
from proxyd.routing.health import Availability
from proxyd.routing.route import Router
from proxyd.routing.sticky import StickyTable, session_id
from tests.conftest import SECRET, StartProxy, StartServer, channel, make_config
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, anthropic_body, make_channel
from tests.test_route import AllReady, Fixed

ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
UUID = "6f1c9a8e-2b1d-4c55-9e7a-1234567890ab"


def test_session_id_sources_in_order() -> None:
    """Claude Code header, then metadata.user_id (both forms), Codex headers, prompt_cache_key."""
    body: dict[str, Any] = {
        "metadata": {"user_id": orjson.dumps({"session_id": "s-json"}).decode()}
    }
    assert session_id({"x-claude-code-session-id": "s-h"}, body) == "h:s-h"
    assert session_id({}, body) == "u:s-json"
    old = {"metadata": {"user_id": f"user_{'ab' * 32}_account_{UUID}_session_{UUID}"}}
    assert session_id({}, old) == "u:" + UUID
    assert session_id({"session-id": "cx"}, {"prompt_cache_key": "pk"}) == "h:cx"
    assert session_id({"session_id": "cx2"}, {}) == "h:cx2"
    assert session_id({"thread-id": "t1"}, {}) == "h:t1"
    assert session_id({}, {"prompt_cache_key": "pk"}) == "p:pk"
    assert (
        session_id({}, {"metadata": {"user_id": "plain-user"}, "prompt_cache_key": "pk"}) == "p:pk"
    )
    long = session_id({"x-claude-code-session-id": "x" * 5000}, {})
    assert len(long) < 100


def test_opening_hash_follows_the_conversation_not_its_later_turns() -> None:
    """Without ids, two turns of one conversation share an id; another first message differs."""
    first = {"system": "You are terse.", "messages": [{"role": "user", "content": "hello"}]}
    later = {
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
        ],
    }
    other = {"system": "You are terse.", "messages": [{"role": "user", "content": "bye"}]}
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    assert session_id({}, first) == session_id({}, later)
    assert session_id({}, first) != session_id({}, other)
    assert session_id({}, chat).startswith("d:")
    assert session_id({}, chat) != session_id({}, {"messages": [{"role": "user", "content": "U"}]})


def test_table_counts_hits_misses_moves_and_scopes_by_key() -> None:
    """First turn a miss, same place a hit, elsewhere a move; another key's same id is apart."""
    table = StickyTable(ttl=60.0, max_sessions=10)
    s = table.open("k1", "h:s", 0.0)
    assert s.channel_id is None
    s.settle("a", 1)
    s = table.open("k1", "h:s", 1.0)
    assert (s.channel_id, s.credential("a"), s.credential("b")) == ("a", 1, None)
    s.settle("a", 1)
    table.open("k1", "h:s", 2.0).settle("b", 0)
    assert table.open("k2", "h:s", 3.0).channel_id is None
    assert (table.hits, table.misses, table.moves) == (1, 1, 1)
    assert dict(table.counts()) == {("hit",): 1, ("miss",): 1, ("move",): 1}


def test_ttl_slides_and_expires() -> None:
    """Each served turn renews the TTL; a session idle longer than it starts over."""
    table = StickyTable(ttl=10.0)
    table.open("k", "s", 0.0).settle("a", 0)
    table.open("k", "s", 8.0).settle("a", 0)  # renewed until 18
    assert table.open("k", "s", 17.0).channel_id == "a"
    assert table.open("k", "s", 18.5).channel_id is None
    assert len(table) == 0


def test_table_is_bounded_lru() -> None:
    """Past max_sessions the least recently used session is dropped first."""
    table = StickyTable(ttl=100.0, max_sessions=3)
    for i in range(3):
        table.open("k", f"s{i}", 0.0).settle("a", 0)
    assert table.open("k", "s0", 1.0).channel_id == "a"  # s0 is now the most recent
    table.open("k", "s3", 2.0).settle("a", 0)
    assert len(table) == 3
    assert table.open("k", "s1", 3.0).channel_id is None
    assert table.open("k", "s0", 3.0).channel_id == "a"


def test_untracked_session_follows_but_never_moves() -> None:
    """A count call follows the pin; where it is served does not move the conversation."""
    table = StickyTable()
    table.open("k", "s", 0.0).settle("a", 0)
    table.open("k", "s", 1.0, track=False).settle("b", 0)
    assert table.open("k", "s", 2.0).channel_id == "a"


async def test_a_placement_is_published_before_the_answer_and_the_stores_pin_is_followed() -> None:
    """With a shared store, a first placement and a move return what the request awaits before
    its answer (a hit returns nothing); when the store already held another pin for the new
    session (another worker placed it first), the next turns follow the store's."""
    asked: list[tuple[str, str, int, bool]] = []
    held: dict[str, tuple[str, int]] = {"k1\x00s2": ("b", 1)}

    async def place(key: str, ch: str, cred: int, first: bool) -> tuple[str, int] | None:
        asked.append((key, ch, cred, first))
        if first and key in held:
            return held[key]
        held[key] = (ch, cred)
        return held[key]

    table = StickyTable(ttl=10.0, publish=place)
    placing = table.open("k1", "s1", 0.0).settle("a", 0)
    assert placing is not None
    assert asked == []  # nothing is asked until the request awaits it
    await placing
    assert asked == [("k1\x00s1", "a", 0, True)]
    assert table.open("k1", "s1", 1.0).settle("a", 0) is None  # a hit: no round trip
    moved = table.open("k1", "s1", 2.0).settle("b", 2)
    assert moved is not None
    await moved
    assert asked[-1] == ("k1\x00s1", "b", 2, False)
    raced = table.open("k1", "s2", 3.0).settle("a", 0)  # this turn went to a/0 ...
    assert raced is not None
    await raced
    later = table.open("k1", "s2", 4.0)  # ... the next follow the store's pin
    assert (later.channel_id, later.pinned) == ("b", 1)


async def test_a_store_that_cannot_be_asked_leaves_the_local_pin() -> None:
    """Redis away or the supervisor gone (None): the request goes on, the local pin stands."""

    async def away(key: str, ch: str, cred: int, first: bool) -> tuple[str, int] | None:
        return None

    table = StickyTable(ttl=10.0, publish=away)
    placing = table.open("k", "s", 0.0).settle("a", 1)
    assert placing is not None
    await placing
    later = table.open("k", "s", 1.0)
    assert (later.channel_id, later.pinned) == ("a", 1)


@pytest.mark.redis
async def test_redis_keeps_the_first_placement_and_takes_a_move() -> None:
    """Against the real Redis: two instances place one new session at once, the first stays
    and both are told it; a move replaces it; with Redis away, None."""
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore("redis://127.0.0.1:6379/0", prefix=prefix) for _ in range(2)]
    for store in stores:
        await store.start()
    try:
        one, two = (RedisSessions(store, 60.0) for store in stores)
        assert await one.place("k\x00s", "c0", 0, True) == ("c0", 0)
        assert await two.place("k\x00s", "c1", 2, True) == ("c0", 0)
        assert await two.get("k\x00s") == ("c0", 0)
        assert await two.place("k\x00s", "c1", 2, False) == ("c1", 2)
        assert await one.get("k\x00s") == ("c1", 2)
    finally:
        for store in stores:
            await store.close()
    down = RedisStore("redis://127.0.0.1:1/0", prefix=prefix)
    await down.start()
    try:
        assert await RedisSessions(down, 60.0).place("k\x00t", "c0", 0, True) is None
    finally:
        await down.close()


def test_router_puts_the_sticky_channel_first_only_while_ready() -> None:
    """`first` leads the plan when READY; cooling down it is left out and the plan stands."""
    chans = tuple(make_channel(c) for c in "abc")
    router = Router(random.Random(1))
    for _ in range(50):
        assert router.plan(chans, 0.0, AllReady(), first="c")[0].id == "c"
    cooling = Fixed({"c": Availability.BLOCKED})
    assert "c" not in [ch.id for ch in router.plan(chans, 0.0, cooling, first="c")]
    capped = Fixed({"c": Availability.CAPPED})
    assert router.plan(chans, 0.0, capped, first="c")[-1].id == "c"


def test_sticky_backup_gives_way_to_a_recovered_primary() -> None:
    """A session that fell to a lower-priority backup returns once the primary is READY again."""
    chans = (make_channel("primary", priority=1), make_channel("backup"))
    router = Router()
    assert router.plan(chans, 0.0, AllReady(), first="backup")[0].id == "primary"
    down = Fixed({"primary": Availability.BLOCKED})
    assert router.plan(chans, 0.0, down, first="backup")[0].id == "backup"


def test_pinned_credential_is_used_as_is() -> None:
    """A pinned credential index overrides the round-robin on that channel."""
    ch = make_channel("a", api_keys=("k0", "k1", "k2"))
    router = Router()
    assert [router.next_credential(ch, 2) for _ in range(5)] == ["k2"] * 5
    assert {router.next_credential(ch) for _ in range(3)} == {"k0", "k1", "k2"}


async def _pool(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, **cfg: Any
) -> tuple[Any, list[FakeProvider], Any]:
    fakes = [FakeProvider(Step(body=anthropic_body("ok"))) for _ in range(3)]
    chans = []
    for i, fake in enumerate(fakes):
        server = await start_server(fake.app())
        ch = channel(f"c{i}", url_of(server), type="anthropic", models=["claude-x"])
        del ch["api_key"]
        ch["api_keys"] = [f"cred-{i}-{j}" for j in range(3)]
        chans.append(ch)
    client, parts = await start_proxy(make_config(tmp_path, chans, **cfg))
    return client, fakes, parts


def _where(fakes: list[FakeProvider]) -> list[tuple[int, str]]:
    out = []
    for i, fake in enumerate(fakes):
        out += [(i, seen.headers["x-api-key"]) for seen in fake.seen]
    return out


async def test_turns_of_a_session_stay_on_one_channel_and_credential(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Ten turns with one Claude Code session id land on one channel and one credential."""
    client, fakes, parts = await _pool(start_server, start_proxy, tmp_path)
    for turn in range(10):
        body = {
            "model": "claude-x",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"t{turn}"}],
        }
        headers = {**ANT, "x-claude-code-session-id": "sess-1"}
        assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200
    places = Counter(_where(fakes))
    assert len(places) == 1
    assert parts.sticky.hits == 9
    assert parts.sticky.misses == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'proxyd_sticky_sessions_total{result="hit"} 9.0' in metrics


async def test_a_route_without_a_choice_opens_no_session(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """One channel with one credential leaves nothing to keep a session on: no session is
    opened (nothing counted, nothing remembered); the same channel with two credentials pins."""
    fake = FakeProvider(Step(body=anthropic_body("ok")))
    server = await start_server(fake.app())
    single = channel("solo", url_of(server), type="anthropic", models=["claude-x"])
    double = channel("duo", url_of(server), type="anthropic", models=["claude-y"])
    del double["api_key"]
    double["api_keys"] = ["cred-a", "cred-b"]
    client, parts = await start_proxy(make_config(tmp_path, [single, double]))
    headers = {**ANT, "x-claude-code-session-id": "sess-1"}
    for model, counted in (("claude-x", (0, 0, 0)), ("claude-y", (2, 1, 1))):
        for _ in range(3):
            body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "t"}]}
            assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200
        assert (parts.sticky.hits, parts.sticky.misses, len(parts.sticky)) == counted
    assert len({seen.headers["x-api-key"] for seen in fake.seen[3:]}) == 1


async def test_without_stickiness_turns_spread(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """With sticky.enabled = false the same ten turns spread over channels and credentials."""
    client, fakes, parts = await _pool(
        start_server, start_proxy, tmp_path, sticky={"enabled": False}
    )
    for turn in range(10):
        body = {
            "model": "claude-x",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"t{turn}"}],
        }
        headers = {**ANT, "x-claude-code-session-id": "sess-1"}
        assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200
    assert len(Counter(_where(fakes))) > 1
    assert parts.sticky is None


async def test_session_moves_when_its_channel_fails_and_stays_moved(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The pinned channel failing before the first byte: failover serves, the session moves."""
    client, fakes, parts = await _pool(start_server, start_proxy, tmp_path)
    body = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "a"}]}
    headers = {**ANT, "x-claude-code-session-id": "sess-2"}
    assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200
    ((first, _),) = _where(fakes)
    fakes[first].then(
        Step(status=529, body=b'{"type":"error","error":{"type":"overloaded_error"}}')
    )
    assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200
    for fake in fakes:
        fake.seen.clear()
    for _ in range(4):
        assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200
    places = Counter(_where(fakes))
    assert len(places) == 1
    ((moved_to, _),) = places
    assert moved_to != first
    assert parts.sticky.moves == 1


@pytest.mark.redis
async def test_pins_are_shared_between_instances_through_redis(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """A session placed by one instance continues on the same channel and credential on another,
    which reads the pin in its admission's round trip (ADMIT and GET in one pipeline)."""
    fakes = [FakeProvider(Step(body=anthropic_body("ok"))) for _ in range(3)]
    chans = []
    for i, fake in enumerate(fakes):
        server = await start_server(fake.app())
        ch = channel(f"c{i}", url_of(server), type="anthropic", models=["claude-x"])
        del ch["api_key"]
        ch["api_keys"] = [f"cred-{i}-{j}" for j in range(3)]
        chans.append(ch)
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    instances = []
    for n in range(2):
        home = tmp_path / f"i{n}"
        home.mkdir()
        redis = {"url": "redis://127.0.0.1:6379/0", "prefix": prefix}
        instances.append(await start_proxy(make_config(home, chans, redis=redis)))
    body = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    client = instances[1][1].redis.client
    lone_gets: list[object] = []  # GETs on a round trip of their own (not in admission's)
    plain_get = client.get

    async def counted_get(name: Any) -> Any:
        lone_gets.append(name)
        return await plain_get(name)

    client.get = counted_get
    for s in range(6):
        headers = {**ANT, "x-claude-code-session-id": f"shared-{s}"}
        first, second = instances[0][0], instances[1][0]
        # no wait: the pin is in Redis before the first instance's answer is
        assert (await first.post("/v1/messages", json=body, headers=headers)).status == 200
        placed = _where(fakes)
        for fake in fakes:
            fake.seen.clear()
        for _ in range(3):
            assert (await second.post("/v1/messages", json=body, headers=headers)).status == 200
        assert set(_where(fakes)) == set(placed)
        for fake in fakes:
            fake.seen.clear()
    assert instances[1][1].sticky.hits == 6 * 3
    assert lone_gets == []  # each first turn read the pin with its admission: one round trip
