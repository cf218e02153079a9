"""What happened to one request: the per-request record the billing row is made from.

Plain data; imports nothing of aiohttp and never holds a body beyond the request's own answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxyd.errors import ErrorType
from proxyd.protocol.usage import StreamUsage, Usage


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in as it goes; the billing row is made from it."""

    channel_id: str | None = None
    upstream_model: str | None = None
    status: int = 0
    error_type: ErrorType | None = None
    usage: Usage | None = None
    response_text: str | None = None  # a non-stream answer without usage, to count offline
    answer: bytes | None = None  # a native whole answer: its usage is read once it was sent
    scanner: StreamUsage | None = None
    first_byte_at: float | None = None  # loop time when the first byte went to the client
    sent: bool = False  # whether anything reached the client
