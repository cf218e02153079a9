"""Sticky pins shared between processes: the next turn of a conversation, or a parallel first
turn, reaching another worker (through the supervisor) or another instance (through Redis).

Each race is made certain, not hoped for: the store takes a placement late (a supervisor that
answers the other worker's `pin_get` first, a Redis slow to take the SET), and the two processes
would place the session on different credentials if they did not share the pin.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from proxyd.app import PARTS, build_parts, create_app
from proxyd.supervisor.frames import FrameBuffer, encode
from proxyd.supervisor.hub import Hub
from proxyd.supervisor.link import Link
from proxyd.supervisor.shared import SupervisorSessions
from tests.conftest import SECRET, StartServer, channel, make_config
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, anthropic_body

ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
SESSION = "race"  # the conversation both processes serve
PLACES = ("pin_put", "pin_place")  # a placement, as a notification (before) or a request
Post = Callable[[str], Awaitable[str]]  # a turn of a session: the credential that served it


class Supervisor:
    """One Hub answering each worker's channel in order, as the supervisor does, except that a
    placement of SESSION is taken only once `gets` of its `pin_get`s were answered (or after
    `hold` seconds): the supervisor found the other worker's socket readable first."""

    def __init__(self, gets: int, hold: float = 0.5) -> None:
        self.hub = Hub(sticky_ttl=3600.0)
        self.gets, self.hold = gets, hold
        self.asked = 0
        self.enough = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def worker(self, pid: int) -> Link:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        self.tasks.append(asyncio.create_task(self._serve(pid, theirs)))
        return Link(ours, slot=pid - 1, workers=2)

    async def _serve(self, pid: int, sock: socket.socket) -> None:
        loop, frames = asyncio.get_running_loop(), FrameBuffer()
        with sock:
            while data := await loop.sock_recv(sock, 65536):
                for message in frames.feed(data):
                    ours = message.get("key", "").endswith(SESSION)
                    if ours and message["op"] in PLACES:
                        with suppress(TimeoutError):
                            await asyncio.wait_for(self.enough.wait(), self.hold)
                    reply = self.hub.handle(pid, message)
                    if ours and message["op"] == "pin_get":
                        self.asked += 1
                        if self.asked >= self.gets:
                            self.enough.set()
                    if reply is not None:
                        await loop.sock_sendall(sock, encode(reply))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _provider(start_server: StartServer) -> tuple[FakeProvider, dict[str, Any]]:
    """One channel with two credentials: a session has a credential to keep."""
    fake = FakeProvider(Step(body=anthropic_body("ok")))
    server = await start_server(fake.app())
    ch = channel("c0", url_of(server), type="anthropic", models=["claude-x"])
    del ch["api_key"]
    ch["api_keys"] = ["cred-0", "cred-1"]
    return fake, ch


def _poster(client: Any, fake: FakeProvider) -> Post:
    async def post(session: str) -> str:
        turn = uuid.uuid4().hex  # finds this turn among the provider's, sent at once or not
        body = {
            "model": "claude-x",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": turn}],
        }
        headers = {**ANT, "x-claude-code-session-id": session}
        response = await client.post("/v1/messages", json=body, headers=headers)
        assert response.status == 200
        (seen,) = [s for s in fake.seen if s.body["messages"][0]["content"] == turn]
        return str(seen.headers["x-api-key"])

    return post


@asynccontextmanager
async def _two_workers(
    start_server: StartServer, aiohttp_client: Any, tmp_path: Path, supervisor: Supervisor
) -> AsyncIterator[tuple[Post, Post]]:
    """Two workers of one instance (no Redis), each with its real channel to `supervisor`; the
    second has served another session, so left alone it would place SESSION on cred-1."""
    fake, ch = await _provider(start_server)
    links, posts = [], []
    try:
        for pid in (1, 2):
            home = tmp_path / f"w{pid}"
            home.mkdir()
            link = supervisor.worker(pid)
            links.append(link)
            await link.start()
            config = make_config(home, [ch])
            parts = build_parts(config, shared_sessions=SupervisorSessions(link))
            app = create_app(config, parts)
            client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
            posts.append(_poster(client, fake))
        assert await posts[1]("warm-up") == "cred-0"
        yield posts[0], posts[1]
    finally:
        for link in links:
            link.close()
        await supervisor.stop()


async def test_the_next_turn_on_another_worker_finds_the_placement(
    start_server: StartServer, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Turn 1 on worker 1, turn 2 on worker 2, whose `pin_get` the supervisor would take before
    worker 1's placement if it could: the placement is answered before turn 1's answer, so
    turn 2 and the next ones stay on turn 1's credential (before: worker 2 placed its own)."""
    supervisor = Supervisor(gets=2)
    async with _two_workers(start_server, aiohttp_client, tmp_path, supervisor) as (one, two):
        first = await one(SESSION)
        assert first == "cred-0"
        assert [await two(SESSION) for _ in range(3)] == [first] * 3
        assert await one(SESSION) == first


async def test_two_first_turns_on_two_workers_end_on_one_credential(
    start_server: StartServer, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Two first turns of one session at once on two workers, both asked before either placed:
    each serves where it chose, the supervisor keeps the first placement and tells the second,
    and every later turn on either worker goes there (before: each kept its own)."""
    supervisor = Supervisor(gets=2)
    async with _two_workers(start_server, aiohttp_client, tmp_path, supervisor) as (one, two):
        placed = await asyncio.gather(one(SESSION), two(SESSION))
        assert sorted(placed) == ["cred-0", "cred-1"]
        kept = supervisor.hub.handle(1, {"op": "pin_get", "key": f"k1\x00h:{SESSION}", "id": 1})
        assert kept is not None
        held = f"cred-{kept['pin'][1]}"
        assert [await one(SESSION), await two(SESSION), await one(SESSION)] == [held] * 3


@asynccontextmanager
async def _two_instances(
    start_server: StartServer, aiohttp_client: Any, tmp_path: Path, slow: float
) -> AsyncIterator[tuple[Post, Post]]:
    """Two instances sharing pins through the real Redis, whose SET of a pin is taken `slow`
    seconds late; the second has served another session, so left alone it would place SESSION
    on cred-1."""
    fake, ch = await _provider(start_server)
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    posts = []
    for n in (1, 2):
        home = tmp_path / f"i{n}"
        home.mkdir()
        config = make_config(
            home, [ch], redis={"url": "redis://127.0.0.1:6379/0", "prefix": prefix}
        )
        app = create_app(config)
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        redis = app[PARTS].redis
        assert redis is not None
        redis_client: Any = redis.client  # its SET of a pin taken late; the rest as it is
        plain_set = redis_client.set

        async def slow_set(name: Any, *args: Any, _set: Any = plain_set, **kw: Any) -> Any:
            if "sticky:" in str(name):
                await asyncio.sleep(slow)
            return await _set(name, *args, **kw)

        redis_client.set = slow_set
        posts.append(_poster(client, fake))
    assert await posts[1]("warm-up") == "cred-0"
    yield posts[0], posts[1]


@pytest.mark.redis
async def test_the_next_turn_on_another_instance_finds_the_placement_in_redis(
    start_server: StartServer, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Turn 1 on one instance, turn 2 at once on another, with Redis slow to take the SET: the
    first instance's answer waits for it, so turn 2 and the next ones stay on turn 1's
    credential (before: the write ran in the background and the other instance placed its own)."""
    async with _two_instances(start_server, aiohttp_client, tmp_path, 0.3) as (one, two):
        first = await one(SESSION)
        assert first == "cred-0"
        assert [await two(SESSION) for _ in range(3)] == [first] * 3
        assert await one(SESSION) == first


@pytest.mark.redis
async def test_two_first_turns_on_two_instances_end_on_one_credential(
    start_server: StartServer, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Two first turns of one session at once on two instances, both read before either wrote:
    SET NX keeps the first placement, the second instance is told it, and every later turn on
    either instance goes there (before: each kept its own, the last write won in Redis)."""
    async with _two_instances(start_server, aiohttp_client, tmp_path, 0.3) as (one, two):
        placed = await asyncio.gather(one(SESSION), two(SESSION))
        assert sorted(placed) == ["cred-0", "cred-1"]
        later = [await one(SESSION), await two(SESSION), await one(SESSION), await two(SESSION)]
        assert len(set(later)) == 1
