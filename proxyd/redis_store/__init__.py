"""Redis, shared by all instances: limit buckets, concurrency leases, balances, and a broadcast.

The only package that imports redis (`redis.asyncio`) and hiredis. Every shared change is one
Lua script, so instances never race; the script calls of the request path run on a connection of
their own (`channel.ScriptChannel`), everything else on redis-py's client. While Redis is
unreachable each instance falls back to its local limits and ledger (`fallback_active`, a
warning per transition), queues what Redis must still learn, and replays it when Redis answers
again. Never lets a shared balance go below zero.
"""

from __future__ import annotations

from proxyd.redis_store.broadcast import Broadcast
from proxyd.redis_store.ledger import RedisLedger
from proxyd.redis_store.limits import RedisLimits
from proxyd.redis_store.sessions import RedisSessions
from proxyd.redis_store.store import RedisStore, RedisUnavailable

__all__ = [
    "Broadcast",
    "RedisLedger",
    "RedisLimits",
    "RedisSessions",
    "RedisStore",
    "RedisUnavailable",
]
