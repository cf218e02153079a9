"""Append-only spool files holding usage rows while the database is away, until replayed.

Format: `<dir>/spool-<12-digit seq>.jsonl`, one orjson object per row (keys are the COLUMNS, so
metadata only), each append flushed and fsync'd. `<dir>/rejected.jsonl` keeps rows the database
refused. `<dir>/lock` (flock) gives one process a directory. Blocking file I/O: call it from a
worker thread. A segment is deleted only after all its rows were written.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import orjson

from proxyd.billing.record import UsageRecord
from proxyd.errors import ProxydError

_FIELDS = frozenset(f.name for f in fields(UsageRecord))
_TEXT_FIELDS = tuple(f.name for f in fields(UsageRecord) if "str" in str(f.type))
_PREFIX = "spool-"
_SUFFIX = ".jsonl"


class SpoolLocked(ProxydError):
    """Another process holds this spool directory; give each worker its own."""


@dataclass(slots=True)
class Chunk:
    """Rows read from a segment, where reading stopped and what could not be parsed."""

    records: list[UsageRecord] = field(default_factory=list)
    offset: int = 0
    lines: int = 0  # lines consumed, good and bad
    nbytes: int = 0
    bad: int = 0
    eof: bool = False


def clean_text(record: UsageRecord) -> UsageRecord:
    """The record with NUL characters and unencodable surrogates removed from its text."""
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, str):
            clean = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
            if clean != value:
                changes[name] = clean
    return dataclasses.replace(record, **changes) if changes else record


def _line(record: UsageRecord) -> bytes:
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # a surrogate or an integer past 64 bits: never fail to spool a row
        d = dataclasses.asdict(clean_text(record))
        return json.dumps(d, separators=(",", ":")).encode() + b"\n"


def encode(records: Sequence[UsageRecord]) -> bytes:
    """The spool lines of some records; it does not fail on odd values."""
    return b"".join(map(_line, records))


def decode(line: bytes) -> UsageRecord:
    """One spool line back to a record; unknown keys (a later schema) are ignored."""
    try:
        d = orjson.loads(line)
    except orjson.JSONDecodeError:
        d = json.loads(line)  # the fallback encoding of _line, e.g. integers past 64 bits
    return UsageRecord(**{k: v for k, v in d.items() if k in _FIELDS})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Segments in one directory; counters say how much is pending replay."""

    def __init__(self, directory: Path | str, *, segment_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.rows = 0  # pending rows (newline-terminated lines not yet replayed)
        self.bytes = 0  # pending bytes
        self._seq = 0
        self._current: IO[bytes] | None = None
        self._current_path: Path | None = None
        self._lock: IO[bytes] | None = None
        self._count_lock = threading.Lock()  # appends run in a worker thread, reads on the loop

    def _segments(self) -> list[Path]:
        return sorted(p for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}") if p.is_file())

    def open(self) -> None:
        """Lock the directory and count what earlier runs left to replay."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = (self.directory / "lock").open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock.close()
            raise SpoolLocked(f"spool directory {self.directory} is in use") from exc
        self._lock = lock
        for path in self._segments():
            data = path.read_bytes()
            self.rows += data.count(b"\n")
            self.bytes += len(data)
            self._seq = max(self._seq, int(path.name[len(_PREFIX) : -len(_SUFFIX)]))

    def append(self, records: Sequence[UsageRecord]) -> int:
        """Append rows durably (fsync); return the bytes written."""
        data = encode(records)
        f = self._current
        if f is None:
            self._seq += 1
            path = self.directory / f"{_PREFIX}{self._seq:012d}{_SUFFIX}"
            f = self._current = path.open("ab")
            self._current_path = path
            _fsync_dir(self.directory)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        with self._count_lock:
            self.rows += len(records)
            self.bytes += len(data)
        if f.tell() >= self.segment_bytes:
            self.seal()
        return len(data)

    def seal(self) -> None:
        """Close the segment being appended to, so it can be replayed; the next append starts
        a new one."""
        f, self._current, self._current_path = self._current, None, None
        if f is not None:
            f.close()

    def sealed(self) -> list[Path]:
        """Segments ready for replay, oldest first."""
        return [p for p in self._segments() if p != self._current_path]

    def read(self, path: Path, offset: int, max_rows: int) -> Chunk:
        """Up to `max_rows` rows of a sealed segment from byte `offset`.

        A line without its newline (a write torn by a crash) or one that does not parse is
        counted in `bad` and skipped.
        """
        chunk = Chunk(offset=offset)
        with path.open("rb") as f:
            f.seek(offset)
            while len(chunk.records) < max_rows:
                line = f.readline()
                if not line:
                    break
                chunk.lines += 1
                chunk.nbytes += len(line)
                if not line.endswith(b"\n"):
                    chunk.bad += 1
                    continue
                try:
                    chunk.records.append(decode(line))
                except (ValueError, TypeError, AttributeError):  # JSONDecodeError is a ValueError
                    chunk.bad += 1
            chunk.offset = f.tell()
            chunk.eof = chunk.offset >= os.fstat(f.fileno()).st_size
        return chunk

    def consumed(self, chunk: Chunk) -> None:
        """A chunk's rows are in the database: take them off the pending counters."""
        with self._count_lock:
            self.rows = max(0, self.rows - chunk.lines)
            self.bytes = max(0, self.bytes - chunk.nbytes)

    def reset_counters(self) -> None:
        """Nothing is left to replay: set the pending counters to zero."""
        with self._count_lock:
            self.rows = self.bytes = 0

    def remove(self, path: Path) -> None:
        """Delete a fully replayed segment."""
        path.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def reject(self, records: Sequence[UsageRecord]) -> None:
        """Keep rows the database refused, for an operator to look at."""
        with (self.directory / "rejected.jsonl").open("ab") as f:
            f.write(encode(records))
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the open segment and release the directory."""
        self.seal()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()
