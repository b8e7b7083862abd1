"""The worker applies hosts, attendees and event changes to the Action Network simulator (with
its events API), by the same consent rules as signatures: one mirrored event per CS event, in its
calendar's event campaign, created once; one attendance per person; nobody subscribed without
an opt-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.actionnetwork.client import ActionNetworkClient
from csand.model import (
    ATTENDEE_TAG,
    EVENT_HOST_TAG,
    attendee_activity,
    calendar_ref,
    event_change_activity,
    event_ref,
    host_activity,
)
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim
from csand.storage import Storage, open_store
from csand.sync.worker import Dispatcher
from tests.fakes import ManualClock
from tests.storage import ORG, event_record
from tests.test_worker import drain

AN_KEY = "an-key"
AN_BASE = "http://an.test/api/v2"
CALENDAR = calendar_ref({"slug": "summer", "name": "Summer of action",
                         "url": "https://cs.example.org/calendars/summer"}, ORG)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[ActionNetworkSim, Storage, Any]]:
    """The simulator, the store, and a maker of dispatchers (one per drain)."""
    sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None, events_api=True)
    store = await open_store(tmp_path / "csand.db", clock=ManualClock())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            an = ActionNetworkClient(http, AN_BASE, AN_KEY, TokenBucket(1e6))
            yield sim, store, lambda: Dispatcher(store, an, clock=ManualClock())
    finally:
        await store.close()


def attendee(aid: int, email: str, join: bool | None, slug: str = "picnic") -> dict:
    return {"id": aid, "email": email, "first_name": "Ann", "last_name": "Lee",
            "attending_status": "attending", "join_organisation": join,
            "created_at": "2024-05-02T00:00:00Z", "updated_at": "2024-05-02T00:00:00Z",
            "event": {"slug": slug}}


@pytest.mark.anyio
async def test_an_event_with_its_host_and_attendees_lands_once_by_the_rules(world) -> None:
    sim, store, dispatcher = world
    sim.add_person("known@example.org", status="subscribed")
    record = event_record("picnic")
    ref = event_ref({**record, "virtual": False,
                     "location": {"locality": "Sydney", "postal_code": "2000"}}, ORG, CALENDAR)
    await store.enqueue([
        host_activity(record, ref),
        attendee_activity(attendee(1, "yes@example.org", True), ref),
        attendee_activity(attendee(2, "quiet@example.org", None), ref),
        attendee_activity(attendee(3, "known@example.org", False), ref),
    ])
    await drain(dispatcher(), 4)
    assert (await store.counts())["done"] == 4

    (event,) = sim.events()
    (campaign,) = sim.event_campaigns()
    assert event["campaign_uuid"] == campaign["uuid"]
    assert "controlshift-test-org:event-picnic" in event["identifiers"]
    assert "controlshift-test-org:calendar-summer" in campaign["identifiers"]
    host = sim.person("hana@example.org")
    assert event["creator_uuid"] == host["uuid"] and event["organizer_uuid"] == host["uuid"]
    assert host["status"] == "subscribed" and EVENT_HOST_TAG in host["tags"]
    assert sim.person("yes@example.org")["status"] == "subscribed"
    assert sim.person("quiet@example.org")["status"] == "unsubscribed"  # created explicitly so
    assert sim.person("known@example.org")["status"] == "subscribed"  # left as it was
    assert all(ATTENDEE_TAG in sim.person(e)["tags"]
               for e in ("yes@example.org", "quiet@example.org", "known@example.org"))
    # One attendance per person: the host's and the three attendees'.
    assert sorted(a["person_uuid"] for a in sim.attendances(event["uuid"])) == sorted(
        sim.person(e)["uuid"] for e in ("hana@example.org", "yes@example.org",
                                        "quiet@example.org", "known@example.org"))
    assert sum(sim.duplicates().values()) == 0
    assert await store.event_uuid("picnic") == event["uuid"]

    # A change of title and time is one update of the same event; replaying it changes nothing.
    moved = event_ref({**record, "title": "Picnic (moved)",
                       "start_at": "2024-06-02T10:00:00Z", "end_at": "2024-06-02T12:00:00Z"},
                      ORG, CALENDAR)
    await store.enqueue([event_change_activity(moved, datetime(2024, 5, 9, tzinfo=UTC))])
    await drain(dispatcher(), 1)
    (event,) = sim.events()
    assert (event["title"], event["start_date"][:10]) == ("Picnic (moved)", "2024-06-02")
    assert len(sim.event_campaigns()) == 1


@pytest.mark.anyio
async def test_a_change_to_an_event_never_mirrored_creates_nothing(world) -> None:
    sim, store, dispatcher = world
    ref = event_ref(event_record("never"), ORG)
    await store.enqueue([event_change_activity(ref, datetime(2024, 5, 9, tzinfo=UTC))])
    await drain(dispatcher(), 1)
    assert sim.events() == [] and (await store.counts())["done"] == 1
