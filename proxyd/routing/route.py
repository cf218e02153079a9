"""Routing: which channels to try for one request, in what order, and which credential each uses.

Pure module: no aiohttp, no I/O; the clock reading comes in as `now`. It only orders candidates:
it never acquires a permit (health does) and never decides a retry (failover does).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

from proxyd.routing.health import Availability
from proxyd.state.store import Channel, State

# One priority level: each channel with 1/weight, ready for the weighted shuffle.
_Group = tuple[tuple[Channel, float], ...]
_CACHE_LIMIT = 4096


class HealthView(Protocol):
    """What the router needs from passive health (`proxyd.routing.health.ChannelHealth` is one)."""

    def availability(self, channel: Channel, now: float) -> Availability:
        """READY, CAPPED or BLOCKED for `channel` at `now`, taking nothing."""
        ...


class Router:
    """Orders candidate channels and rotates each channel's credentials.

    `plan` puts higher priorities first and, within one priority, draws a weighted random order
    (Efraimidis-Spirakis: sort by log(u) / weight, the log of u**(1/weight), which keeps precision
    for large weights). Channels that are cooling down, or whose one trial is already out, are
    left out. Channels over their own rpm or concurrency cap are not dropped: they go after every
    ready channel (in their own priority-then-weighted order), so a backup takes the overflow and
    a capped channel is still tried if a slot frees while the others fail. The caller acquires a
    permit per attempt and skips, without counting an attempt, a channel that refuses one.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - load spreading
        self._groups: dict[int, tuple[tuple[Channel, ...], tuple[_Group, ...]]] = {}
        self._turns: dict[str, int] = {}

    def plan(
        self,
        channels: Sequence[Channel],
        now: float,
        health: HealthView,
        *,
        only_type: str | None = None,
        first: str | None = None,
    ) -> list[Channel]:
        """The channels to try, best first; `only_type` keeps channels of that type only.

        `first` (a sticky session's channel id) goes to the front while it is READY and of the
        best priority READY; cooling down, capped, gone or outranked (a backup the session fell
        to while the primary cooled down), it stays where the plan puts it and the session moves.
        """
        rnd = self._rng.random
        log = math.log
        availability = health.availability
        out: list[Channel] = []
        capped: list[Channel] | None = None
        for group in self._static(channels):
            if len(group) == 1:
                ordered: Sequence[tuple[Channel, float]] = group
            else:
                ordered = sorted(group, key=lambda cw: log(1.0 - rnd()) * cw[1], reverse=True)
            for channel, _ in ordered:
                if only_type is not None and channel.type != only_type:
                    continue
                seen = availability(channel, now)
                if seen is Availability.READY:
                    out.append(channel)
                elif seen is Availability.CAPPED:
                    if capped is None:
                        capped = [channel]
                    else:
                        capped.append(channel)
        if first is not None and out and out[0].id != first:  # only READY channels so far
            top = out[0].priority
            for i, channel in enumerate(out):
                if channel.priority != top:  # a backup the session fell to gives way
                    break
                if channel.id == first:
                    out.insert(0, out.pop(i))
                    break
        if capped is not None:
            out.extend(capped)
        return out

    def next_credential(self, channel: Channel, pinned: int | None = None) -> str:
        """The channel's credentials in round-robin, per channel id (kept across state swaps);
        `pinned` (a sticky session's credential index on this channel) is used as is."""
        keys = channel.api_keys
        if len(keys) == 1:
            return keys[0]
        if pinned is not None:
            return keys[pinned % len(keys)]
        turn = self._turns.get(channel.id, 0)
        self._turns[channel.id] = turn + 1
        return keys[turn % len(keys)]

    def prune(self, ids: set[str] | frozenset[str]) -> None:
        """Forget rotation state of channel ids no longer in force, and every cached grouping."""
        for cid in [c for c in self._turns if c not in ids]:
            del self._turns[cid]
        self._groups.clear()

    def on_state(self, old: State, new: State) -> None:
        """A `StateStore.subscribe` listener: drop what the new channel list made stale."""
        if old.channels is not new.channels:
            self.prune({c.id for c in new.channels})

    def _static(self, channels: Sequence[Channel]) -> tuple[_Group, ...]:
        """Priority groups of `channels`, cached per tuple object (the state's route tuples)."""
        if not isinstance(channels, tuple):
            return _group(channels)
        hit = self._groups.get(id(channels))
        if hit is not None and hit[0] is channels:
            return hit[1]
        groups = _group(channels)
        if len(self._groups) >= _CACHE_LIMIT:
            self._groups.clear()
        self._groups[id(channels)] = (channels, groups)  # holding the tuple keeps its id unique
        return groups


def _group(channels: Sequence[Channel]) -> tuple[_Group, ...]:
    ordered = sorted(channels, key=lambda c: -c.priority)
    groups: list[_Group] = []
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i].priority != ordered[start].priority:
            groups.append(tuple((c, 1.0 / max(c.weight, 1)) for c in ordered[start:i]))
            start = i
    return tuple(groups)
