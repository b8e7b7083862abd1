"""A token bucket shared by every worker, that slows down on 429 and recovers gradually.

AN allows 4 requests/second per API key and asks clients to back off exponentially, so one
bucket per key is shared by all workers: requests are spaced ``1/rate`` apart (a burst above 1
would let a short spike exceed AN's window). On a 429 every worker pauses (for ``Retry-After``
when AN sends it, otherwise the exponential pause of :data:`csand.retry.LIMITER_PAUSE`), the rate
is halved, and it climbs back linearly to the configured rate over ``recovery_seconds``.

Time comes from an injectable clock and sleep, so tests drive it with a fake clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from csand.retry import LIMITER_PAUSE, RetryPolicy


class TokenBucket:
    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        headroom: float = 1.0,
        min_rate_fraction: float = 0.125,
        recovery_seconds: float = 20.0,
        pause_policy: RetryPolicy = LIMITER_PAUSE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if not 0 < headroom <= 1:
            raise ValueError("headroom must be in (0, 1]")
        # Run a little under the limit: requests scheduled exactly 1/rate apart arrive a
        # millisecond closer now and then, which a strict limiter answers with a 429.
        self.target_rate = rate * headroom
        self.burst = max(1.0, burst)
        self.min_rate = self.target_rate * min_rate_fraction
        self._full_rate = self.target_rate  # before any share is left to another process
        self._min_fraction = min_rate_fraction
        self.recovery_seconds = recovery_seconds
        self.pause_policy = pause_policy
        self._clock = clock
        self._sleep = sleep
        self._lock = anyio.Lock()
        self._next = clock()  # earliest time the next request may start
        self._floor = rate  # rate right after the last 429
        self._limited_at: float | None = None
        self._paused_until = 0.0
        self._strikes = 0  # consecutive 429s without a success in between
        self.rate_limited_count = 0

    def current_rate(self, now: float | None = None) -> float:
        if self._limited_at is None:
            return self.target_rate
        now = self._clock() if now is None else now
        elapsed = max(0.0, now - self._limited_at)
        climbed = self._floor + (self.target_rate - self._floor) * elapsed / self.recovery_seconds
        return min(self.target_rate, climbed)

    def leave(self, rate: float) -> None:
        """Leave ``rate`` requests/second of the configured rate to another process (``csand
        audit`` beside a daemon on a SQLite store, see :class:`Reservation`); 0 takes it all
        back. At least a quarter of the configured rate always stays."""
        self.target_rate = max(self._full_rate - max(0.0, rate), self._full_rate * 0.25)
        self.min_rate = self.target_rate * self._min_fraction

    @property
    def paused_until(self) -> float:
        return self._paused_until

    async def acquire(self) -> None:
        """Wait for this caller's slot. Slots are handed out in arrival order."""
        while True:
            async with self._lock:
                now = self._clock()
                earliest = now - (self.burst - 1) / self.current_rate(now)
                start = max(self._next, earliest, self._paused_until)
                self._next = start + 1.0 / self.current_rate(start)
            if start > now:
                await self._sleep(start - now)
            # A 429 seen while we slept pauses us too, even though our slot was handed out.
            if self._clock() + 1e-9 >= self._paused_until:
                return

    def on_success(self) -> None:
        self._strikes = 0

    def on_rate_limited(self, retry_after: float | None = None) -> float:
        """Pause everyone and halve the rate. Returns the pause in seconds."""
        now = self._clock()
        self.rate_limited_count += 1
        self._strikes += 1
        pause = retry_after if retry_after is not None else self.pause_policy.delay(self._strikes)
        self._floor = max(self.min_rate, self.current_rate(now) / 2)
        self._limited_at = now + pause
        self._paused_until = max(self._paused_until, now + pause)
        self._next = max(self._next, self._paused_until)
        return pause


class SlotSource(Protocol):
    async def reserve(self, bucket: str, interval: float, pause: float = 0.0) -> float: ...


class SharedTokenBucket(TokenBucket):
    """The same limiter for several csand instances on one database.

    AN's limit is per API key, not per process: each request reserves the next slot of one
    row in the database (:meth:`csand.storage.Cluster.reserve`), so slots of all instances are
    ``1/rate`` apart together. A 429 seen here pauses every instance (the pause goes with the
    next reservation) and halves this instance's rate, which spaces the shared slots further
    while it recovers.
    """

    def __init__(self, slots: SlotSource, rate: float, *, bucket: str = "action_network",
                 **options: object) -> None:
        super().__init__(rate, **options)  # type: ignore[arg-type]
        self._slots = slots
        self.bucket = bucket
        self._pause_to_share = 0.0

    async def acquire(self) -> None:
        while True:
            pause, self._pause_to_share = self._pause_to_share, 0.0
            wait = await self._slots.reserve(self.bucket, 1.0 / self.current_rate(), pause)
            if wait > 0:
                await self._sleep(wait)
            if self._clock() + 1e-9 >= self._paused_until:
                return

    def on_rate_limited(self, retry_after: float | None = None) -> float:
        pause = super().on_rate_limited(retry_after)
        self._pause_to_share = max(self._pause_to_share, pause)
        return pause


RESERVATION_KEY = "an_audit_reservation"  # meta: a share of AN's rate another process takes
HONOURED_KEY = "an_audit_honoured"  # meta: the daemon left that share (the reservation's expiry)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A share of the AN rate announced in the store's meta by a process beside the daemon
    (``csand audit``), until ``until`` (Unix time): the daemon's in-process bucket (SQLite)
    leaves it while the announcement is fresh. The announcer renews it while it runs."""

    rate: float
    until: float

    def to_meta(self) -> str:
        return json.dumps({"rate": self.rate, "until": self.until})

    @classmethod
    def from_meta(cls, raw: str | None) -> Reservation | None:
        try:
            data = json.loads(raw or "")
            return cls(float(data["rate"]), float(data["until"]))
        except (ValueError, TypeError, KeyError):
            return None

    def fresh(self, now: float) -> bool:
        return now < self.until
