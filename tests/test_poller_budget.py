"""The poller and the webhook processor within the ControlShift budget, on a fake clock: a long
petition list stretches the poll cycle within poll_budget_share, webhook work never waits for
the poll bucket, and a sweep is paced and measured."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.controlshift.budget import CSBudget, purpose
from csand.controlshift.client import ControlShiftClient
from csand.controlshift.poller import Poller
from csand.controlshift.webhooks import WebhookProcessor
from csand.ratelimit import TokenBucket
from csand.sim.controlshift import ControlShiftSim
from csand.storage import Storage, open_store
from tests.fakes import FakeClock, ManualClock

T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)


@dataclass
class Rig:
    sim: ControlShiftSim
    store: Storage
    poller: Poller
    budget: CSBudget
    clock: FakeClock
    times: list[float]  # fake time of every request sent

    def most_in_a_minute(self) -> int:
        return max(sum(1 for t in self.times if start <= t < start + 60) for start in self.times)


@asynccontextmanager
async def rig(tmp_path: Path, *, petitions: int, page_size: int, share: float = 0.5
              ) -> AsyncIterator[Rig]:
    stamps = iter(T0 + timedelta(seconds=i) for i in range(100_000))
    sim = ControlShiftSim(requests_per_minute=None, page_size=page_size, now=lambda: next(stamps))
    for n in range(petitions):
        sim.add_petition(title=f"Petition {n}", creator={
            "first_name": "Cleo", "last_name": f"Ng{n}", "email": f"creator{n}@example.org"})
    clock = FakeClock(0.0)
    times: list[float] = []

    async def sent(request: httpx.Request) -> None:
        times.append(clock.now)

    store = await open_store(tmp_path / "csand.db", clock=ManualClock(1_727_784_000.0))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app),
                                     event_hooks={"request": [sent]}) as http:
            budget = CSBudget(1000, share, clock=clock, sleep=clock.sleep)
            cs = ControlShiftClient(http, "http://cs.test", api_key="cs-test-key",
                                    limiter=TokenBucket(1000 / 60, burst=5, headroom=0.95,
                                                        clock=clock, sleep=clock.sleep),
                                    sleep=clock.sleep, budget=budget)
            poller = Poller(cs, store, clock=ManualClock(1_727_784_000.0))
            yield Rig(sim, store, poller, budget, clock, times)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_long_petition_list_stretches_the_cycle_within_the_share(tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=240, page_size=2) as r:
        await r.poller.cycle()  # the backfill, unmetered here ("other")
        assert r.budget.page_sizes == {"petitions": 2}
        r.times.clear()
        start = r.clock.now
        with purpose("poll"):
            for _ in range(3):  # three idle cycles of 120 listing pages each
                assert (await r.poller._incremental()) is not None
        assert len(r.times) == 360
        took = r.clock.now - start
        # 360 requests within 475/min (0.5 x 1000 x 0.95 headroom): at least 45 s, not 22
        assert took >= 359 / r.budget.poll_rate - 1e-6
        assert r.most_in_a_minute() <= 476
        assert r.budget.idle_requests == 120
        assert r.budget.meter.totals["poll"] == 360


@pytest.mark.anyio
async def test_without_the_poll_share_only_the_overall_limit_paces(tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=240, page_size=2, share=1.0) as r:
        await r.poller.cycle()
        r.times.clear()
        start = r.clock.now
        with purpose("poll"):
            await r.poller._incremental()
        assert r.clock.now - start < 120 / (500 * 0.95 / 60)  # faster than half the budget


@pytest.mark.anyio
async def test_webhook_work_does_not_wait_for_the_poll_bucket(tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=1, page_size=5) as r:
        await r.poller.cycle()
        slug = r.sim.petitions()[0]["slug"]
        r.budget.poll._next = r.clock.now + 3600.0  # polling booked for the next hour
        processor = WebhookProcessor(r.store, r.poller.directory, r.poller.org_slug, lambda: None)
        r.poller.directory.forget_all()  # the webhook must fetch the petition from ControlShift
        sig = r.sim.add_signature(slug, email="ann@example.org", first_name="Ann",
                                  join_organisation=True)
        body = json.dumps({"type": "signature.created", "data": sig, "jid": "j1"})
        await r.store.receive_event("jid:j1", "signature.created", body)
        start, sent = r.clock.now, len(r.times)
        for event in await r.store.events_due():
            await processor.process(event)
        assert len(r.times) > sent  # it did ask ControlShift
        assert r.clock.now - start < 1.0  # and did not wait for the poll bucket
        assert r.budget.meter.last_minute()["webhook"] == len(r.times) - sent
        rows = await r.store._read("SELECT kind FROM outbox WHERE kind = 'signature'")
        assert len(rows) == 1


@pytest.mark.anyio
async def test_a_sweep_is_paced_and_measured(tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=20, page_size=5) as r:
        await r.poller.cycle()
        with purpose("poll"):
            await r.poller._incremental()
        assert r.budget.estimate() == 4 + 20  # 4 listing pages, one page per petition
        r.times.clear()
        report = await r.poller.sweep()
        assert report is not None and report.walked == 20
        last: dict[str, Any] = r.budget.last_sweep  # type: ignore[assignment]
        assert last["requests"] == len(r.times) == 24
        # spread over 80 % of the hour: 24 requests at 24 / 2880 s apart
        assert last["seconds"] == pytest.approx(23 * 2880 / 24, rel=0.01)
        assert r.budget.sweep is None
        asked = await r.poller.sweep(asked=True)  # csand backfill: as fast as allowed
        assert asked is not None
        assert r.budget.last_sweep["seconds"] < 60  # type: ignore[index]


@pytest.mark.anyio
async def test_an_incremental_cycle_skips_the_petition_a_sweep_is_walking(tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=3, page_size=5) as r:
        await r.poller.cycle()
        slug = r.sim.petitions()[0]["slug"]
        cs_id = r.sim.petitions()[0]["id"]
        r.sim.add_signature(slug, email="bo@example.org", first_name="Bo", join_organisation=True)
        other = r.sim.petitions()[1]
        r.sim.add_signature(other["slug"], email="cy@example.org", first_name="Cy",
                            join_organisation=True)
        lock = r.poller._locks[cs_id]
        async with lock:  # a sweep holds it
            report = await r.poller.cycle()
        assert report.skipped == 1 and report.walked == 1  # the other one is not held up
        report = await r.poller.cycle()  # and the skipped one's signature comes next cycle
        assert report.walked == 1 and report.skipped == 0
        rows = await r.store._read("SELECT kind FROM outbox WHERE kind = 'signature'")
        assert len(rows) == 2


@pytest.mark.anyio
async def test_a_page_of_petitions_is_walked_before_the_next_page_is_listed(
        tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=6, page_size=2) as r:
        await r.poller.cycle()
        newest = r.sim.petitions()[-1]["slug"]  # newest first: on page 1
        r.sim.add_signature(newest, email="di@example.org", first_name="Di",
                            join_organisation=True)
        urls: list[str] = []

        async def sent(request: httpx.Request) -> None:
            urls.append(str(request.url.path) + "?" + str(request.url.query, "ascii"))

        r.poller.cs._http.event_hooks["request"].append(sent)
        report = await r.poller.cycle()
        assert report.walked == 1
        walk = next(i for i, u in enumerate(urls) if "/signatures" in u)
        assert urls.index("/api/v1/petitions?page=2") > walk


@pytest.mark.anyio
async def test_a_long_poll_interval_keeps_the_directory_for_two_cycles(tmp_path: Path) -> None:
    async with rig(tmp_path, petitions=1, page_size=5) as r:
        assert r.poller.directory._max_age == 600.0  # poll_interval 30 s
        long = Poller(r.poller.cs, r.store, poll_interval=900.0)
        assert long.directory._max_age == 1800.0


@pytest.mark.anyio
@pytest.mark.parametrize("petitions", [10, 200])
async def test_with_bulk_as_source_a_cycle_is_one_request_whatever_the_petitions(
        tmp_path: Path, petitions: int) -> None:
    """controlshift.source = "bulk": no petition listing, no signature page; one request (the
    organisation) per cycle, and a stale-exports problem in csand status until files arrive."""
    async with rig(tmp_path, petitions=petitions, page_size=2) as r:
        r.poller.source = "bulk"
        for _ in range(3):
            report = await r.poller.cycle()
            assert report.petitions == 0 and report.pages == 0
        assert len(r.times) == 1 + 3  # the organisation's slug once, then one per cycle
        assert await r.store.get_meta("org_url") == "https://demo-org.example.org"
        status = await r.store.status()
        (stale,) = status["bulk_source"]["stale"]
        assert "no bulk-data file has arrived yet" in stale
        await r.store.record_bulk_file(
            url="https://b.s3.amazonaws.com/o/signatures_1.csv", jid="j1", table="signatures",
            kind="incremental", compression=None, body="{}", expires_at=None)
        await r.poller.cycle()
        assert (await r.store.status())["bulk_source"]["stale"] == []
        r.poller.clock = lambda: 1_727_784_000.0 + 31 * 3600  # type: ignore[method-assign]
        await r.poller.cycle()
        assert (await r.store.status())["bulk_source"]["stale"] == [
            "no incremental signatures export for 1860 min (expected within 30 min)",
            "no nightly full signatures export for 1860 min (expected within 1800 min): none "
            "since csand first saw one"]
