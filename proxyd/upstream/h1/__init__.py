"""proxyd's own HTTP/1.1 client: `H1Pool.post` returns a whole answer, `H1Pool.open` a stream.

Only `upstream.attempt` and `relay.stream` use it. Never logs, keeps or inspects a body.
"""

from proxyd.upstream.h1.pool import H1Pool, Stream
from proxyd.upstream.h1.wire import Answer, BadTarget, H1Error, Target, request_head, target_of

__all__ = [
    "Answer",
    "BadTarget",
    "H1Error",
    "H1Pool",
    "Stream",
    "Target",
    "request_head",
    "target_of",
]
