"""The resale signal: distinct IPs and user agents per key in a sliding window, bounded memory."""

from __future__ import annotations

import gc
import tracemalloc

from structlog.testing import capture_logs

from proxyd.admission.resale import ResaleWatch


def watch(**extra: float) -> ResaleWatch:
    args: dict[str, float] = {"window": 600.0, "max_ips": 3, "max_user_agents": 2}
    args.update(extra)
    return ResaleWatch(
        window=args["window"],
        max_ips=int(args["max_ips"]),
        max_user_agents=int(args["max_user_agents"]),
    )


def test_flags_above_the_ip_threshold_and_logs_once() -> None:
    """The fourth distinct IP with a threshold of 3 flags the key and logs one event."""
    w = watch()
    with capture_logs() as logs:
        assert not any(w.observe("k", f"10.0.0.{i}", "ua", 1.0) for i in range(3))
        assert w.observe("k", "10.0.0.9", "ua", 2.0)
        assert w.observe("k", "10.0.0.9", "ua", 3.0)
    assert [e["event"] for e in logs] == ["resale_flagged"]
    assert logs[0]["key_id"] == "k"
    assert logs[0]["distinct_ips"] == 4
    assert "10.0.0.9" not in repr(logs)
    assert w.flagged_count() == 1


def test_repeat_clients_never_flag() -> None:
    """Thousands of requests from the same few clients are not a signal."""
    w = watch()
    for i in range(3000):
        assert not w.observe("k", f"10.0.0.{i % 3}", f"ua{i % 2}", i * 0.1)


def test_user_agents_flag_on_their_own() -> None:
    """Three user agents from one IP with a UA threshold of 2 flag the key."""
    w = watch()
    w.observe("k", "1.1.1.1", "a", 0.0)
    w.observe("k", "1.1.1.1", "b", 0.0)
    assert w.observe("k", "1.1.1.1", "c", 0.0)


def test_signal_clears_after_the_window() -> None:
    """Once the old clients leave the window the flag clears, with a log event."""
    w = watch(window=60.0)
    for i in range(5):
        w.observe("k", f"10.0.0.{i}", "ua", 0.0)
    assert w.is_flagged("k")
    assert w.observe("k", "10.0.0.0", "ua", 30.0)  # still within the window
    with capture_logs() as logs:
        assert not w.observe("k", "10.0.0.0", "ua", 61.0)
    assert [e["event"] for e in logs] == ["resale_cleared"]
    assert w.flagged_count() == 0


def test_keys_are_independent() -> None:
    """Many IPs on one key do not flag another key."""
    w = watch()
    for i in range(10):
        w.observe("busy", f"10.0.0.{i}", "ua", 0.0)
    assert not w.observe("quiet", "10.0.0.1", "ua", 0.0)


def test_view_counts_and_prune() -> None:
    """`view` shows the counts; `prune` forgets keys silent for a window and clears their flag."""
    w = watch(window=60.0)
    for i in range(5):
        w.observe("k", f"10.0.0.{i}", "ua", 0.0)
    assert w.view("k", 1.0) == {"distinct_ips": 4, "distinct_user_agents": 1, "flagged": True}
    assert w.prune(30.0) == 0
    assert w.prune(70.0) == 1
    assert w.tracked_keys() == 0
    assert w.flagged_count() == 0


def _traced_bytes(w: ResaleWatch, n: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            w.observe("k", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"agent/{i}", i * 0.001)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_with_100k_distinct_ips() -> None:
    """100,000 distinct IPs and user agents on one key hold no more memory than 1,000 do."""
    small = _traced_bytes(ResaleWatch(window=3600.0, max_ips=20, max_user_agents=10), 1_000)
    large = _traced_bytes(ResaleWatch(window=3600.0, max_ips=20, max_user_agents=10), 100_000)
    assert large < 64 * 1024
    assert large <= small * 1.5 + 4096
