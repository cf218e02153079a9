"""What happened to one request: the per-request record its billing row is made from.

Each fact is recorded once, by the step that learns it, through a method named after the fact
(`deliver`, `first_byte`, `fail`, `client_left`, `saw_usage`, ...); recording one a second time
raises `RecordedTwice`, so two steps can never silently disagree about a request. The record
step reads it; nothing else does.

Plain data; imports nothing of aiohttp and holds no body beyond the request's own answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxyd.errors import ErrorType
from proxyd.protocol.usage import StreamUsage, Usage


class RecordedTwice(RuntimeError):
    """A fact about a request was recorded again: a bug in the step that recorded it."""


@dataclass(slots=True)
class Outcome:
    """What happened to one request, one fact at a time. Read the fields; write by method."""

    channel_id: str | None = None  # the channel of the attempt that answered (or the last one)
    upstream_model: str | None = None
    status: int = 0  # the status of the upstream answer delivered to the client
    delivered: bool = False  # an upstream answer (or proxyd's own count) went to the client
    first_byte_at: float | None = None  # loop time when its first byte went to the client
    error_type: ErrorType | None = None  # how the request failed, when it did
    error_status: int = 0
    left: bool = False  # the client went away before its answer was complete
    usage: Usage | None = None  # the provider's counts, when it gave them
    answer: bytes | None = None  # a native whole answer: its usage is read by the record step
    response_text: str | None = None  # an answer without usage, to count offline
    scanner: StreamUsage | None = None  # what a stream delivered, for its usage or an estimate
    offline: bool = False  # proxyd answered with its own estimate (token counting)

    # -- the attempt --------------------------------------------------------------------------
    def trying(self, channel_id: str, upstream_model: str) -> None:
        """The channel being tried now; each failover moves it, until an answer is delivered."""
        if self.delivered:
            raise RecordedTwice("a channel was tried after the answer was delivered")
        self.channel_id = channel_id
        self.upstream_model = upstream_model

    # -- the answer ---------------------------------------------------------------------------
    def deliver(self, status: int) -> None:
        """An upstream answer with `status` goes to the client (its head is committed)."""
        if self.delivered:
            raise RecordedTwice("the answer was delivered twice")
        self.delivered = True
        self.status = status

    def answered_offline(self, status: int) -> None:
        """proxyd answered itself, with its own estimate, on no channel."""
        self.deliver(status)
        self.offline = True
        self.channel_id = self.upstream_model = None

    def first_byte(self, at: float) -> None:
        """The first byte of the answer went to the client at loop time `at`."""
        if self.first_byte_at is not None:
            raise RecordedTwice("the first byte was recorded twice")
        self.first_byte_at = at

    def fail(self, error_type: ErrorType, status: int) -> None:
        """The request failed: the client got (or its stream ended with) this error."""
        if self.error_type is not None:
            raise RecordedTwice(f"the request failed twice ({self.error_type}, {error_type})")
        self.error_type = error_type
        self.error_status = status

    def client_left(self) -> None:
        """The client went away before its answer was complete."""
        if self.left:
            raise RecordedTwice("the client left twice")
        self.left = True

    # -- what the answer reported -------------------------------------------------------------
    def saw_usage(self, usage: Usage | None) -> None:
        """The provider's counts (None: it gave none; the record step estimates)."""
        if self.usage is not None:
            raise RecordedTwice("usage was recorded twice")
        self.usage = usage

    def whole_answer(self, raw: bytes) -> None:
        """A native whole answer, passed on as it is; its usage is read after it was sent."""
        if self.answer is not None:
            raise RecordedTwice("the answer was kept twice")
        self.answer = raw

    def answer_text(self, text: str | None) -> None:
        """The text of an answer that gave no usage, to count offline."""
        if self.response_text is not None:
            raise RecordedTwice("the answer's text was kept twice")
        self.response_text = text

    def streaming(self, scanner: StreamUsage) -> None:
        """The usage scanner fed with what a stream delivers."""
        if self.scanner is not None:
            raise RecordedTwice("a second stream was scanned")
        self.scanner = scanner

    # -- read by the record step --------------------------------------------------------------
    @property
    def status_code(self) -> int:
        """The row's status: 499 for a client that left, the error's, else the answer's."""
        if self.left:
            return 499
        if self.error_type is not None:
            return self.error_status
        return self.status or 500

    @property
    def final_error(self) -> ErrorType | None:
        """The row's error type."""
        return ErrorType.CLIENT_DISCONNECT if self.left else self.error_type
