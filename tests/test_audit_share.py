"""The AN budget an audit takes beside a running daemon: the daemon's in-process bucket (SQLite)
leaves the share an audit announces in the store, while the announcement is fresh."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from csand.config import Settings
from csand.daemon import Daemon
from csand.ratelimit import HONOURED_KEY, RESERVATION_KEY, Reservation, TokenBucket
from csand.storage import open_store
from tests.fakes import FakeClock


@pytest.mark.anyio
async def test_a_bucket_leaves_a_share_and_takes_it_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4.0, clock=clock, sleep=clock.sleep)
    bucket.leave(1.0)
    assert bucket.current_rate() == pytest.approx(3.0)
    for _ in range(31):
        await bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(10.0)  # 30 intervals of 1/3 s
    bucket.leave(10.0)
    assert bucket.current_rate() == pytest.approx(1.0)  # a quarter always stays
    bucket.leave(0.0)
    assert bucket.current_rate() == pytest.approx(4.0)


def test_a_reservation_round_trips_through_meta() -> None:
    r = Reservation(0.97, 123.5)
    assert Reservation.from_meta(r.to_meta()) == r
    assert Reservation.from_meta(None) is None
    assert Reservation.from_meta("{broken") is None
    assert r.fresh(100.0) and not r.fresh(123.5)


@pytest.mark.anyio
async def test_the_daemon_leaves_a_fresh_reservation_and_says_so(tmp_path: Path) -> None:
    settings = Settings(controlshift={"url": "http://cs.test", "api_key": "k"},
                        action_network={"api_key": "a"},
                        store={"path": str(tmp_path / "csand.db")})
    daemon = Daemon(settings)
    store = await open_store(tmp_path / "csand.db")
    limiter = TokenBucket(4.0, headroom=0.97)
    daemon.store = store
    daemon.dispatcher = SimpleNamespace(an=SimpleNamespace(limiter=limiter))  # type: ignore[assignment]
    try:
        until = time.time() + 30
        await store.set_meta(**{RESERVATION_KEY: Reservation(0.97, until).to_meta()})
        await daemon._leave_audit_share()
        assert limiter.current_rate() == pytest.approx(3 * 0.97)
        assert float(await store.get_meta(HONOURED_KEY) or 0) == pytest.approx(until)
        # Expired (an audit killed without a word): the whole rate again.
        await store.set_meta(**{RESERVATION_KEY: Reservation(0.97, time.time() - 1).to_meta()})
        await daemon._leave_audit_share()
        assert limiter.current_rate() == pytest.approx(4 * 0.97)
        await store.set_meta(**{RESERVATION_KEY: None})
        await daemon._leave_audit_share()
        assert limiter.current_rate() == pytest.approx(4 * 0.97)
    finally:
        await store.close()


class Slots:
    """A store's request slots, counted (what the daemons of a PostgreSQL cluster share)."""

    def __init__(self) -> None:
        self.reserved: list[float] = []

    async def reserve(self, bucket: str, interval: float, pause: float = 0.0) -> float:
        self.reserved.append(interval)
        return 0.0


@pytest.mark.anyio
async def test_an_audit_request_takes_its_own_share_and_a_shared_slot() -> None:
    from csand.audit import AuditLimiter
    from csand.ratelimit import SharedTokenBucket

    slots = Slots()
    limiter = AuditLimiter(1000.0, SharedTokenBucket(slots, 4.0, headroom=0.97))
    for _ in range(3):
        await limiter.acquire()
    assert slots.reserved == [pytest.approx(1 / (4 * 0.97))] * 3  # a daemon's slot each
    assert limiter.on_rate_limited(2.0) == 2.0
    assert limiter.shared is not None and limiter.shared.rate_limited_count == 1
