"""A loopback TCP proxy in front of PostgreSQL that tests can cut and restore.

`cut()` resets every live connection and refuses new ones; `cut(blackhole=True)` keeps sockets
open but forwards nothing (a hung network); `restore()` forwards again. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib


class PgProxy:
    """Forwards 127.0.0.1:<port> to the PostgreSQL server; start() picks a free port."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.up = True
        self.blackhole = False
        self.connections = 0  # accepted while up, for tests that want to see reconnects
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def dsn(self, database: str = "test", user: str = "postgres") -> str:
        """A connection URL that goes through the proxy."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                if self.blackhole:
                    continue
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    def cut(self, *, blackhole: bool = False) -> None:
        """Lose connectivity: reset live connections (or silently drop their bytes)."""
        if blackhole:
            self.blackhole = True
            return
        self.up = False
        for a, b in self._pairs:
            a.transport.abort()
            b.transport.abort()
        self._pairs.clear()

    def restore(self) -> None:
        """Forward again; blackholed connections stay dead, new ones work."""
        if self.blackhole:
            self.blackhole = False
            for a, b in self._pairs:
                a.transport.abort()
                b.transport.abort()
            self._pairs.clear()
        self.up = True

    async def close(self) -> None:
        """Stop listening and drop everything."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
