"""Admission: order of checks, refusals return what they took, tickets, slots on every exit."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.admission.admit import Admission, AdmissionSettings, Ticket
from proxyd.admission.balances import BalanceView, LocalLedger, Reservation
from proxyd.admission.limits import LocalLimits
from proxyd.admission.resale import ResaleWatch
from proxyd.errors import ErrorType, ProxydError
from tests.conftest import (
    SECRET,
    StartProxy,
    StartServer,
    channel,
    key,
    make_config,
    server_url,
)
from tests.fakes import FakeProvider
from tests.test_limits import FakeClock, make_key


def build(
    balance: int = 10_000, *, ledger: LocalLedger | None = None, **resale: int
) -> tuple[Admission, LocalLimits, LocalLedger, FakeClock]:
    clock = FakeClock()
    limits = LocalLimits(clock)
    ledger = ledger or LocalLedger()
    ledger.mirror("a1", balance, 1)
    watch = ResaleWatch(
        window=600.0, max_ips=resale.get("max_ips", 3), max_user_agents=resale.get("max_uas", 3)
    )
    admission = Admission(
        limits=limits, ledger=ledger, resale=watch, settings=AdmissionSettings(), clock=clock
    )
    return admission, limits, ledger, clock


async def admit(admission: Admission, key: object, **extra: object) -> Ticket:
    args: dict[str, object] = {
        "model": "m1",
        "client_ip": "192.0.2.1",
        "user_agent": "sdk/1",
        "est_tokens": 100,
        "max_cost_nanos": 1000,
    }
    args.update(extra)
    return await admission.admit(key, **args)  # type: ignore[arg-type]


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(
    ("key_fields", "extra", "status", "error_type"),
    [
        ({"allowed_networks": nets("10.0.0.0/8")}, {}, 403, ErrorType.IP_NOT_ALLOWED),
        ({"rpm": 1}, {"repeat": 2}, 429, ErrorType.RATE_LIMITED),
        ({"tpm": 150}, {"repeat": 2}, 429, ErrorType.RATE_LIMITED),
        ({"max_concurrency": 1}, {"repeat": 2}, 429, ErrorType.CONCURRENCY_LIMITED),
        ({}, {"max_cost_nanos": 10_001}, 429, ErrorType.INSUFFICIENT_QUOTA),
        (
            {"allowed_networks": nets("10.0.0.0/8"), "tpm": 1},
            {},
            403,
            ErrorType.IP_NOT_ALLOWED,
        ),
        ({"rpm": 1, "max_concurrency": 1}, {"repeat": 2}, 429, ErrorType.RATE_LIMITED),
    ],
)
async def test_refusals_in_order(
    key_fields: dict[str, object], extra: dict[str, int], status: int, error_type: ErrorType
) -> None:
    """Each check refuses with its status and type, and earlier checks win over later ones."""
    admission, limits, ledger, _ = build()
    key = make_key(**key_fields)
    repeat = extra.pop("repeat", 1)
    for _ in range(repeat - 1):
        await admit(admission, key)
    with pytest.raises(ProxydError) as info:
        await admit(admission, key, **extra)
    assert (info.value.status, info.value.error_type) == (status, error_type)
    assert limits.in_flight("k1") == repeat - 1
    assert (await ledger.view("a1")).reserved_nanos == 1000 * (repeat - 1)


async def test_balance_refusal_returns_everything_taken() -> None:
    """A request refused for its balance gives back its request, tokens and slot."""
    admission, limits, _, _ = build(balance=500)
    key = make_key(rpm=3, tpm=1000, max_concurrency=1)
    for _ in range(5):
        with pytest.raises(ProxydError) as info:
            await admit(admission, key, est_tokens=400)
        assert info.value.error_type is ErrorType.INSUFFICIENT_QUOTA
    view = limits.view_now(key)
    assert (view["requests"]["remaining"], view["tokens"]["remaining"]) == (3, 1000)
    assert view["in_flight"] == 0


async def test_ticket_finish_settles_corrects_and_is_idempotent() -> None:
    """finish frees the slot, corrects tokens to the real count and charges the real cost, once."""
    admission, limits, ledger, _ = build()
    key = make_key(tpm=1000, max_concurrency=1)
    ticket = await admit(admission, key, est_tokens=400, max_cost_nanos=3000)
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "600"
    assert await ledger.view("a1") == BalanceView(10_000, 3000, 1)
    ticket.finish(tokens=150, cost_nanos=1200)
    ticket.finish(tokens=150, cost_nanos=1200)
    assert await ledger.view("a1") == BalanceView(8800, 0, 1)
    assert limits.view_now(key)["tokens"]["remaining"] == 850
    assert limits.in_flight("k1") == 0


async def test_credit_unblocks_an_account() -> None:
    """A key refused for quota is admitted after a credit lands."""
    admission, _, ledger, _ = build(balance=0)
    key = make_key()
    with pytest.raises(ProxydError):
        await admit(admission, key)
    assert await ledger.credit("a1", "top-up-1", 5000)
    (await admit(admission, key)).finish(tokens=1, cost_nanos=10)


async def test_resale_blocks_only_keys_that_ask_for_it() -> None:
    """Past the IP threshold a blocking key gets 403 resale_blocked; another is only signalled."""
    admission, _, _, _ = build(max_ips=2)
    blocking = make_key(id="b", block_on_resale=True)
    signalled = make_key(id="s")
    for ip in ("192.0.2.1", "192.0.2.2"):
        (await admit(admission, blocking, client_ip=ip)).finish(tokens=0, cost_nanos=0)
        (await admit(admission, signalled, client_ip=ip)).finish(tokens=0, cost_nanos=0)
    with pytest.raises(ProxydError) as info:
        await admit(admission, blocking, client_ip="192.0.2.3")
    assert (info.value.status, info.value.error_type) == (403, ErrorType.RESALE_BLOCKED)
    (await admit(admission, signalled, client_ip="192.0.2.3")).finish(tokens=0, cost_nanos=0)
    assert admission.resale.is_flagged("s")


async def test_ip_allowlist_admits_inside() -> None:
    """An address inside the key's networks (also v4-mapped) is admitted."""
    admission, _, _, _ = build()
    key = make_key(allowed_networks=nets("192.0.2.0/24"))
    await admit(admission, key, client_ip="::ffff:192.0.2.9")


def test_local_path_never_yields_to_the_loop() -> None:
    """With local limits and ledger, admit completes on its first step, admitted or refused."""
    admission, _, _, _ = build()
    coro = admit(admission, make_key())
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert isinstance(done.value.value, Ticket)
    refused = admit(admission, make_key(allowed_networks=nets("10.0.0.0/8")))
    with pytest.raises(ProxydError):
        refused.send(None)


class SlowLedger(LocalLedger):
    """A ledger whose reserve awaits the loop, as a shared one does, to create interleavings."""

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        await asyncio.sleep(0)
        return self.reserve_now(account_id, amount)


async def test_cancellation_during_admission_returns_the_slot() -> None:
    """A request cancelled while admission awaits the ledger leaves no slot or tokens behind."""
    admission, limits, ledger, _ = build(ledger=SlowLedger())
    key = make_key(rpm=10, tpm=1000, max_concurrency=1)
    task = asyncio.create_task(admit(admission, key))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limits.in_flight("k1") == 0
    assert limits.view_now(key)["tokens"]["remaining"] == 1000
    assert (await ledger.view("a1")).reserved_nanos == 0


plans = st.lists(
    st.tuples(
        st.sampled_from(["ok", "error", "cancel", "credit"]),
        st.integers(0, 3),  # loop turns the request stays in flight
        st.integers(0, 4000),  # real cost (may exceed the reservation)
        st.integers(0, 3000),  # max cost reserved
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(plan=plans, balance=st.integers(0, 20_000), seed=st.integers(0, 2**16))
async def test_slots_return_and_balance_stays_positive_on_every_exit_path(
    plan: list[tuple[str, int, int, int]], balance: int, seed: int
) -> None:
    """Concurrent requests that succeed, fail or are cancelled leave no slot, reserve or debt."""
    admission, limits, ledger, _ = build(balance=balance, ledger=SlowLedger())
    key = make_key(max_concurrency=3, rpm=1000, tpm=100_000)
    rng = random.Random(seed)
    lowest: list[int] = []

    async def request(kind: str, turns: int, cost: int, reserve: int) -> None:
        if kind == "credit":
            await ledger.credit("a1", f"c{rng.random()}", cost)
            return
        ticket = None
        try:
            ticket = await admit(admission, key, max_cost_nanos=reserve)
            assert limits.in_flight("k1") <= 3
            for _ in range(turns):
                await asyncio.sleep(0)
            if kind == "error":
                raise RuntimeError("upstream broke")
        finally:
            if ticket is not None:
                ticket.finish(tokens=50, cost_nanos=cost)
            lowest.append((await ledger.view("a1")).balance_nanos)

    tasks = [asyncio.create_task(request(*step)) for step in plan]
    for task, step in zip(tasks, plan, strict=True):
        if step[0] == "cancel":
            asyncio.get_running_loop().call_soon(task.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limits.in_flight("k1") == 0
    view = await ledger.view("a1")
    assert view.reserved_nanos == 0
    assert view.balance_nanos >= 0
    assert min(lowest, default=0) >= 0


async def test_rejection_is_cheap() -> None:
    """A rate-limited refusal costs a few CPU microseconds in admission (budget 60 for it all)."""
    admission, _, _, _ = build()
    key = make_key(rpm=1)
    await admit(admission, key)
    n = 20_000
    start = time.process_time()
    for _ in range(n):
        with contextlib.suppress(ProxydError):
            await admit(admission, key)
    per_refusal_us = (time.process_time() - start) / n * 1e6
    assert per_refusal_us < 30, per_refusal_us


# -- through real HTTP, with the app as `proxyd serve` builds it --------------------------------

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
AUTH = {"Authorization": f"Bearer {SECRET}"}


async def test_http_429_headers_and_recovery_after_the_advertised_wait(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Over its rpm a key gets 429 with exact Retry-After and x-ratelimit-*; the wait suffices."""
    server = await start_server(FakeProvider().app())
    config = make_config(
        tmp_path,
        [channel("c1", server_url(server))],
        keys=[key(rpm=600, burst={"requests": 1})],  # one request per 100 ms
    )
    client, _ = await start_proxy(config)
    ok = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert ok.status == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "600"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    assert 0 < int(refused.headers["retry-after-ms"]) <= 100
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("ms")
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    await asyncio.sleep(int(refused.headers["retry-after-ms"]) / 1000)
    again = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert again.status == 200


async def test_http_insufficient_quota_in_both_formats_and_credit_unblocks(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """An empty balance gets 429 insufficient_quota (OpenAI) / billing_error (Anthropic)."""
    server = await start_server(FakeProvider().app())
    config = make_config(tmp_path, [channel("c1", server_url(server))], balance=0)
    client, parts = await start_proxy(config)
    openai = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert openai.status == 429
    assert (await openai.json())["error"]["code"] == "insufficient_quota"
    anthropic = await client.post(
        "/v1/messages",
        json={**CHAT, "max_tokens": 5},
        headers={"x-api-key": SECRET, "anthropic-version": "2023-06-01"},
    )
    assert anthropic.status == 429
    body = await anthropic.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "billing_error"
    assert await parts.ledger.credit("acct-1", "top-up-1", 10**12)
    after = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert after.status == 200
    view = await parts.ledger.view("acct-1")
    assert view.reserved_nanos == 0
    assert 0 < view.balance_nanos < 10**12
