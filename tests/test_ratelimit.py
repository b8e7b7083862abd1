"""The shared token bucket (csand.ratelimit), on fake time: no test here really sleeps."""

from __future__ import annotations

import heapq
import itertools

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csand.ratelimit import SharedTokenBucket, TokenBucket
from csand.retry import RetryPolicy
from tests.fakes import FakeClock

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)
EPS = 1e-9


class VirtualClock:
    """Virtual time for concurrent tasks: sleepers wake in time order, and time only moves on
    once every runnable task has had its turn, so a task reads the time of its own slot when it
    wakes. Settling is a fixed number of scheduler turns: no real time passes."""

    SETTLE_TURNS = 50

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        wake = anyio.Event()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), wake))
        await wake.wait()

    async def settle(self) -> None:
        for _ in range(self.SETTLE_TURNS):
            await anyio.lowlevel.checkpoint()

    async def run(self) -> None:
        """Advance time until nobody sleeps any more (run as a task beside the workers)."""
        while True:
            await self.settle()
            if not self._sleepers:
                return
            self.now = max(self.now, self._sleepers[0][0])
            while self._sleepers and self._sleepers[0][0] <= self.now:
                heapq.heappop(self._sleepers)[2].set()


def bucket(clock, rate: float = 4.0, **kwargs) -> TokenBucket:
    return TokenBucket(rate, clock=clock, sleep=clock.sleep, **kwargs)


async def acquire_times(b: TokenBucket, clock, n: int) -> list[float]:
    times = []
    for _ in range(n):
        await b.acquire()
        times.append(clock.now)
    return times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# ---- steady state -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_n_acquires_take_n_minus_one_intervals() -> None:
    clock = FakeClock()
    start = clock.now
    b = bucket(clock, rate=4.0)
    times = await acquire_times(b, clock, 9)
    assert times[0] == start  # the first request goes at once
    assert times[-1] - start == pytest.approx(8 / 4.0)
    assert all(g == pytest.approx(0.25) for g in gaps(times))


@PROPERTY_SETTINGS
@given(st.floats(min_value=0.5, max_value=50.0), st.integers(min_value=1, max_value=40))
def test_spacing_is_exactly_one_over_rate(rate: float, n: int) -> None:
    async def main() -> None:
        clock = FakeClock()
        start = clock.now
        times = await acquire_times(bucket(clock, rate=rate), clock, n)
        assert times[-1] - start == pytest.approx((n - 1) / rate)
        for g in gaps(times):
            assert g == pytest.approx(1 / rate)

    anyio.run(main)


@pytest.mark.anyio
async def test_idle_time_does_not_bank_a_burst() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0)
    await b.acquire()
    clock.now += 60  # a long idle spell
    times = await acquire_times(b, clock, 3)
    assert times[0] == clock.now - 0.5
    assert gaps(times) == pytest.approx([0.25, 0.25])


@pytest.mark.anyio
async def test_configured_burst_is_allowed_after_idle() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0, burst=3)
    clock.now += 60
    idle_end = clock.now
    times = await acquire_times(b, clock, 5)
    assert times[:3] == [idle_end] * 3
    assert times[3:] == pytest.approx([idle_end + 0.25, idle_end + 0.5])


def test_rate_must_be_positive() -> None:
    clock = FakeClock()
    for rate in (0, -1):
        with pytest.raises(ValueError):
            bucket(clock, rate=rate)


# ---- concurrency --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_acquirers_never_get_slots_closer_than_one_over_rate() -> None:
    clock = VirtualClock()
    start = clock.now
    b = bucket(clock, rate=4.0)
    times: list[float] = []

    async def worker() -> None:
        for _ in range(5):
            await b.acquire()
            times.append(clock.now)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(worker)
        tg.start_soon(clock.run)

    assert len(times) == 40
    ordered = sorted(times)
    assert all(g >= 0.25 - EPS for g in gaps(ordered))
    # shared fairly and without idle gaps: 40 requests need 39 intervals
    assert ordered[-1] - start == pytest.approx(39 * 0.25)


@pytest.mark.anyio
async def test_concurrent_acquirers_with_the_simple_clock_are_spaced_too() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=10.0)
    times: list[float] = []

    async def worker() -> None:
        for _ in range(4):
            await b.acquire()
            times.append(clock.now)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(worker)

    ordered = sorted(times)
    assert len(ordered) == 20
    assert all(g >= 0.1 - EPS for g in gaps(ordered))


@pytest.mark.anyio
async def test_a_429_pauses_acquirers_that_were_already_waiting() -> None:
    clock = VirtualClock()
    b = bucket(clock, rate=4.0, recovery_seconds=1e9)  # recovery too slow to see here
    await b.acquire()
    t429 = clock.now
    times: list[float] = []

    async def worker() -> None:
        await b.acquire()
        times.append(clock.now)

    async def limited() -> None:
        await clock.sleep(0.1)  # by now every worker holds a slot and sleeps towards it
        assert b.paused_until < clock.now
        b.on_rate_limited(retry_after=3)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(worker)
        tg.start_soon(limited)
        tg.start_soon(clock.run)

    assert len(times) == 4
    assert min(times) >= t429 + 0.1 + 3 - EPS
    ordered = sorted(times)
    # after the 429 the rate is halved: slots 0.5 s apart
    assert gaps(ordered) == pytest.approx([0.5, 0.5, 0.5])


# ---- 429s: pause, halve, recover ----------------------------------------------------------


@pytest.mark.anyio
async def test_retry_after_pauses_everyone_and_halves_the_rate() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0)
    await acquire_times(b, clock, 3)
    t = clock.now
    pause = b.on_rate_limited(retry_after=3)
    assert pause == 3
    assert b.paused_until == pytest.approx(t + 3)
    assert b.current_rate() == pytest.approx(2.0)
    assert b.rate_limited_count == 1
    times = await acquire_times(b, clock, 3)
    assert times[0] == pytest.approx(t + 3)
    assert all(x >= t + 3 - EPS for x in times)
    assert gaps(times)[0] == pytest.approx(1 / 2.0, rel=0.05)


@pytest.mark.anyio
async def test_a_pause_applies_even_to_a_slot_already_due() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0)
    clock.now += 10
    t = clock.now
    b.on_rate_limited(retry_after=3)
    await b.acquire()
    assert clock.now == pytest.approx(t + 3)


@pytest.mark.parametrize("recovery", [10.0, 20.0, 60.0])
def test_rate_recovers_linearly_after_the_pause(recovery: float) -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0, recovery_seconds=recovery)
    t = clock.now
    b.on_rate_limited(retry_after=3)
    end = t + 3
    assert b.current_rate(t + 1) == pytest.approx(2.0)  # still paused: the halved rate
    assert b.current_rate(end) == pytest.approx(2.0)
    for fraction in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert b.current_rate(end + fraction * recovery) == pytest.approx(2.0 + 2.0 * fraction)
    assert b.current_rate(end + recovery) == pytest.approx(4.0)
    assert b.current_rate(end + 10 * recovery) == pytest.approx(4.0)
    clock.now = end + recovery
    assert b.current_rate() == pytest.approx(4.0)


@pytest.mark.anyio
async def test_spacing_shrinks_back_to_one_over_rate_during_recovery() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0, recovery_seconds=5.0)
    b.on_rate_limited(retry_after=0)
    times = await acquire_times(b, clock, 40)
    g = gaps(times)
    assert g[0] == pytest.approx(0.5)
    assert all(later <= earlier + EPS for earlier, later in itertools.pairwise(g))
    assert g[-1] == pytest.approx(0.25)


def test_pause_without_retry_after_doubles_and_is_capped() -> None:
    clock = FakeClock()
    b = bucket(clock)
    pauses = [b.on_rate_limited() for _ in range(8)]
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 30]
    assert b.rate_limited_count == 8


def test_pause_resets_after_a_success() -> None:
    clock = FakeClock()
    b = bucket(clock)
    assert [b.on_rate_limited() for _ in range(3)] == [1, 2, 4]
    b.on_success()
    assert [b.on_rate_limited() for _ in range(2)] == [1, 2]


def test_pause_stays_capped_after_very_many_429s() -> None:
    """Past 1024 strikes the doubling overflows a float; the pause is the cap all the same."""
    clock = FakeClock()
    b = bucket(clock)
    pauses = [b.on_rate_limited() for _ in range(1100)]
    assert pauses[-100:] == [30] * 100


def test_pause_follows_the_given_policy() -> None:
    clock = FakeClock()
    b = bucket(clock, pause_policy=RetryPolicy(base=0.5, factor=3.0, cap=10.0, jitter=0.0))
    assert [b.on_rate_limited() for _ in range(4)] == [0.5, 1.5, 4.5, 10.0]


@pytest.mark.anyio
async def test_exponential_pause_holds_back_acquires() -> None:
    clock = FakeClock()
    b = bucket(clock)
    expected_end = clock.now
    for _ in range(3):
        expected_end = clock.now + b.on_rate_limited()
        await b.acquire()
        assert clock.now == pytest.approx(expected_end)
    assert clock.slept == pytest.approx([1, 2, 4])


def test_paused_until_never_moves_backwards() -> None:
    clock = FakeClock()
    b = bucket(clock)
    t = clock.now
    b.on_rate_limited(retry_after=10)
    b.on_rate_limited(retry_after=1)
    assert b.paused_until == pytest.approx(t + 10)


@pytest.mark.parametrize("fraction", [0.125, 0.25])
def test_min_rate_floor_holds_after_many_429s(fraction: float) -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0, min_rate_fraction=fraction)
    for _ in range(50):
        b.on_rate_limited(retry_after=0.5)
        clock.now += 0.1
        assert b.current_rate() >= 4.0 * fraction - EPS
    assert b.current_rate(b.paused_until) == pytest.approx(4.0 * fraction)


@pytest.mark.anyio
async def test_acquires_after_many_429s_are_spaced_by_the_floor_rate() -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0, recovery_seconds=1e9)
    for _ in range(20):
        b.on_rate_limited(retry_after=0)
    times = await acquire_times(b, clock, 3)
    for g in gaps(times):
        assert g <= 1 / (4.0 * 0.125) + EPS  # never slower than the floor rate
        assert g == pytest.approx(2.0)


@PROPERTY_SETTINGS
@given(st.lists(st.sampled_from(["429", "429-after", "ok", "wait"]), max_size=40))
def test_rate_stays_between_floor_and_target(events: list[str]) -> None:
    clock = FakeClock()
    b = bucket(clock, rate=4.0)
    for event in events:
        if event == "429":
            b.on_rate_limited()
        elif event == "429-after":
            b.on_rate_limited(retry_after=2)
        elif event == "ok":
            b.on_success()
        else:
            clock.now += 5
        assert 0.5 - EPS <= b.current_rate() <= 4.0 + EPS
        assert b.paused_until <= clock.now + 30 + EPS


def test_defaults_do_not_touch_the_fake_clock_at_rest() -> None:
    clock = FakeClock()
    b = bucket(clock)
    assert b.current_rate() == 4.0
    assert b.paused_until == 0.0
    assert clock.slept == []


# ---------------------------------------------------------------- shared by several instances


class Slots:
    """What a store's ``reserve`` does, on the same fake clock: one sequence of slots."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.next_at = 0.0
        self.paused_until = 0.0
        self.calls: list[tuple[str, float, float]] = []

    async def reserve(self, bucket: str, interval: float, pause: float = 0.0) -> float:
        now = self.clock()
        self.calls.append((bucket, interval, pause))
        self.paused_until = max(self.paused_until, now + pause)
        slot = max(self.next_at, now, self.paused_until)
        self.next_at = slot + interval
        return slot - now


@pytest.mark.anyio
async def test_shared_bucket_waits_for_the_slot_the_store_hands_out() -> None:
    clock = FakeClock()
    slots = Slots(clock)
    bucket = SharedTokenBucket(slots, 4.0, headroom=0.97, clock=clock, sleep=clock.sleep)
    started = clock()
    for _ in range(5):
        await bucket.acquire()
    assert clock() - started == pytest.approx(4 / (4 * 0.97))
    assert {c[:2] for c in slots.calls} == {("action_network", 1 / (4 * 0.97))}


@pytest.mark.anyio
async def test_a_429_here_pauses_every_instance_and_slows_this_one() -> None:
    clock = FakeClock()
    slots = Slots(clock)
    bucket = SharedTokenBucket(slots, 4.0, headroom=1.0, clock=clock, sleep=clock.sleep)
    await bucket.acquire()
    pause = bucket.on_rate_limited(retry_after=3.0)
    assert pause == 3.0
    before = clock()
    await bucket.acquire()
    # The pause went to the store with the next reservation, where the other instances meet it.
    assert slots.calls[-1][2] == 3.0 and slots.paused_until == pytest.approx(before + 3.0)
    assert clock() >= before + 3.0
    # This instance asks for wider slots while it recovers (half the rate: twice the interval).
    assert slots.calls[-1][1] == pytest.approx(0.5)
    await bucket.acquire()
    assert slots.calls[-1][2] == 0.0  # the pause is shared once, not with every request
