"""Polling events, hosts and attendees (csand.controlshift.poller.EventSync) against the
ControlShift simulator, in process."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.controlshift.client import ControlShiftClient, CSError
from csand.controlshift.poller import Poller
from csand.controlshift.versions import NOT_ATTENDING
from csand.ratelimit import TokenBucket
from csand.sim.controlshift import ControlShiftSim
from csand.storage import EventState, Storage, open_store
from tests.fakes import ManualClock

T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)  # the clock's "now"
EVENTS_ROUTE = "GET /api/v1/events"
ATTENDEES_ROUTE = "GET /api/v1/events/{slug}/attendees"

pytestmark = pytest.mark.anyio


@dataclass
class Env:
    sim: ControlShiftSim
    store: Storage
    poller: Poller
    clock: ManualClock
    db_path: Path

    def outbox(self, where: str = "1") -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            found = conn.execute(f"SELECT * FROM outbox WHERE {where} ORDER BY id").fetchall()
        finally:
            conn.close()
        return [dict(r) | {"payload": json.loads(r["payload"])} for r in found]

    def routes(self) -> dict[str, int]:
        return self.sim.stats()["by_route"]


@asynccontextmanager
async def make_env(tmp_path: Path) -> AsyncIterator[Env]:
    stamps = iter(T0 - timedelta(days=60) + timedelta(seconds=i) for i in range(100_000))
    sim = ControlShiftSim(requests_per_minute=None, now=lambda: next(stamps), page_size=3)
    clock = ManualClock(T0.timestamp())
    db_path = tmp_path / "csand.db"
    store = await open_store(db_path, clock=clock)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            cs = ControlShiftClient(http, "http://cs.test", api_key="cs-test-key",
                                    limiter=TokenBucket(1e6))
            poller = Poller(cs, store, clock=clock, sync_events=True)
            yield Env(sim, store, poller, clock, db_path)
    finally:
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


HOST = {"email": "Hana@Example.org", "first_name": "Hana", "last_name": "Host",
        "join_organisation": True}


def add_event(sim: ControlShiftSim, slug: str = "picnic", *, days: float = 10,
              **kw: Any) -> dict[str, Any]:
    start = T0 + timedelta(days=days)
    kw.setdefault("host", HOST)
    return sim.add_event(slug, title=kw.pop("title", "Park picnic"),
                         description=kw.pop("description", "Bring food"), start_at=start,
                         end_at=start + timedelta(hours=2), **kw)


def attendances(env: Env, slug: str = "picnic") -> list[dict[str, Any]]:
    return env.outbox(f"kind = 'attendance' AND event_slug = '{slug}'")


async def test_host_and_one_attendance_per_attending_attendee(env: Env) -> None:
    env.sim.add_calendar("summer", "Summer of action")
    add_event(env.sim, calendar_slug="summer")
    ids = {status: env.sim.add_attendee("picnic", email=f"{status}@example.org",
                                        attending_status=status, join_organisation=True)["id"]
           for status in ("attending", "confirmed", "attended", "not_attending", "no_show")}

    report = await env.poller.cycle()
    assert report.events == 1 and report.events_walked == 1 and report.malformed == 0

    items = env.outbox()
    assert [i["kind"] for i in items] == ["event_hosted"] + ["attendance"] * 3
    host = items[0]["payload"]
    # The REST host: only a full name, never split; no opt-in (webhooks carry those)
    assert host["email"] == "hana@example.org" and host["opted_in"] is False
    assert host["first_name"] is None and host["tags"] == ["controlshift-event-host"]
    assert host["event"]["identifier"] == "controlshift-demo-org:event-picnic"
    assert host["event"]["calendar"]["identifier"] == "controlshift-demo-org:calendar-summer"
    assert host["event"]["calendar"]["name"] == "Summer of action"
    assert sorted(i["source_key"] for i in items[1:]) == sorted(
        f"attendee:{ids[s]}" for s in ("attending", "confirmed", "attended"))
    assert all(i["payload"]["opted_in"] for i in items[1:])

    seen = await env.store.attendees_seen("picnic")
    assert set(seen) == set(ids.values())  # declines are recorded, not synced
    assert seen[ids["no_show"]].fingerprint == NOT_ATTENDING
    state = await env.store.event_state("picnic")
    assert state is not None and state.content and state.calendar_slug == "summer"


async def test_unlaunched_or_inappropriate_event_is_not_synced(env: Env) -> None:
    add_event(env.sim, "draft", launched=False)
    add_event(env.sim, "flagged")
    env.sim.add_attendee("draft", email="a@example.org")
    env.sim.add_attendee("flagged", email="b@example.org")
    # What an event.updated webhook with admin_status "inappropriate" records: REST events
    # carry no moderation status, so only this keeps it out.
    await env.store.commit_poll(None, event=EventState("flagged", inappropriate=True))

    report = await env.poller.cycle()
    assert report.events == 0 and env.outbox() == []
    assert env.routes().get(ATTENDEES_ROUTE) is None
    assert await env.store.event_state("draft") is None

    env.sim.update_event("draft", launched=True)  # launched later: synced then
    await env.poller.cycle()
    assert [i["event_slug"] for i in env.outbox()] == ["draft", "draft"]


async def test_second_poll_adds_nothing(env: Env) -> None:
    add_event(env.sim)
    for n in range(7):  # three pages
        env.sim.add_attendee("picnic", email=f"p{n}@example.org")
    await env.poller.cycle()
    before = env.outbox()
    assert len(before) == 8

    report = await env.poller.cycle()
    assert report.enqueued == 0 and env.outbox() == before
    report = await env.poller.cycle(full=True)
    assert report.enqueued == 0 and env.outbox() == before


async def test_new_attendee_and_confirmation(env: Env) -> None:
    add_event(env.sim)
    first = env.sim.add_attendee("picnic", email="a@example.org")
    await env.poller.cycle()
    env.sim.confirm_attendee(first["id"])  # nothing AN holds changes
    env.sim.add_attendee("picnic", email="b@example.org")
    report = await env.poller.cycle()
    assert report.enqueued == 1
    assert [i["payload"]["email"] for i in attendances(env)] == ["a@example.org",
                                                                 "b@example.org"]


async def test_changed_title_is_one_event_changed_item(env: Env) -> None:
    add_event(env.sim)
    await env.poller.cycle()
    env.sim.update_event("picnic", title="Park picnic (moved indoors)")

    report = await env.poller.cycle()
    assert report.enqueued == 1
    changed = env.outbox("kind = 'event_changed'")
    assert len(changed) == 1
    assert changed[0]["payload"]["event"]["title"] == "Park picnic (moved indoors)"
    assert changed[0]["person_key"] == "event:picnic"
    await env.poller.cycle()
    await env.poller.cycle(full=True)
    assert len(env.outbox("kind = 'event_changed'")) == 1
    assert len(env.outbox("kind = 'event_hosted'")) == 1  # the host did not change


async def test_decline_after_sync_cancels_the_pending_item_and_reattending_syncs(
        env: Env) -> None:
    add_event(env.sim)
    att = env.sim.add_attendee("picnic", email="d@example.org", first_name="Dee")
    await env.poller.cycle()
    assert [i["status"] for i in attendances(env)] == ["pending"]

    env.sim.update_attendee(att["id"], attending_status="not_attending")
    await env.poller.cycle()
    item = attendances(env)[0]
    assert item["status"] == "cancelled" and item["source_deleted_at"] is not None
    seen = (await env.store.attendees_seen("picnic"))[att["id"]]
    assert seen.fingerprint == NOT_ATTENDING and seen.deleted_at is None

    # A decline can be undone: attending again unchanged brings the cancelled item back...
    env.sim.update_attendee(att["id"], attending_status="attending")
    await env.poller.cycle()
    assert [i["status"] for i in attendances(env)] == ["pending"]
    # ...and with new details (after another decline) it is a new version.
    env.sim.update_attendee(att["id"], attending_status="not_attending")
    await env.poller.cycle()
    env.sim.update_attendee(att["id"], attending_status="attending", first_name="Deanna")
    await env.poller.cycle()
    assert [i["status"] for i in attendances(env)] == ["cancelled", "pending"]


async def test_deleted_attendee_is_marked_deleted_and_cancelled(env: Env) -> None:
    add_event(env.sim)
    gone = env.sim.add_attendee("picnic", email="gone@example.org")
    env.sim.add_attendee("picnic", email="stays@example.org")
    await env.poller.cycle()
    env.sim.delete_attendee(gone["id"])

    await env.poller.cycle()
    statuses = {i["payload"]["email"]: i["status"] for i in attendances(env)}
    assert statuses == {"gone@example.org": "cancelled", "stays@example.org": "pending"}
    seen = await env.store.attendees_seen("picnic")
    assert seen[gone["id"]].deleted_at is not None
    assert seen[gone["id"] + 1].deleted_at is None


async def test_incremental_cycles_skip_attendees_of_events_that_ended_long_ago(
        env: Env) -> None:
    add_event(env.sim, "old", days=-30)
    add_event(env.sim, "lastweek", days=-5)
    add_event(env.sim, "soon", days=3)
    await env.poller.cycle()  # the backfill walks everything
    assert env.routes()[ATTENDEES_ROUTE] == 3
    for slug in ("old", "lastweek", "soon"):
        env.sim.add_attendee(slug, email=f"late-{slug}@example.org")
    env.sim.reset_stats()

    report = await env.poller.cycle()
    assert report.events == 3 and report.events_walked == 2
    assert env.routes()[ATTENDEES_ROUTE] == 2
    assert sorted(i["event_slug"] for i in env.outbox("kind = 'attendance'")) == [
        "lastweek", "soon"]

    report = await env.poller.cycle(full=True)  # the reconciliation sweep walks all
    assert report.events_walked == 3 and report.enqueued == 1
    assert len(attendances(env, "old")) == 1


async def test_event_never_walked_is_walked_even_when_old(env: Env) -> None:
    await env.poller.cycle()  # the backfill: nothing yet
    add_event(env.sim, "old", days=-30)
    env.sim.add_attendee("old", email="a@example.org")
    report = await env.poller.cycle()
    assert report.events_walked == 1 and len(attendances(env, "old")) == 1


async def test_malformed_attendee_is_a_dead_letter_and_the_rest_syncs(env: Env) -> None:
    add_event(env.sim)
    bad = env.sim.add_attendee("picnic", email="bad@example.org", additional_fields="oops")
    env.sim.add_attendee("picnic", email="good@example.org")
    report = await env.poller.cycle()
    assert report.malformed == 1
    dead = env.outbox("status = 'dead'")
    assert [d["source_key"] for d in dead] == [f"attendee:{bad['id']}"]
    assert "additional_fields is not an object" in dead[0]["last_error"]
    assert [i["payload"]["email"] for i in attendances(env)] == ["good@example.org"]
    await env.poller.cycle(full=True)
    assert len(env.outbox("status = 'dead'")) == 1  # once per version


async def test_events_are_polled_only_when_asked(tmp_path: Path) -> None:
    async with make_env(tmp_path) as env:
        env.poller.sync_events = False
        add_event(env.sim)
        await env.poller.cycle()
        assert env.outbox() == [] and EVENTS_ROUTE not in env.routes()


async def test_failed_event_listing_keeps_the_petitions_cycle(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.sim.add_petition(title="P", creator={"email": "c@example.org"})
    add_event(env.sim)

    async def failing() -> list[dict[str, Any]]:
        raise CSError("ControlShift answered 502")

    monkeypatch.setattr(env.poller.events.cs, "events", failing)
    await env.poller.cycle()
    assert [i["kind"] for i in env.outbox()] == ["petition_created"]
    status = await env.store.get_meta("last_poll_result")
    assert status is not None and "events failed: ControlShift answered 502" in status
    assert await env.store.get_meta("backfill_done") == "1"
    monkeypatch.undo()
    await env.poller.cycle()  # never walked: walked now
    assert [i["kind"] for i in env.outbox()] == ["petition_created", "event_hosted"]


async def test_a_calendars_name_and_description_come_from_its_own_endpoint_once(env: Env) -> None:
    env.sim.add_calendar("autumn", "Autumn of action", description="Every Saturday in May")
    add_event(env.sim, "rally", calendar_slug="autumn")
    add_event(env.sim, "march", calendar_slug="autumn")
    await env.poller.cycle()
    await env.poller.cycle()
    calendars = [i["payload"]["event"]["calendar"] for i in env.outbox()
                 if i["kind"] == "event_hosted"]
    assert {(c["name"], c["description"]) for c in calendars} == {
        ("Autumn of action", "Every Saturday in May")}
    assert env.routes().get("GET /api/v1/calendars/{slug}") == 1
