"""The billing writer: a non-blocking `submit()` and background tasks that batch rows into the
sink, spool them while it is away or the queue is full, and replay the spool when it is back.

Never raises into the request path, never drops a row, never logs a row's contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from proxyd.billing.record import UsageRecord
from proxyd.billing.sink import Sink, SinkRejected
from proxyd.billing.spool import Chunk, Spool, clean_text
from proxyd.errors import ProxydError


class WriterStats:
    """Plain counters the metrics module reads at scrape time (no locking: one event loop)."""

    __slots__ = (
        "_writer",
        "batches",
        "flush_seconds_last",
        "rows_after_close",
        "rows_duplicate",
        "rows_lost",
        "rows_rejected",
        "rows_replayed",
        "rows_spooled",
        "rows_submitted",
        "rows_unreadable",
        "rows_written",
        "sink_up",
        "spool_bytes",
        "spool_failing",
        "spool_rows",
    )

    def __init__(self, writer: BillingWriter) -> None:
        self._writer = writer
        self.rows_submitted = 0
        self.rows_written = 0  # rows the database newly stored (queue and replay)
        self.rows_duplicate = 0  # rows the database already had (a replay after a lost ack)
        self.rows_spooled = 0  # rows appended to the spool file
        self.rows_replayed = 0  # spooled rows written back to the database
        self.rows_rejected = 0  # rows the database refused, kept in rejected.jsonl
        self.rows_unreadable = 0  # spool lines that could not be parsed (torn by a crash)
        self.rows_lost = 0  # at shutdown with neither database nor a writable spool
        self.rows_after_close = 0  # submitted after close(): a wiring bug, logged, not stored
        self.batches = 0  # successful database writes
        self.flush_seconds_last = 0.0
        self.spool_rows = 0  # pending replay
        self.spool_bytes = 0
        self.sink_up = False
        self.spool_failing = False

    @property
    def queue_depth(self) -> int:
        """Rows waiting in memory (queue and overflow on its way to the spool)."""
        return len(self._writer._queue) + len(self._writer._overflow)


class BillingWriter:
    """Batches usage rows by size and time into a sink; the spool holds what it cannot take.

    `on_flush(batch_size, seconds)` is called after every successful database write (wire it to
    a histogram). At a SIGKILL the rows at risk are the ones in memory: at most `queue_max`
    queued plus one batch in flight plus any overflow not yet fsync'd to the spool.
    """

    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.5,
        queue_max: int = 50_000,
        spool_max_rows: int = 1_000_000,
        spool_max_bytes: int = 512 << 20,
        write_timeout: float = 30.0,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        on_flush: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue_max = queue_max
        self._spool_max_rows = spool_max_rows
        self._spool_max_bytes = spool_max_bytes
        self._write_timeout = write_timeout
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._on_flush = on_flush
        self._clock = clock
        self._queue: deque[UsageRecord] = deque()
        self._overflow: list[UsageRecord] = []  # bound for the spool
        self._wake = asyncio.Event()
        self._spool_wake = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._closing = False
        self._closed = False
        self._spooler_closing = False
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._replay: tuple[Path, int] | None = None  # (segment path, byte offset)
        self._tasks: list[asyncio.Task[None]] = []
        self._log = structlog.get_logger("proxyd.billing")
        self.stats = WriterStats(self)

    # -- request path ---------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Hand over one row: a plain append, no I/O, never raises, never drops."""
        self.stats.rows_submitted += 1
        if self._closed:
            self.stats.rows_after_close += 1
            self._log.error("billing_submit_after_close", request_id=record.request_id)
            return
        q = self._queue
        if len(q) < self._queue_max:
            q.append(record)
            if len(q) == self._batch_size:
                self._wake.set()
        else:
            self._overflow.append(record)
            self._spool_wake.set()

    def ready(self) -> tuple[bool, str]:
        """Unready only when the spool cannot be written or holds more than its bound."""
        s = self.stats
        if s.spool_failing:
            return False, "billing spool is not writable"
        if s.spool_rows > self._spool_max_rows or s.spool_bytes > self._spool_max_bytes:
            return False, f"billing spool holds {s.spool_rows} rows, over its bound"
        if not s.sink_up:
            return True, f"billing database away, spooling ({s.spool_rows} rows)"
        return True, "ok"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (raises SpoolLocked if another process has it), try the sink, start."""
        await asyncio.to_thread(self._spool.open)
        self._sync_spool_stats()
        try:
            await asyncio.wait_for(self._sink.open(), self._write_timeout)
            self._mark_up()
        except Exception as exc:  # noqa: BLE001 - an unreachable database must not stop start-up
            self._mark_down(exc)
        self._tasks = [
            asyncio.create_task(self._run(), name="billing-writer"),
            asyncio.create_task(self._spooler(), name="billing-spooler"),
        ]

    async def close(self) -> None:
        """Write or spool every queued row, then close; call it after the last request ended."""
        if not self._tasks:
            return
        self._closing = True
        self._wake.set()
        await self._tasks[0]
        self._closed = True
        self._spooler_closing = True
        self._spool_wake.set()
        await self._tasks[1]
        self._tasks = []
        late = [*self._queue, *self._overflow]  # submitted while closing
        if late:
            self._queue.clear()
            self._overflow.clear()
            try:
                await asyncio.to_thread(self._spool.append, late)
                self.stats.rows_spooled += len(late)
            except Exception as exc:  # noqa: BLE001 - shutdown must finish; the loss is logged
                self._lost(late, exc)
        await asyncio.to_thread(self._spool.close)
        self._sync_spool_stats()
        try:
            await self._sink.close()
        except Exception as exc:  # noqa: BLE001 - closing a broken sink must not fail shutdown
            self._log.warning("billing_sink_close_failed", error=type(exc).__name__)

    # -- background -----------------------------------------------------------------------

    def _may_try_sink(self) -> bool:
        return self._clock() >= self._retry_at

    def _replay_due(self) -> bool:
        return self._may_try_sink() and (self._replay is not None or self._spool.bytes > 0)

    async def _run(self) -> None:
        q = self._queue
        while True:
            try:
                if len(q) < self._batch_size and not self._closing and not self._replay_due():
                    delay = self._flush_interval
                    if self._spool.bytes > 0:
                        delay = min(delay, max(self._retry_at - self._clock(), 0.0))
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                if q:
                    await self._deliver([q.popleft() for _ in range(min(len(q), self._batch_size))])
                elif self._closing:
                    return
                elif self._replay_due():
                    await self._replay_step()
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any bug in one round
                self._log.error("billing_writer_error", error=type(exc).__name__)
                await asyncio.sleep(self._flush_interval)

    async def _deliver(self, batch: list[UsageRecord]) -> None:
        try:
            if self._may_try_sink() and await self._write(batch):
                return
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the rows go to the spool
            self._log.error("billing_deliver_error", error=type(exc).__name__)
        self._to_spool(batch)

    async def _write(self, batch: Sequence[UsageRecord], *, cleaned: bool = False) -> bool:
        """Store a batch; False when the sink is away (the caller spools it).

        A refused batch is bisected down to the refused rows, which are retried once cleaned
        of NUL/surrogates and otherwise kept in rejected.jsonl.
        """
        started = self._clock()
        try:
            inserted = await asyncio.wait_for(self._sink.write(batch), self._write_timeout)
        except SinkRejected:
            if len(batch) > 1:
                mid = len(batch) // 2
                return await self._write(batch[:mid]) and await self._write(batch[mid:])
            clean = clean_text(batch[0])
            if not cleaned and clean is not batch[0]:
                return await self._write([clean], cleaned=True)
            await self._reject(batch[0])
            return True
        except Exception as exc:  # noqa: BLE001 - any sink failure means: spool and retry later
            self._mark_down(exc)
            return False
        elapsed = self._clock() - started
        self._mark_up()
        s = self.stats
        s.rows_written += inserted
        s.rows_duplicate += len(batch) - inserted
        s.batches += 1
        s.flush_seconds_last = elapsed
        if self._on_flush is not None:
            self._on_flush(len(batch), elapsed)
        return True

    async def _reject(self, record: UsageRecord) -> None:
        self.stats.rows_rejected += 1
        self._log.warning("billing_row_rejected", request_id=record.request_id)
        try:
            await asyncio.to_thread(self._spool.reject, [record])
        except Exception as exc:  # noqa: BLE001 - a refused row must not stop the writer
            self._log.error("billing_reject_file_failed", error=type(exc).__name__)

    def _to_spool(self, batch: list[UsageRecord]) -> None:
        self._overflow.extend(batch)
        self._spool_wake.set()

    async def _spooler(self) -> None:
        """Move overflow rows to the spool file, fsync'd, in one append per wake-up."""
        pending = self._overflow
        while True:
            if not pending:
                if self._spooler_closing:
                    return
                self._spool_wake.clear()
                await self._spool_wake.wait()
                continue
            rows = pending.copy()
            pending.clear()
            try:
                async with self._spool_lock:
                    await asyncio.to_thread(self._spool.append, rows)
            except Exception as exc:  # noqa: BLE001 - keep the rows in memory and retry
                if self._spooler_closing:  # shutting down with neither database nor disk
                    self._lost(rows, exc)
                    continue
                pending[:0] = rows
                if not self.stats.spool_failing:
                    self._log.error("billing_spool_write_failed", error=type(exc).__name__)
                self.stats.spool_failing = True
                await asyncio.sleep(1.0)
                continue
            self.stats.spool_failing = False
            self.stats.rows_spooled += len(rows)
            self._sync_spool_stats()

    async def _replay_step(self) -> None:
        """Write the next chunk of the oldest sealed segment; delete the segment when done.

        A crash between a write and the delete replays rows already stored: request_id
        uniqueness makes that a no-op (counted in rows_duplicate), never a second row.
        """
        if self._replay is None:
            async with self._spool_lock:
                segments = self._spool.sealed()
                if not segments:
                    self._spool.seal()
                    segments = self._spool.sealed()
                if not segments:
                    self._spool.reset_counters()  # nothing left: heal the counters
                    self._sync_spool_stats()
                    return
            self._replay = (segments[0], 0)
        path, offset = self._replay
        try:
            chunk: Chunk = await asyncio.to_thread(self._spool.read, path, offset, self._batch_size)
        except FileNotFoundError:
            self._replay = None
            return
        if chunk.records and not await self._write(chunk.records):
            return  # the sink went away again; resume from the same offset later
        self.stats.rows_replayed += len(chunk.records)
        if chunk.bad:
            self.stats.rows_unreadable += chunk.bad
            self._log.warning("billing_spool_unreadable_lines", lines=chunk.bad)
        self._spool.consumed(chunk)
        if chunk.eof:
            await asyncio.to_thread(self._spool.remove, path)
            self._replay = None
        else:
            self._replay = (path, chunk.offset)
        self._sync_spool_stats()

    def _lost(self, rows: list[UsageRecord], exc: BaseException) -> None:
        self.stats.rows_lost += len(rows)
        self._log.error("billing_rows_lost", rows=len(rows), error=type(exc).__name__)

    # -- health ---------------------------------------------------------------------------

    def _sync_spool_stats(self) -> None:
        self.stats.spool_rows = self._spool.rows
        self.stats.spool_bytes = self._spool.bytes

    def _mark_down(self, exc: BaseException) -> None:
        self._retry_delay = min(max(self._retry_delay * 2, self._retry_min), self._retry_max)
        self._retry_at = self._clock() + self._retry_delay
        if self.stats.sink_up or self._retry_delay == self._retry_min:
            self._log.warning(
                "billing_sink_unavailable",
                error=type(exc).__name__,
                reason=str(exc) if isinstance(exc, ProxydError) else None,  # our texts: no values
                retry_in=self._retry_delay,
            )
        self.stats.sink_up = False

    def _mark_up(self) -> None:
        if not self.stats.sink_up and self._retry_delay:
            self._log.info("billing_sink_available", spool_rows=self._spool.rows)
        self._retry_delay = 0.0
        self._retry_at = 0.0
        self.stats.sink_up = True
