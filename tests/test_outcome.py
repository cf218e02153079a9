"""The per-request record: each fact once, and the row's status and error read off the facts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxyd.errors import ErrorType
from proxyd.protocol.usage import StreamUsage, Usage
from proxyd.relay.outcome import Outcome, RecordedTwice

FACTS: dict[str, Callable[[Outcome], None]] = {
    "deliver": lambda o: o.deliver(200),
    "first_byte": lambda o: o.first_byte(1.0),
    "fail": lambda o: o.fail(ErrorType.UPSTREAM_RESET, 502),
    "client_left": lambda o: o.client_left(),
    "saw_usage": lambda o: o.saw_usage(Usage(prompt_tokens=1)),
    "whole_answer": lambda o: o.whole_answer(b"{}"),
    "answer_text": lambda o: o.answer_text("hi"),
    "streaming": lambda o: o.streaming(StreamUsage()),
}


@pytest.mark.parametrize("fact", sorted(FACTS))
def test_a_fact_recorded_twice_is_refused(fact: str) -> None:
    outcome = Outcome()
    FACTS[fact](outcome)
    before = (outcome.status, outcome.error_type, outcome.first_byte_at, outcome.usage)
    with pytest.raises(RecordedTwice):
        FACTS[fact](outcome)
    assert (outcome.status, outcome.error_type, outcome.first_byte_at, outcome.usage) == before


def test_a_different_error_does_not_overwrite_the_first() -> None:
    outcome = Outcome()
    outcome.fail(ErrorType.UPSTREAM_TIMEOUT, 504)
    with pytest.raises(RecordedTwice):
        outcome.fail(ErrorType.UPSTREAM_RESET, 502)
    assert (outcome.status_code, outcome.final_error) == (504, ErrorType.UPSTREAM_TIMEOUT)


def test_failover_moves_the_channel_until_the_answer_is_delivered() -> None:
    outcome = Outcome()
    outcome.trying("a", "m-a")
    outcome.trying("b", "m-b")  # a failover: the row names the channel that answered
    outcome.deliver(200)
    with pytest.raises(RecordedTwice):
        outcome.trying("c", "m-c")
    assert (outcome.channel_id, outcome.upstream_model) == ("b", "m-b")


@pytest.mark.parametrize(
    ("facts", "status", "error"),
    [
        ([], 500, None),  # nothing was recorded: proxyd's own failure
        (["deliver"], 200, None),
        (["deliver", "fail"], 502, ErrorType.UPSTREAM_RESET),  # a stream broken mid-way
        (["deliver", "fail", "client_left"], 499, ErrorType.CLIENT_DISCONNECT),
        (["deliver", "client_left"], 499, ErrorType.CLIENT_DISCONNECT),
        (["fail"], 502, ErrorType.UPSTREAM_RESET),
    ],
)
def test_the_rows_status_and_error(facts: list[str], status: int, error: ErrorType | None) -> None:
    outcome = Outcome()
    for fact in facts:
        FACTS[fact](outcome)
    assert (outcome.status_code, outcome.final_error) == (status, error)


def test_an_offline_answer_names_no_channel() -> None:
    outcome = Outcome()
    outcome.answered_offline(200)
    assert (outcome.offline, outcome.delivered, outcome.channel_id) == (True, True, None)
    with pytest.raises(RecordedTwice):
        outcome.answered_offline(200)
