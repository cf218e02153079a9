"""The one wiring module: builds the client app and its parts in `cleanup_ctx` order.

Only this module knows how the pieces are assembled. Each cleanup runs only if its start-up ran,
in reverse order: stop accepting, let streams finish, then flush billing, then close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from proxyd.admission.admit import (
    Admission,
    AdmissionSettings,
    Joint,
    Ledger,
    Limits,
    SharedParts,
)
from proxyd.admission.balances import LocalLedger
from proxyd.admission.clientip import client_address, parse_networks
from proxyd.admission.limits import LocalLimits
from proxyd.admission.spend import SpendWindows
from proxyd.billing.migrate import migrate, retention_task
from proxyd.billing.opener import open_sink
from proxyd.billing.spool import Spool
from proxyd.billing.writer import BillingWriter
from proxyd.config import Config
from proxyd.control.api import create_control_app
from proxyd.control.bootstrap import Bootstrap
from proxyd.observability import logs, metric_sources
from proxyd.observability.metrics import CONTENT_TYPE, Metrics
from proxyd.observability.observe import wire_sources
from proxyd.protocol import estimate
from proxyd.redis_store import Broadcast, RedisLedger, RedisLimits, RedisSessions, RedisStore
from proxyd.redis_store.admit import RedisAdmission
from proxyd.redis_store.spend import RedisSpend
from proxyd.relay.relay import Relay
from proxyd.routing.health import ChannelHealth
from proxyd.routing.route import Router
from proxyd.routing.sticky import StickyTable
from proxyd.server import connection
from proxyd.server.connection import ConnectionStats
from proxyd.server.count import count_routes
from proxyd.server.handlers import MAX_BODY, ClientHandlers
from proxyd.server.pipeline import Pipeline, SharedSessions
from proxyd.server.respond import FlowControl
from proxyd.server.server_errors import server_header_hook
from proxyd.state import sync
from proxyd.state.store import StateStore
from proxyd.upstream.attempt import Upstream

log = structlog.get_logger("proxyd.app")


@dataclass
class Parts:
    """The long-lived objects of one proxyd process, built by `build_parts`."""

    config: Config
    store: StateStore
    metrics: Metrics
    upstream: Upstream
    health: ChannelHealth
    router: Router
    sticky: StickyTable | None
    shared_sessions: SharedSessions | None
    writer: BillingWriter
    admission: Admission
    ledger: Ledger
    limits: Limits
    redis: RedisStore | None
    broadcast: Broadcast | None
    tokenizer: estimate.Tokenizer
    ready_reasons: list[Callable[[], str | None]] = field(default_factory=list)
    # Set in a worker of `proxyd serve --workers N` (proxyd/supervisor): which one, the scrape of
    # every worker's metrics, and the hand-off of a control push to the other workers.
    worker: int | None = None
    workers: int = 1
    scrape: Callable[[], Awaitable[bytes]] | None = None
    fan_out: sync.Publish | None = None
    connections: ConnectionStats = field(default_factory=ConnectionStats)  # the client listener

    def channel_health(self) -> list[dict[str, object]]:
        """Health of the channels in force, for metrics and the control API."""
        return self.health.snapshot(ids=[c.id for c in self.store.current.channels])

    def readiness(self) -> tuple[bool, str]:
        """Ready when state is loaded and billing is writable or spooling within bounds."""
        if not self.store.loaded:
            return False, "state not loaded yet"
        ok, reason = self.writer.ready()
        if not ok:
            return False, reason
        return True, "ready"

    def detail(self) -> dict[str, object]:
        """What /readyz adds to its answer: Redis's state and, under a supervisor, the worker."""
        redis = "off" if self.redis is None else "fallback" if self.redis.fallback_active else "ok"
        out: dict[str, object] = {"redis": redis}
        if self.worker is not None:
            out |= {"worker": self.worker, "workers": self.workers}
        return out


PARTS = web.AppKey("parts", Parts)


def build_parts(
    config: Config,
    store: StateStore | None = None,
    *,
    tokenizer: estimate.Tokenizer | None = None,
    shared: SharedParts | None = None,
    workers: int = 1,
    shared_sessions: SharedSessions | None = None,
) -> Parts:
    """Create every part (nothing started yet).

    A worker of several passes the tokenizer loaded before the fork, its `workers` count (the
    Redis fallback then takes a fair share of each key's limits) and, without Redis, `shared`:
    the limits, spend windows and ledger its supervisor keeps for all workers, with their joint
    admission (one round trip), and `shared_sessions`: the sticky-session pins it keeps.
    """
    store = store or StateStore()
    metrics = Metrics(enabled=config.metrics_enabled)
    r = config.redis
    redis = (
        RedisStore(
            r.url,
            prefix=r.prefix,
            retry_interval=r.retry_interval_seconds,
            retry_max_interval=r.retry_max_interval_seconds,
        )
        if r.url
        else None
    )
    share = config.redis.fallback_instances * workers
    limits: Limits
    ledger: Ledger
    spend: SpendWindows | None = None
    joint: Joint | None = None
    if redis:
        redis_limits = RedisLimits(redis, share=share)
        allowance = config.redis.fallback_balance_nanos
        redis_ledger = RedisLedger(redis, share=share, allowance=allowance)
        redis_spend = RedisSpend(redis)
        limits, ledger, spend = redis_limits, redis_ledger, redis_spend
        joint = RedisAdmission(redis_limits, redis_spend, redis_ledger)
    elif shared is not None:
        limits, ledger, spend, joint = shared.limits, shared.ledger, shared.spend, shared.joint
    else:
        limits, ledger = LocalLimits(), LocalLedger()
    a = config.admission
    admission = Admission(
        limits=limits,
        ledger=ledger,
        spend=spend,
        joint=joint,
        settings=AdmissionSettings(
            default_max_tokens=a.default_max_tokens,
            resale_window_seconds=a.resale_window_seconds,
            resale_max_ips=a.resale_max_ips,
            resale_max_user_agents=a.resale_max_user_agents,
            count_tokens_per_minute=a.count_tokens_per_minute,
            trusted_proxies=tuple(config.server.trusted_proxies),
        ),
    )
    b = config.billing
    writer = BillingWriter(
        open_sink(b.database_url),
        Spool(b.spool_dir),
        batch_size=b.batch_size,
        flush_interval=b.flush_interval_seconds,
        queue_max=b.queue_max,
        spool_max_rows=b.spool_max_rows,
        on_flush=metrics.flush_observe,
    )
    u = config.upstream
    health = ChannelHealth(
        base_cooldown=u.base_cooldown_seconds,
        max_cooldown=u.max_cooldown_seconds,
        failure_threshold=u.failure_threshold,
        credential_cooldown=u.credential_cooldown_seconds,
    )
    router = Router()
    st = config.sticky
    sticky = StickyTable(ttl=st.ttl_seconds, max_sessions=st.max_sessions) if st.enabled else None
    if sticky is None:
        shared_sessions = None
    elif redis is not None:  # pins shared by every instance
        shared_sessions = RedisSessions(redis, st.ttl_seconds)
    if sticky is not None and shared_sessions is not None:  # or by the workers of this one
        sticky.publish = shared_sessions.place
        sticky.on_renew = shared_sessions.renew
    store.subscribe(health.on_state)
    store.subscribe(router.on_state)
    if u.fast_client is not None:
        log.warning("config_key_ignored", key="upstream.fast_client")
    return Parts(
        config=config,
        store=store,
        metrics=metrics,
        upstream=Upstream(u),
        health=health,
        router=router,
        sticky=sticky,
        shared_sessions=shared_sessions,
        redis=redis,
        broadcast=Broadcast(redis) if redis else None,
        writer=writer,
        admission=admission,
        ledger=ledger,
        limits=limits,
        tokenizer=tokenizer or estimate.Tokenizer(),
        workers=workers,
    )


def create_app(config: Config, parts: Parts | None = None) -> web.Application:
    """The client-facing application with every part wired in."""
    parts = parts or build_parts(config)
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[PARTS] = parts
    app[MAX_BODY] = config.server.max_body_bytes
    trusted = parse_networks(config.server.trusted_proxies)
    pipeline = Pipeline(
        store=parts.store,
        relay=Relay(parts.upstream, parts.health, parts.router, parts.metrics, FlowControl),
        admission=parts.admission,
        writer=parts.writer,
        metrics=parts.metrics,
        tokenizer=parts.tokenizer,
        client_ip=lambda request: client_address(request.remote, request.headers, trusted),
        request_log=logs.request_log,
        default_max_tokens=config.admission.default_max_tokens,
        max_tool_calls=config.admission.max_tool_calls,
        unbounded_reserve_nanos=config.admission.unbounded_reserve_nanos,
        sticky=parts.sticky,
        shared_sessions=parts.shared_sessions,
    )
    wire_sources(
        parts.metrics,
        writer=parts.writer,
        store=parts.store,
        ready=lambda: parts.readiness()[0],
        redis_fallback=lambda: parts.redis is not None and parts.redis.fallback_active,
        resale_flagged=parts.admission.resale.flagged_count,
        channel_health=parts.channel_health,
    )
    if parts.sticky is not None:
        table = parts.sticky
        parts.metrics.add_source(metric_sources.STICKY_SESSIONS, table.counts)
        parts.metrics.add_source(metric_sources.STICKY_PINNED, lambda: [((), float(len(table)))])
    app.router.add_routes(ClientHandlers(pipeline).routes())
    app.router.add_routes(count_routes(pipeline))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    connection.install(app, parts.metrics, parts.connections, config.server.server_header)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_state_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_billing_ctx)
    return app


def create_ops_app(parts: Parts) -> web.Application:
    """/metrics, /healthz and /readyz of this process alone, for `server.metrics_listen`."""
    app = web.Application()
    app[PARTS] = parts
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", own_metrics_handler)
    app.on_response_prepare.append(server_header_hook(parts.config.server.server_header))
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    if parts.redis is None or parts.broadcast is None:
        yield
        return
    for kind in sync.KINDS:
        parts.broadcast.subscribe(kind, sync.applier(parts.store, kind))
    await parts.redis.start()
    await parts.broadcast.start()
    yield
    await parts.broadcast.close()
    if parts.shared_sessions is not None:
        await parts.shared_sessions.drain()
    await parts.redis.close()


def create_control(parts: Parts) -> web.Application:
    """The control API on the same parts; other instances hear of its changes over Redis."""
    token = parts.config.server.admin_token
    if token is None:
        raise ValueError("server.admin_token: the control API needs an admin token")
    broadcast = parts.broadcast
    publish = _publisher(parts.fan_out, broadcast.publish if broadcast else None)
    app = create_control_app(
        store=parts.store,
        ledger=parts.ledger,
        limits=parts.limits,
        channel_health=parts.channel_health,
        admin_token=token,
        allow_cidrs=list(parts.config.server.control_allow_cidrs),
        max_body_bytes=parts.config.server.max_body_bytes,
        on_change=sync.Publisher(parts.store, publish) if publish else None,
        spend=parts.admission.spend,
    )
    app.on_response_prepare.append(server_header_hook(parts.config.server.server_header))
    return app


def _publisher(*publishers: sync.Publish | None) -> sync.Publish | None:
    """One publish that hands a push to each of `publishers` in turn (this host's workers first)."""
    chosen = [p for p in publishers if p is not None]
    if len(chosen) <= 1:
        return chosen[0] if chosen else None

    async def publish(kind: str, payload: bytes, /, *, version: int | None = None) -> None:
        for each in chosen:
            await each(kind, payload, version=version)

    return publish


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    await asyncio.to_thread(parts.tokenizer.load)  # 0.4 s once, off the event loop
    cp = parts.config.control_plane
    boot = Bootstrap(
        parts.store,
        parts.ledger,
        snapshot=parts.config.state,
        url=cp.snapshot_url,
        token=cp.snapshot_token,
        poll_interval=cp.poll_interval_seconds,
    )
    if cp.snapshot_url is not None and isinstance(parts.ledger, RedisLedger):
        parts.ledger.snapshot_balance = boot.balance_of  # for balances Redis forgot
    await boot.start()  # with a URL: fetched in the background; /readyz waits for it
    yield
    await boot.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    await parts.upstream.start()
    yield
    await parts.upstream.close()


async def _billing_ctx(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    b = parts.config.billing
    migrating: asyncio.Task[None] | None = None
    if not await _migrate_once(b.database_url):  # away: spool, and keep trying in the background
        migrating = asyncio.create_task(_migrate_until_done(b.database_url))
    await parts.writer.start()
    retention = asyncio.create_task(_retention(b.database_url, b.retention_days))
    yield
    for task in (retention, migrating):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await parts.writer.close()


async def _migrate_once(url: str) -> bool:
    """Create or upgrade the billing schema; False (logged) when the database is away."""
    try:
        await asyncio.wait_for(migrate(url), timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure here only means "spool until it is back"
        log.warning("billing_migrate_failed", error=type(exc).__name__)
        return False
    return True


async def _migrate_until_done(url: str) -> None:
    delay = 1.0
    while not await _migrate_once(url):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


async def _retention(url: str, days: int) -> None:
    """Keep partitions ahead and drop expired ones, on a sink of its own."""
    sink = open_sink(url)
    try:
        while True:
            try:
                await sink.open()
                break
            except Exception as exc:  # noqa: BLE001 - retried; the database may come back
                log.warning("billing_retention_waiting", error=type(exc).__name__)
                await asyncio.sleep(30)
        await retention_task(sink, days=days)
    finally:
        await sink.close()


async def healthz(request: web.Request) -> web.Response:
    """The process answers."""
    return web.json_response({"status": "ok"}, headers={"x-request-id": _rid()})


async def readyz(request: web.Request) -> web.Response:
    """State loaded and billing writable or spooling within bounds; the reason when not."""
    parts = request.app[PARTS]
    ok, reason = parts.readiness()
    body = {"ready": ok, "reason": reason, **parts.detail()}
    return web.json_response(body, status=200 if ok else 503, headers={"x-request-id": _rid()})


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition (of every worker, on the client port of a supervisor's worker)."""
    parts = request.app[PARTS]
    if parts.scrape is None:
        return await own_metrics_handler(request)
    return _metrics_response(await parts.scrape(), CONTENT_TYPE)


async def own_metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process alone."""
    return _metrics_response(*request.app[PARTS].metrics.render())


def _metrics_response(body: bytes, content_type: str) -> web.Response:
    response = web.Response(body=body, headers={"x-request-id": _rid()})
    response.headers["Content-Type"] = content_type
    return response


def _rid() -> str:
    return f"req_{time.time_ns():x}"
