"""The SSE splitter over arbitrary read boundaries."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from proxyd.protocol.sse import EventSplitter

_line = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
    max_size=40,
)
_event = st.lists(_line.map(lambda s: "data: " + s), min_size=1, max_size=3).map(
    lambda lines: ("\n".join(lines) + "\n\n").encode()
)


@given(events=st.lists(_event, min_size=1, max_size=12), cuts=st.lists(st.integers(0, 2000)))
def test_any_read_boundaries_give_the_same_events(events: list[bytes], cuts: list[int]) -> None:
    """However the bytes are cut into reads, the same whole events come out, in order."""
    data = b"".join(events)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    splitter = EventSplitter()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out.extend(splitter.feed(data[a:b]))
    assert out == events
    assert splitter.pending() == b""


def test_whole_read_is_passed_on_uncopied() -> None:
    """A read that is exactly one event is returned as the same object."""
    chunk = b"data: {}\n\n"
    assert EventSplitter().feed(chunk)[0] is chunk


def test_partial_event_is_held() -> None:
    """An incomplete tail is kept until its blank line arrives."""
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n\ndata: b") == [b"data: a\n\n"]
    assert splitter.pending() == b"data: b"
    assert splitter.feed(b"\n\n") == [b"data: b\n\n"]


def test_crlf_events_are_split() -> None:
    """CRLF-framed events split correctly, also with the CRLF cut across reads."""
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n\r") == []
    assert splitter.feed(b"\ndata: b\r\n\r\n") == [b"data: a\n\n", b"data: b\n\n"]
