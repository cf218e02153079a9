"""The supervisor process: binds the listeners, forks the workers, restarts, drains and reloads.

A plain selector loop on one thread (no asyncio, so forking a replacement is always safe). It
routes the workers' messages: shared limits and balances to the hub, pushes to every other
worker (answered once all have applied them), scrapes to every worker (answered with all their
series). It never serves a client request.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.process_collector import ProcessCollector

from proxyd.config import Config, ConfigError, load_config, split_host_port
from proxyd.observability import logs, merge
from proxyd.protocol import estimate
from proxyd.state import sync
from proxyd.state.store import StateStore
from proxyd.supervisor import spawn
from proxyd.supervisor.frames import FrameError, Message, encode
from proxyd.supervisor.hub import Hub
from proxyd.supervisor.rounds import Rounds, WorkerProc
from proxyd.supervisor.table import SharedTable

log = structlog.get_logger("proxyd.supervisor")

STABLE_SECONDS = 30.0  # a worker that ran this long restarts at once; earlier ones back off
KILL_MARGIN_SECONDS = 10.0  # after the grace period, workers still draining are killed
TABLE_KEYS = TABLE_ACCOUNTS = 1 << 16  # slots of the shared table; beyond, the hub answers


class Supervisor:
    """Runs `workers` worker processes until SIGTERM or SIGINT; SIGHUP replaces them in turn."""

    def __init__(
        self,
        config: Config,
        *,
        workers: int,
        config_path: str | None,
        run_worker: Callable[[Config, Any], int],
    ) -> None:
        self.config = config
        self.workers = workers
        self.config_path = config_path
        self._run_worker = run_worker
        st = config.sticky
        # Without Redis, several workers admit against one table mapped into each of them: a
        # column per live worker process (a reload's replacement overlaps the one it replaces),
        # and the hub's own last.
        self.table = (
            SharedTable(keys=TABLE_KEYS, accounts=TABLE_ACCOUNTS, columns=2 * workers + 1)
            if workers > 1 and not config.redis.url
            else None
        )
        self.hub = Hub(
            sticky_ttl=st.ttl_seconds if st.enabled and not config.redis.url else None,
            sticky_max=st.max_sessions,
            table=self.table,
            column=self.table.hub_column if self.table is not None else 0,
        )
        self.store = StateStore()
        self.tokenizer = estimate.Tokenizer()
        self._procs: dict[int, WorkerProc] = {}
        self._dirty: set[WorkerProc] = set()
        self._sel = selectors.DefaultSelector()
        self._buffer = bytearray(1 << 18)  # what one read of a worker's channel takes at most
        self._view = memoryview(self._buffer)
        self._signals: list[int] = []
        self._restart_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._rolling: list[int] = []
        self._stopping = False
        self._kill_at: float | None = None
        self._exit = 0
        self.listen_sock: socket.socket | None = None
        self.control_sock: socket.socket | None = None
        # server.metrics_listen: one socket per slot, bound once, so a reload's new worker
        # takes over the old one's (no scrape queued on a closing socket is reset)
        self.metrics_socks: list[socket.socket] = []
        self.registry = CollectorRegistry()
        ProcessCollector(namespace="proxyd", registry=self.registry)
        Gauge(
            "proxyd_workers", "Worker processes serving now.", registry=self.registry
        ).set_function(lambda: sum(p.role == "current" for p in self._procs.values()))
        self.restarts = Counter(
            "proxyd_worker_restarts_total",
            "Workers restarted after they died, by slot.",
            ("worker",),
            registry=self.registry,
        )
        self.rounds = Rounds(self._procs, self.send, lambda: merge.snapshot(self.registry))

    # -- start ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Bind the listeners and load what the workers share read-only (raises on a mistake)."""
        self.listen_sock = spawn.bind(self.config.server.listen)
        if self.config.server.admin_token:
            self.control_sock = spawn.bind(self.config.server.control_listen, backlog=128)
        if self.config.server.metrics_listen:
            host, port = split_host_port(self.config.server.metrics_listen)
            self.metrics_socks = [
                spawn.bind(f"{host}:{port + slot}", backlog=128) for slot in range(self.workers)
            ]
        self._load_state(self.config)
        self.tokenizer.load()
        import proxyd.app  # noqa: F401 - every module the workers run, imported once and shared

        gc.collect()
        gc.freeze()  # start-up objects stay where they are: their pages stay shared after fork

    def _load_state(self, config: Config) -> None:
        if config.control_plane.snapshot_url is not None:
            return  # each worker fetches the control plane's snapshot itself
        from proxyd.control.bootstrap import newer_sections

        fresh = newer_sections(config.state, self.store.current)
        if fresh.keys or fresh.prices or fresh.channels or not self.store.loaded:
            self.store.load(fresh)

    def run(self) -> int:
        """Fork the workers and supervise them; the exit status."""
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self._wake = (rfd, wfd)
        self._sel.register(rfd, selectors.EVENT_READ, None)
        log.info(
            "supervisor_started",
            workers=self.workers,
            listen=self.config.server.listen,
            pid=os.getpid(),
        )
        for slot in range(self.workers):
            self._spawn(slot)
        while not (self._stopping and not self._procs):
            for key, mask in self._sel.select(self._timeout()):
                if isinstance(key.data, WorkerProc):
                    self._io(key.data, mask)
                else:
                    self._drain_wakeup()
            while self._dirty:  # one write per worker per turn, however many replies it has
                self._flush(self._dirty.pop())
            if self._signals:
                self._handle_signals()
            if self._restart_at or self.rounds.waiting or self._kill_at:
                self._timers()
        log.info("supervisor_stopped", status=self._exit)
        return self._exit

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake[0], 512):
                pass
        except BlockingIOError:
            pass

    # -- workers --------------------------------------------------------------------------------

    def _spool_index(self) -> int:
        used = {p.spool for p in self._procs.values()}
        return next(i for i in itertools.count() if i not in used)

    def _spawn(self, slot: int, role: str = "current") -> None:
        spool = self._spool_index()
        config = spawn.worker_config(self.config, spool)
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; its work is the worker's tests
            parent.close()
            assert self.listen_sock is not None
            inherited = [p.sock for p in self._procs.values()]
            if slot != 0 and self.control_sock is not None:
                inherited.append(self.control_sock)
            inherited += [m for i, m in enumerate(self.metrics_socks) if i != slot]
            signal.set_wakeup_fd(-1)
            os.close(self._wake[0])
            os.close(self._wake[1])
            self._sel.close()
            context = spawn.Inherited(
                slot=slot,
                workers=self.workers,
                sock=child,
                listen_sock=self.listen_sock,
                control_sock=self.control_sock if slot == 0 else None,
                metrics_sock=self.metrics_socks[slot] if self.metrics_socks else None,
                store=self.store,
                tokenizer=self.tokenizer,
                table=self.table,
                column=spool,
            )
            os._exit(spawn.child_main(config, context, inherited, self._run_worker))
        child.close()
        parent.setblocking(False)
        proc = WorkerProc(slot=slot, pid=pid, sock=parent, spool=spool, role=role)
        self._procs[pid] = proc
        self._sel.register(parent, selectors.EVENT_READ, proc)
        log.info("worker_started", worker=slot, pid=pid, role=role)

    def _io(self, proc: WorkerProc, mask: int) -> None:
        sock = proc.sock
        if mask & selectors.EVENT_WRITE:
            self._flush(proc)
        if mask & selectors.EVENT_READ:
            try:  # into one buffer reused for every read (recv(n) would allocate n bytes each)
                size = sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                size = 0
            if not size:
                self._unregister(proc)
                return
            try:
                messages = proc.frames.feed(self._view[:size])
            except FrameError:
                log.exception("worker_channel_garbled", worker=proc.slot, pid=proc.pid)
                self._unregister(proc)
                return
            for message in messages:
                try:
                    self._dispatch(proc, message)
                except Exception:  # one bad message must not stop the supervisor
                    log.exception("worker_message_failed", worker=proc.slot, op=message.get("op"))

    def _unregister(self, proc: WorkerProc) -> None:
        try:
            self._sel.unregister(proc.sock)
        except (KeyError, ValueError):
            return
        proc.sock.close()

    def send(self, proc: WorkerProc, message: Message) -> None:
        """Queue a message to a worker; written once this turn of the loop has read everything."""
        if proc.sock.fileno() < 0:
            return
        proc.out += encode(message)
        self._dirty.add(proc)

    def _flush(self, proc: WorkerProc) -> None:
        try:
            while proc.out:
                sent = proc.sock.send(proc.out)
                del proc.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            proc.out.clear()
        writing = bool(proc.out)
        if writing != proc.writing:  # epoll_ctl only when the interest changes
            proc.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(proc.sock, events, proc)

    def _dispatch(self, proc: WorkerProc, message: Message) -> None:
        op = message.get("op")
        if op is None:
            self.rounds.answered(proc, message)
        elif op == "ready":
            self._ready(proc)
        elif op == "push":
            self._fan_out(proc, message)
        elif op == "collect":
            self._collect(proc, message)
        else:
            reply = self.hub.handle(proc.pid, message)
            if reply is not None:
                self.send(proc, reply)

    def _ready(self, proc: WorkerProc) -> None:
        proc.ready = True
        log.info("worker_ready", worker=proc.slot, pid=proc.pid)
        if proc.role != "incoming":
            return
        for old in self._procs.values():
            if old.slot == proc.slot and old.role == "current":
                self._retire(old)
        proc.role = "current"
        self._roll_next()

    def _retire(self, proc: WorkerProc) -> None:
        proc.role = "retiring"
        self._signal(proc, signal.SIGTERM)

    @staticmethod
    def _signal(proc: WorkerProc, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    # -- pushes and scrapes ---------------------------------------------------------------------

    def _fan_out(self, origin: WorkerProc, message: Message) -> None:
        kind, body = message["kind"], message["body"]
        sync.apply(self.store, kind, body.encode())  # so workers forked later start with it
        targets = [p for p in self._procs.values() if p is not origin and p.sock.fileno() >= 0]
        self.rounds.ask(origin, message["id"], targets, {"op": "apply", "kind": kind, "body": body})

    def _collect(self, origin: WorkerProc, message: Message) -> None:
        targets = [
            p
            for p in self._procs.values()
            if p.role == "current" and p.ready and p.sock.fileno() >= 0
        ]
        if origin not in targets:
            targets.append(origin)
        self.rounds.ask(origin, message["id"], targets, {"op": "collect"})

    # -- signals, deaths, timers ----------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self._stop(sig)

    def _stop(self, sig: int) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.server.shutdown_grace_seconds
        log.info("supervisor_stopping", signal=signal.Signals(sig).name, grace_seconds=grace)
        self._restart_at.clear()
        self._rolling.clear()
        for sock in (self.listen_sock, self.control_sock, *self.metrics_socks):
            if sock is not None:
                sock.close()  # the workers hold their own copies until they have drained
        for proc in self._procs.values():
            self._signal(proc, signal.SIGTERM)
        self._kill_at = time.monotonic() + grace + KILL_MARGIN_SECONDS

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self._procs.pop(pid, None)
            if proc is not None:
                self._gone(proc, status)

    def _gone(self, proc: WorkerProc, status: int) -> None:
        self._unregister(proc)
        grants, reservations = self.hub.forget(proc.pid)
        nanos = 0
        if self.table is not None and proc.spool < self.table.hub_column:
            slots, nanos = self.table.forget(proc.spool)
            grants += slots
        self.rounds.gone(proc.pid)
        code = os.waitstatus_to_exitcode(status)
        how = {"exit_status": code} if code >= 0 else {"signal": signal.Signals(-code).name}
        if self._stopping or proc.role == "retiring":
            log.info("worker_stopped", worker=proc.slot, pid=proc.pid, **how)
            if code not in (0, -signal.SIGTERM) and self._stopping:
                self._exit = self._exit or 1
            return
        if code == 2 and not proc.ready:  # a configuration the worker refused: no point retrying
            log.error("worker_refused_configuration", worker=proc.slot, pid=proc.pid)
            if proc.role == "incoming":
                self._abort_reload()
                return
            self._exit = 2
            self._stop(signal.SIGTERM)
            return
        ran = time.monotonic() - proc.started
        failures = 0 if ran >= STABLE_SECONDS else self._failures.get(proc.slot, 0) + 1
        self._failures[proc.slot] = failures
        delay = 0.0 if failures == 0 else min(30.0, 0.25 * 2 ** (failures - 1))
        log.error(
            "worker_exited",
            worker=proc.slot,
            pid=proc.pid,
            restart_in=delay,
            released_slots=grants,
            released_reservations=reservations,
            released_nanos=nanos,
            **how,
        )
        if proc.role == "incoming":
            self._abort_reload()
            return
        self._restart_at[proc.slot] = time.monotonic() + delay

    def _timeout(self) -> float | None:
        if not (self._restart_at or self.rounds.waiting or self._kill_at):
            return None  # the common case: nothing is due, wait for the workers
        others = (self.rounds.next_deadline(), self._kill_at)
        dues = [*self._restart_at.values(), *(d for d in others if d is not None)]
        if not dues:
            return None
        return max(0.0, min(dues) - time.monotonic())

    def _timers(self) -> None:
        now = time.monotonic()
        for slot, due in list(self._restart_at.items()):
            if due <= now:
                del self._restart_at[slot]
                self.restarts.labels(str(slot)).inc()
                self._spawn(slot)
        self.rounds.expire(now)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for proc in self._procs.values():
                log.error("worker_killed_after_grace", worker=proc.slot, pid=proc.pid)
                self._signal(proc, signal.SIGKILL)
            self._exit = self._exit or 1

    # -- reload ---------------------------------------------------------------------------------

    def _reload(self) -> None:
        if self._stopping:
            return
        if self._rolling or any(p.role == "incoming" for p in self._procs.values()):
            log.warning("reload_ignored", reason="a reload is still replacing workers")
            return
        try:
            config = load_config(self.config_path)
            if config.server.listen != self.config.server.listen or (
                config.server.control_listen != self.config.server.control_listen
            ):
                log.warning("reload_listen_unchanged", reason="listeners change on restart only")
                config = config.model_copy(
                    update={
                        "server": config.server.model_copy(
                            update={
                                "listen": self.config.server.listen,
                                "control_listen": self.config.server.control_listen,
                            }
                        )
                    }
                )
            self._load_state(config)
        except (ConfigError, ValueError) as exc:
            log.error("reload_failed", error=str(exc)[:500])  # noqa: TRY400 - no traceback for a typo
            return
        self.config = config
        logs.configure_logging(config.logging.level, config.logging.format)
        log.info("reloading", workers=self.workers)
        self._rolling = sorted({p.slot for p in self._procs.values() if p.role == "current"})
        self._roll_next()

    def _roll_next(self) -> None:
        if self._rolling and not self._stopping:
            self._spawn(self._rolling.pop(0), role="incoming")
        elif not self._stopping and not any(p.role == "incoming" for p in self._procs.values()):
            log.info("reloaded", workers=self.workers)

    def _abort_reload(self) -> None:
        self._rolling.clear()
        log.error("reload_aborted", reason="a new worker did not start; the old ones keep serving")


def supervise(
    config: Config,
    *,
    workers: int,
    config_path: str | None,
    run_worker: Callable[[Config, Any], int],
) -> int:
    """`proxyd serve --workers N` (N > 1): the supervisor's whole life; the exit status."""
    supervisor = Supervisor(config, workers=workers, config_path=config_path, run_worker=run_worker)
    try:
        supervisor.prepare()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"proxyd: cannot listen: {exc.strerror}", file=sys.stderr)
            return 1
        raise
    return supervisor.run()
