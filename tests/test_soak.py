"""The short soak (30 s of `make soak`'s mixed traffic) through a real `proxyd serve` process."""

from __future__ import annotations

import pytest

from benchmarks.soak import MiB, soak

pytestmark = pytest.mark.slow


@pytest.mark.timeout(150)
async def test_short_soak_holds_memory_fds_and_rows() -> None:
    """30 s of streams and whole answers on both protocols, a key over its limit, aborts and
    provider errors: every admitted request has its row, file descriptors and memory stay flat,
    and proxyd exits 0 on SIGTERM."""
    result = await soak(30.0, clients=12, sample_every=3.0)
    for line in result.lines():
        print(line)
    assert result.exit_code == 0
    assert result.client_errors == 0
    assert result.statuses[200] > 200
    assert result.statuses[429] > 0  # the over-limit key
    assert result.statuses[503] > 0  # the provider's failures, in proxyd's words
    assert set(result.statuses) == {200, 429, 503}
    assert result.aborted > 0
    assert result.rows == result.admitted
    assert result.rows_by_status.get(499, 0) >= 1  # the aborts are billed as 499
    warm, last = result.samples[len(result.samples) // 5], result.samples[-1]
    assert last.fds <= warm.fds + 4
    assert last.rss - warm.rss < 24 * MiB
