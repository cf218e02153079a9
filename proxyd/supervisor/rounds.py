"""Pushes and scrapes in progress: asked of several workers, answered to one once all replied.

A push is answered once every other worker has applied it; a scrape once every worker has sent
its series (the supervisor's own added). A worker that dies is no longer waited for; one that
does not answer within `ANSWER_SECONDS` is named in the reply. Never blocks.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxyd.observability import merge
from proxyd.supervisor.frames import FrameBuffer, Message

ANSWER_SECONDS = 5.0


@dataclass(eq=False)
class WorkerProc:
    """One forked worker as the supervisor sees it."""

    slot: int
    pid: int
    sock: socket.socket
    spool: int
    role: str = "current"  # "current", "incoming" (a reload's replacement) or "retiring"
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    frames: FrameBuffer = field(default_factory=FrameBuffer)
    out: bytearray = field(default_factory=bytearray)
    writing: bool = False  # registered for EVENT_WRITE (the socket did not take all of `out`)


@dataclass
class _Round:
    origin: int  # the pid that asked
    request_id: int
    kind: str  # "push" or "collect"
    waiting: set[int]
    deadline: float
    parts: list[tuple[str, Any]] = field(default_factory=list)


class Rounds:
    """Every push and scrape waiting for workers' answers."""

    def __init__(
        self,
        procs: dict[int, WorkerProc],
        send: Callable[[WorkerProc, Message], None],
        own: Callable[[], list[merge.Family]],
    ) -> None:
        self._procs = procs
        self._send = send
        self._own = own
        self._rounds: dict[int, _Round] = {}
        self._ids = itertools.count(1)

    def ask(
        self, origin: WorkerProc, request_id: int, targets: list[WorkerProc], message: Message
    ) -> None:
        """Send `message` (op `apply` or `collect`) to `targets`; answer `origin` when all did."""
        sid = next(self._ids)
        kind = "collect" if message["op"] == "collect" else "push"
        waiting = {p.pid for p in targets}
        self._rounds[sid] = _Round(
            origin.pid, request_id, kind, waiting, time.monotonic() + ANSWER_SECONDS
        )
        for proc in targets:
            self._send(proc, {**message, "id": sid})
        self._maybe_done(sid)

    def answered(self, proc: WorkerProc, message: Message) -> None:
        """A worker's reply to one of our requests."""
        sid = message.get("id", -1)
        round_ = self._rounds.get(sid)
        if round_ is None or proc.pid not in round_.waiting:
            return
        round_.waiting.discard(proc.pid)
        if round_.kind == "collect" and "families" in message:
            round_.parts.append((str(proc.slot), message["families"]))
        self._maybe_done(sid)

    @property
    def waiting(self) -> bool:
        """Whether any push or scrape still waits for answers."""
        return bool(self._rounds)

    def gone(self, pid: int) -> None:
        """A worker died: stop waiting for it."""
        for sid, round_ in list(self._rounds.items()):
            if pid in round_.waiting:
                round_.waiting.discard(pid)
                self._maybe_done(sid)

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._rounds.values()), default=None)

    def expire(self, now: float) -> None:
        """Answer the rounds past their deadline with what came in."""
        for sid, round_ in list(self._rounds.items()):
            if round_.deadline <= now:
                self._maybe_done(sid, expired=True)

    def _maybe_done(self, sid: int, *, expired: bool = False) -> None:
        round_ = self._rounds[sid]
        if round_.waiting and not expired:
            return
        del self._rounds[sid]
        origin = self._procs.get(round_.origin)
        if origin is None:
            return
        reply: Message = {"id": round_.request_id}
        if round_.kind == "collect":
            parts = sorted(round_.parts, key=lambda part: part[0])
            reply["parts"] = [*parts, ("supervisor", self._own())]
        elif round_.waiting:
            slots = sorted(self._procs[p].slot for p in round_.waiting if p in self._procs)
            reply["error"] = f"workers {slots} did not confirm within {ANSWER_SECONDS} s"
        self._send(origin, reply)
