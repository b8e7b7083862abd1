"""The ControlShift budget (csand.controlshift.budget): page-size learning, sweep estimates and
pacing, the request meter, the poll bucket, and what csand status shows of them. Fake clocks:
nothing here sleeps."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csand.controlshift import budget as b
from csand.controlshift.budget import (
    MIN_SWEEP_SHARE,
    SWEEP_FILL,
    CSBudget,
    RequestMeter,
    idle_rate,
    learn_page_size,
    pages_for,
    plan_sweep,
    purpose,
    sweep_estimate,
)
from tests.fakes import FakeClock

# ---------------------------------------------------------------- page size


@pytest.mark.parametrize(("known", "items", "next_page", "learned"), [
    (None, 25, 2, 25),       # a page with a next page is full
    (None, 7, None, None),   # the last page says nothing
    (25, 7, None, 25),
    (None, 0, 2, None),      # an empty page says nothing either
    (25, 24, 3, 25),         # a short page (a record vanished) does not lower it
    (10, 25, 3, 25),
])
def test_learn_page_size(known: int | None, items: int, next_page: Any,
                         learned: int | None) -> None:
    assert learn_page_size(known, items, next_page) == learned


@given(size=st.integers(1, 200), records=st.integers(0, 2000))
def test_walking_a_whole_list_learns_its_page_size_exactly_when_it_has_two_pages(
        size: int, records: int) -> None:
    pages = max(1, math.ceil(records / size))
    known = None
    for page in range(1, pages + 1):
        items = min(size, records - (page - 1) * size)
        known = learn_page_size(known, items, page + 1 if page < pages else None)
    assert known == (size if records > size else None)


def test_the_budget_learns_page_sizes_per_list_and_falls_back_to_any() -> None:
    budget = CSBudget()
    assert budget.page_size("signatures") is None
    budget.saw_page("petitions", 3, {"next_page": None})
    assert budget.page_size("signatures") == 3  # a lower bound until a full page is seen
    budget.saw_page("petitions", 25, {"next_page": 2})
    assert budget.page_sizes == {"petitions": 25} and budget.page_sizes_changed
    assert budget.page_size("signatures") == 25
    budget.saw_page("signatures", 50, {"next_page": 2})
    assert budget.page_size("signatures") == 50 and budget.page_size("petitions") == 25


def test_a_stored_page_size_counts_until_this_run_learns_one() -> None:
    budget = CSBudget()
    budget.remember_page_sizes({"petitions": 25, "bogus": "x"})  # type: ignore[dict-item]
    assert budget.page_sizes == {"petitions": 25} and not budget.page_sizes_changed


# ---------------------------------------------------------------- estimates and pacing


@pytest.mark.parametrize(("records", "size", "pages"), [
    (None, 25, 1), (0, 25, 1), (1, 25, 1), (25, 25, 1), (26, 25, 2), (1000, 25, 40)])
def test_pages_for(records: int | None, size: int, pages: int) -> None:
    assert pages_for(records, size) == pages


def test_sweep_estimate_counts_the_list_and_every_signature_page() -> None:
    # 1000 petitions listed (40 pages), 3 launched with 0, 30 and 250 signatures, 12 for events
    assert sweep_estimate(1000, [0, 30, 250], petition_page_size=25, signature_page_size=25,
                          other=12) == 40 + 1 + 2 + 10 + 12


POLL = 500 / 60  # requests/second


@pytest.mark.parametrize(("estimated", "incremental", "asked", "rate", "fits"), [
    # small sweep: spread over 80 % of the hour, far under the budget
    (1_000, 1.0, False, 1_000 / (3600 * SWEEP_FILL), True),
    # asked for (csand backfill): as fast as the incremental cycles leave room for
    (1_000, 1.0, True, POLL - 1.0, True),
    # too big for the hour: all the room there is, and it says so
    (60_000, 1.0, False, POLL - 1.0, False),
    # the incremental cycles need everything: the sweep still gets its minimum share
    (60_000, POLL, False, POLL * MIN_SWEEP_SHARE, False),
    # size unknown (no page size learned yet): go at the room available
    (None, 1.0, False, POLL - 1.0, False),
])
def test_plan_sweep(estimated: int | None, incremental: float, asked: bool, rate: float,
                    fits: bool) -> None:
    plan = plan_sweep(estimated, reconcile_interval=3600, poll_rate=POLL,
                      incremental_rate=incremental, asked=asked)
    assert plan.rate == pytest.approx(rate)
    assert plan.fits is fits
    if estimated:
        assert plan.seconds == pytest.approx(estimated / rate)


@given(estimated=st.integers(1, 10**7), interval=st.floats(60, 86_400),
       poll=st.floats(0.1, 100), incremental=st.floats(0, 200), asked=st.booleans())
def test_a_sweep_never_exceeds_the_poll_budget_nor_starves(
        estimated: int, interval: float, poll: float, incremental: float, asked: bool) -> None:
    plan = plan_sweep(estimated, reconcile_interval=interval, poll_rate=poll,
                      incremental_rate=incremental, asked=asked)
    assert 0 < plan.rate <= poll
    wanted = estimated / (interval * SWEEP_FILL)
    assert plan.rate >= min(wanted, poll * MIN_SWEEP_SHARE) * (1 - 1e-9)
    # the incremental cycles keep what they need, unless that leaves less than the minimum
    assert plan.rate <= max(poll - incremental, poll * MIN_SWEEP_SHARE) * (1 + 1e-9)
    if plan.rate >= wanted * (1 - 1e-9):
        assert plan.fits


@pytest.mark.parametrize(("idle", "interval", "rate"), [
    (0, 30, 0.0), (40, 30, 40 / (40 / POLL + 30)), (800, 30, 800 / (800 / POLL + 30))])
def test_idle_rate(idle: int, interval: float, rate: float) -> None:
    assert idle_rate(idle, poll_rate=POLL, poll_interval=interval) == pytest.approx(rate)
    assert idle_rate(idle, poll_rate=POLL, poll_interval=interval) < POLL


# ---------------------------------------------------------------- meter and buckets


def test_the_meter_counts_the_last_minute_by_purpose() -> None:
    clock = FakeClock(0.0)
    meter = RequestMeter(clock)
    for name in ("poll", "poll", "webhook"):
        meter.record(name)
    clock.now = 30.0
    meter.record("other")
    assert meter.last_minute() == {"poll": 2, "sweep": 0, "webhook": 1, "other": 1}
    clock.now = 60.0
    assert meter.last_minute() == {"poll": 0, "sweep": 0, "webhook": 0, "other": 1}
    assert meter.totals["poll"] == 2


def test_purpose_is_scoped() -> None:
    assert b.current_purpose() == "other"
    with purpose("poll"):
        assert b.current_purpose() == "poll"
        with purpose("webhook"):
            assert b.current_purpose() == "webhook"
        assert b.current_purpose() == "poll"
    assert b.current_purpose() == "other"
    with pytest.raises(ValueError):
        with purpose("nonsense"):
            pass


@pytest.mark.anyio
async def test_polling_waits_for_its_share_and_webhooks_do_not() -> None:
    clock = FakeClock(0.0)
    budget = CSBudget(1000, 0.5, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        await budget.admit("poll")
    assert clock.now == pytest.approx(99 / budget.poll_rate)
    assert budget.poll_rate * 60 <= 500
    before = clock.now
    for _ in range(100):
        await budget.admit("webhook")
        await budget.admit("other")
    assert clock.now == before  # only the client's overall bucket paces them


@pytest.mark.anyio
async def test_a_sweep_passes_its_pacer_and_the_poll_bucket() -> None:
    clock = FakeClock(0.0)
    budget = CSBudget(1000, 0.5, clock=clock, sleep=clock.sleep)
    budget.start_sweep(b.SweepPlan(rate=1.0, seconds=10, fits=True))
    for _ in range(11):
        await budget.admit("sweep")
    assert clock.now == pytest.approx(10.0)
    budget.finish_sweep(requests=11, events=0, seconds=10.0, ok=True)
    assert budget.sweep is None and budget.last_sweep["requests"] == 11  # type: ignore[index]


def test_snapshot_and_status_rows() -> None:
    clock = FakeClock(0.0)
    budget = CSBudget(1000, 0.5, clock=clock, sleep=clock.sleep)
    assert budget.estimate() is None
    budget.saw_page("petitions", 25, {"next_page": 2})
    budget.saw_petitions([{"launched": True, "public_signature_count": 60}] * 1000,
                         lambda p: True)
    budget.saw_idle_cycle(40)
    budget.record("poll")
    budget.record("webhook")
    snap = budget.snapshot(reconcile_interval=3600, poll_interval=30)
    assert snap["last_minute"] == {"poll": 1, "sweep": 0, "webhook": 1, "other": 0}
    assert snap["poll_budget_per_minute"] == 475.0
    assert snap["page_size"] == {"petitions": 25}
    assert snap["sweep_estimate"]["requests"] == 40 + 1000 * 3
    assert snap["sweep_estimate"]["fits_reconcile_interval"] is True
    text = "\n".join(f"{k}: {v}" for k, v in b.status_rows(snap))
    assert "2 in the last minute" in text and "poll 1" in text and "webhook 1" in text
    assert "475/min" in text and "25 items" in text and "3040 requests" in text
    assert b.status_rows(None) == []


@pytest.mark.anyio
async def test_publish_writes_meta_and_restore_reads_the_page_size(tmp_path: Any) -> None:
    from csand.storage import open_store

    store = await open_store(tmp_path / "csand.db")
    try:
        budget = CSBudget(1000, 0.5)
        budget.saw_page("signatures", 25, {"next_page": 2})
        await b.publish(store, budget, reconcile_interval=3600, poll_interval=30)
        status = await store.status()
        assert status["cs_budget"]["page_size"] == {"signatures": 25}
        assert status["cs_budget"]["poll_budget_per_minute"] == 475.0
        fresh = CSBudget(1000, 0.5)
        await b.restore(store, fresh)
        assert fresh.page_size("signatures") == 25
        from csand import metrics

        text = metrics.render().decode()
        assert "csand_cs_poll_budget_per_minute 475.0" in text
        assert 'csand_cs_page_size{list="signatures"} 25.0' in text
        assert 'csand_cs_requests_last_minute{purpose="webhook"}' in text
    finally:
        await store.close()
