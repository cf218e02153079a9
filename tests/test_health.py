"""Passive channel health under a fake clock: cooldown, backoff, one trial, Retry-After, caps."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxyd.errors import ErrorType
from proxyd.routing.health import Availability, ChannelHealth, Permit
from proxyd.state.store import Channel, State
from tests.fakes import make_channel


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fail(health: ChannelHealth, ch: Channel, kind: ErrorType = ErrorType.UPSTREAM_ERROR) -> None:
    permit = health.acquire(ch, health.clock())
    assert permit is not None
    permit.failure(kind)
    permit.release()


def trip(health: ChannelHealth, ch: Channel) -> None:
    for _ in range(health.failure_threshold):
        fail(health, ch)


def state_of(health: ChannelHealth, cid: str = "a") -> dict[str, object]:
    return health.snapshot(ids=[cid])[0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> ChannelHealth:
    return ChannelHealth(clock, base_cooldown=1.0, max_cooldown=30.0, jitter=0.0)


def test_failures_below_threshold_keep_the_channel(health: ChannelHealth) -> None:
    """Two failures in a row (threshold 3) leave the channel healthy and taking traffic."""
    ch = make_channel()
    fail(health, ch)
    fail(health, ch)
    assert state_of(health)["state"] == "healthy"
    assert state_of(health)["consecutive_failures"] == 2
    assert health.acquire(ch, health.clock()) is not None


def test_success_resets_the_failure_count(health: ChannelHealth) -> None:
    """A success between failures restarts the count, so 2 + 2 failures never trip."""
    ch = make_channel()
    fail(health, ch)
    fail(health, ch)
    permit = health.acquire(ch, health.clock())
    assert permit is not None
    permit.success()
    permit.release()
    fail(health, ch)
    fail(health, ch)
    assert state_of(health)["state"] == "healthy"


def test_cooling_channel_gets_no_traffic_until_its_single_trial(
    health: ChannelHealth, clock: FakeClock
) -> None:
    """Tripped: no permit until the cooldown ends, then exactly one trial; a second waits."""
    ch = make_channel()
    trip(health, ch)
    assert state_of(health)["state"] == "cooling_down"
    assert health.acquire(ch, clock.now + 0.999) is None
    assert health.availability(ch, clock.now + 0.999) is Availability.BLOCKED
    clock.now += 1.0
    assert state_of(health)["state"] == "trial"
    assert health.availability(ch, clock.now) is Availability.READY
    trial = health.acquire(ch, clock.now)
    assert trial is not None
    assert trial.trial
    assert health.acquire(ch, clock.now) is None
    assert health.availability(ch, clock.now) is Availability.BLOCKED
    trial.success()
    assert state_of(health)["state"] == "healthy"
    second = health.acquire(ch, clock.now)
    assert second is not None
    assert not second.trial
    trial.release()
    second.release()


def test_backoff_doubles_per_failed_trial_and_caps(health: ChannelHealth, clock: FakeClock) -> None:
    """Cooldowns run 1, 2, 4, 8, 16 s, then stay at max_cooldown (30 s) after failed trials."""
    ch = make_channel()
    trip(health, ch)
    observed = []
    for _ in range(7):
        remaining = state_of(health)["cooldown_remaining_seconds"]
        assert isinstance(remaining, float)
        observed.append(remaining)
        clock.now += remaining
        trial = health.acquire(ch, clock.now)
        assert trial is not None
        assert trial.trial
        trial.failure(ErrorType.UPSTREAM_TIMEOUT)
        trial.release()
    assert observed == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_successful_trial_resets_the_backoff(health: ChannelHealth, clock: FakeClock) -> None:
    """After a failed trial (2 s) and a good one, the next trip cools for the base 1 s again."""
    ch = make_channel()
    trip(health, ch)
    clock.now += 1.0
    t = health.acquire(ch, clock.now)
    assert t is not None
    t.failure(ErrorType.UPSTREAM_CONNECT)
    t.release()
    assert state_of(health)["cooldown_remaining_seconds"] == 2.0
    clock.now += 2.0
    t = health.acquire(ch, clock.now)
    assert t is not None
    t.success()
    t.release()
    trip(health, ch)
    assert state_of(health)["cooldown_remaining_seconds"] == 1.0


def test_jitter_shortens_within_its_fraction(clock: FakeClock) -> None:
    """With jitter 0.5 every cooldown lies in [base/2, base], and not all are equal."""
    seen = set()
    for seed in range(20):
        health = ChannelHealth(clock, 4.0, 60.0, 1, jitter=0.5, rng=random.Random(seed))
        fail(health, make_channel())
        remaining = state_of(health)["cooldown_remaining_seconds"]
        assert isinstance(remaining, float)
        assert 2.0 <= remaining <= 4.0
        seen.add(remaining)
    assert len(seen) > 10


def test_retry_after_cools_for_exactly_that_long(health: ChannelHealth, clock: FakeClock) -> None:
    """One 429 with Retry-After 7.5 blocks the channel 7.5 s (below the threshold), then a trial."""
    ch = make_channel()
    permit = health.acquire(ch, clock.now)
    assert permit is not None
    permit.failure(ErrorType.UPSTREAM_ERROR, retry_after=7.5)
    permit.release()
    assert state_of(health)["cooldown_remaining_seconds"] == 7.5
    assert health.acquire(ch, clock.now + 7.49) is None
    trial = health.acquire(ch, clock.now + 7.5)
    assert trial is not None
    assert trial.trial
    trial.release()


def test_retry_after_is_capped_by_max_cooldown(health: ChannelHealth) -> None:
    """A Retry-After of an hour cools the channel for max_cooldown (30 s) only."""
    ch = make_channel()
    permit = health.acquire(ch, health.clock())
    assert permit is not None
    permit.failure(ErrorType.UPSTREAM_ERROR, retry_after=3600.0)
    permit.release()
    assert state_of(health)["cooldown_remaining_seconds"] == 30.0


def test_retry_after_of_a_stale_permit_still_extends(
    health: ChannelHealth, clock: FakeClock
) -> None:
    """A 429 arriving after the channel tripped extends the cooldown to its Retry-After."""
    ch = make_channel()
    late = health.acquire(ch, clock.now)
    assert late is not None
    trip(health, ch)
    late.failure(ErrorType.UPSTREAM_ERROR, retry_after=10.0)
    late.release()
    assert state_of(health)["cooldown_remaining_seconds"] == 10.0


def test_soonest_cooldown_end_for_a_retry_after(health: ChannelHealth, clock: FakeClock) -> None:
    """With every candidate cooling, soonest() is the shortest wait; any free one gives None."""
    a, b = make_channel("a"), make_channel("b")
    p = health.acquire(a, clock.now)
    assert p is not None
    p.failure(ErrorType.UPSTREAM_ERROR, retry_after=9.0)
    p.release()
    assert health.soonest([a, b], clock.now) is None
    p = health.acquire(b, clock.now)
    assert p is not None
    p.failure(ErrorType.UPSTREAM_ERROR, retry_after=4.0)
    p.release()
    assert health.soonest([a, b], clock.now + 1.0) == 3.0
    assert health.soonest([a, b], clock.now + 4.0) is None
    assert health.soonest([], clock.now) is None


def test_outcomes_from_before_the_trip_do_not_count(
    health: ChannelHealth, clock: FakeClock
) -> None:
    """Permits issued before a trip neither lengthen the cooldown nor end it."""
    ch = make_channel()
    early = [health.acquire(ch, clock.now) for _ in range(4)]
    trip(health, ch)
    for p in early[:3]:
        assert p is not None
        p.failure(ErrorType.UPSTREAM_ERROR)
        p.release()
    assert state_of(health)["cooldown_remaining_seconds"] == 1.0
    assert early[3] is not None
    early[3].success()
    early[3].release()
    assert state_of(health)["state"] == "cooling_down"


def test_client_error_counts_as_an_answer(health: ChannelHealth, clock: FakeClock) -> None:
    """An upstream 400 on the trial means the channel answers: it is healthy again."""
    ch = make_channel()
    trip(health, ch)
    clock.now += 1.0
    trial = health.acquire(ch, clock.now)
    assert trial is not None
    trial.failure(ErrorType.UPSTREAM_CLIENT_ERROR)
    trial.release()
    assert state_of(health)["state"] == "healthy"


def test_neutral_outcome_frees_the_trial_slot(health: ChannelHealth, clock: FakeClock) -> None:
    """A trial whose client left decides nothing; once released another request is the trial."""
    ch = make_channel()
    trip(health, ch)
    clock.now += 1.0
    trial = health.acquire(ch, clock.now)
    assert trial is not None
    trial.failure(ErrorType.CLIENT_DISCONNECT)
    assert health.acquire(ch, clock.now) is None
    trial.release()
    assert state_of(health)["state"] == "trial"
    again = health.acquire(ch, clock.now)
    assert again is not None
    assert again.trial
    again.release()


def test_reset_after_success_still_counts(health: ChannelHealth) -> None:
    """success() at the headers then failure(reset) mid-stream counts one failure; twice is once."""
    ch = make_channel()
    permit = health.acquire(ch, health.clock())
    assert permit is not None
    permit.success()
    permit.failure(ErrorType.UPSTREAM_RESET)
    permit.failure(ErrorType.UPSTREAM_RESET)
    permit.success()
    permit.release()
    snap = state_of(health)
    assert snap["consecutive_failures"] == 1
    assert snap["last_error_type"] == "upstream_reset"


def test_concurrency_cap_and_idempotent_release(health: ChannelHealth) -> None:
    """max_concurrency 2: a third permit is refused (CAPPED) until one is released, once."""
    ch = make_channel(max_concurrency=2)
    now = health.clock()
    a, b = health.acquire(ch, now), health.acquire(ch, now)
    assert a is not None
    assert b is not None
    assert health.acquire(ch, now) is None
    assert health.availability(ch, now) is Availability.CAPPED
    a.release()
    a.release()
    assert state_of(health)["in_flight"] == 1
    c = health.acquire(ch, now)
    assert c is not None
    assert health.acquire(ch, now) is None
    b.release()
    c.release()
    assert state_of(health)["in_flight"] == 0


def test_rpm_cap_refills_continuously(health: ChannelHealth, clock: FakeClock) -> None:
    """rpm 2: two permits at once, the third 30 s later (one token per 30 s), failed ones count."""
    ch = make_channel(rpm=2)
    for _ in range(2):
        p = health.acquire(ch, clock.now)
        assert p is not None
        p.failure(ErrorType.UPSTREAM_CONNECT)
        p.release()
    assert health.acquire(ch, clock.now + 29.9) is None
    assert health.availability(ch, clock.now + 29.9) is Availability.CAPPED
    p = health.acquire(ch, clock.now + 30.0)
    assert p is not None
    p.release()


def test_rpm_change_takes_effect(health: ChannelHealth, clock: FakeClock) -> None:
    """A pushed channel with a new rpm under the same id gets a bucket of the new size."""
    for _ in range(1):
        p = health.acquire(make_channel(rpm=1), clock.now)
        assert p is not None
        p.release()
    assert health.acquire(make_channel(rpm=1), clock.now) is None
    for _ in range(3):
        p = health.acquire(make_channel(rpm=3), clock.now)
        assert p is not None
        p.release()
    assert health.acquire(make_channel(rpm=3), clock.now) is None
    assert health.acquire(make_channel(rpm=None), clock.now) is not None


def test_snapshot_reports_every_field(health: ChannelHealth, clock: FakeClock) -> None:
    """The snapshot names each channel asked for, unknown ones as fresh and healthy."""
    ch = make_channel("b")
    held = health.acquire(ch, clock.now)
    trip(health, ch)
    snap = health.snapshot(clock.now + 0.25, ids=["b", "zz"])
    assert snap == [
        {
            "id": "b",
            "healthy": False,
            "state": "cooling_down",
            "consecutive_failures": 3,
            "cooldown_remaining_seconds": 0.75,
            "in_flight": 1,
            "last_error_type": "upstream_error",
            "refused_models": {},
        },
        {
            "id": "zz",
            "healthy": True,
            "state": "healthy",
            "consecutive_failures": 0,
            "cooldown_remaining_seconds": 0.0,
            "in_flight": 0,
            "last_error_type": None,
            "refused_models": {},
        },
    ]
    assert [s["id"] for s in health.snapshot()] == ["b"]
    assert held is not None
    held.release()


def test_removed_channels_are_forgotten(health: ChannelHealth) -> None:
    """A state swap without channel b drops b's health; a/c stay as they were."""
    a, b = make_channel("a"), make_channel("b")
    trip(health, a)
    fail(health, b)
    health.on_state(State(channels=(a, b)), State(channels=(a,)))
    assert [s["id"] for s in health.snapshot()] == ["a"]
    assert state_of(health, "a")["state"] == "cooling_down"
    health.prune(set())
    assert health.snapshot() == []


def test_bad_settings_are_refused(clock: FakeClock) -> None:
    """Nonsense thresholds and cooldowns fail at construction, not on the request path."""
    with pytest.raises(ValueError, match="cooldown"):
        ChannelHealth(clock, base_cooldown=0.0)
    with pytest.raises(ValueError, match="threshold"):
        ChannelHealth(clock, failure_threshold=0)
    with pytest.raises(ValueError, match="jitter"):
        ChannelHealth(clock, jitter=1.0)


KINDS = [
    ErrorType.UPSTREAM_CONNECT,
    ErrorType.UPSTREAM_TIMEOUT,
    ErrorType.UPSTREAM_ERROR,
    ErrorType.UPSTREAM_RESET,
    ErrorType.UPSTREAM_CLIENT_ERROR,
    ErrorType.CLIENT_DISCONNECT,
]


class PermitMachine(RuleBasedStateMachine):
    """Random acquire/success/failure/release/clock steps on two capped channels."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.health = ChannelHealth(self.clock, 0.5, 4.0, 2, jitter=0.2, rng=random.Random(1))
        self.channels = [make_channel("a", max_concurrency=2), make_channel("b", rpm=30)]
        self.out: list[tuple[int, Permit]] = []
        self.decided: set[int] = set()

    @rule(which=st.integers(0, 1))
    def acquire(self, which: int) -> None:
        ch = self.channels[which]
        expected = self.health.availability(ch, self.clock.now)
        permit = self.health.acquire(ch, self.clock.now)
        assert (permit is not None) == (expected is Availability.READY)
        if permit is not None:
            self.out.append((which, permit))

    @precondition(lambda self: self.out)
    @rule(i=st.integers(0, 1000), ok=st.booleans(), kind=st.sampled_from(KINDS),
          retry_after=st.none() | st.floats(0.0, 10.0))  # fmt: skip
    def outcome(self, i: int, ok: bool, kind: ErrorType, retry_after: float | None) -> None:
        _, permit = self.out[i % len(self.out)]
        self.decided.add(id(permit))
        if ok:
            permit.success()
        else:
            permit.failure(kind, retry_after)

    @precondition(lambda self: self.out)
    @rule(i=st.integers(0, 1000), twice=st.booleans())
    def release(self, i: int, twice: bool) -> None:
        _, permit = self.out.pop(i % len(self.out))
        permit.release()
        if twice:
            permit.release()

    @rule(dt=st.floats(0.0, 5.0))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @invariant()
    def in_flight_matches_permits_out(self) -> None:
        snap = {s["id"]: s for s in self.health.snapshot(ids=["a", "b"])}
        for which, ch in enumerate(self.channels):
            held = sum(1 for w, _ in self.out if w == which)
            assert snap[ch.id]["in_flight"] == held
            if ch.max_concurrency is not None:
                assert held <= ch.max_concurrency

    @invariant()
    def one_undecided_trial_per_cooldown(self) -> None:
        for which in (0, 1):
            gens = [
                p.generation
                for w, p in self.out
                if w == which and p.trial and id(p) not in self.decided
            ]
            assert len(gens) == len(set(gens))

    def teardown(self) -> None:
        for _, held in self.out:
            held.release()
        self.clock.now += 1000.0
        for ch in self.channels:
            assert state_of(self.health, ch.id)["in_flight"] == 0
            permit = self.health.acquire(ch, self.clock.now)
            assert permit is not None, "a channel must never stay stuck once permits are back"
            permit.release()


TestPermitMachine = PermitMachine.TestCase
TestPermitMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_refused_credential_trips_at_once_with_its_own_backoff(clock: FakeClock) -> None:
    """One refused credential cools the channel for credential_cooldown (not after 3 failures,
    not for a Retry-After's few seconds); failed trials double it up to max_cooldown; a good
    trial makes it healthy."""
    health = ChannelHealth(
        clock, base_cooldown=1.0, max_cooldown=100.0, credential_cooldown=20.0, jitter=0.0
    )
    ch = make_channel()
    permit = health.acquire(ch, clock.now)
    assert permit is not None
    permit.failure(ErrorType.UPSTREAM_CREDENTIAL, retry_after=2.0)
    permit.release()
    snap = state_of(health)
    assert (snap["state"], snap["cooldown_remaining_seconds"]) == ("cooling_down", 20.0)
    assert snap["last_error_type"] == "upstream_credential"
    assert snap["healthy"] is False
    for expected in (40.0, 80.0, 100.0, 100.0):
        clock.now += 1000
        assert state_of(health)["healthy"] is True  # cooldown over: its trial is offered
        trial = health.acquire(ch, clock.now)
        assert trial is not None
        assert trial.trial
        trial.failure(ErrorType.UPSTREAM_CREDENTIAL)
        trial.release()
        assert state_of(health)["cooldown_remaining_seconds"] == expected
    clock.now += 1000
    trial = health.acquire(ch, clock.now)
    assert trial is not None
    trial.success()
    trial.release()
    assert state_of(health)["state"] == "healthy"


def test_a_model_the_credential_may_not_use_cools_alone(clock: FakeClock) -> None:
    """A 403 about one model (`refuse_model`) skips that model on the channel for the credential
    cooldown, doubling while it keeps being refused, capped; the channel stays healthy and
    serves its other models; a success for the model forgets the refusal; pruning the channel
    forgets it too."""
    health = ChannelHealth(
        clock, base_cooldown=1.0, max_cooldown=100.0, credential_cooldown=20.0, jitter=0.0
    )
    ch = make_channel()
    health.refuse_model(ch.id, "gpt-b")
    assert health.model_refused(ch.id, "gpt-b", clock.now)
    assert not health.model_refused(ch.id, "gpt-a", clock.now)
    assert health.availability(ch, clock.now) is Availability.READY
    snap = state_of(health)
    assert (snap["state"], snap["refused_models"]) == ("healthy", {"gpt-b": 20.0})
    for expected in (40.0, 80.0, 100.0, 100.0):
        clock.now += 1000
        assert not health.model_refused(ch.id, "gpt-b", clock.now)  # tried again
        health.refuse_model(ch.id, "gpt-b")
        assert state_of(health)["refused_models"] == {"gpt-b": expected}
    clock.now += 1000
    health.model_served(ch.id, "gpt-b")
    health.refuse_model(ch.id, "gpt-b")
    assert state_of(health)["refused_models"] == {"gpt-b": 20.0}  # the backoff starts over
    health.prune(set())
    assert not health.model_refused(ch.id, "gpt-b", clock.now)
