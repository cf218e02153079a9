"""The control API package: what it needs from the ledger and the limits, as protocols.

Holds only interfaces; the aiohttp application is in `api`, start-up loading in `bootstrap`.
Never imports the ledger, limits or health modules themselves: the wiring module passes them in.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxyd.state.store import KeyRecord


class BalanceViewLike(Protocol):
    """An account's ledger as the control API shows it."""

    @property
    def balance_nanos(self) -> int: ...

    @property
    def reserved_nanos(self) -> int: ...

    @property
    def version(self) -> int: ...


class LedgerLike(Protocol):
    """The account ledger calls the control API and the bootstrap make."""

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        """Replace the balance; raise `VersionConflict` below the version in force."""

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        """Set a start-up balance only over an older version or none; False when not applied."""

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add credit once per `credit_id`; False when it was applied before."""

    async def view(self, account_id: str) -> BalanceViewLike:
        """Balance, reserved amount and version (-1: never set)."""


class LimitsLike(Protocol):
    """The per-key limiter as the control API reads it."""

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """The live limit state of one key."""
