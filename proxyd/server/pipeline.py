"""The pieces one request passes through, held together for the handler, and the record step.

Owns the decisions that join the steps: what to reserve at admission, the request's sticky
session, and how a finished request becomes its one usage record (the route step is
`proxyd.routing.route.route_call`). Never touches a body beyond counting.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from proxyd.admission.admit import Admission, Ticket
from proxyd.billing import pricing
from proxyd.billing.record import UsageRecord
from proxyd.billing.writer import BillingWriter
from proxyd.observability.metrics import Metrics
from proxyd.protocol.call import Call
from proxyd.protocol.estimate import Tokenizer
from proxyd.protocol.paid import max_calls, paid_features
from proxyd.protocol.usage import Usage, completion_text, usage_from_body
from proxyd.relay.outcome import Outcome
from proxyd.relay.relay import Relay
from proxyd.routing.sticky import Session, StickyTable, session_id
from proxyd.state.store import Channel, State, StateStore

# Body parts naming state the provider holds or fetches (a previous response, a conversation,
# an uploaded file, an image by URL), whose tokens the body's bytes cannot bound. An inline
# (base64) image is bounded by its bytes. `unbounded` finds the fixed names with `in` (a C
# substring search: 3.5k instructions for W2's body against 9.5k for one regular expression,
# whose engine stops at every quote); the URL's pattern runs only where a key ends in `url`.
_BY_URL = re.compile(rb'"(?:image_)?url": ?"http')


@dataclass(slots=True)
class Arrival:
    """What is known of a request once it is authenticated: who, where from, when, which
    endpoint; the billing row's fixed part."""

    request_id: str
    wall: float  # unix time it arrived
    start: float  # loop time it arrived
    key_id: str
    account_id: str
    endpoint: str
    client_ip: str | None


def unbounded(raw: bytes) -> bool:
    """Whether a body names provider-side state whose tokens its bytes cannot bound."""
    return (
        b'"previous_response_id"' in raw
        or b'"conversation"' in raw
        or b'"file_id"' in raw
        or (b'url"' in raw and _BY_URL.search(raw) is not None)
    )


class SharedSessions(Protocol):
    """Pins shared by every instance (`proxyd.redis_store.sessions.RedisSessions`) or by the
    workers of one (`proxyd.supervisor.shared.SupervisorSessions`)."""

    def prefetch(self, scoped: str) -> None: ...
    async def get(self, scoped: str) -> tuple[str, int] | None: ...
    async def place(
        self, scoped: str, channel_id: str, credential: int, first: bool
    ) -> tuple[str, int] | None: ...
    def renew(self, scoped: str) -> None: ...
    async def drain(self) -> None: ...


class Pipeline:
    """Everything the client handler needs, assembled by the app factory."""

    def __init__(
        self,
        *,
        store: StateStore,
        relay: Relay,
        admission: Admission,
        writer: BillingWriter,
        metrics: Metrics,
        tokenizer: Tokenizer,
        client_ip: Callable[[web.Request], str],
        request_log: Callable[[UsageRecord], None],
        default_max_tokens: int,
        max_tool_calls: int = 10,
        unbounded_reserve_nanos: int = 1_000_000_000,
        sticky: StickyTable | None = None,
        shared_sessions: SharedSessions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.relay = relay
        self.admission = admission
        self.writer = writer
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.client_ip = client_ip
        self._request_log = request_log
        self.default_max_tokens = default_max_tokens
        self.max_tool_calls = max_tool_calls
        self.unbounded_reserve_nanos = unbounded_reserve_nanos
        self.sticky = sticky
        self.shared_sessions = shared_sessions
        self._clock = clock

    # -- admit ------------------------------------------------------------------------------
    def estimate_tokens(self, call: Call) -> int:
        """Tokens to reserve from the per-minute bucket: a cheap prompt estimate plus the cap."""
        return len(call.raw) // 4 + (call.max_tokens or self.default_max_tokens)

    def max_cost(self, price: pricing.Price, call: Call) -> int:
        """The most this request can cost: refuses (400) a tier or paid tool the price lacks.

        A prompt in the body never has more tokens than bytes; every prompt token is reserved at
        the dearest rate of the requested tier and the long-context levels it could reach, each
        enabled paid tool at its most calls. A body naming server-side state (a previous
        response, a file, an image URL) cannot bound its prompt: it reserves at least
        `unbounded_reserve_nanos`.
        """
        paid = paid_features(call.body)
        pricing.check_priced(price, paid)
        calls = (  # most bodies name no paid tool: no comprehension for them
            {t: max_calls(call.body, t, self.max_tool_calls) for t, _ in paid.tools}
            if paid.tools
            else None
        )
        bound = pricing.max_cost_nanos(
            price,
            len(call.raw),
            call.max_tokens or self.default_max_tokens,
            tier=paid.tier,
            tool_calls=calls,
        )
        if unbounded(call.raw):
            return max(bound, self.unbounded_reserve_nanos)
        return bound

    # -- session ----------------------------------------------------------------------------
    def open_session(
        self,
        key_id: str,
        call: Call,
        headers: Mapping[str, str],
        channels: Sequence[Channel],
        *,
        track: bool = True,
    ) -> Session | None:
        """The request's sticky session among its route's `channels`, as this process knows it
        (None with sticky sessions off, or when the route leaves no choice: one channel with one
        credential). Call before admission: a session this process has no pin for asks the
        shared store to read its pin with admission's round trip (`shared_pin` takes it).
        """
        table = self.sticky
        if table is None or (len(channels) == 1 and len(channels[0].api_keys) == 1):
            return None
        session = table.open(key_id, session_id(headers, call.body), self._clock(), track)
        if session.pin is None and self.shared_sessions is not None:
            self.shared_sessions.prefetch(session.key)
        return session

    async def shared_pin(self, session: Session) -> Session:
        """`session` with the pin the shared store holds, when this process had none (read with
        the admission's round trip where one was made, else looked up once)."""
        shared = self.shared_sessions
        if session.pin is not None or shared is None or self.sticky is None:
            return session
        found = await shared.get(session.key)
        if found is not None:
            table, now = self.sticky, session.opened
            table.put(session.key, found[0], found[1], now + table.ttl, now)
            session.adopt(table.pin_of(session.key, now))
        return session

    # -- record -----------------------------------------------------------------------------
    def finish(
        self,
        arrival: Arrival,
        outcome: Outcome,
        call: Call | None,
        ticket: Ticket | None,
        end: float,
        state: State,
    ) -> None:
        """Make the request's one usage record from what was recorded, and hand it on.

        This is the one place a billing row is made. It never raises.
        """
        record = UsageRecord(
            arrival.request_id,
            arrival.wall,
            arrival.key_id,
            arrival.account_id,
            call.model if call is not None else "",
            arrival.endpoint,
            outcome.upstream_model,
            outcome.channel_id,
            call.stream if call is not None else False,
            outcome.status_code,
            client_ip=arrival.client_ip,
        )  # (positional up to status_code: a 25-keyword call costs twice the time)
        error = outcome.final_error
        if error is not None:
            record.error_type = error.value
        record.latency_ms = int((end - arrival.start) * 1000)
        if outcome.first_byte_at is not None:
            record.ttft_ms = int((outcome.first_byte_at - arrival.start) * 1000)
        if outcome.offline:
            record.usage_source = "estimated"
        if call is not None and outcome.delivered and not call.endpoint.counts:  # counts: free
            usage, estimated = self._usage(outcome, call)
            record.prompt_tokens = usage.prompt_tokens
            record.completion_tokens = usage.completion_tokens
            record.cached_tokens = usage.cached_tokens
            record.reasoning_tokens = usage.reasoning_tokens
            record.cache_write_tokens = usage.cache_write_tokens
            record.cache_write_1h_tokens = usage.cache_write_1h_tokens
            record.service_tier = usage.service_tier
            record.tool_calls = usage.tool_call_count
            record.usage_source = "estimated" if estimated else "upstream"
            price = state.prices.get(call.model)
            if price is not None:  # what was delivered is billed, also to a client that left
                record.cost_nanos = pricing.cost_nanos(price, usage)
                for category, tokens in pricing.fallback_tokens(price, usage):
                    self.metrics.fallback_priced(category, tokens)
        if ticket is not None:  # cost the balance could not hold
            shortfall = ticket.finish(
                tokens=record.prompt_tokens + record.completion_tokens,
                cost_nanos=record.cost_nanos,
            )
            record.shortfall_nanos = shortfall
            if shortfall:
                self.metrics.shortfall(shortfall)
        self.writer.submit(record)
        self.metrics.observe_request(record)
        self._request_log(record)

    def _usage(self, outcome: Outcome, call: Call) -> tuple[Usage, bool]:
        """The provider's counts when it gave them, else what was delivered, counted offline."""
        found, text = outcome.usage, outcome.response_text
        if found is None and outcome.answer is not None:  # a native whole answer
            found = usage_from_body(outcome.answer)
            if found is None:
                text = completion_text(outcome.answer)
        if found is not None:
            return found, False
        if outcome.scanner is None and outcome.status >= 400:
            return Usage(), False
        usage, source = self.tokenizer.estimate(
            call.endpoint.path, call.body, outcome.scanner, text
        )
        return usage, source == "estimated"
