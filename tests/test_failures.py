"""The one table from the h1 client's failures to proxyd's words, before and after the head."""

from __future__ import annotations

import pytest

from proxyd.upstream.failures import KINDS, AttemptKind, failed
from proxyd.upstream.h1 import (
    BadTarget,
    ConnectError,
    ConnectTimeout,
    H1Error,
    PoolClosed,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
)

K = AttemptKind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # no answer's head: another channel may be tried
        (ConnectError("refused"), K.CONNECT_ERROR),
        (ConnectTimeout("slow handshake"), K.TIMEOUT),
        (PoolTimeout("no free connection"), K.TIMEOUT),
        (PoolClosed("shutting down"), K.CONNECT_ERROR),
        (ReadTimeout("no head"), K.TIMEOUT),
        (ProtocolError("closed before answering"), K.CONNECT_ERROR),
        (BadTarget("not an http(s) URL"), K.CONNECT_ERROR),
        # the head had arrived: the answer broke off
        (ReadTimeout("body stalled", status=200), K.STALLED),
        (ProtocolError("closed mid-body", status=200), K.RESET),
        (ProtocolError("malformed chunk", status=200), K.RESET),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_each_client_failure_has_one_kind(exc: H1Error | BadTarget, kind: AttemptKind) -> None:
    assert failed(exc).kind is kind


def test_the_table_covers_every_failure_the_client_raises() -> None:
    """Every exception class of the h1 client is in the table (a new one fails this test)."""
    import proxyd.upstream.h1 as h1

    ours = h1.__name__
    raised = {
        obj
        for obj in vars(h1).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__.startswith(ours)
    }
    assert raised <= set(KINDS), sorted(c.__name__ for c in raised - set(KINDS))


def test_a_failed_attempt_says_only_proxyds_words() -> None:
    """What crosses the boundary carries a kind, not the client's exception or its message."""
    out = failed(ConnectError("cannot connect to 10.0.0.7:443: secret-host"))
    assert str(out) == "connect_error"
    assert out.__cause__ is None
    assert (out.status, out.body, out.headers) == (None, None, None)
