"""The spool file: durable append, documented line format, torn lines, one owner per directory."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from proxyd.billing.record import COLUMNS, UsageRecord
from proxyd.billing.spool import Spool, SpoolLocked


def rec(i: int) -> UsageRecord:
    """A small record."""
    return UsageRecord(
        request_id=f"r{i}",
        created_at=1_763_900_000.5 + i,
        key_id="k",
        account_id="a",
        model="m",
        endpoint="/v1/messages",
        prompt_tokens=i,
        ttft_ms=None,
    )


def test_append_then_read_round_trips(tmp_path: Path) -> None:
    """Rows come back equal, and the pending counters follow appends and consumption."""
    spool = Spool(tmp_path)
    spool.open()
    n = spool.append([rec(i) for i in range(5)])
    assert (spool.rows, spool.bytes) == (5, n)
    spool.seal()
    [segment] = spool.sealed()
    chunk = spool.read(segment, 0, 3)
    assert chunk.records == [rec(i) for i in range(3)]
    assert not chunk.eof
    spool.consumed(chunk)
    rest = spool.read(segment, chunk.offset, 100)
    assert rest.records == [rec(3), rec(4)]
    assert rest.eof
    spool.consumed(rest)
    assert (spool.rows, spool.bytes) == (0, 0)
    spool.remove(segment)
    assert spool.sealed() == []
    spool.close()


def test_line_format_is_one_json_object_of_columns_per_row(tmp_path: Path) -> None:
    """Each line is an orjson object whose keys are exactly the record's columns."""
    spool = Spool(tmp_path)
    spool.open()
    spool.append([rec(1), rec(2)])
    spool.close()
    [segment] = tmp_path.glob("spool-*.jsonl")
    lines = segment.read_bytes().splitlines()
    assert len(lines) == 2
    assert set(orjson.loads(lines[0])) == set(COLUMNS)


def test_reopen_counts_what_is_pending_and_continues_numbering(tmp_path: Path) -> None:
    """A restarted process sees the earlier rows as pending and appends to a new segment."""
    first = Spool(tmp_path)
    first.open()
    first.append([rec(1), rec(2)])
    first.close()
    second = Spool(tmp_path)
    second.open()
    assert second.rows == 2
    second.append([rec(3)])
    assert len(list(tmp_path.glob("spool-*.jsonl"))) == 2
    assert len(second.sealed()) == 1  # the segment being appended to is not replayable yet
    second.close()


def test_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    """A line cut by a crash (no newline) or garbage is counted bad, the rest is read."""
    spool = Spool(tmp_path)
    spool.open()
    spool.append([rec(1)])
    spool.close()
    [segment] = tmp_path.glob("spool-*.jsonl")
    with segment.open("ab") as f:
        f.write(b"not json\n")
        f.write(orjson.dumps(rec(2))[:20])
    reopened = Spool(tmp_path)
    reopened.open()
    chunk = reopened.read(segment, 0, 10)
    assert chunk.records == [rec(1)]
    assert (chunk.bad, chunk.lines, chunk.eof) == (2, 3, True)
    reopened.consumed(chunk)
    assert (reopened.rows, reopened.bytes) == (0, 0)
    reopened.close()


def test_one_process_per_directory(tmp_path: Path) -> None:
    """A second owner of the same directory is refused until the first closes."""
    a = Spool(tmp_path)
    a.open()
    with pytest.raises(SpoolLocked):
        Spool(tmp_path).open()
    a.close()
    b = Spool(tmp_path)
    b.open()
    b.close()


def test_segments_rotate_at_their_size(tmp_path: Path) -> None:
    """An append past segment_bytes seals the segment so replay can start on it."""
    spool = Spool(tmp_path, segment_bytes=100)
    spool.open()
    spool.append([rec(1), rec(2)])
    assert len(spool.sealed()) == 1
    spool.close()
