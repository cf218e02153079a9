"""Admit: decide whether an authenticated request may run, and hold what it reserved until it ends.

Order: model, client address, resale, requests, tokens, concurrency, spend windows, balance. A
refusal returns everything already taken before raising. Limits, spend windows and balance shared
with other processes are asked together (`Joint`: one round trip to Redis or the supervisor).
Raises only proxyd.errors; never reads a body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from proxyd.admission.balances import BalanceView, Reservation
from proxyd.admission.clientip import address_allowed
from proxyd.admission.counting import CountLimiter
from proxyd.admission.limits import LimitGrant
from proxyd.admission.resale import ResaleWatch
from proxyd.admission.spend import LocalSpend, SpendReservation, SpendWindows
from proxyd.errors import ErrorType, Forbidden
from proxyd.state.store import KeyRecord

log = structlog.get_logger("proxyd.admission.admit")


class Limits(Protocol):
    """Per-key rate and concurrency limits (limits.LocalLimits, redis_store.RedisLimits)."""

    async def acquire(self, key: KeyRecord, tokens: int) -> LimitGrant: ...
    def release(self, grant: LimitGrant, *, tokens: int | None) -> None: ...
    async def key_view(self, key: KeyRecord) -> dict[str, Any]: ...


class Ledger(Protocol):
    """Account balances (balances.LocalLedger, redis_store.RedisLedger)."""

    async def reserve(self, account_id: str, amount: int) -> Reservation: ...
    def settle(self, reservation: Reservation, cost_nanos: int) -> int: ...
    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None: ...
    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool: ...
    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool: ...
    async def view(self, account_id: str) -> BalanceView: ...


Admitted = tuple[LimitGrant, SpendReservation | None, Reservation]


class Joint(Protocol):
    """Limits, spend windows and balance taken together, all or nothing, in one round trip
    (redis_store.RedisAdmission, supervisor.shared.SupervisorAdmission)."""

    async def admit(self, key: KeyRecord, tokens: int, amount: int) -> Admitted | None:
        """What the request took, or the first refusal having taken nothing; None when the
        shared store cannot answer now (admission then goes part by part, locally)."""
        ...

    def finish(self, admitted: Admitted, *, tokens: int | None, cost_nanos: int) -> int:
        """Give back what `admit` took (see Ticket.finish); the shortfall known at once."""
        ...


@dataclass(frozen=True, slots=True)
class SharedParts:
    """Limits, ledger and spend windows another process keeps for this one, and their joint
    admission (a worker's supervisor)."""

    limits: Limits
    ledger: Ledger
    spend: SpendWindows
    joint: Joint


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """Admission settings that are not per key."""

    default_max_tokens: int = 4096  # the reservation cap for a request without max_tokens
    resale_window_seconds: float = 3600.0
    resale_max_ips: int = 20
    resale_max_user_agents: int = 10
    trusted_proxies: tuple[str, ...] = ()
    count_tokens_per_minute: int = 600  # token-count calls per key, a bucket apart from rpm


class Ticket:
    """An admitted request: its response headers, and `finish` to give back what it holds."""

    __slots__ = (
        "_done",
        "_grant",
        "_joint",
        "_ledger",
        "_limits",
        "_reservation",
        "_spend",
        "_spent",
        "headers",
    )

    def __init__(
        self,
        limits: Limits,
        ledger: Ledger,
        grant: LimitGrant,
        reservation: Reservation,
        spend: SpendWindows | None = None,
        spent: SpendReservation | None = None,
        joint: Joint | None = None,
    ) -> None:
        self.headers = grant.headers
        self._joint = joint
        self._limits = limits
        self._ledger = ledger
        self._grant = grant
        self._reservation = reservation
        self._spend = spend
        self._spent = spent
        self._done = False

    @property
    def finished(self) -> bool:
        """Whether `finish` ran."""
        return self._done

    def finish(self, *, tokens: int, cost_nanos: int) -> int:
        """Free the slot, correct the tokens to `tokens`, charge `cost_nanos`. Once; never raises.

        Returns the shortfall the ledger knows at once (cost it could not charge; a shared
        ledger counts its own when Redis answers). Shared (Redis) work runs in a background task
        whose errors are logged.
        """
        if self._done:
            return 0
        self._done = True
        if self._joint is not None:  # given back together, as it was taken
            try:
                admitted = (self._grant, self._spent, self._reservation)
                return self._joint.finish(admitted, tokens=tokens, cost_nanos=cost_nanos)
            except Exception:  # finish runs in the handler's finally and must not raise
                log.exception("admission_finish_failed", key_id=self._grant.key_id)
                return 0
        return finish_parts(
            self._limits,
            self._spend,
            self._ledger,
            (self._grant, self._spent, self._reservation),
            tokens=tokens,
            cost_nanos=cost_nanos,
        )


def finish_parts(
    limits: Limits,
    spend: SpendWindows | None,
    ledger: Ledger,
    admitted: Admitted,
    *,
    tokens: int | None,
    cost_nanos: int,
) -> int:
    """Give back a request's grant, spend and balance reservations, each apart: one failing
    does not keep the others (a billing row must still be written); never raises."""
    grant, spent, reservation = admitted
    try:
        limits.release(grant, tokens=tokens)
    except Exception:  # finish runs in the handler's finally and must not raise
        log.exception("limits_release_failed", key_id=grant.key_id)
    if spend is not None and spent is not None:
        try:
            spend.settle(spent, cost_nanos)
        except Exception:
            log.exception("spend_settle_failed", key_id=grant.key_id)
    try:
        return ledger.settle(reservation, cost_nanos)
    except Exception:  # same: the billing row must still be written
        log.exception("ledger_settle_failed", account_id=reservation.account_id)
        return 0


class Admission:
    """The admission step: allowlists, resale signal, limits and balance, in that order."""

    def __init__(
        self,
        *,
        limits: Limits,
        ledger: Ledger,
        resale: ResaleWatch | None = None,
        settings: AdmissionSettings,
        spend: SpendWindows | None = None,
        joint: Joint | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self.joint = joint
        self.ledger = ledger
        self.spend: SpendWindows = spend if spend is not None else LocalSpend()
        self.settings = settings
        self.resale = resale or ResaleWatch(
            window=settings.resale_window_seconds,
            max_ips=settings.resale_max_ips,
            max_user_agents=settings.resale_max_user_agents,
        )
        self._clock = clock
        self.counting = CountLimiter(settings.count_tokens_per_minute, clock=clock)
        self._wall = wall  # kept for callers that stamp decisions; admission itself needs none

    async def admit(
        self,
        key: KeyRecord,
        *,
        model: str,
        client_ip: str,
        user_agent: str,
        est_tokens: int,
        max_cost_nanos: int,
    ) -> Ticket:
        """Admit the request or raise a 403/429 ProxydError having returned all it took."""
        _allowed(key, client_ip)
        if (
            self.resale.observe(key.id, client_ip, user_agent, self._clock())
            and key.block_on_resale
        ):
            raise Forbidden(
                "This API key is in use by too many different clients and is blocked for now.",
                error_type=ErrorType.RESALE_BLOCKED,
            )
        if self.joint is not None:
            admitted = await self.joint.admit(key, est_tokens, max_cost_nanos)
            if admitted is not None:
                grant, spent, reservation = admitted
                return Ticket(
                    self.limits, self.ledger, grant, reservation, self.spend, spent, self.joint
                )
        grant = await self.limits.acquire(key, est_tokens)
        spent = None
        try:
            if key.spend_limits:
                spent = await self.spend.reserve(key, max_cost_nanos)
            reservation = await self.ledger.reserve(key.account_id, max_cost_nanos)
        except BaseException:
            self.limits.release(grant, tokens=None)
            if spent is not None:
                self.spend.settle(spent, 0)
            raise
        return Ticket(self.limits, self.ledger, grant, reservation, self.spend, spent)

    def admit_count(self, key: KeyRecord, *, model: str, client_ip: str) -> None:
        """Admit a token-count call: the key's model and address lists, then the count bucket.

        Nothing is reserved (a count is never billed) and rpm, tpm and concurrency are not used.
        """
        _allowed(key, client_ip)
        self.counting.take(key.id)


def _allowed(key: KeyRecord, client_ip: str) -> None:
    """403 unless the key may be used from `client_ip` (its model list is the route step's,
    `proxyd.routing.route.route_call`, which runs first)."""
    if key.allowed_networks and not address_allowed(client_ip, key.allowed_networks):
        raise Forbidden(
            "Requests with this API key are not allowed from this address.",
            error_type=ErrorType.IP_NOT_ALLOWED,
        )
