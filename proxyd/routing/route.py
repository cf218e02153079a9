"""Routing: which channels may serve one request, in what order, and which credential each uses.

The route step is `route_call`: model → price → the key's permission → the channels that serve
the model on this endpoint (404, 403, 503). `Router.plan` then orders those channels when the
relay starts (priority, weight, health, the sticky session's channel first).

Pure module: no aiohttp, no I/O; the clock reading comes in as `now`. It never acquires a permit
(health does) and never decides a retry (failover does).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxyd.billing.pricing import Price
from proxyd.errors import ErrorType, Forbidden, ModelNotFound, UpstreamFailure
from proxyd.protocol.call import Call
from proxyd.routing.health import Availability
from proxyd.state.store import Channel, KeyRecord, State

# One priority level: each channel with 1/weight, ready for the weighted shuffle.
_Group = tuple[tuple[Channel, float], ...]
_CACHE_LIMIT = 4096


@dataclass(slots=True)
class Route:
    """Where one request may go: its model's price and the channels permitted to serve it (in
    the state's order; `Router.plan` orders them per attempt run)."""

    price: Price
    channels: tuple[Channel, ...]


def route_call(state: State, key: KeyRecord, call: Call, *, offline: bool = False) -> Route:
    """The route step: the price and the permitted channels of `call` for `key`.

    - 404 model_not_found: nobody serves the model here, or it has no price;
    - 403 model_not_allowed: the key's model list leaves it out;
    - 503 no_channel: no channel speaks the endpoint's protocol and the endpoint cannot be
      translated; with `offline` (token counting, which proxyd can answer itself) the route is
      empty instead.

    An endpoint that can be translated may use every channel of the model; one that cannot
    only the channels of its own protocol.
    """
    model = call.model
    price = state.prices.get(model)
    channels = state.routes.get(model)
    if price is None or channels is None:
        raise ModelNotFound(
            f"The model '{model}' does not exist or is not served here.", param="model"
        )
    if not key.allows_model(model):
        raise Forbidden(
            f"This API key is not allowed to use the model '{model}'.",
            error_type=ErrorType.MODEL_NOT_ALLOWED,
            param="model",
        )
    endpoint = call.endpoint
    if endpoint.translatable:
        return Route(price, channels)
    native = state.native_route(model, endpoint.protocol)
    if native or offline:
        return Route(price, native)
    raise UpstreamFailure(
        "No channel can serve this model on this endpoint.",
        status=503,
        error_type=ErrorType.NO_CHANNEL,
    )


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
        first: str | None = None,
    ) -> list[Channel]:
        """The channels to try, best first (`channels`: a route's permitted ones).

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
