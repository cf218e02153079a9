"""The one boundary where an upstream client failure becomes proxyd's: `KINDS`, one table.

An h1 exception, and whether the answer's head had arrived, becomes an `AttemptKind`, carried by
`AttemptFailed`; nothing above `proxyd.upstream` sees the client's own exceptions (nor an
`OSError`). Pure module: no I/O.
"""

from __future__ import annotations

from enum import StrEnum

from multidict import CIMultiDictProxy

from proxyd.upstream.h1 import (
    Abandoned,
    BadTarget,
    ConnectError,
    ConnectTimeout,
    H1Error,
    PoolClosed,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
)


class AttemptKind(StrEnum):
    """What happened to one attempt on one channel: proxyd's words for an upstream failure."""

    CONNECT_ERROR = "connect_error"  # no connection (refused, DNS, TLS handshake, proxy)
    TIMEOUT = "timeout"  # no response head within the time allowed (or no pooled connection)
    RESPONSE = "response"  # the upstream answered with a status line and headers
    RESET = "reset"  # the connection broke after the response head
    STALLED = "stalled"  # the body stopped arriving (read or chunk timeout) after the head
    CLIENT_GONE = "client_gone"  # the client went away while its answer was being relayed


# The one table: an h1 failure, before the answer's head arrived and after it. The most
# specific class wins (the lookup walks each exception's class hierarchy).
KINDS: dict[type[Exception], tuple[AttemptKind, AttemptKind]] = {
    ConnectError: (AttemptKind.CONNECT_ERROR, AttemptKind.RESET),
    ConnectTimeout: (AttemptKind.TIMEOUT, AttemptKind.STALLED),
    PoolTimeout: (AttemptKind.TIMEOUT, AttemptKind.STALLED),
    PoolClosed: (AttemptKind.CONNECT_ERROR, AttemptKind.RESET),
    ReadTimeout: (AttemptKind.TIMEOUT, AttemptKind.STALLED),
    # a connection the upstream closed before answering (a stale keep-alive one, say) is a
    # failed connection; one that breaks off a body is a reset
    ProtocolError: (AttemptKind.CONNECT_ERROR, AttemptKind.RESET),
    # proxyd itself dropped the exchange (the body it wanted was read, or a stream let go)
    Abandoned: (AttemptKind.CONNECT_ERROR, AttemptKind.RESET),
    H1Error: (AttemptKind.CONNECT_ERROR, AttemptKind.RESET),
    # a channel URL or header the client cannot send: the channel cannot be reached
    BadTarget: (AttemptKind.CONNECT_ERROR, AttemptKind.RESET),
}


class AttemptFailed(Exception):
    """One attempt failed, in proxyd's terms: what happened (`kind`) and, for an error answer
    (kind RESPONSE), its status, body (as the provider sent it) and headers."""

    def __init__(
        self,
        kind: AttemptKind,
        status: int | None = None,
        body: bytes | None = None,
        headers: CIMultiDictProxy[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(kind.value)
        self.kind = kind
        self.status = status
        self.body = body
        self.headers = headers
        self.retry_after = retry_after


def failed(exc: H1Error | BadTarget) -> AttemptFailed:
    """The h1 client's failure `exc` in proxyd's terms, by the one table `KINDS`."""
    after_head = isinstance(exc, H1Error) and exc.head_arrived
    for cls in type(exc).__mro__:
        kinds = KINDS.get(cls)
        if kinds is not None:
            return AttemptFailed(kinds[1] if after_head else kinds[0])
    raise TypeError(f"not an upstream client failure: {type(exc).__name__}")  # pragma: no cover
