"""The resale signal: per key, distinct client IPs and user agents in a sliding window.

Pure module (the clock reading is passed in). Memory per key is bounded by the thresholds, never
by the traffic: each time slice keeps at most `threshold + 1` value hashes. Never stores or logs
the IPs or user agents themselves.
"""

from __future__ import annotations

import structlog

log = structlog.get_logger("proxyd.admission.resale")


class _Track:
    """One key's slices: a ring of capped hash sets for IPs and user agents."""

    __slots__ = ("epoch", "flagged", "ips", "n_ips", "n_uas", "uas")

    def __init__(self, slices: int, epoch: int) -> None:
        self.epoch = epoch
        self.ips: list[set[int]] = [set() for _ in range(slices)]
        self.uas: list[set[int]] = [set() for _ in range(slices)]
        self.n_ips = 0
        self.n_uas = 0
        self.flagged = False

    def rotate(self, epoch: int) -> None:
        """Advance to slice `epoch`, emptying the slices that fell out of the window."""
        slices = len(self.ips)
        steps = min(epoch - self.epoch, slices)
        for i in range(epoch - steps + 1, epoch + 1):
            self.ips[i % slices].clear()
            self.uas[i % slices].clear()
        self.epoch = epoch


def _union_size(sets: list[set[int]]) -> int:
    return len(set().union(*sets))


class ResaleWatch:
    """Flags a key when more than `max_ips` IPs or `max_user_agents` user agents used it lately.

    The window is cut into `slices` slices, so the distinct counts cover between
    `window * (slices - 1) / slices` and `window` seconds back. Each slice keeps at most
    `threshold + 1` hashes, which keeps the decision "more than the threshold" exact.
    """

    def __init__(
        self,
        *,
        window: float,
        max_ips: int,
        max_user_agents: int,
        slices: int = 6,
    ) -> None:
        if window <= 0 or slices < 1 or max_ips < 1 or max_user_agents < 1:
            raise ValueError("window, slices and thresholds must be positive")
        self.window = window
        self.max_ips = max_ips
        self.max_user_agents = max_user_agents
        self._slices = slices
        self._slice = window / slices
        self._tracks: dict[str, _Track] = {}
        self._flagged: set[str] = set()
        self._prune_at = 1024

    def observe(self, key_id: str, ip: str, user_agent: str, now: float) -> bool:
        """Count one request; returns whether the key is flagged now."""
        epoch = int(now // self._slice)
        track = self._tracks.get(key_id)
        if track is None:
            if len(self._tracks) >= self._prune_at:
                self.prune(now)
            track = self._tracks[key_id] = _Track(self._slices, epoch)
        changed = False
        if epoch > track.epoch:
            track.rotate(epoch)
            changed = True
        pos = track.epoch % self._slices
        h = hash(ip)
        cur = track.ips[pos]
        if h not in cur and len(cur) <= self.max_ips:
            cur.add(h)
            changed = True
        h = hash(user_agent)
        cur = track.uas[pos]
        if h not in cur and len(cur) <= self.max_user_agents:
            cur.add(h)
            changed = True
        if changed:
            track.n_ips = _union_size(track.ips)
            track.n_uas = _union_size(track.uas)
            flagged = track.n_ips > self.max_ips or track.n_uas > self.max_user_agents
            if flagged != track.flagged:
                self._transition(key_id, track, flagged)
        return track.flagged

    def _transition(self, key_id: str, track: _Track, flagged: bool) -> None:
        track.flagged = flagged
        if flagged:
            self._flagged.add(key_id)
        else:
            self._flagged.discard(key_id)
        log.warning(
            "resale_flagged" if flagged else "resale_cleared",
            key_id=key_id,
            distinct_ips=track.n_ips,
            distinct_user_agents=track.n_uas,
            max_ips=self.max_ips,
            max_user_agents=self.max_user_agents,
            window_seconds=self.window,
        )

    def is_flagged(self, key_id: str) -> bool:
        """Whether the key was flagged at its last request."""
        return key_id in self._flagged

    def flagged_count(self) -> int:
        """Keys flagged now (the `proxyd_resale_flagged_keys` gauge)."""
        return len(self._flagged)

    def view(self, key_id: str, now: float) -> dict[str, int | bool]:
        """The key's distinct counts (capped at threshold + 1 per slice) and its flag."""
        track = self._tracks.get(key_id)
        if track is None:
            return {"distinct_ips": 0, "distinct_user_agents": 0, "flagged": False}
        epoch = int(now // self._slice)
        if epoch > track.epoch:
            track.rotate(epoch)
            track.n_ips = _union_size(track.ips)
            track.n_uas = _union_size(track.uas)
        return {
            "distinct_ips": track.n_ips,
            "distinct_user_agents": track.n_uas,
            "flagged": track.flagged,
        }

    def prune(self, now: float) -> int:
        """Forget keys with no request in the whole window (clearing their flag)."""
        horizon = int(now // self._slice) - self._slices
        stale = [k for k, t in self._tracks.items() if t.epoch <= horizon]
        for k in stale:
            track = self._tracks.pop(k)
            if track.flagged:
                self._transition(k, track, False)
        self._prune_at = max(1024, 2 * len(self._tracks))
        return len(stale)

    def tracked_keys(self) -> int:
        """Keys with state held now."""
        return len(self._tracks)
