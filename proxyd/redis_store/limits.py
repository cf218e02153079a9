"""Per-key token buckets and concurrency leases shared by every instance through Redis."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from proxyd.admission.buckets import duration_text
from proxyd.admission.limits import LimitGrant, LocalLimits, concurrency_limited, rate_limited
from proxyd.redis_store.scripts import UNIT, admit_args
from proxyd.redis_store.store import RedisStore, RedisUnavailable
from proxyd.state.store import KeyRecord


def _bucket_headers(kind: str, rate: int, level: int, cap: int, out: dict[str, str]) -> None:
    out[f"x-ratelimit-limit-{kind}"] = str(rate)
    out[f"x-ratelimit-remaining-{kind}"] = str(max(0, level // UNIT))
    reset_ms = -(-(cap * UNIT - level) // rate) if level < cap * UNIT else 0
    out[f"x-ratelimit-reset-{kind}"] = duration_text(reset_ms * 1000)


class RedisLimits:
    """Per-key limits shared by every instance; the local limits while Redis is away."""

    shared = True

    def __init__(
        self, store: RedisStore, local: LocalLimits | None = None, *, share: int = 1
    ) -> None:
        self.store = store
        self.local = local or LocalLimits()
        self.share = share  # the processes that split a key's limits while Redis is away

    def _fallback(self, key: KeyRecord) -> KeyRecord:
        """The key with its fair share (1/share) of each limit, for the local fallback."""
        n = self.share
        if n == 1:
            return key
        return replace(
            key,
            rpm=max(1, key.rpm // n) if key.rpm else key.rpm,
            tpm=max(1, key.tpm // n) if key.tpm else key.tpm,
            burst_requests=max(1, key.burst_requests // n) if key.burst_requests else None,
            burst_tokens=max(1, key.burst_tokens // n) if key.burst_tokens else None,
            max_concurrency=max(1, key.max_concurrency // n) if key.max_concurrency else None,
        )

    def keys(self, key: KeyRecord) -> list[str]:
        """The key's request bucket, token bucket and lease zset, tagged with its account (so a
        request's limit, spend and balance keys share one Redis Cluster slot)."""
        base = f"{self.store.prefix}lim:{{{key.account_id}}}:{key.id}:"
        return [base + "r", base + "t", base + "c"]

    @staticmethod
    def rates(key: KeyRecord) -> list[int]:
        """ARGV 1-4 of the bucket scripts: request rate and cap, token rate and cap."""
        return [
            key.rpm or 0,
            key.burst_requests or key.rpm or 0,
            key.tpm or 0,
            key.burst_tokens or key.tpm or 0,
        ]

    def lease_for(self, key: KeyRecord) -> str:
        """A fresh concurrency lease for a key with a concurrency limit, else ''."""
        return self.store.new_lease() if key.max_concurrency else ""

    async def acquire(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """Take one request, the tokens and a slot in Redis, or raise the 429; never partial."""
        if not (key.rpm or key.tpm or key.max_concurrency):
            return self.local.acquire_now(key, tokens)
        if self.store.fallback_active:
            return self.local.acquire_now(self._fallback(key), tokens)
        keys = self.keys(key)
        lease = self.lease_for(key)
        args = admit_args(
            self.rates(key),
            tokens,
            key.max_concurrency or 0,
            lease,
            self.store.lease_ms,
            None,
            "",
            0,
            0,
            [],
        )
        try:
            result = await self.store.call("admit", keys[:1] * 3 + keys, args)
        except RedisUnavailable:
            return self.local.acquire_now(self._fallback(key), tokens)
        except BaseException:
            if lease:  # cancelled mid-call: the slot may have been taken; free it
                self.undo(key, lease)
            raise
        return self.granted(key, tokens, lease, result)

    def undo(self, key: KeyRecord, lease: str) -> None:
        """Free a slot a call the caller left may have taken (in the background)."""
        self.store.submit("release", self.keys(key), [*self.rates(key), 0, 0, lease])

    def granted(self, key: KeyRecord, tokens: int, lease: str, result: list[Any]) -> LimitGrant:
        """The grant an ADMIT answer gives (the limits' part), or its 429 (status 1 or 2)."""
        status, wait_r, wait_t, level_r, level_t = (int(x) for x in result[:5])
        headers: dict[str, str] = {}
        if key.rpm:
            _bucket_headers("requests", key.rpm, level_r, key.burst_requests or key.rpm, headers)
        if key.tpm:
            _bucket_headers("tokens", key.tpm, level_t, key.burst_tokens or key.tpm, headers)
        if status == 1:
            raise rate_limited(wait_r * 1000, wait_t * 1000, headers)
        if status == 2:
            raise concurrency_limited(key.max_concurrency or 0)
        if not (key.rpm or key.tpm or key.max_concurrency):  # nothing of it in Redis
            return self.local.acquire_now(key, tokens)
        if lease:
            self.store.leases[lease] = (self.keys(key)[2], True)
        return LimitGrant(key.id, tokens, headers, lease=lease or None, remote=True, key=key)

    def release(self, grant: LimitGrant, *, tokens: int | None) -> None:
        """End a grant once; shared work runs in the background (see LocalLimits.release)."""
        given = self.give_back(grant, tokens=tokens)
        if given is not None:
            self.store.submit("release", given[0], given[1])

    def give_back(
        self, grant: LimitGrant, *, tokens: int | None
    ) -> tuple[list[str], list[Any]] | None:
        """End a grant once: a local one at once; for a shared one, the bucket keys and the
        RELEASE arguments (rates, requests back, tokens back, lease) still to send to Redis, or
        None when there is nothing to send."""
        if not grant.remote:
            self.local.release(grant, tokens=tokens)
            return None
        if grant.released:
            return None
        grant.released = True
        if grant.lease is not None:
            self.store.leases.pop(grant.lease, None)
        back_r = 1 if tokens is None else 0
        back_t = grant.tokens if tokens is None else grant.tokens - tokens
        if grant.key is None or not (back_r or back_t or grant.lease):
            return None
        return self.keys(grant.key), [*self.rates(grant.key), back_r, back_t, grant.lease or ""]

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """Live shared state of a key for the control API (local while Redis is away)."""
        try:
            result = await self.store.call("view", self.keys(key), self.rates(key))
        except RedisUnavailable:
            view = self.local.view_now(self._fallback(key))
            view["fallback"] = True
            return view
        level_r, level_t, in_flight = (int(x) for x in result)
        return {
            "requests": _remote_bucket(key.rpm, key.burst_requests, level_r),
            "tokens": _remote_bucket(key.tpm, key.burst_tokens, level_t),
            "in_flight": in_flight if key.max_concurrency else None,
            "max_concurrency": key.max_concurrency,
            "shared": True,
            "fallback": False,
        }


def _remote_bucket(rate: int | None, burst: int | None, level: int) -> dict[str, Any] | None:
    if not rate:
        return None
    cap = burst or rate
    reset_ms = -(-(cap * UNIT - level) // rate) if level < cap * UNIT else 0
    return {
        "limit": rate,
        "capacity": cap,
        "remaining": max(0, level // UNIT),
        "reset_seconds": reset_ms / 1000,
    }
