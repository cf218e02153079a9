"""The h1 client's failures: a small tree, each knowing whether the answer's head had arrived.

Callers outside `proxyd.upstream` never see these: `proxyd.upstream.failures` turns each into
proxyd's words with one table. Messages name what failed, never a body or a credential.
"""

from __future__ import annotations

from typing import ClassVar


class H1Error(Exception):
    """A request that got no complete answer; `status` is non-zero once its head had arrived."""

    timeout: ClassVar[bool] = False  # whether it failed by waiting too long

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def head_arrived(self) -> bool:
        """Whether the answer's status line and headers had arrived before it failed."""
        return self.status != 0


class ConnectError(H1Error):
    """No connection: refused, unreachable, DNS, the TLS handshake, or a proxy that refused."""


class ConnectTimeout(H1Error):
    """The connection (with its TLS and proxy handshakes) took longer than allowed."""

    timeout = True


class PoolTimeout(H1Error):
    """No pooled connection became free within the pool's acquire timeout."""

    timeout = True


class PoolClosed(H1Error):
    """The pool is closed (proxyd is shutting down)."""


class ReadTimeout(H1Error):
    """Nothing arrived for longer than allowed: the head, or the next read of a whole answer."""

    timeout = True


class ProtocolError(H1Error):
    """The answer broke: malformed, or the upstream closed the connection before its end."""


class Abandoned(H1Error):
    """The caller gave up on the exchange (it read enough, or dropped the stream)."""
