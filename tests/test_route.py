"""Routing order: priority first, weights within a priority, health and caps, credential turns."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path
from types import MappingProxyType

import orjson
import pytest

from proxyd.billing.pricing import compile_price
from proxyd.errors import ErrorType, ProxydError
from proxyd.protocol.call import Call, parse_call
from proxyd.protocol.endpoints import ALL, COUNTING
from proxyd.routing.health import Availability, ChannelHealth
from proxyd.routing.route import Router, route_call
from proxyd.state.store import Channel, State
from tests.conftest import SECRET, StartProxy, StartServer, channel, key, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body, make_channel
from tests.test_limits import make_key

PRICE = compile_price({"input": "1", "output": "2"}, "0")


def _state(chans: tuple[Channel, ...], *, priced: bool = True, model: str = "m") -> State:
    return State(
        channels=chans,
        routes=MappingProxyType({model: chans}) if chans else MappingProxyType({}),
        prices=MappingProxyType({model: PRICE} if priced else {}),
    )


def _call(path: str, model: str = "m") -> Call:
    endpoint = next(e for e in ALL + COUNTING if e.path == path)
    body: dict[str, object] = {"model": model, "messages": [], "input": "x", "max_tokens": 5}
    return parse_call(endpoint, orjson.dumps(body))


OA, AN = make_channel("oa"), make_channel("an", type="anthropic")


@pytest.mark.parametrize(
    ("case", "chans", "key_models", "path", "offline", "outcome"),
    [
        ("unknown model", (), None, "/v1/chat/completions", False, (404, "model_not_found")),
        (
            "model the key may not use",
            (OA,),
            {"x"},
            "/v1/chat/completions",
            False,
            (403, "model_not_allowed"),
        ),
        ("no channel of the protocol", (AN,), None, "/v1/responses", False, (503, "no_channel")),
        ("translatable endpoint", (AN, OA), None, "/v1/chat/completions", False, ("an", "oa")),
        ("anthropic endpoint, translatable", (OA,), None, "/v1/messages", False, ("oa",)),
        ("native only", (AN, OA), None, "/v1/responses", False, ("oa",)),
        ("counting, no native channel", (OA,), None, "/v1/messages/count_tokens", True, ()),
        ("counting, native channel", (AN, OA), None, "/v1/messages/count_tokens", True, ("an",)),
    ],
)
def test_the_route_step(
    case: str,
    chans: tuple[Channel, ...],
    key_models: set[str] | None,
    path: str,
    offline: bool,
    outcome: tuple[object, ...],
) -> None:
    """model → price → the key's permission → the permitted channels, or 404, 403, 503."""
    key = make_key(models=frozenset(key_models) if key_models is not None else None)
    state = _state(chans)
    if outcome and isinstance(outcome[0], int):
        with pytest.raises(ProxydError) as caught:
            route_call(state, key, _call(path), offline=offline)
        assert (caught.value.status, caught.value.error_type.value) == outcome
    else:
        route = route_call(state, key, _call(path), offline=offline)
        assert tuple(c.id for c in route.channels) == outcome
        assert route.price is PRICE


def test_a_model_without_a_price_is_not_found() -> None:
    """A served model with no price is never routed (nothing is billed at a guessed rate)."""
    with pytest.raises(ProxydError) as caught:
        route_call(_state((OA,), priced=False), make_key(), _call("/v1/chat/completions"))
    assert caught.value.status == 404


def test_not_found_comes_before_not_allowed() -> None:
    with pytest.raises(ProxydError) as caught:
        route_call(_state(()), make_key(models=frozenset({"x"})), _call("/v1/chat/completions"))
    assert caught.value.status == 404


def test_a_native_route_is_the_same_tuple_each_time() -> None:
    """The router caches its grouping per route tuple: the filtered route must not be rebuilt
    per request."""
    state = _state((AN, OA))
    first = route_call(state, make_key(), _call("/v1/responses")).channels
    assert route_call(state, make_key(), _call("/v1/responses")).channels is first


# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails the
# seeded test with probability 1e-3 per seed; the seeds below are fixed, so the tests are stable.
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27, 5: 20.52}


class AllReady:
    def availability(self, channel: Channel, now: float) -> Availability:
        return Availability.READY


class Fixed:
    def __init__(self, marks: dict[str, Availability]) -> None:
        self.marks = marks

    def availability(self, channel: Channel, now: float) -> Availability:
        return self.marks.get(channel.id, Availability.READY)


def chi_square(observed: Counter[object], expected: dict[object, float]) -> float:
    n = sum(observed.values())
    return sum((observed[k] - n * p) ** 2 / (n * p) for k, p in expected.items())


def permutation_probabilities(weights: dict[str, int]) -> dict[object, float]:
    """Probability of each order under weighted sampling without replacement."""
    out: dict[object, float] = {}
    for order in itertools.permutations(weights):
        p, left = 1.0, float(sum(weights.values()))
        for cid in order:
            p *= weights[cid] / left
            left -= weights[cid]
        out[order] = p
    return out


def test_priority_is_strict() -> None:
    """Every plan lists all priority-10 channels before any priority-5 one, whatever the weights."""
    chans = (
        make_channel("low-heavy", priority=5, weight=1000),
        make_channel("hi-a", priority=10),
        make_channel("hi-b", priority=10, weight=3),
        make_channel("low", priority=5),
        make_channel("lowest", priority=-1, weight=50),
    )
    router = Router(random.Random(7))
    for _ in range(2000):
        plan = router.plan(chans, 0.0, AllReady())
        assert {c.id for c in plan[:2]} == {"hi-a", "hi-b"}
        assert {c.id for c in plan[2:4]} == {"low-heavy", "low"}
        assert plan[4].id == "lowest"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_whole_order_follows_weights(seed: int) -> None:
    """Orders of three channels (weights 1, 2, 5) match weighted sampling: chi-square, 5 df."""
    weights = {"a": 1, "b": 2, "c": 5}
    chans = tuple(make_channel(cid, weight=w) for cid, w in weights.items())
    router = Router(random.Random(seed))
    seen: Counter[object] = Counter()
    for _ in range(12_000):
        seen[tuple(c.id for c in router.plan(chans, 0.0, AllReady()))] += 1
    expected = permutation_probabilities(weights)
    assert chi_square(seen, expected) < CHI2_CRIT_001[5]
    # The same counts are far from a plain uniform shuffle: the test can tell the two apart.
    uniform = dict.fromkeys(expected, 1 / 6)
    assert chi_square(seen, uniform) > 100 * CHI2_CRIT_001[5]


def test_first_pick_share_is_within_binomial_bounds() -> None:
    """Weights 1 and 99 within one priority: the light channel leads 1% of plans (+-4 sigma)."""
    chans = (make_channel("light", weight=1), make_channel("heavy", weight=99))
    router = Router(random.Random(11))
    n = 50_000
    light_first = sum(router.plan(chans, 0.0, AllReady())[0].id == "light" for _ in range(n))
    p = 0.01
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(light_first - n * p) < 4 * sigma


def test_large_weights_keep_their_ratio() -> None:
    """Weights 1,000,000 vs 500,000 keep a 2:1 first-pick ratio (no precision loss)."""
    chans = (make_channel("x", weight=1_000_000), make_channel("y", weight=500_000))
    router = Router(random.Random(5))
    seen: Counter[object] = Counter(
        router.plan(chans, 0.0, AllReady())[0].id for _ in range(20_000)
    )
    assert chi_square(seen, {"x": 2 / 3, "y": 1 / 3}) < CHI2_CRIT_001[1]


def test_blocked_channels_are_left_out_and_capped_ones_go_last() -> None:
    """Cooling channels are skipped; a capped primary follows the ready backup instead."""
    chans = (
        make_channel("primary", priority=10),
        make_channel("cooling", priority=10),
        make_channel("backup", priority=1),
    )
    marks = {"primary": Availability.CAPPED, "cooling": Availability.BLOCKED}
    plan = Router(random.Random(0)).plan(chans, 0.0, Fixed(marks))
    assert [c.id for c in plan] == ["backup", "primary"]


def test_cooldown_trial_reaches_the_router() -> None:
    """With real health: no plan holds a tripped channel until its trial is due, then one does."""
    health = ChannelHealth(lambda: 100.0, base_cooldown=2.0, failure_threshold=1, jitter=0.0)
    sick, other = make_channel("sick", priority=5), make_channel("other")
    chans = (sick, other)
    router = Router(random.Random(0))
    permit = health.acquire(sick, 100.0)
    assert permit is not None
    permit.failure(ErrorType.UPSTREAM_CONNECT)
    permit.release()
    assert [c.id for c in router.plan(chans, 101.9, health)] == ["other"]
    assert [c.id for c in router.plan(chans, 102.0, health)] == ["sick", "other"]
    trial = health.acquire(sick, 102.0)
    assert trial is not None
    assert [c.id for c in router.plan(chans, 102.0, health)] == ["other"]
    trial.release()


def test_a_native_route_keeps_the_weights() -> None:
    """An endpoint that cannot be translated is routed to its protocol's channels only; among
    them the weights still hold."""
    chans = (
        make_channel("oa1", weight=1),
        make_channel("an", type="anthropic", weight=50),
        make_channel("oa3", weight=3),
    )
    state = _state(chans)
    native = route_call(state, make_key(), _call("/v1/responses")).channels
    router = Router(random.Random(9))
    seen: Counter[object] = Counter()
    for _ in range(8000):
        plan = router.plan(native, 0.0, AllReady())
        assert {c.id for c in plan} == {"oa1", "oa3"}
        seen[plan[0].id] += 1
    assert chi_square(seen, {"oa1": 0.25, "oa3": 0.75}) < CHI2_CRIT_001[1]


def test_lists_and_tuples_plan_alike() -> None:
    """A list input (not cached) and a tuple input (cached) give the same orders for one seed."""
    chans = tuple(make_channel(f"c{i}", priority=i % 2, weight=i + 1) for i in range(5))
    a, b = Router(random.Random(3)), Router(random.Random(3))
    for _ in range(50):
        assert a.plan(chans, 0.0, AllReady()) == b.plan(list(chans), 0.0, AllReady())


def test_cached_grouping_follows_a_new_route_tuple() -> None:
    """A swapped-in route tuple with other priorities is planned by its own, not the cached one."""
    router = Router(random.Random(0))
    old = (make_channel("a", priority=1), make_channel("b", priority=0))
    assert [c.id for c in router.plan(old, 0.0, AllReady())] == ["a", "b"]
    new = (make_channel("a", priority=0), make_channel("b", priority=1))
    assert [c.id for c in router.plan(new, 0.0, AllReady())] == ["b", "a"]
    router.on_state(State(channels=old), State(channels=new))
    assert [c.id for c in router.plan(new, 0.0, AllReady())] == ["b", "a"]


def test_empty_candidates_give_an_empty_plan() -> None:
    """No channel for the model: an empty list, which failover turns into 503 no_channel."""
    assert Router().plan((), 0.0, AllReady()) == []


def test_credentials_rotate_per_channel_and_survive_swaps() -> None:
    """Three keys go round-robin; another channel has its own turn; a re-pushed one continues."""
    router = Router()
    three = make_channel("x", api_keys=("k1", "k2", "k3"))
    two = make_channel("y", api_keys=("y1", "y2"))
    assert [router.next_credential(three) for _ in range(4)] == ["k1", "k2", "k3", "k1"]
    assert router.next_credential(two) == "y1"
    repushed = make_channel("x", api_keys=("k1", "k2", "k3"), weight=9)
    router.on_state(State(channels=(three, two)), State(channels=(repushed, two)))
    assert [router.next_credential(repushed) for _ in range(2)] == ["k2", "k3"]
    assert router.next_credential(make_channel("solo", api_keys=("only",))) == "only"


def test_removed_channel_rotation_starts_over() -> None:
    """A channel dropped by a push and pushed again later starts from its first credential."""
    router = Router()
    ch = make_channel("x", api_keys=("k1", "k2"))
    assert router.next_credential(ch) == "k1"
    router.on_state(State(channels=(ch,)), State(channels=()))
    assert router.next_credential(ch) == "k1"


async def test_route_refusals_come_before_admission(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """End to end: a model the key may not use is a 403 model_not_allowed in the caller's
    format, before the key's rate limit is touched (the third call still gets 403, not 429) and
    without an upstream call; an unknown model is a 404 first."""
    fake = FakeProvider(Step(body=chat_body("hi")))
    server = await start_server(fake.app())
    config = make_config(
        tmp_path,
        [channel("c1", server_url(server), models=["gpt-test", "other"])],
        keys=[key(models=["gpt-test"], rpm=1)],
    )
    client, _ = await start_proxy(config)
    auth = {"Authorization": f"Bearer {SECRET}"}
    for _ in range(3):
        resp = await client.post(
            "/v1/chat/completions", headers=auth, json={"model": "other", "messages": []}
        )
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (403, "model_not_allowed")
    resp = await client.post(
        "/v1/chat/completions", headers=auth, json={"model": "nope", "messages": []}
    )
    assert resp.status == 404
    assert fake.seen == []
    resp = await client.post(
        "/v1/chat/completions", headers=auth, json={"model": "gpt-test", "messages": []}
    )
    assert resp.status == 200  # the rate limit was not spent by the refusals
