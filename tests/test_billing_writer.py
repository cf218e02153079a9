"""The writer's contract with the request path: cheap, never raising, never losing a row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from proxyd.billing.migrate import migrate
from proxyd.billing.opener import open_sink
from proxyd.billing.record import UsageRecord
from proxyd.billing.spool import Spool, decode, encode
from proxyd.billing.sqlite import SqliteSink
from proxyd.billing.writer import BillingWriter


def record(i: int) -> UsageRecord:
    """A small record."""
    return UsageRecord(
        request_id=f"w{i}",
        created_at=1_763_900_000.0 + i,
        key_id="k",
        account_id="a",
        model="m",
        endpoint="/v1/embeddings",
    )


class BrokenThenFine:
    """A real SQLite sink behind a switch that makes writes fail with an unexpected error."""

    def __init__(self, inner: SqliteSink) -> None:
        self.inner = inner
        self.broken = True

    async def open(self) -> None:
        """Open the file."""
        await self.inner.open()

    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Fail like a buggy driver while broken."""
        if self.broken:
            raise RuntimeError("driver bug")
        return await self.inner.write(records)

    async def migrate(self, now: float, days_ahead: int) -> int:
        """Delegate."""
        return await self.inner.migrate(now, days_ahead)

    async def drop_older_than(self, cutoff: float) -> int:
        """Delegate."""
        return await self.inner.drop_older_than(cutoff)

    async def close(self) -> None:
        """Delegate."""
        await self.inner.close()


def test_submit_costs_well_under_five_microseconds(tmp_path: Path) -> None:
    """submit() is a plain append: the mean of 50,000 calls stays under 5 us."""
    writer = BillingWriter(open_sink(f"sqlite:///{tmp_path}/u.db"), Spool(tmp_path / "s"))
    records = [record(i) for i in range(50_000)]
    start = time.perf_counter()
    for r in records:
        writer.submit(r)
    mean = (time.perf_counter() - start) / len(records)
    assert mean < 5e-6
    assert writer.stats.queue_depth == 50_000


async def test_an_unexpected_sink_error_spools_and_the_writer_goes_on(tmp_path: Path) -> None:
    """A sink raising anything spools the rows; once it works they are replayed."""
    url = f"sqlite:///{tmp_path}/u.db"
    await migrate(url)
    inner = open_sink(url)
    assert isinstance(inner, SqliteSink)
    sink = BrokenThenFine(inner)
    writer = BillingWriter(sink, Spool(tmp_path / "s"), flush_interval=0.02, retry_min=0.05)
    await writer.start()
    for i in range(30):
        writer.submit(record(i))
    async with asyncio.timeout(10):
        while writer.stats.rows_spooled < 30:
            await _tick()
    assert not writer.stats.sink_up
    sink.broken = False
    async with asyncio.timeout(10):
        while writer.stats.spool_rows:
            await _tick()
    await writer.close()
    assert writer.stats.rows_written == 30
    assert writer.stats.rows_replayed == 30


async def _tick() -> None:
    await asyncio.sleep(0.01)


async def test_submit_after_close_is_counted_not_silently_lost(tmp_path: Path) -> None:
    """A row handed over after close() is logged and counted (a wiring bug), never raised."""
    url = f"sqlite:///{tmp_path}/u.db"
    await migrate(url)
    writer = BillingWriter(open_sink(url), Spool(tmp_path / "s"))
    await writer.start()
    await writer.close()
    writer.submit(record(1))
    assert writer.stats.rows_after_close == 1
    await writer.close()  # a second close is a no-op


def test_odd_values_still_spool_and_read_back() -> None:
    """Surrogates and integers past 64 bits never make a spool append fail."""
    odd = UsageRecord(
        request_id="x",
        created_at=1.5,
        key_id="k",
        account_id="a",
        model="bad\udc80",
        endpoint="/v1/messages",
        prompt_tokens=2**70,
    )
    back = decode(encode([odd]).rstrip(b"\n"))
    assert back.model == "bad?"
    assert back.prompt_tokens == 2**70


async def test_unwritable_spool_turns_unready_and_keeps_rows_until_it_recovers(
    tmp_path: Path,
) -> None:
    """With the database away and the spool failing, readiness drops and rows wait in memory."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spool_dir = tmp_path / "s"
    squatter = spool_dir / "spool-000000000001.jsonl"
    squatter.mkdir(parents=True)  # the next segment's name is taken by a directory
    writer = BillingWriter(
        open_sink(f"sqlite:///{blocker}/u.db"), Spool(spool_dir), flush_interval=0.02
    )
    await writer.start()
    for i in range(10):
        writer.submit(record(i))
    async with asyncio.timeout(10):
        while not writer.stats.spool_failing:
            await _tick()
    assert writer.ready() == (False, "billing spool is not writable")
    assert writer.stats.queue_depth == 10
    squatter.rmdir()
    async with asyncio.timeout(10):
        while writer.stats.rows_spooled < 10:
            await _tick()
    assert writer.ready()[0]
    await writer.close()
    assert writer.stats.rows_lost == 0
    assert sum(1 for _ in spool_dir.glob("spool-*.jsonl")) == 1
