"""Passive health of channels: failure counts, cooldowns with backoff, one trial, per-channel caps.

Pure module: no aiohttp, no I/O, no logging; time comes from the caller (`now`) or the clock it was
given. It never decides retries (failover does) and never holds a request or response body.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from enum import IntEnum

from proxyd.admission.buckets import TokenBucket
from proxyd.errors import ErrorType
from proxyd.state.store import Channel, State

# Outcomes that say the channel itself is in trouble; they count towards a cooldown.
FAILURE_KINDS = frozenset(
    {
        ErrorType.UPSTREAM_CONNECT,
        ErrorType.UPSTREAM_TIMEOUT,
        ErrorType.UPSTREAM_ERROR,
        ErrorType.UPSTREAM_RESET,
        ErrorType.UPSTREAM_CREDENTIAL,
    }
)
# The operator's upstream key or account was refused (401/403, out of credit): no point waiting
# for more failures, and no point trying again soon. One such answer cools the channel for
# `credential_cooldown * 2**n`, a Retry-After notwithstanding.
CREDENTIAL_KINDS = frozenset({ErrorType.UPSTREAM_CREDENTIAL})
# Outcomes where the channel answered properly (a 4xx other than 429 is the caller's fault): they
# count as a success. Every other kind (client_disconnect, internal_error, ...) is neutral.
ANSWERED_KINDS = frozenset({ErrorType.UPSTREAM_CLIENT_ERROR})


class Availability(IntEnum):
    """What `acquire` would say now, without taking anything (the router orders by it)."""

    READY = 0  # a permit would be granted
    CAPPED = 1  # over the channel's own rpm or concurrency cap; may free up soon
    BLOCKED = 2  # cooling down, or its one trial is already out


class _Entry:
    """The mutable health of one channel id."""

    __slots__ = (
        "bucket",
        "consecutive_failures",
        "cooldown_until",
        "generation",
        "in_flight",
        "last_error_type",
        "rpm",
        "trial_owner",
        "tripped",
        "trips",
    )

    def __init__(self) -> None:
        self.consecutive_failures = 0
        self.trips = 0  # cooldowns in a row without a successful trial: the backoff exponent
        self.tripped = False  # True from a cooldown's start until a trial succeeds
        self.cooldown_until = 0.0
        self.generation = 0  # bumped at every cooldown: outcomes of older permits are stale
        self.trial_owner: Permit | None = None
        self.in_flight = 0
        self.rpm: int | None = None
        self.bucket: TokenBucket | None = None
        self.last_error_type: ErrorType | None = None


class Permit:
    """One attempt's claim on a channel: holds a concurrency slot until `release()`.

    Call `success()` once the response headers show the channel answered, `failure(kind)` when
    the attempt failed (also after `success()` when the stream broke later), and `release()` in a
    `finally`. Each of success and failure counts at most once; a success after a failure is
    ignored; `release()` is idempotent.
    """

    __slots__ = ("_entry", "_failed", "_generation", "_health", "_released", "_succeeded", "trial")

    def __init__(self, health: ChannelHealth, entry: _Entry, trial: bool) -> None:
        self._health = health
        self._entry = entry
        self._generation = entry.generation
        self.trial = trial
        self._succeeded = False
        self._failed = False
        self._released = False

    def success(self) -> None:
        """The channel answered: clear its failure count; a trial's success ends the cooldown."""
        if self._succeeded or self._failed:
            return
        self._succeeded = True
        self._health._on_success(self._entry, self)

    def failure(self, kind: ErrorType, retry_after: float | None = None) -> None:
        """The attempt failed with `kind`; a positive `retry_after` cools the channel that long."""
        if self._failed:
            return
        self._failed = True
        self._health._on_failure(self._entry, self, kind, retry_after)

    def release(self) -> None:
        """Give the concurrency slot back (and an undecided trial slot); safe to call twice."""
        if self._released:
            return
        self._released = True
        entry = self._entry
        entry.in_flight -= 1
        if entry.trial_owner is self:
            entry.trial_owner = None

    @property
    def generation(self) -> int:
        """The cooldown generation this permit was issued in."""
        return self._generation


class ChannelHealth:
    """Health of every channel by id, shared by all requests of one process.

    A channel is `healthy` until `failure_threshold` failures in a row; then it cools down for
    `base_cooldown * 2**n` seconds (n: cooldowns in a row so far, capped at `max_cooldown`, minus
    up to `jitter` of it at random so instances do not come back in step). After a cooldown one
    trial request at a time is let through: its success makes the channel healthy and resets the
    backoff, its failure starts the next, longer cooldown. A failure with `retry_after > 0` (an
    upstream 429's Retry-After) cools the channel for exactly that long (capped by
    `max_cooldown`), then a trial decides as above. Outcomes of permits issued before the current
    cooldown began are not counted again (one outage is one trip), except that a Retry-After is
    always honoured. A rejected credential (`CREDENTIAL_KINDS`) trips the channel at once, for
    `credential_cooldown * 2**n` seconds (capped by `max_cooldown`), with a trial as above.

    Per-channel caps: `channel.max_concurrency` permits at once, and `channel.rpm` permits per
    minute from a token bucket holding one minute's worth; every permit takes a token, failed
    attempts included, since each reached the provider.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        base_cooldown: float = 1.0,
        max_cooldown: float = 300.0,
        failure_threshold: int = 3,
        *,
        credential_cooldown: float = 60.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        if base_cooldown <= 0 or max_cooldown < base_cooldown:
            raise ValueError("need 0 < base_cooldown <= max_cooldown")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        self.clock = clock
        self.base_cooldown = base_cooldown
        self.max_cooldown = max_cooldown
        self.failure_threshold = failure_threshold
        self.credential_cooldown = min(max(credential_cooldown, base_cooldown), max_cooldown)
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._entries: dict[str, _Entry] = {}
        # (channel id, model) -> [until, refusals in a row]: models a channel's credential may
        # not use (a 403 about one model), cooled without cooling the channel's other models
        self._refused: dict[tuple[str, str], list[float]] = {}

    # -- request path -------------------------------------------------------------------------
    def availability(self, channel: Channel, now: float) -> Availability:
        """Whether `acquire(channel, now)` would grant a permit; takes nothing."""
        entry = self._entries.get(channel.id)
        if entry is None:
            return Availability.READY
        if entry.tripped and (now < entry.cooldown_until or entry.trial_owner is not None):
            return Availability.BLOCKED
        cap = channel.max_concurrency
        if cap is not None and entry.in_flight >= cap:
            return Availability.CAPPED
        bucket = entry.bucket
        if bucket is not None and entry.rpm == channel.rpm and bucket.wait_us(1, now) > 0:
            return Availability.CAPPED
        return Availability.READY

    def acquire(self, channel: Channel, now: float) -> Permit | None:
        """A permit for one attempt on `channel`, or None (cooling down, trial out, over a cap)."""
        entry = self._entries.get(channel.id)
        if entry is None:
            entry = self._entries[channel.id] = _Entry()
        trial = entry.tripped
        if trial and (now < entry.cooldown_until or entry.trial_owner is not None):
            return None
        cap = channel.max_concurrency
        if cap is not None and entry.in_flight >= cap:
            return None
        rpm = channel.rpm
        if rpm is None:
            entry.bucket = entry.rpm = None
        else:
            if entry.rpm != rpm or entry.bucket is None:
                entry.rpm, entry.bucket = rpm, TokenBucket(rpm, None, now)
            if entry.bucket.take(1, now):
                return None
        entry.in_flight += 1
        permit = Permit(self, entry, trial)
        if trial:
            entry.trial_owner = permit
        return permit

    def soonest(self, channels: Iterable[Channel], now: float) -> float | None:
        """Seconds until the first of `channels` ends its cooldown; None if one is not cooling.

        For a Retry-After on the 503 when every candidate was cooling down.
        """
        best: float | None = None
        for channel in channels:
            entry = self._entries.get(channel.id)
            if entry is None or not entry.tripped or entry.cooldown_until <= now:
                return None
            wait = entry.cooldown_until - now
            if best is None or wait < best:
                best = wait
        return best

    # -- models a channel's credential may not use -----------------------------------------------
    def refuse_model(self, channel_id: str, model: str, now: float | None = None) -> None:
        """The channel's credential was refused for `model` (a 403 about one model): skip the
        pair for `credential_cooldown * 2**n` (n: refusals in a row before, capped by
        `max_cooldown`, minus up to `jitter` of it); the channel's other models are untouched."""
        at = self.clock() if now is None else now
        seen = self._refused.get((channel_id, model))
        trips = int(seen[1]) if seen is not None else 0
        delay = min(self.credential_cooldown * 2.0 ** min(trips, 64), self.max_cooldown)
        if self.jitter:
            delay *= 1.0 - self.jitter * self._rng.random()
        self._refused[(channel_id, model)] = [at + delay, trips + 1]

    def model_refused(self, channel_id: str, model: str, now: float) -> bool:
        """Whether `model` is cooling on the channel (after its cooldown the next request tries
        it again; a success there forgets the refusal, `model_served`)."""
        refused = self._refused
        if not refused:
            return False
        seen = refused.get((channel_id, model))
        return seen is not None and now < seen[0]

    def model_served(self, channel_id: str, model: str) -> None:
        """The channel answered for `model`: forget a refusal of it (and its backoff)."""
        if self._refused:
            self._refused.pop((channel_id, model), None)

    # -- outcomes (called by Permit) ----------------------------------------------------------
    def _on_success(self, entry: _Entry, permit: Permit) -> None:
        if permit.generation != entry.generation:
            return  # issued before the current cooldown: only its trial decides
        entry.consecutive_failures = 0
        if entry.tripped:
            entry.tripped = False
            entry.trips = 0
            entry.trial_owner = None

    def _on_failure(
        self, entry: _Entry, permit: Permit, kind: ErrorType, retry_after: float | None
    ) -> None:
        if kind in ANSWERED_KINDS:
            self._on_success(entry, permit)
            return
        if kind not in FAILURE_KINDS:
            return  # neutral: the trial slot frees itself on release
        entry.last_error_type = kind
        now = self.clock()
        current = permit.generation == entry.generation
        if current:
            entry.consecutive_failures += 1
        credential = kind in CREDENTIAL_KINDS
        if retry_after is not None and retry_after > 0 and not credential:
            until = now + min(retry_after, self.max_cooldown)
            if entry.tripped and entry.cooldown_until > until:
                until = entry.cooldown_until
            self._cool(entry, until)
        elif current and (
            credential or entry.tripped or entry.consecutive_failures >= self.failure_threshold
        ):
            base = self.credential_cooldown if credential else self.base_cooldown
            delay = base * 2.0 ** min(entry.trips, 64)
            delay = min(delay, self.max_cooldown)
            if self.jitter:
                delay *= 1.0 - self.jitter * self._rng.random()
            entry.trips += 1
            self._cool(entry, now + delay)

    @staticmethod
    def _cool(entry: _Entry, until: float) -> None:
        entry.tripped = True
        entry.cooldown_until = until
        entry.generation += 1
        entry.trial_owner = None

    # -- observation and upkeep ---------------------------------------------------------------
    def snapshot(
        self, now: float | None = None, ids: Iterable[str] | None = None
    ) -> list[dict[str, object]]:
        """One dict per channel (the `ids` given, in order, else every known id, sorted).

        Keys: id, healthy (False only while cooling down: a channel whose cooldown ended takes
        its trial with the next request), state ("healthy" | "cooling_down" | "trial"),
        consecutive_failures, cooldown_remaining_seconds, in_flight, last_error_type (an
        ErrorType value or None), refused_models (model -> seconds left of its cooldown, for
        models the channel's credential was refused, `refuse_model`).
        """
        at = self.clock() if now is None else now
        fresh = _Entry()
        out: list[dict[str, object]] = []
        for cid in sorted(self._entries) if ids is None else ids:
            e = self._entries.get(cid, fresh)
            remaining = max(0.0, e.cooldown_until - at) if e.tripped else 0.0
            if not e.tripped:
                state = "healthy"
            elif remaining > 0:
                state = "cooling_down"
            else:
                state = "trial"
            out.append(
                {
                    "id": cid,
                    "healthy": state != "cooling_down",  # a trial is offered: it takes traffic
                    "state": state,
                    "consecutive_failures": e.consecutive_failures,
                    "cooldown_remaining_seconds": remaining,
                    "in_flight": e.in_flight,
                    "last_error_type": e.last_error_type.value if e.last_error_type else None,
                    "refused_models": {
                        model: round(until - at, 3)
                        for (channel_id, model), (until, _) in sorted(self._refused.items())
                        if channel_id == cid and until > at
                    },
                }
            )
        return out

    def prune(self, ids: set[str] | frozenset[str]) -> None:
        """Forget every channel whose id is not in `ids` (permits still out stay harmless)."""
        for cid in [c for c in self._entries if c not in ids]:
            del self._entries[cid]
        for pair in [p for p in self._refused if p[0] not in ids]:
            del self._refused[pair]

    def on_state(self, old: State, new: State) -> None:
        """A `StateStore.subscribe` listener: forget channels the new state no longer has."""
        if old.channels is not new.channels:
            self.prune({c.id for c in new.channels})
