"""proxyd's own HTTP/1.1 client: `H1Pool.post` returns a whole answer, `H1Pool.open` a stream.

Only `proxyd.upstream` uses it. Never logs, keeps or inspects a body.
"""

from proxyd.upstream.h1.errors import (
    Abandoned,
    ConnectError,
    ConnectTimeout,
    H1Error,
    PoolClosed,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
)
from proxyd.upstream.h1.pool import H1Pool, Stream
from proxyd.upstream.h1.wire import Answer, BadTarget, Target, request_head, target_of

__all__ = [
    "Abandoned",
    "Answer",
    "BadTarget",
    "ConnectError",
    "ConnectTimeout",
    "H1Error",
    "H1Pool",
    "PoolClosed",
    "PoolTimeout",
    "ProtocolError",
    "ReadTimeout",
    "Stream",
    "Target",
    "request_head",
    "target_of",
]
