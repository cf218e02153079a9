"""The local ledger: reservations, settlement, shortfalls, versioned sets, once-only credits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.admission.balances import BalanceView, LocalLedger, Reservation, settle_charge
from proxyd.errors import ErrorType, InsufficientQuota
from proxyd.state.store import VersionConflict


async def test_reserve_settle_returns_the_rest() -> None:
    """Reserving 300 of 1000 and costing 120 leaves 880 with nothing reserved."""
    ledger = LocalLedger()
    await ledger.set_balance("a", 1, 1000)
    res = await ledger.reserve("a", 300)
    assert await ledger.view("a") == BalanceView(1000, 300, 1)
    assert ledger.settle(res, 120) == 0
    assert await ledger.view("a") == BalanceView(880, 0, 1)
    assert ledger.settle(res, 120) == 0  # settling twice changes nothing
    assert await ledger.view("a") == BalanceView(880, 0, 1)


async def test_reservations_cannot_overdraw() -> None:
    """Concurrent reservations stop at the balance: the one that would exceed it is refused."""
    ledger = LocalLedger()
    await ledger.set_balance("a", 1, 1000)
    await ledger.reserve("a", 600)
    with pytest.raises(InsufficientQuota) as info:
        await ledger.reserve("a", 401)
    assert info.value.status == 429
    assert info.value.error_type is ErrorType.INSUFFICIENT_QUOTA
    await ledger.reserve("a", 400)


async def test_empty_or_unknown_account_is_refused() -> None:
    """An account never funded, or at zero, is refused even for a zero-cost reservation."""
    ledger = LocalLedger()
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("nobody", 0)
    await ledger.set_balance("a", 1, 0)
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("a", 0)


async def test_cost_above_reservation_charges_only_what_is_free() -> None:
    """A wrong estimate cannot eat another request's reservation; the rest is a shortfall."""
    ledger = LocalLedger()
    await ledger.set_balance("a", 1, 1000)
    first = await ledger.reserve("a", 100)
    other = await ledger.reserve("a", 700)
    assert ledger.settle(first, 450) == 150  # 100 reserved + 200 free = 300 charged
    assert await ledger.view("a") == BalanceView(700, 700, 1)
    assert ledger.settle(other, 700) == 0
    assert await ledger.view("a") == BalanceView(0, 0, 1)
    assert ledger.shortfall_nanos_total == 150
    assert ledger.shortfalls_total == 1


async def test_balance_lowered_below_reservations_never_goes_negative() -> None:
    """A set below what is reserved refuses new work and settles charge at most the balance."""
    ledger = LocalLedger()
    await ledger.set_balance("a", 1, 1000)
    a = await ledger.reserve("a", 500)
    b = await ledger.reserve("a", 500)
    await ledger.set_balance("a", 2, 300)
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("a", 1)
    assert ledger.settle(a, 400) == 400  # b's reservation still claims the whole 300
    assert ledger.settle(b, 400) == 100
    assert await ledger.view("a") == BalanceView(0, 0, 2)


async def test_set_balance_version_rules() -> None:
    """A lower version raises VersionConflict and changes nothing; the same version re-applies."""
    ledger = LocalLedger()
    await ledger.set_balance("a", 5, 100)
    with pytest.raises(VersionConflict) as info:
        await ledger.set_balance("a", 4, 999)
    assert (info.value.pushed, info.value.current) == (4, 5)
    await ledger.set_balance("a", 5, 200)
    assert await ledger.view("a") == BalanceView(200, 0, 5)
    with pytest.raises(ValueError, match="negative"):
        await ledger.set_balance("a", 6, -1)


async def test_credit_applies_once_per_id() -> None:
    """A repeated credit id is reported and not added twice."""
    ledger = LocalLedger()
    assert await ledger.credit("a", "c-1", 500)
    assert not await ledger.credit("a", "c-1", 500)
    assert await ledger.credit("a", "c-2", 1)
    assert (await ledger.view("a")).balance_nanos == 501
    await ledger.reserve("a", 501)


@pytest.mark.parametrize(
    ("balance", "reserved_after", "cost", "charge"),
    [(100, 0, 30, 30), (100, 80, 30, 20), (100, 100, 30, 0), (100, 150, 30, 0), (0, 0, 0, 0)],
)
def test_settle_charge_rule(balance: int, reserved_after: int, cost: int, charge: int) -> None:
    """The charge is the cost, capped by what no other reservation claims, never below zero."""
    assert settle_charge(balance, reserved_after, cost) == charge


ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 2_000)),
        st.tuples(st.just("settle"), st.integers(0, 3_000)),
        st.tuples(st.just("credit"), st.integers(0, 1_500)),
        st.tuples(st.just("set"), st.integers(0, 3_000)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 5_000), plan=ops, picks=st.randoms(use_true_random=False))
async def test_balance_never_negative_under_any_interleaving(
    start: int, plan: list[tuple[str, int]], picks: object
) -> None:
    """Random reserve/settle/credit/set sequences keep balance >= 0 and reserved = outstanding."""
    import random

    assert isinstance(picks, random.Random)
    ledger = LocalLedger()
    await ledger.set_balance("a", 0, start)
    open_: list[Reservation] = []
    version = 0
    credited = 0
    for op, n in plan:
        if op == "reserve":
            try:
                open_.append(await ledger.reserve("a", n))
            except InsufficientQuota:
                view = await ledger.view("a")
                assert view.balance_nanos - view.reserved_nanos <= 0 or n > (
                    view.balance_nanos - view.reserved_nanos
                )
        elif op == "settle" and open_:
            res = open_.pop(picks.randrange(len(open_)))
            before = await ledger.view("a")
            shortfall = ledger.settle(res, n)
            after = await ledger.view("a")
            assert before.balance_nanos - after.balance_nanos == n - shortfall
            if n <= res.amount and before.balance_nanos >= before.reserved_nanos:
                assert shortfall == 0
        elif op == "credit":
            credited += 1
            await ledger.credit("a", f"c{credited}", n)
        elif op == "set":
            version += 1
            await ledger.set_balance("a", version, n)
        view = await ledger.view("a")
        assert view.balance_nanos >= 0
        assert view.reserved_nanos == sum(r.amount for r in open_)


async def test_seed_balance_never_undoes_charges() -> None:
    """A start-up seed applies over nothing or an older version, never over the same one."""
    ledger = LocalLedger()
    assert await ledger.seed_balance("a", 1, 1000)
    ledger.settle(await ledger.reserve("a", 100), 100)
    assert not await ledger.seed_balance("a", 1, 1000)
    assert (await ledger.view("a")).balance_nanos == 900
    assert await ledger.seed_balance("a", 2, 5)
    assert await ledger.view("a") == BalanceView(5, 0, 2)
