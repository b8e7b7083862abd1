"""The Action Network client's event, event campaign and attendance calls (respx, and once
against the in-process AN simulator)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.actionnetwork.errors import Verdict
from csand.model import Fields
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim
from tests.fakes import FakeClock

BASE = "https://an.test/api/v2"
KEY = "an-secret-key-123"
EVENT_ID = "controlshift-org:event-picnic"
CALENDAR_ID = "controlshift-org:calendar-summer"
LOCATION = {"venue": "Town Hall", "address_lines": ["1 Main St"], "locality": "Sydney",
            "region": "NSW", "postal_code": "2000", "country": "AU"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def an(clock: FakeClock) -> AsyncIterator[ActionNetworkClient]:
    limiter = TokenBucket(4.0, clock=clock, sleep=clock.sleep)
    async with httpx.AsyncClient() as http:
        yield ActionNetworkClient(http, BASE + "/", KEY, limiter)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def body_of(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


def raw_query(route: respx.Route) -> str:
    return route.calls.last.request.url.query.decode()


async def make_event(an: ActionNetworkClient, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "title": "Picnic", "description": "Bring food", "start_date": "2026-08-01T10:00:00Z",
        "end_date": "2026-08-01T12:00:00Z", "location": LOCATION,
        "browser_url": "https://cs.test/events/picnic", "identifier": EVENT_ID,
        "origin_system": "Controlshift Event", "creator_uuid": None, "campaign_uuid": None,
    }
    return await an.create_event(**(args | overrides))


# ---------------------------------------------------------------- events


@pytest.mark.anyio
async def test_find_event_by_identifier_filter(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    listing = mock.get(url__startswith=f"{BASE}/events").respond(200, json={"_embedded": {"osdi:events": [
        {"identifiers": ["action_network:ev-0", "controlshift-org:event-other"]},
        {"identifiers": ["action_network:ev-9", EVENT_ID]}]}})
    assert await an.find_event(EVENT_ID) == "ev-9"
    assert listing.calls.last.request.url.path == "/api/v2/events"
    assert raw_query(listing) == "filter=identifier%20eq%20%27controlshift-org%3Aevent-picnic%27"

    listing.respond(200, json={"_embedded": {"osdi:events": []}, "total_pages": 1})
    assert await an.find_event(EVENT_ID) is None

    await an.find_event("controlshift-org:event-o'brien")
    assert raw_query(listing).endswith("o%27%27brien%27")


@pytest.mark.anyio
async def test_find_event_pages_when_the_filter_is_refused(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if "filter" in request.url.params:
            return httpx.Response(400, json={"error": "Unsupported filter"})
        events = {
            "1": [{"identifiers": ["action_network:ev-1", "controlshift-org:event-1"]}],
            "2": [{"identifiers": ["action_network:ev-12", EVENT_ID]}],
        }.get(request.url.params["page"], [])
        return httpx.Response(200, json={"_embedded": {"osdi:events": events}})

    route = mock.get(url__startswith=f"{BASE}/events").mock(side_effect=respond)
    assert await an.find_event(EVENT_ID) == "ev-12"
    assert route.call_count == 3
    assert await an.find_event("controlshift-org:event-99") is None


@pytest.mark.anyio
@pytest.mark.parametrize("body", [{}, None])
async def test_an_event_lookup_without_a_list_is_a_failure(
    an: ActionNetworkClient, mock: respx.MockRouter, body: Any
) -> None:
    mock.get(url__startswith=f"{BASE}/events").respond(
        200, content=b"" if body is None else json.dumps(body).encode())
    with pytest.raises(ANFailure) as info:
        await an.find_event(EVENT_ID)
    assert info.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_a_found_event_without_an_id_is_a_failure_not_absence(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    """Taking it for "not in AN" would create a duplicate."""
    mock.get(url__startswith=f"{BASE}/events").respond(
        200, json={"_embedded": {"osdi:events": [{"identifiers": [EVENT_ID], "title": "Picnic"}]}})
    with pytest.raises(ANFailure) as info:
        await an.find_event(EVENT_ID)
    assert info.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_create_event_body_and_host_links(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    create = mock.post(f"{BASE}/events").respond(
        200, json={"identifiers": ["action_network:ev-1", EVENT_ID], "title": "Picnic"})
    assert await make_event(an, creator_uuid="uuid-h") == "ev-1"
    assert body_of(create) == {
        "title": "Picnic", "description": "Bring food",
        "start_date": "2026-08-01T10:00:00Z", "end_date": "2026-08-01T12:00:00Z",
        "location": LOCATION, "browser_url": "https://cs.test/events/picnic",
        "origin_system": "Controlshift Event", "identifiers": [EVENT_ID],
        "_links": {"osdi:creator": {"href": f"{BASE}/people/uuid-h"},
                   "osdi:organizer": {"href": f"{BASE}/people/uuid-h"}},
    }

    await make_event(an, location=None, end_date=None, description=None)
    assert body_of(create) == {
        "title": "Picnic", "start_date": "2026-08-01T10:00:00Z",
        "browser_url": "https://cs.test/events/picnic", "origin_system": "Controlshift Event",
        "identifiers": [EVENT_ID],
    }


@pytest.mark.anyio
async def test_create_event_into_a_campaign(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    plain = mock.post(f"{BASE}/events").respond(200, json={"identifiers": ["action_network:ev-x"]})
    create = mock.post(f"{BASE}/event_campaigns/camp-1/events").respond(
        200, json={"identifiers": ["action_network:ev-2"]})
    assert await make_event(an, campaign_uuid="camp-1") == "ev-2"
    assert create.call_count == 1 and plain.call_count == 0
    assert body_of(create)["identifiers"] == [EVENT_ID]
    assert "_links" not in body_of(create)


@pytest.mark.anyio
async def test_create_event_id_from_the_self_link(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    """As for petitions (``uuid_of``): without the identifier, the self link names the event."""
    mock.post(f"{BASE}/events").respond(200, json={"_links": {"self": {"href": f"{BASE}/events/ev-3"}}})
    assert await make_event(an) == "ev-3"


@pytest.mark.anyio
@pytest.mark.parametrize("content", [b"{}", b""])
async def test_creates_answering_200_empty_are_a_retry(
    an: ActionNetworkClient, mock: respx.MockRouter, content: bytes
) -> None:
    mock.post(f"{BASE}/events").respond(200, content=content)
    mock.post(f"{BASE}/event_campaigns/camp-1/events").respond(200, content=content)
    mock.post(f"{BASE}/event_campaigns").respond(200, content=content)
    mock.post(f"{BASE}/events/ev-1/attendances").respond(200, content=content)
    mock.put(f"{BASE}/events/ev-1").respond(200, content=content)
    calls = [
        make_event(an),
        make_event(an, campaign_uuid="camp-1"),
        an.create_event_campaign(title="Summer", description=None, browser_url=None,
                                 identifier=CALENDAR_ID, origin_system="Controlshift Event"),
        an.record_attendance("ev-1", Fields(email="ann@example.org"), None, ()),
        an.attend_as("ev-1", "uuid-1"),
        an.update_event("ev-1", title="New"),
    ]
    for call in calls:
        with pytest.raises(ANFailure) as info:
            await call
        assert info.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_creates_answering_without_an_id_are_a_failure(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    mock.post(f"{BASE}/events").respond(200, json={"identifiers": [EVENT_ID], "title": "Picnic"})
    mock.post(f"{BASE}/event_campaigns").respond(200, json={"title": "Summer", "identifiers": []})
    with pytest.raises(ANFailure) as info:
        await make_event(an)
    assert info.value.outcome.verdict is Verdict.RETRY
    with pytest.raises(ANFailure) as info:
        await an.create_event_campaign(title="Summer", description="d", browser_url=None,
                                       identifier=CALENDAR_ID, origin_system="o")
    assert info.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_update_event_sends_only_the_given_fields(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    put = mock.put(f"{BASE}/events/ev-1").respond(200, json={"identifiers": ["action_network:ev-1"]})
    await an.update_event("ev-1", title="Picnic (moved)", location={"venue": "Park"})
    assert body_of(put) == {"title": "Picnic (moved)", "location": {"venue": "Park"}}
    await an.update_event("ev-1", description="d", start_date="2026-08-02T10:00:00Z",
                          end_date="2026-08-02T12:00:00Z", browser_url="https://cs.test/e")
    assert body_of(put) == {"description": "d", "start_date": "2026-08-02T10:00:00Z",
                            "end_date": "2026-08-02T12:00:00Z", "browser_url": "https://cs.test/e"}
    assert put.call_count == 2
    await an.update_event("ev-1")
    assert put.call_count == 2  # nothing to change: no request


@pytest.mark.anyio
async def test_404_and_400_as_for_petitions(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    """A uuid csand addressed that AN no longer has is gone (re-plan); a refused body is dead."""
    mock.put(f"{BASE}/events/ev-gone").respond(404, json={"error": "Event not found"})
    mock.post(f"{BASE}/events/ev-gone/attendances").respond(404, json={"error": "Event not found"})
    mock.post(f"{BASE}/event_campaigns/camp-gone/events").respond(404, json={"error": "Not found"})
    gone = [
        an.update_event("ev-gone", title="t"),
        an.record_attendance("ev-gone", Fields(email="a@example.org"), "subscribed", ()),
        an.attend_as("ev-gone", "uuid-1"),
        make_event(an, campaign_uuid="camp-gone"),
    ]
    for call in gone:
        with pytest.raises(ANFailure) as info:
            await call
        assert info.value.outcome.verdict is Verdict.GONE

    mock.post(f"{BASE}/events").respond(400, json={"error": "end_date is before start_date"})
    mock.post(f"{BASE}/event_campaigns").respond(400, json={"error": "Title is required"})
    mock.put(f"{BASE}/events/ev-1").respond(400, json={"error": "start_date is not ISO 8601"})
    dead = [
        make_event(an),
        an.create_event_campaign(title="", description=None, browser_url=None,
                                 identifier=CALENDAR_ID, origin_system="o"),
        an.update_event("ev-1", start_date="soon"),
    ]
    for call in dead:
        with pytest.raises(ANFailure) as info:
            await call
        assert info.value.outcome.verdict is Verdict.DEAD
        assert info.value.outcome.status == 400


# ---------------------------------------------------------------- event campaigns


@pytest.mark.anyio
async def test_find_and_create_event_campaign(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    listing = mock.get(url__startswith=f"{BASE}/event_campaigns").respond(
        200, json={"_embedded": {"osdi:event_campaigns": [
            {"identifiers": ["action_network:camp-9", CALENDAR_ID]}]}})
    assert await an.find_event_campaign(CALENDAR_ID) == "camp-9"
    assert listing.calls.last.request.url.path == "/api/v2/event_campaigns"
    assert raw_query(listing) == "filter=identifier%20eq%20%27controlshift-org%3Acalendar-summer%27"
    listing.respond(200, json={"_embedded": {"osdi:event_campaigns": []}})
    assert await an.find_event_campaign(CALENDAR_ID) is None

    create = mock.post(f"{BASE}/event_campaigns").respond(
        200, json={"identifiers": ["action_network:camp-1", CALENDAR_ID]})
    uuid = await an.create_event_campaign(
        title="Summer", description="Summer events", browser_url="https://cs.test/calendars/summer",
        identifier=CALENDAR_ID, origin_system="Controlshift Event")
    assert uuid == "camp-1"
    assert body_of(create) == {
        "title": "Summer", "description": "Summer events",
        "browser_url": "https://cs.test/calendars/summer",
        "origin_system": "Controlshift Event", "identifiers": [CALENDAR_ID],
    }


@pytest.mark.anyio
async def test_find_event_campaign_pages_when_the_filter_is_refused(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if "filter" in request.url.params:
            return httpx.Response(400, json={"error": "Unsupported filter"})
        items = [{"identifiers": ["action_network:camp-3", CALENDAR_ID]}]
        return httpx.Response(200, json={"_embedded": {
            "osdi:event_campaigns": items if request.url.params["page"] == "1" else []}})

    mock.get(url__startswith=f"{BASE}/event_campaigns").mock(side_effect=respond)
    assert await an.find_event_campaign(CALENDAR_ID) == "camp-3"
    assert await an.find_event_campaign("controlshift-org:calendar-none") is None


# ---------------------------------------------------------------- attendances


@pytest.mark.anyio
async def test_record_attendance_payload_and_person_id(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    route = mock.post(f"{BASE}/events/ev-1/attendances").respond(200, json={
        "identifiers": ["action_network:att-1"], "action_network:person_id": "uuid-9",
        "action_network:event_id": "ev-1"})
    fields = Fields(email="ann@example.org", given_name="Ann", postal_code="2000")
    assert await an.record_attendance("ev-1", fields, "subscribed", ("controlshift-event-attendee",)) \
        == ("uuid-9", None)
    assert body_of(route) == {
        "person": {"email_addresses": [{"address": "ann@example.org", "status": "subscribed"}],
                   "given_name": "Ann", "postal_addresses": [{"postal_code": "2000"}]},
        "add_tags": ["controlshift-event-attendee"],
    }

    route.respond(200, json={"_links": {"osdi:person": {"href": f"{BASE}/people/uuid-7"}}})
    assert await an.record_attendance("ev-1", Fields(email="ann@example.org"), None, ()) \
        == ("uuid-7", None)
    assert body_of(route) == {"person": {"email_addresses": [{"address": "ann@example.org"}]},
                              "add_tags": []}

    # Should AN embed the person, its subscription state is read from it.
    route.respond(200, json={"identifiers": ["action_network:att-1"], "_embedded": {"osdi:person": {
        "identifiers": ["action_network:uuid-5"],
        "email_addresses": [{"primary": True, "address": "ann@example.org", "status": "unsubscribed"}]}}})
    assert await an.record_attendance("ev-1", Fields(email="ann@example.org"), None, ()) \
        == ("uuid-5", False)

    route.respond(200, json={"identifiers": ["action_network:att-1"]})
    assert await an.record_attendance("ev-1", Fields(email="ann@example.org"), None, ()) == (None, None)


@pytest.mark.anyio
async def test_attend_as_links_the_person(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.post(f"{BASE}/events/ev-1/attendances").respond(
        200, json={"identifiers": ["action_network:att-2"], "action_network:person_id": "uuid-1"})
    assert await an.attend_as("ev-1", "uuid-1") is None
    assert body_of(route) == {"_links": {"osdi:person": {"href": f"{BASE}/people/uuid-1"}}}
    assert route.calls.last.request.headers["OSDI-API-Token"] == KEY


# ---------------------------------------------------------------- against the simulator


@pytest.mark.anyio
async def test_against_the_simulator_an_event_in_a_campaign_and_an_attendance(clock: FakeClock) -> None:
    sim = ActionNetworkSim(api_key=KEY, requests_per_second=None, events_api=True)
    host = sim.add_person("host@example.org", given_name="Hana", status="unsubscribed")
    known = sim.add_person("known@example.org", status="unsubscribed")
    limiter = TokenBucket(4.0, clock=clock, sleep=clock.sleep)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
        an = ActionNetworkClient(http, "http://an.sim/api/v2", KEY, limiter)

        assert await an.find_event_campaign(CALENDAR_ID) is None
        campaign = await an.create_event_campaign(
            title="Summer", description="Summer events", browser_url="https://cs.test/calendars/summer",
            identifier=CALENDAR_ID, origin_system="Controlshift Event")
        assert await an.find_event_campaign(CALENDAR_ID) == campaign

        assert await an.find_event(EVENT_ID) is None
        event = await make_event(an, creator_uuid=host, campaign_uuid=campaign)
        assert await an.find_event(EVENT_ID) == event
        await an.update_event(event, title="Picnic (moved)", location={"venue": "Park"})

        person, subscribed = await an.record_attendance(
            event, Fields(email="new@example.org", given_name="Nia"), None,
            ("controlshift-event-attendee",))
        await an.attend_as(event, known)

    (view,) = sim.events()
    assert view["uuid"] == event and view["campaign_uuid"] == campaign
    assert view["creator_uuid"] == host and view["organizer_uuid"] == host
    assert EVENT_ID in view["identifiers"]
    assert view["title"] == "Picnic (moved)" and view["location"] == {"venue": "Park"}
    assert view["description"] == "Bring food" and view["browser_url"] == "https://cs.test/events/picnic"
    assert view["total_accepted"] == 2

    new = sim.person("new@example.org")
    assert new is not None and person == new["uuid"]
    assert subscribed is None  # the simulator, like AN, answers with the attendance alone
    assert new["status"] == "subscribed"  # the helper subscribes a person new to the list
    assert {a["person_uuid"] for a in sim.attendances(event)} == {new["uuid"], known}
    known_view = sim.person("known@example.org")
    assert known_view is not None and known_view["status"] == "unsubscribed"  # not subscribed
    assert not any(sim.duplicates().values())
