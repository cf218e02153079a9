"""Sticky sessions: the turns of one conversation go to the same channel and credential.

Providers cache prompts per account, so a conversation spread over channels and credentials
pays a cache write where a read would have served. Pure module: no aiohttp, no I/O; the clock
comes in as `now`. It only remembers where a session went; the router still decides what is
healthy, and failover still decides retries (the session then moves with the request).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from zlib import crc32 as _crc32

import orjson

# The session headers of the coding agents, in the order they are believed.
_CLAUDE_CODE = "x-claude-code-session-id"
_CODEX = ("session-id", "session_id", "thread-id", "thread_id")
_CODEX_NAMES = frozenset(_CODEX)
# Characters hashed for the fallback id: of the system prompt (one app's conversations share it,
# and ids are scoped by key already, so its start is enough), and of the first user message
# (what tells one conversation from another).
_SYSTEM_CHARS = 256
_FIRST_CHARS = 1024
_SURROGATES = "surrogatepass"  # lone surrogates (valid JSON escapes) encode as themselves
_MAX_ID = 200  # a client id longer than this is hashed (it is a dictionary key, and a Redis one)


def session_id(headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """The conversation's id as the client states it, or one derived from its opening.

    In order: Claude Code's `x-claude-code-session-id`; the session in Anthropic
    `metadata.user_id` (a JSON string with `session_id`, or `user_<hex>_account_<uuid>_session_
    <uuid>`); Codex's `session-id` / `thread-id`; OpenAI `prompt_cache_key`; else a hash of the
    system prompt and the first user message. Clients choose these: scope them by key id.
    """
    value = headers.get(_CLAUDE_CODE)
    if value:
        return _short("h:" + value)
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        user = metadata.get("user_id")
        if isinstance(user, str) and user:
            found = _from_user_id(user)
            if found:
                return _short("u:" + found)
    if not headers.keys().isdisjoint(_CODEX_NAMES):  # one C call where most requests have none
        for name in _CODEX:
            value = headers.get(name)
            if value:
                return _short("h:" + value)
    cache_key = body.get("prompt_cache_key")
    if isinstance(cache_key, str) and cache_key:
        return _short("p:" + cache_key)
    return "d:" + _opening_hash(body)


def _from_user_id(user: str) -> str | None:
    """The session part of Anthropic `metadata.user_id`, in either of Claude Code's forms."""
    if user.startswith("{"):
        try:
            data = orjson.loads(user)
        except orjson.JSONDecodeError:
            return None
        sid = data.get("session_id") if isinstance(data, dict) else None
        return sid if isinstance(sid, str) and sid else None
    cut = user.rfind("_session_")
    if cut >= 0 and cut + 9 < len(user):
        return user[cut + 9 :]
    return None


def _short(value: str) -> str:
    if len(value) <= _MAX_ID:
        return value
    return value[:2] + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def _opening_hash(body: Mapping[str, Any]) -> str:
    """CRC-32s of the start of the system prompt and of the first user message (stable across
    processes, cheap; a collision only puts two conversations on the same channel).

    On every request without a stated session id: straight-line code for the usual shapes
    (exact `dict`/`list`/`str` types, as the JSON parser makes them), `_head` for the rest.
    """
    system = body.get("system")
    if system is None:
        system = body.get("instructions")
    items = body.get("messages")
    if items is None:
        items = body.get("input")
    first = None
    if type(items) is list:
        for item in items:
            if not isinstance(item, dict):
                continue
            role = item.get("role")
            if role == "user":
                first = item.get("content")
                break
            if system is None and (role == "system" or role == "developer"):
                system = item.get("content")
    elif type(items) is str:
        first = items
    # 16 hex digits, as f"{crc_system:08x}{crc_first:08x}" at a third of its cost; an absent
    # part hashes as the empty string (CRC 0)
    if system is not None:
        system = system[:_SYSTEM_CHARS] if type(system) is str else _head(system, _SYSTEM_CHARS)
    if first is not None:
        first = first[:_FIRST_CHARS] if type(first) is str else _head(first, _FIRST_CHARS)
    crc_system = 0 if system is None else _crc32(system.encode("utf-8", _SURROGATES))
    crc_first = 0 if first is None else _crc32(first.encode("utf-8", _SURROGATES))
    return (crc_system << 32 | crc_first).to_bytes(8, "big").hex()


def _head(part: object, limit: int) -> str:
    """The first `limit` characters of a prompt part's text, without serialising it all."""
    if isinstance(part, str):
        return part[:limit]
    if isinstance(part, list):
        if part:  # one text block, or a first one long enough (Claude Code's system prompt)
            block = part[0]
            text = block.get("text") if type(block) is dict else None
            if type(text) is str and (len(part) == 1 or len(text) >= limit):
                return text[:limit]
        texts: list[str] = []
        size = 0
        for block in part:
            text = block.get("text") if isinstance(block, dict) else block
            if not isinstance(text, str):
                text = orjson.dumps(block).decode()
            text = text[: limit - size]
            texts.append(text)
            size += len(text)
            if size >= limit:
                break
        return "\x1f".join(texts)[:limit]
    return "" if part is None else orjson.dumps(part).decode()[:limit]


class Pin:
    """Where a session last went: a channel id and the index of the credential it used."""

    __slots__ = ("channel_id", "credential", "expires", "shared_at")

    def __init__(self, channel_id: str, credential: int, expires: float, shared_at: float) -> None:
        self.channel_id = channel_id
        self.credential = credential
        self.expires = expires
        self.shared_at = shared_at  # when a shared store last heard of it (placed or renewed)


class Session:
    """One request's view of its session: the pin found, and `settle` once a channel served.

    Made by `StickyTable.open` only, field by field: `channel_id` is the channel to try first,
    `pinned` the session's credential there.
    """

    __slots__ = ("_table", "channel_id", "key", "opened", "pin", "pinned", "track")
    _table: StickyTable
    key: str  # the scoped session key (key id and session id)
    opened: float  # when this request opened it: the TTL slides from here
    track: bool  # False: follow the pin, never move it
    pin: Pin | None
    channel_id: str | None
    pinned: int | None

    def adopt(self, pin: Pin | None) -> None:
        """Take `pin` as the session's: the table's at `open`, or the one a shared store held
        when this process had none."""
        self.pin = pin
        self.channel_id = pin.channel_id if pin is not None else None
        self.pinned = pin.credential if pin is not None else None

    def credential(self, channel_id: str) -> int | None:
        """The credential index to use on `channel_id`, if the session was there (the relay
        reads `pinned` where `channel_id` matches, without this call)."""
        return self.pinned if channel_id == self.channel_id else None

    def settle(self, channel_id: str, credential: int) -> Coroutine[Any, Any, None] | None:
        """A channel answered: remember it (a hit, a first placement, or a move).

        With a shared store (`StickyTable.publish`), a placement or a move returns what to
        await before the answer reaches the client: the store then holds the pin before the
        client can send the next turn to another worker or instance. A hit returns None.
        """
        if not self.track:
            return None
        pin = self.pin
        if pin is not None and pin.channel_id == channel_id and pin.credential == credential:
            table = self._table  # a hit (most turns): the TTL slides from when it was opened
            table.hits += 1
            pin.expires = self.opened + table.ttl
            if table.on_renew is not None and self.opened - pin.shared_at > table.ttl / 4:
                pin.shared_at = self.opened
                table.on_renew(self.key)
            return None
        return self._table.place(self, channel_id, credential)


_new_session = object.__new__

# A shared store's `place(scoped key, channel id, credential, first)`: the pin it holds after
# (a first placement does not replace a live pin), or None when it could not be asked.
Publish = Callable[[str, str, int, bool], Awaitable[tuple[str, int] | None]]


class StickyTable:
    """Session → pin, bounded (least recently used dropped first) with a sliding TTL.

    Counters `hits`, `misses` (no pin yet, or it expired) and `moves` (the request went
    elsewhere, e.g. the pinned channel was cooling down or failed before the first byte) are
    plain ints read at scrape time. `publish` (optional: a shared store's `place`) is given
    every placement and move, awaited by the request before its answer (see `Session.settle`);
    `on_renew` hears renewals, without a round trip on the request's path.
    """

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_sessions: int = 100_000,
        publish: Publish | None = None,
        on_renew: Callable[[str], None] | None = None,
    ) -> None:
        if ttl <= 0 or max_sessions < 1:
            raise ValueError("ttl must be positive and max_sessions at least 1")
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.publish = publish
        self.on_renew = on_renew
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.moves = 0

    def __len__(self) -> int:
        return len(self._pins)

    def open(self, key_id: str, sid: str, now: float, track: bool = True) -> Session:
        """The session `sid` of key `key_id`, with its pin if one is alive at `now`.

        `track=False` follows the pin without moving it (token counts, served by one protocol's
        channels only, must not pull a conversation off the channel its turns use).
        """
        key = key_id + "\x00" + sid
        pin = self.pin_of(key, now)
        # Built field by field: Python 3.11 runs a class's __init__ through its slow generic
        # call path, about twice what these stores cost (one per request).
        session = _new_session(Session)
        session._table = self
        session.key = key
        session.opened = now
        session.track = track
        session.adopt(pin)
        return session

    def place(
        self, session: Session, channel_id: str, credential: int
    ) -> Coroutine[Any, Any, None] | None:
        """`session` was served elsewhere than its pin (or has none): a first placement or a
        move; the TTL slides from the time it was opened. (`Session.settle` counts hits.)
        With `publish`, what to await: the shared store learns it, and a first placement that
        another worker or instance made first is taken from there for the next turns."""
        first = session.pin is None
        if first:
            self.misses += 1
        else:
            self.moves += 1
        self.put(session.key, channel_id, credential, session.opened + self.ttl, session.opened)
        publish = self.publish
        if publish is None:
            return None
        asked = publish(session.key, channel_id, credential, first)
        return self._published(asked, session.key, channel_id, credential)

    async def _published(
        self, asked: Awaitable[tuple[str, int] | None], key: str, channel_id: str, credential: int
    ) -> None:
        held = await asked
        if held is None or held == (channel_id, credential):
            return
        pin = self._pins.get(key)
        if pin is not None:  # the store had a pin already: the next turns go there
            pin.channel_id, pin.credential = held

    def put(
        self, key: str, channel_id: str, credential: int, expires: float, shared_at: float
    ) -> None:
        """Set the pin of a scoped session key (also for pins learned from a shared store)."""
        pins = self._pins
        old = pins.get(key)
        if old is not None:
            old.channel_id, old.credential, old.expires = channel_id, credential, expires
            old.shared_at = shared_at
            pins.move_to_end(key)
            return
        pins[key] = Pin(channel_id, credential, expires, shared_at)
        if len(pins) > self.max_sessions:
            pins.popitem(last=False)

    def pin_of(self, key: str, now: float) -> Pin | None:
        """The live pin of a scoped session key, for a holder of shared pins (the supervisor)."""
        pin = self._pins.get(key)
        if pin is None:
            return None
        if pin.expires <= now:
            del self._pins[key]
            return None
        self._pins.move_to_end(key)
        return pin

    def renew(self, key: str, now: float) -> None:
        """Slide a scoped session key's TTL from `now` (a later turn was served there)."""
        pin = self.pin_of(key, now)
        if pin is not None:
            pin.expires = now + self.ttl

    def counts(self) -> list[tuple[tuple[str, ...], float]]:
        """(labels, value) pairs of `proxyd_sticky_sessions_total` for the metrics."""
        return [(("hit",), self.hits), (("miss",), self.misses), (("move",), self.moves)]
