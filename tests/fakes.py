"""Test doubles shared by the unit tests."""

from __future__ import annotations


class FakeClock:
    """Time stands still until someone sleeps; sleeping just moves it forward.

    Pass it as both ``clock`` and ``sleep`` to the code under test (TokenBucket, OAuthToken,
    ControlShiftClient): waits then take no real time and are recorded in ``slept``.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


class ManualClock:
    """Time moves only when a test sets ``t``: for the store, the workers and the poller, whose
    schedules (retries, leases, sweeps) a test steps through deliberately."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
