"""State on start: a snapshot from the config file, or from the control plane's URL.

Retries the URL with exponential backoff until a snapshot loads, then optionally re-polls it as a
safety net for missed pushes. Never applies a section older than the one in force, and never
resets a balance to a version it already holds (that would undo the charges made since).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from pydantic import ValidationError

from proxyd.control import LedgerLike
from proxyd.control.api import refusal_from
from proxyd.state.schemas import Snapshot
from proxyd.state.store import State, StateError, StateStore, VersionConflict

log = structlog.get_logger("proxyd.bootstrap")


class SnapshotUnavailable(Exception):
    """The snapshot URL did not answer with a snapshot (network error, timeout, non-200)."""


class SnapshotInvalid(Exception):
    """A snapshot that the schemas or the store refused; `field` names where."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field or '(body)'}: {message}")
        self.field = field


def parse_snapshot(data: bytes | Mapping[str, Any] | Snapshot) -> Snapshot:
    """A snapshot validated by the same schemas as the control API."""
    if isinstance(data, Snapshot):
        return data
    try:
        if isinstance(data, bytes):  # JSON from the control plane: as strict as the API
            return Snapshot.model_validate_json(data, strict=True)
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        refusal = refusal_from(exc)
        raise SnapshotInvalid(refusal.param, refusal.message) from None


def newer_sections(snapshot: Snapshot, state: State) -> Snapshot:
    """The snapshot without the sections the state already holds at that version or later."""
    keys, prices, channels = snapshot.keys, snapshot.prices, snapshot.channels
    return snapshot.model_copy(
        update={
            "keys": keys if keys is not None and keys.version > state.keys_version else None,
            "prices": prices
            if prices is not None and prices.version > state.prices_version
            else None,
            "channels": channels
            if channels is not None and channels.version > state.channels_version
            else None,
        }
    )


async def apply_snapshot(store: StateStore, ledger: LedgerLike, snapshot: Snapshot) -> int:
    """Apply balances, then the newer sections at once; returns how many parts changed."""
    changed = 0
    for account_id, push in snapshot.balances.items():
        # only over an older version: the same version again would undo the charges made since
        changed += await ledger.seed_balance(account_id, push.version, push.balance_nanos)
    fresh = newer_sections(snapshot, store.current)
    sections = sum(part is not None for part in (fresh.keys, fresh.prices, fresh.channels))
    if sections == 0 and store.loaded:
        return changed  # nothing newer: leave the state (and its listeners) alone
    try:
        store.load(fresh)
    except StateError as exc:
        raise SnapshotInvalid(exc.field_path, str(exc)) from None
    except VersionConflict as exc:  # pragma: no cover - newer_sections leaves none behind
        raise SnapshotInvalid(exc.kind, str(exc)) from None
    return changed + sections


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}{parts.path}"


class Bootstrap:
    """Loads state at start and, with a poll interval, keeps re-polling the snapshot URL."""

    def __init__(
        self,
        store: StateStore,
        ledger: LedgerLike,
        *,
        snapshot: Snapshot | Mapping[str, Any] | None = None,
        url: str | None = None,
        token: str | None = None,
        poll_interval: float | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        jitter: float = 0.1,
        request_timeout: float = 10.0,
        max_bytes: int = 256 * 2**20,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.snapshot = snapshot
        self.url = url
        self.token = token
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.request_timeout = request_timeout
        self.max_bytes = max_bytes
        self.attempts = 0
        self.polls = 0
        self.last_error: str | None = None
        self._loaded = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.balance_cache_seconds = 5.0
        self._fetching: asyncio.Future[Snapshot] | None = None
        self._fetched_at = 0.0

    @property
    def loaded(self) -> bool:
        """Whether the first snapshot (file or URL) has been applied: the readiness signal."""
        return self._loaded.is_set()

    async def wait_loaded(self) -> None:
        """Return once the first snapshot has been applied."""
        await self._loaded.wait()

    async def start(self) -> None:
        """Apply the file snapshot now (raising when invalid), or start fetching from the URL.

        With a URL the file snapshot is not applied: the control plane's state wins.
        """
        if self.url is None:
            await apply_snapshot(self.store, self.ledger, parse_snapshot(self.snapshot or {}))
            self._loaded.set()
            return
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.request_timeout)
        )
        self._task = asyncio.create_task(self._run(), name="proxyd-bootstrap")

    async def close(self) -> None:
        """Stop fetching and polling; waits for the task and the session to close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """For `app.cleanup_ctx`: start on start-up, close on clean-up."""
        await self.start()
        yield
        await self.close()

    async def fetch(self) -> Snapshot:
        """One GET of the snapshot URL, validated."""
        if self._session is None or self.url is None:
            raise RuntimeError("Bootstrap.fetch needs a URL and start() first")
        try:
            async with self._session.get(self.url) as response:
                if response.status != 200:
                    raise SnapshotUnavailable(f"snapshot URL answered {response.status}")
                if (response.content_length or 0) > self.max_bytes:
                    raise SnapshotUnavailable(f"snapshot over {self.max_bytes} bytes")
                body = await response.content.read(self.max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SnapshotUnavailable(f"{type(exc).__name__}: {exc}") from None
        if len(body) > self.max_bytes:
            raise SnapshotUnavailable(f"snapshot over {self.max_bytes} bytes")
        return parse_snapshot(body)

    async def balance_of(self, account_id: str) -> tuple[int, int] | None:
        """(version, balance_nanos) of one account in the control plane's snapshot, or None.

        For putting back a balance Redis forgot. One fetch serves every account asking within
        `balance_cache_seconds`; an unreachable URL answers None.
        """
        if self.url is None or self._session is None:
            return None
        loop = asyncio.get_running_loop()
        if self._fetching is None or loop.time() - self._fetched_at > self.balance_cache_seconds:
            self._fetched_at = loop.time()
            self._fetching = asyncio.ensure_future(self.fetch())
        try:
            snapshot = await asyncio.shield(self._fetching)
        except (SnapshotUnavailable, SnapshotInvalid) as exc:
            log.warning("snapshot_balance_unavailable", error=str(exc))
            return None
        push = snapshot.balances.get(account_id)
        return None if push is None else (push.version, push.balance_nanos)

    async def load_once(self) -> int:
        """Fetch and apply the snapshot once; returns how many parts changed."""
        changed = await apply_snapshot(self.store, self.ledger, await self.fetch())
        self._loaded.set()
        return changed

    def _delay(self, failures: int) -> float:
        base = min(self.backoff_max, self.backoff_initial * 2.0 ** min(failures - 1, 32))
        spread = base * self.jitter
        return base + random.uniform(-spread, spread)  # noqa: S311  # jitter, not a secret

    async def _run(self) -> None:
        where = _where(self.url or "")
        failures = 0
        while not self.loaded:
            self.attempts += 1
            try:
                changed = await self.load_once()
            except (SnapshotUnavailable, SnapshotInvalid) as exc:
                failures += 1
                self.last_error = str(exc)
                delay = self._delay(failures)
                log.warning("snapshot_retry", url=where, error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
            else:
                log.info("snapshot_loaded", url=where, attempts=self.attempts, changed=changed)
        while self.poll_interval is not None:
            await asyncio.sleep(self.poll_interval)
            self.polls += 1
            try:
                changed = await self.load_once()
            except (SnapshotUnavailable, SnapshotInvalid) as exc:
                self.last_error = str(exc)
                log.warning("snapshot_poll_failed", url=where, error=str(exc))
            else:
                if changed:
                    log.info("snapshot_poll_applied", url=where, changed=changed)
