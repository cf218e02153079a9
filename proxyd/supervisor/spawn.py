"""What a forked worker starts from: the listening sockets, its own config, and its first steps.

Runs in the child right after `fork()`: signals back to their defaults (SIGHUP ignored: reloads
are the supervisor's), the supervisor's descriptors closed, then the worker's own serve loop.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from proxyd.config import Config, split_host_port
from proxyd.protocol import estimate
from proxyd.state.store import StateStore
from proxyd.supervisor.table import SharedTable

log = structlog.get_logger("proxyd.supervisor")


def bind(address: str, backlog: int = 4096) -> socket.socket:
    """A listening socket on `host:port` the workers inherit (SO_REUSEPORT for other processes).

    One socket, one accept queue for every worker: a worker that dies or drains leaves no
    connection stranded in a queue of its own, as per-worker SO_REUSEPORT sockets would.
    """
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=True)
    sock.set_inheritable(True)
    return sock


def worker_config(config: Config, spool: int) -> Config:
    """A worker's config: a spool directory of its own (its `server.metrics_listen` port, that
    address plus its slot, is the socket the supervisor bound: `Supervisor.prepare`)."""
    billing = config.billing.model_copy(
        update={"spool_dir": f"{config.billing.spool_dir}/worker-{spool}"}
    )
    return config.model_copy(update={"billing": billing})


@dataclass
class Inherited:
    """What the child takes over from the supervisor."""

    slot: int
    workers: int
    sock: socket.socket  # its end of the channel
    listen_sock: socket.socket
    control_sock: socket.socket | None
    store: StateStore
    tokenizer: estimate.Tokenizer
    table: SharedTable | None = None  # limits and balances mapped into every worker (no Redis)
    column: int = -1  # this worker's column of it
    metrics_sock: socket.socket | None = None  # its slot's server.metrics_listen socket


def child_main(
    config: Config,
    inherited: Inherited,
    close: list[socket.socket],
    run_worker: Callable[[Config, Any], int],
) -> int:  # pragma: no cover - runs in the forked child; the worker tests cover it
    """The forked child's whole life; its exit status."""
    code = 70
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for sock in close:
            sock.close()
        from proxyd.supervisor.link import Link
        from proxyd.supervisor.worker import WorkerContext

        structlog.contextvars.bind_contextvars(worker=inherited.slot)
        context = WorkerContext(
            slot=inherited.slot,
            workers=inherited.workers,
            link=Link(inherited.sock, slot=inherited.slot, workers=inherited.workers),
            listen_sock=inherited.listen_sock,
            control_sock=inherited.control_sock,
            metrics_sock=inherited.metrics_sock,
            store=inherited.store,
            tokenizer=inherited.tokenizer,
            table=inherited.table,
            column=inherited.column,
        )
        code = run_worker(config, context)
    except BaseException:
        log.exception("worker_crashed", worker=inherited.slot)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code
