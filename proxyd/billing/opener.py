"""`open_sink(url)`: the billing sink for a database URL.

Knows URLs, not drivers: the PostgreSQL sink (the only module importing asyncpg) is imported
only for postgresql:// URLs.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from proxyd.billing.sink import Sink


def sqlite_path(url: str) -> Path:
    """`sqlite:///relative/path` -> relative/path, `sqlite:////absolute/path` -> /absolute/path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError("database_url: a SQLite URL is sqlite:///relative or sqlite:////absolute")
    return Path(url[len(prefix) :])


def open_sink(url: str, *, schema: str = "public", timeout: float = 10.0) -> Sink:
    """The sink for a database URL (not yet connected).

    `schema` is the PostgreSQL schema holding the tables (tests use a unique one per run);
    `timeout` bounds every database operation in seconds.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        from proxyd.billing.postgres import PostgresSink  # asyncpg only when used

        return PostgresSink(url, schema=schema, timeout=timeout)
    if scheme == "sqlite":
        from proxyd.billing.sqlite import SqliteSink

        return SqliteSink(sqlite_path(url), timeout=timeout)
    raise ValueError("database_url: use postgresql://..., sqlite:///relative or sqlite:////abs")
