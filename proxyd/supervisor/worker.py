"""One worker process: the ordinary proxyd app, wired to the supervisor's channel.

Takes the listening sockets the supervisor bound, keeps limits, spend windows and balances in
the supervisor when there is no Redis, applies pushes the supervisor fans out, and answers
metric snapshots. Everything else is the same app as a single process runs.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from proxyd.admission.admit import SharedParts
from proxyd.config import Config
from proxyd.observability import merge
from proxyd.protocol import estimate
from proxyd.state import sync
from proxyd.state.store import StateStore
from proxyd.supervisor.frames import Message
from proxyd.supervisor.link import Link, SupervisorGone
from proxyd.supervisor.shared import SupervisorSessions, shared_parts
from proxyd.supervisor.table import SharedTable

log = structlog.get_logger("proxyd.worker")


@dataclass
class WorkerContext:
    """What the supervisor hands a forked worker."""

    slot: int
    workers: int
    link: Link
    listen_sock: socket.socket
    control_sock: socket.socket | None  # only the worker that owns the control listener
    store: StateStore  # loaded before the fork: shared copy-on-write
    tokenizer: estimate.Tokenizer  # loaded before the fork, likewise
    sockets: list[socket.socket] = field(default_factory=list)
    table: SharedTable | None = None  # limits and balances mapped into every worker (no Redis)
    column: int = -1  # this worker's column of the table
    metrics_sock: socket.socket | None = None  # its slot's `server.metrics_listen`, bound once

    @property
    def name(self) -> str:
        """The `worker` label of this process's own series."""
        return str(self.slot)

    def shared_parts(self, config: Config) -> SharedParts | None:
        """Limits, spend windows and ledger in the supervisor, unless Redis shares them."""
        if config.redis.url:
            return None
        return shared_parts(self.link, self.table, self.column)

    def shared_sessions(self, config: Config) -> SupervisorSessions | None:
        """Sticky-session pins in the supervisor, unless Redis shares them (or they are off)."""
        if config.redis.url or not config.sticky.enabled:
            return None
        return SupervisorSessions(self.link)

    async def start(self) -> None:
        """Open the channel; from now on pushes fanned out by the supervisor are applied."""

        def apply(message: Message) -> Message:
            sync.apply(self.store, message["kind"], message["body"].encode())
            return {}

        self.link.handlers["apply"] = apply
        await self.link.start()

    def serve_metrics(self, snapshot: Callable[[], list[merge.Family]]) -> None:
        """Answer the supervisor's scrapes with this process's series."""

        def collect(message: Message) -> Message:
            return {"families": snapshot()}

        self.link.handlers["collect"] = collect

    async def publish(self, kind: str, payload: bytes, *, version: int | None = None) -> None:
        """Hand a push to every other worker; returns once each has applied it."""
        reply = await self.link.request({"op": "push", "kind": kind, "body": payload.decode()})
        if "error" in reply:
            log.warning("push_fanout_incomplete", kind=kind, error=reply["error"])

    def scraper(self, snapshot: Callable[[], list[merge.Family]]) -> Callable[[], Awaitable[bytes]]:
        """GET /metrics on the client port: every worker's series, aggregated."""

        async def scrape() -> bytes:
            try:
                reply = await self.link.request({"op": "collect"})
            except SupervisorGone:  # shutting down: this worker's own series
                reply = {}
            parts = [(str(name), families) for name, families in reply.get("parts", [])]
            if not parts:  # the supervisor could not ask: this worker's own, still labelled
                parts = [(self.name, snapshot())]
            return merge.render(merge.merge(parts))

        return scrape

    def ready(self) -> None:
        """Tell the supervisor this worker accepts connections."""
        self.link.notify({"op": "ready"})
