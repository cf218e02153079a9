"""The account ledger: balances in integer nanos, reservations, settlement, versioned sets, credits.

Local implementation (the Redis one in redis_store shares the interface). Never lets a balance
go below zero, never uses a float, never awaits.

The rules, which the Redis scripts follow word for word:
- `available = balance - reserved`. A reservation of `amount` is granted only when
  `available > 0` and `amount <= available`, so in-flight requests can never claim more than
  the balance holds.
- Settling a reservation `r` with the real cost `c` first releases `r`, then charges
  `min(c, max(0, balance - reserved))`: a cost within its reservation is always charged in
  full; a cost above it (a wrong estimate) takes at most what no other request has reserved.
  The difference is the *shortfall*: it is returned, counted in `shortfall_nanos_total` and
  logged; the billing row still carries the true cost.
- `set_balance` replaces the balance (reservations stay); a lower version than the one in force
  raises `VersionConflict`. `credit` adds once per credit id.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from proxyd.errors import InsufficientQuota
from proxyd.state.store import VersionConflict

log = structlog.get_logger("proxyd.admission.balances")

QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."


@dataclass(frozen=True, slots=True)
class BalanceView:
    """An account's ledger as the control API shows it."""

    balance_nanos: int
    reserved_nanos: int
    version: int


class _Account:
    __slots__ = ("balance", "credits", "reserved", "version")

    def __init__(self) -> None:
        self.balance = 0
        self.reserved = 0
        self.version = -1
        self.credits: set[str] = set()


@dataclass(slots=True)
class Reservation:
    """What `reserve` set aside for one request; settled exactly once."""

    account_id: str
    amount: int
    account: _Account | None = None  # local reservations
    lease: str | None = None  # remote reservations
    remote: bool = False
    settled: bool = False
    slot: int = -1  # reservations in the workers' shared table: the account's slot in it


def insufficient_quota() -> InsufficientQuota:
    """The 429 `insufficient_quota` refusal."""
    return InsufficientQuota(QUOTA_MESSAGE)


def settle_charge(balance: int, reserved_after: int, cost: int) -> int:
    """The amount to charge once the reservation is released (see the module rules)."""
    free = balance - reserved_after
    if free <= 0 or cost <= 0:
        return 0
    return cost if cost < free else free


class LocalLedger:
    """Balances of the accounts this process knows, with their reservations."""

    shared = False

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self.shortfall_nanos_total = 0
        self.shortfalls_total = 0

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account()
        return account

    def reserve_now(self, account_id: str, amount: int) -> Reservation:
        """Set `amount` aside, or raise the 429 `insufficient_quota` and set nothing aside."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        account = self._accounts.get(account_id)
        if account is None:
            raise insufficient_quota()
        available = account.balance - account.reserved
        if available <= 0 or amount > available:
            raise insufficient_quota()
        account.reserved += amount
        return Reservation(account_id, amount, account)

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """`reserve_now`, for callers that treat local and shared ledgers alike."""
        return self.reserve_now(account_id, amount)

    def settle(self, reservation: Reservation, cost_nanos: int, *, record: bool = True) -> int:
        """Release the reservation and charge the real cost; returns the shortfall (0 if none).

        `record=False` leaves the shortfall uncounted (a shared ledger counts its own).
        """
        if reservation.settled:
            return 0
        reservation.settled = True
        account = reservation.account
        if account is None:
            return 0
        account.reserved -= reservation.amount
        charge = settle_charge(account.balance, account.reserved, cost_nanos)
        account.balance -= charge
        shortfall = cost_nanos - charge  # a comparison, not max(0, ...): this runs per request
        if shortfall < 0:
            shortfall = 0
        if shortfall and record:
            self.record_shortfall(reservation.account_id, shortfall)
        return shortfall

    def record_shortfall(self, account_id: str, shortfall: int) -> None:
        """Count a cost that could not be charged (the balance did not hold it)."""
        self.shortfall_nanos_total += shortfall
        self.shortfalls_total += 1
        log.warning("balance_shortfall", account_id=account_id, shortfall_nanos=shortfall)

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        """Replace the balance; raises VersionConflict when `version` is below the one in force."""
        if balance_nanos < 0:
            raise ValueError("a balance cannot be negative")
        account = self._account(account_id)
        if version < account.version:
            raise VersionConflict("balance", version, account.version)
        account.balance = balance_nanos
        account.version = version

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        """Set a start-up balance only over an older version or none; False if not applied."""
        account = self._accounts.get(account_id)
        if account is not None and version <= account.version:
            return False
        await self.set_balance(account_id, version, balance_nanos)
        return True

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add `amount_nanos` once per `credit_id`; False when that credit was applied before."""
        if amount_nanos < 0:
            raise ValueError("a credit cannot be negative")
        account = self._account(account_id)
        if credit_id in account.credits:
            return False
        account.credits.add(credit_id)
        account.balance += amount_nanos
        return True

    def view_now(self, account_id: str) -> BalanceView:
        """Balance, reserved amount and version (version -1: never set)."""
        account = self._accounts.get(account_id)
        if account is None:
            return BalanceView(0, 0, -1)
        return BalanceView(account.balance, account.reserved, account.version)

    async def view(self, account_id: str) -> BalanceView:
        """`view_now` for the control API."""
        return self.view_now(account_id)

    def mirror(self, account_id: str, available_nanos: int, version: int) -> None:
        """Adopt what the shared ledger last said (used as the fallback while it is away)."""
        account = self._account(account_id)
        account.balance = max(0, available_nanos) + account.reserved
        account.version = max(account.version, version)
