"""proxyd's own HTTP/1.1 client for whole (non-stream) answers: `H1Pool.post` returns the answer.

Only `proxyd.attempt` uses it; streams stay on aiohttp. Never logs, keeps or inspects a body.
"""

from proxyd.h1.pool import H1Pool
from proxyd.h1.wire import Answer, BadTarget, H1Error, Target, request_head, target_of

__all__ = ["Answer", "BadTarget", "H1Error", "H1Pool", "Target", "request_head", "target_of"]
