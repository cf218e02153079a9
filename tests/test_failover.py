"""The failover decision table, the error-type classifier and the final status by cause."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.errors import ErrorType, UpstreamFailure
from proxyd.relay.failover import (
    Attempt,
    AttemptKind,
    RetryBudget,
    Verdict,
    classify,
    decide,
    final_failure,
)
from proxyd.relay.provider_errors import MESSAGES, Fault
from proxyd.upstream.attempt import retry_after_seconds

K = AttemptKind
CONNECT = Attempt(K.CONNECT_ERROR)
TIMEOUT = Attempt(K.TIMEOUT)


def status(code: int) -> Attempt:
    return Attempt(K.RESPONSE, code)


@pytest.mark.parametrize(
    ("attempt", "verdict"),
    [
        # retried: connect error, timeout before headers, 429, 5xx, nothing sent yet
        (CONNECT, Verdict.RETRY),
        (TIMEOUT, Verdict.RETRY),
        (status(429), Verdict.RETRY),
        (status(500), Verdict.RETRY),
        (status(502), Verdict.RETRY),
        (status(503), Verdict.RETRY),
        (status(504), Verdict.RETRY),
        (status(529), Verdict.RETRY),
        # passed through unchanged: success and 4xx other than 429
        (status(200), Verdict.DELIVER),
        (status(201), Verdict.DELIVER),
        (status(304), Verdict.DELIVER),
        (status(400), Verdict.DELIVER),
        # the operator's credential or account refused: another channel is tried
        (status(401), Verdict.RETRY),
        (status(402), Verdict.RETRY),
        (status(403), Verdict.RETRY),
        (Attempt(K.RESPONSE, 400, fault=Fault.CREDENTIAL), Verdict.RETRY),
        (Attempt(K.RESPONSE, 403, fault=Fault.CLIENT), Verdict.DELIVER),
        (Attempt(K.RESPONSE, 429, fault=Fault.CREDENTIAL), Verdict.RETRY),
        (status(405), Verdict.DELIVER),
        (status(404), Verdict.DELIVER),
        (status(413), Verdict.DELIVER),
        (status(422), Verdict.DELIVER),
        # broke after the response head, nothing sent yet: an error answer, never a retry
        (Attempt(K.RESET), Verdict.ABORT),
        (Attempt(K.STALLED), Verdict.ABORT),
        (Attempt(K.RESET, 200), Verdict.ABORT),
        # broke mid-stream, bytes already with the client: the stream ends with an error event
        (Attempt(K.RESET, 200, client_started=True), Verdict.END_STREAM),
        (Attempt(K.STALLED, 200, client_started=True), Verdict.END_STREAM),
        # the client left, before or after its first byte: stop, whatever the upstream does
        (Attempt(K.CLIENT_GONE, 200), Verdict.STOP),
        (Attempt(K.CLIENT_GONE, 200, client_started=True), Verdict.STOP),
    ],
)
def test_decision_table(attempt: Attempt, verdict: Verdict) -> None:
    """Every case of the one failover decision (before the head, after it, mid-stream), on the
    first attempt with time to spare."""
    assert decide(attempt, attempts=1, time_left=30.0) is verdict


@pytest.mark.parametrize("attempt", [CONNECT, TIMEOUT, status(429), status(500)])
def test_budget_of_three_attempts(attempt: Attempt) -> None:
    """By default the 3rd failed attempt gives up; a budget of 5 retries on until the 5th."""
    assert decide(attempt, attempts=2, time_left=30.0) is Verdict.RETRY
    assert decide(attempt, attempts=3, time_left=30.0) is Verdict.GIVE_UP
    five = RetryBudget(max_attempts=5)
    assert decide(attempt, attempts=4, time_left=30.0, budget=five) is Verdict.RETRY
    assert decide(attempt, attempts=5, time_left=30.0, budget=five) is Verdict.GIVE_UP


@pytest.mark.parametrize("attempt", [CONNECT, TIMEOUT, status(429), status(503)])
def test_deadline_stops_retries(attempt: Attempt) -> None:
    """No time left before the overall deadline (or less than the minimum): give up."""
    assert decide(attempt, attempts=1, time_left=0.0) is Verdict.GIVE_UP
    assert decide(attempt, attempts=1, time_left=-1.0) is Verdict.GIVE_UP
    margin = RetryBudget(min_time_left=0.5)
    assert decide(attempt, attempts=1, time_left=0.5, budget=margin) is Verdict.GIVE_UP
    assert decide(attempt, attempts=1, time_left=0.6, budget=margin) is Verdict.RETRY


def test_budget_never_turns_a_passthrough_into_a_give_up() -> None:
    """A 400 or a 200 is delivered even on the last attempt past the deadline."""
    assert decide(status(400), attempts=3, time_left=-5.0) is Verdict.DELIVER
    assert decide(status(200), attempts=3, time_left=-5.0) is Verdict.DELIVER


@pytest.mark.parametrize(
    "kind", [K.CONNECT_ERROR, K.TIMEOUT, K.RESPONSE], ids=["connect", "timeout", "response"]
)
def test_a_before_the_head_kind_cannot_come_after_a_byte_was_sent(kind: AttemptKind) -> None:
    """No connect error, head timeout or fresh answer once the client has bytes: such an
    attempt is refused where it is made, so no decision has to guess."""
    with pytest.raises(ValueError, match="cannot happen once the answer was sent"):
        Attempt(kind, 200, client_started=True)


@pytest.mark.parametrize("verdict", [Verdict.END_STREAM, Verdict.STOP])
def test_mid_stream_verdicts_ignore_budget_and_deadline(verdict: Verdict) -> None:
    """Mid-stream there is nothing to retry: the verdict is the same on any attempt count."""
    kind = K.RESET if verdict is Verdict.END_STREAM else K.CLIENT_GONE
    attempt = Attempt(kind, 200, client_started=True)
    assert decide(attempt) is verdict
    assert decide(attempt, attempts=9, time_left=-1.0) is verdict


@given(
    kind=st.sampled_from(list(AttemptKind)),
    code=st.none() | st.integers(100, 599),
    sent=st.booleans(),
    attempts=st.integers(1, 10),
    time_left=st.floats(-10, 100, allow_nan=False),
    max_attempts=st.integers(1, 10),
)
def test_never_retries_outside_the_rules(
    kind: AttemptKind,
    code: int | None,
    sent: bool,
    attempts: int,
    time_left: float,
    max_attempts: int,
) -> None:
    """RETRY only before any byte was sent, within budget and deadline, for a retryable cause."""
    if sent and kind in (K.CONNECT_ERROR, K.TIMEOUT, K.RESPONSE):
        return  # refused by Attempt itself (test above)
    attempt = Attempt(kind, code, client_started=sent)
    verdict = decide(
        attempt, attempts=attempts, time_left=time_left, budget=RetryBudget(max_attempts)
    )
    if verdict is Verdict.RETRY:
        assert not sent
        assert attempts < max_attempts
        assert time_left > 0
        assert kind in (K.CONNECT_ERROR, K.TIMEOUT) or (
            kind is K.RESPONSE
            and code is not None
            and (code in (401, 402, 403, 429) or code >= 500)
        )


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (CONNECT, ErrorType.UPSTREAM_CONNECT),
        (TIMEOUT, ErrorType.UPSTREAM_TIMEOUT),
        (Attempt(K.STALLED), ErrorType.UPSTREAM_TIMEOUT),
        (Attempt(K.RESET), ErrorType.UPSTREAM_RESET),
        (Attempt(K.CLIENT_GONE), ErrorType.CLIENT_DISCONNECT),
        (status(429), ErrorType.UPSTREAM_ERROR),
        (status(500), ErrorType.UPSTREAM_ERROR),
        (status(503), ErrorType.UPSTREAM_ERROR),
        (status(400), ErrorType.UPSTREAM_CLIENT_ERROR),
        (status(404), ErrorType.UPSTREAM_CLIENT_ERROR),
        (status(401), ErrorType.UPSTREAM_CREDENTIAL),
        (status(403), ErrorType.UPSTREAM_CREDENTIAL),
        (Attempt(K.RESPONSE, 429, fault=Fault.CREDENTIAL), ErrorType.UPSTREAM_CREDENTIAL),
        (Attempt(K.RESPONSE, 400, fault=Fault.CREDENTIAL), ErrorType.UPSTREAM_CREDENTIAL),
        (status(200), None),
        (status(302), None),
    ],
)
def test_classifier(attempt: Attempt, expected: ErrorType | None) -> None:
    """What happened maps to one value of the closed error-type set (None for a success)."""
    assert classify(attempt) is expected


def test_nothing_tried_is_503_no_channel() -> None:
    """No attempt at all (no candidate, or every one cooling or capped): 503 no_channel."""
    final = final_failure([])
    assert (final.status, final.error_type, final.upstream_index) == (
        503,
        ErrorType.NO_CHANNEL,
        None,
    )
    err = final.error()
    assert isinstance(err, UpstreamFailure)
    assert (err.status, err.error_type) == (503, ErrorType.NO_CHANNEL)


@pytest.mark.parametrize(
    ("attempts", "status_", "error_type"),
    [
        ([TIMEOUT], 504, ErrorType.UPSTREAM_TIMEOUT),
        ([TIMEOUT, TIMEOUT, TIMEOUT], 504, ErrorType.UPSTREAM_TIMEOUT),
        ([CONNECT], 503, ErrorType.UPSTREAM_CONNECT),
        ([CONNECT, CONNECT], 503, ErrorType.UPSTREAM_CONNECT),
        ([CONNECT, TIMEOUT], 502, ErrorType.UPSTREAM_ERROR),
        ([TIMEOUT, CONNECT, TIMEOUT], 502, ErrorType.UPSTREAM_ERROR),
    ],
)
def test_final_status_by_cause_without_a_response(
    attempts: list[Attempt], status_: int, error_type: ErrorType
) -> None:
    """No upstream ever answered: all timeouts 504, all connect failures 503, a mix 502."""
    final = final_failure(attempts)
    assert (final.status, final.error_type, final.upstream_index) == (status_, error_type, None)
    assert final.error().status == status_


@pytest.mark.parametrize(
    ("attempts", "index", "status_"),
    [
        ([status(500)], 0, 500),
        ([status(429)], 0, 429),
        ([status(500), status(503)], 1, 503),
        ([status(503), CONNECT], 0, 503),
        ([TIMEOUT, status(429), TIMEOUT], 1, 429),
        ([status(502), status(429), CONNECT], 1, 429),
        ([status(401), status(500)], 1, 500),
        ([status(500), status(403), CONNECT], 0, 500),
    ],
)
def test_last_upstream_response_is_passed_through(
    attempts: list[Attempt], index: int, status_: int
) -> None:
    """When some upstream answered 429 or 5xx, the client gets the LAST such answer's status
    with proxyd's message (a refused credential is never the one passed on)."""
    final = final_failure(attempts)
    assert final.upstream_index == index
    assert final.status == status_
    assert final.error_type is ErrorType.UPSTREAM_ERROR
    assert final.message in MESSAGES.values()


@pytest.mark.parametrize(
    "attempts",
    [
        [status(401)],
        [status(403), CONNECT],
        [TIMEOUT, Attempt(K.RESPONSE, 429, fault=Fault.CREDENTIAL)],
        [status(401), status(402), status(403)],
    ],
)
def test_refused_credentials_end_in_503_upstream_credential(attempts: list[Attempt]) -> None:
    """Only refused credentials (with timeouts or connect errors): 503 with proxyd's words."""
    final = final_failure(attempts)
    assert (final.status, final.error_type, final.upstream_index) == (
        503,
        ErrorType.UPSTREAM_CREDENTIAL,
        None,
    )
    assert "not a problem with your API key" in final.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past
        ("Wed, 21 Oct 2015 07:28:30", 30.0),  # no zone: GMT
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_in_both_forms(value: str, expected: float | None) -> None:
    """Retry-After as delay-seconds or as an HTTP-date, relative to now; garbage is ignored."""
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_seconds({"Retry-After": value}, now) == expected
    assert retry_after_seconds({}, now) is None
