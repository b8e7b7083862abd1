"""The ControlShift client's events, attendees and calendars: mocked HTTP (respx) on fake time,
and the in-process ControlShift simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx

from csand.controlshift import client as client_module
from csand.controlshift.client import ControlShiftClient, CSBadPage, CSError, CSNotFound
from csand.ratelimit import TokenBucket
from csand.sim.controlshift import ControlShiftSim
from tests.fakes import FakeClock

BASE = "https://org.cs.test"
API = f"{BASE}/api/v1"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(5000.0)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def mock() -> respx.MockRouter:
    with respx.mock(assert_all_called=False) as router:
        yield router


def api_client(http: httpx.AsyncClient, clock: FakeClock) -> ControlShiftClient:
    return ControlShiftClient(http, BASE + "/", api_key="cs_live_key",
                              limiter=TokenBucket(1000 / 60, clock=clock, sleep=clock.sleep),
                              sleep=clock.sleep)


def meta(page: int, total: int) -> dict[str, Any]:
    return {"current_page": page, "total_pages": total,
            "previous_page": page - 1 if page > 1 else None,
            "next_page": page + 1 if page < total else None}


def paged(key: str, total: int, extra: dict[str, Any] | None = None):
    def respond(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json={
            **(extra or {}), key: [{"n": page * 10}, {"n": page * 10 + 1}],
            "meta": meta(page, total)})
    return respond


# ---------------------------------------------------------------- pagination


@pytest.mark.anyio
async def test_events_follow_next_page_until_null(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/events").mock(side_effect=paged("events", 3))
    events = await api_client(http, clock).events()
    assert [e["n"] for e in events] == [10, 11, 20, 21, 30, 31]
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2", "3"]


@pytest.mark.anyio
async def test_attendees_follow_next_page_until_null(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(url__startswith=f"{API}/events/").mock(
        side_effect=paged("attendees", 2, {"event": {"slug": "x"}}))
    attendees = await api_client(http, clock).attendees("rally/on main st")
    assert [a["n"] for a in attendees] == [10, 11, 20, 21]
    assert [c.request.url.raw_path for c in route.calls] == [
        b"/api/v1/events/rally%2Fon%20main%20st/attendees?page=1",
        b"/api/v1/events/rally%2Fon%20main%20st/attendees?page=2"]


@pytest.mark.anyio
async def test_attendees_page(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    route = mock.get(url__startswith=f"{API}/events/").respond(
        200, json={"event": {"slug": "e"}, "attendees": [{"id": 7}], "meta": meta(2, 4)})
    items, page_meta = await api_client(http, clock).attendees_page("e", 2)
    assert items == [{"id": 7}] and page_meta["next_page"] == 3
    assert route.calls.last.request.url.raw_path == b"/api/v1/events/e/attendees?page=2"


@pytest.mark.anyio
async def test_an_empty_list_without_meta_is_one_page(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/events").respond(200, json={"events": []})
    assert await api_client(http, clock).events() == []
    assert route.call_count == 1


@pytest.mark.anyio
async def test_event_list_stops_on_a_repeated_page(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/events").respond(
        200, json={"events": [{"slug": "a"}], "meta": {"current_page": 1, "next_page": 1}})
    assert len(await api_client(http, clock).events()) == 1
    assert route.call_count == 1


@pytest.mark.anyio
async def test_event_list_stops_at_total_pages(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json={"events": [{"n": page}], "meta": {
            "current_page": page, "total_pages": 2, "next_page": page + 1}})

    route = mock.get(f"{API}/events").mock(side_effect=respond)
    assert [e["n"] for e in await api_client(http, clock).events()] == [1, 2]
    assert route.call_count == 2


# ---------------------------------------------------------------- pages it cannot follow


@pytest.mark.anyio
@pytest.mark.parametrize("items", [{"slug": "a"}, "abc", 7])
async def test_a_list_that_is_not_a_list_is_a_bad_page(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, items: Any
) -> None:
    mock.get(url__startswith=f"{API}/events").respond(
        200, json={"events": items, "attendees": items, "meta": meta(1, 1)})
    cs = api_client(http, clock)
    with pytest.raises(CSBadPage, match="/events page 1: events is not a list"):
        await cs.events()
    with pytest.raises(CSBadPage, match="attendees is not a list"):
        await cs.attendees("e")
    with pytest.raises(CSBadPage, match="attendees is not a list"):
        await cs.attendees_page("e", 1)


@pytest.mark.anyio
@pytest.mark.parametrize("next_page", ["2", 2.5, {"page": 2}, 0, True])
async def test_a_bad_next_page_is_a_bad_page(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, next_page: Any
) -> None:
    mock.get(url__startswith=f"{API}/events").respond(200, json={
        "events": [{"slug": "a"}], "attendees": [{"id": 1}],
        "meta": {"current_page": 1, "total_pages": 3, "next_page": next_page}})
    cs = api_client(http, clock)
    with pytest.raises(CSBadPage, match="meta.next_page"):
        await cs.events()
    with pytest.raises(CSBadPage, match="/events/e/attendees page 1: meta.next_page"):
        await cs.attendees("e")


@pytest.mark.anyio
async def test_meta_that_is_not_an_object_is_a_bad_page(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    mock.get(f"{API}/events").respond(200, json={"events": [], "meta": [1, 2]})
    with pytest.raises(CSBadPage, match="meta is not an object"):
        await api_client(http, clock).events()


@pytest.mark.anyio
async def test_an_event_list_that_never_ends_stops_at_the_ceiling(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "MAX_PAGES", 25)

    def respond(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        if page > 1000:  # the guard of this test, not of the client
            return httpx.Response(200, json={"events": [], "meta": {"next_page": None}})
        return httpx.Response(200, json={"events": [{"n": page}],
                                         "meta": {"current_page": page, "next_page": page + 1}})

    route = mock.get(f"{API}/events").mock(side_effect=respond)
    with pytest.raises(CSBadPage, match="25"):
        await api_client(http, clock).events()
    assert route.call_count == 25


@pytest.mark.anyio
@pytest.mark.parametrize("content", [b"[]", b"null"])
async def test_a_list_answer_that_is_not_an_object_is_a_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, content: bytes
) -> None:
    mock.get(f"{API}/events").respond(200, content=content,
                                      headers={"Content-Type": "application/json"})
    with pytest.raises(CSError):
        await api_client(http, clock).events()


# ---------------------------------------------------------------- single objects


@pytest.mark.anyio
async def test_event_calendar_and_lookup_found(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    event = mock.get(url__regex=rf"^{API}/events/[^/]+$").respond(
        200, json={"event": {"slug": "a/b", "calendar": None}})
    lookup = mock.get(url__startswith=f"{API}/events/a%2Fb/attendees/lookup").respond(
        200, json={"attendee": {"id": 3, "email": "x+y@example.org"}})
    calendar = mock.get(f"{API}/calendars/cal").respond(
        200, json={"calendar": {"name": "Cal", "slug": "cal"}})
    cs = api_client(http, clock)
    assert await cs.event("a/b") == {"slug": "a/b", "calendar": None}
    assert await cs.attendee_lookup("a/b", "x+y@example.org") == {
        "id": 3, "email": "x+y@example.org"}
    assert await cs.calendar("cal") == {"name": "Cal", "slug": "cal"}
    assert event.calls.last.request.url.raw_path == b"/api/v1/events/a%2Fb"
    assert lookup.calls.last.request.url.raw_path == (
        b"/api/v1/events/a%2Fb/attendees/lookup?email=x%2By%40example.org")
    assert calendar.call_count == 1


@pytest.mark.anyio
async def test_404_is_none(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    mock.get(url__startswith=f"{API}/").respond(404, json={"error": "not found"})
    cs = api_client(http, clock)
    assert await cs.event("gone") is None
    assert await cs.attendee_lookup("gone", "a@example.org") is None
    assert await cs.calendar("gone") is None


@pytest.mark.anyio
async def test_a_missing_event_has_no_attendee_list(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    mock.get(url__startswith=f"{API}/events/").respond(404, json={"error": "not found"})
    cs = api_client(http, clock)
    with pytest.raises(CSNotFound):
        await cs.attendees("gone")
    with pytest.raises(CSNotFound):
        await cs.attendees_page("gone", 1)


@pytest.mark.anyio
@pytest.mark.parametrize("body", [{}, {"event": None, "attendee": [], "calendar": "x"}])
async def test_a_200_without_the_object_is_a_cs_error_not_none(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, body: dict[str, Any]
) -> None:
    mock.get(url__startswith=f"{API}/").respond(200, json=body)
    cs = api_client(http, clock)
    with pytest.raises(CSError, match="without an event object"):
        await cs.event("e")
    with pytest.raises(CSError, match="without an attendee object"):
        await cs.attendee_lookup("e", "a@example.org")
    with pytest.raises(CSError, match="without a calendar object"):
        await cs.calendar("c")


# ---------------------------------------------------------------- limits and failures


@pytest.mark.anyio
async def test_429_mid_list_pauses_for_ratelimit_reset_and_resumes(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/events").mock(side_effect=[
        httpx.Response(200, json={"events": [{"n": 1}], "meta": meta(1, 2)}),
        httpx.Response(429, json={"error": "rate limit exceeded"},
                       headers={"RateLimit-Limit": "1000", "RateLimit-Remaining": "0",
                                "RateLimit-Reset": "17"}),
        httpx.Response(200, json={"events": [{"n": 2}], "meta": meta(2, 2)}),
    ])
    cs = api_client(http, clock)
    start = clock()
    assert [e["n"] for e in await cs.events()] == [1, 2]
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2", "2"]
    assert cs.rate_limited == 1 and cs.limiter.rate_limited_count == 1
    assert 17.0 in clock.slept
    assert 17.0 <= clock() - start < 18.0  # the pause, plus the bucket's spacing after it


@pytest.mark.anyio
async def test_429_without_reset_on_a_lookup_pauses_five_seconds(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/calendars/c").mock(side_effect=[
        httpx.Response(429), httpx.Response(200, json={"calendar": {"slug": "c"}})])
    cs = api_client(http, clock)
    start = clock()
    assert await cs.calendar("c") == {"slug": "c"}
    assert route.call_count == 2 and cs.rate_limited == 1
    assert clock() - start == pytest.approx(5.0)


@pytest.mark.anyio
async def test_5xx_retried_with_backoff_then_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(url__startswith=f"{API}/events/e").respond(503)
    with pytest.raises(CSError, match="503") as info:
        await api_client(http, clock).event("e")
    assert not isinstance(info.value, CSNotFound)
    assert route.call_count == 5
    assert [s for s in clock.slept if s >= 0.5] == [1.0, 2.0, 4.0, 8.0]


# ---------------------------------------------------------------- against the simulator


T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)


def _event(sim: ControlShiftSim, slug: str, n: int, calendar: str | None = None) -> None:
    sim.add_event(slug, title=f"Event {n}", description=None,
                  start_at=T0 + timedelta(days=30 + n), end_at=None,
                  host={"email": f"host{n}@example.org", "first_name": "Hana",
                        "last_name": f"Host{n}"},
                  calendar_slug=calendar, created_at=T0 + timedelta(minutes=n))


@pytest.mark.anyio
async def test_events_calendars_and_attendees_from_the_simulator() -> None:
    sim = ControlShiftSim(page_size=2, requests_per_minute=None, now=lambda: T0)
    sim.add_calendar("autumn", "Autumn of Action", description="Every autumn event")
    _event(sim, "rally", 1, "autumn")
    _event(sim, "teach-in", 2, "autumn")
    _event(sim, "picnic", 3)
    _event(sim, "unlaunched", 4)
    sim.update_event("unlaunched", launched=False)
    for i in range(5):
        sim.add_attendee("rally", email=f"a{i}@example.org", first_name="Ari", last_name=f"A{i}",
                         join_organisation=i % 2 == 0)
    gone = sim.add_attendee("rally", email="gone@example.org")
    sim.delete_attendee(gone["id"])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            cs = ControlShiftClient(http, "http://cs.test", api_key="cs-test-key",
                                    limiter=TokenBucket(1e6))
            events = await cs.events()
            # Every event, unlaunched too, over two pages; newest first is the sim's default.
            assert [e["slug"] for e in events] == ["unlaunched", "picnic", "teach-in", "rally"]
            by_slug = {e["slug"]: e for e in events}
            assert "id" not in by_slug["rally"]  # no numeric event id in REST
            assert by_slug["rally"]["host"]["full_name"] == "Hana Host1"
            assert "first_name" not in by_slug["rally"]["host"]
            assert by_slug["unlaunched"]["launched_at"] is None
            assert by_slug["picnic"]["calendar"] is None
            calendars = {e["calendar"]["slug"] for e in events if e["calendar"]}
            assert calendars == {"autumn"}
            calendar = await cs.calendar("autumn")
            assert calendar is not None and calendar["name"] == "Autumn of Action"
            assert calendar["description"] == "Every autumn event"
            assert await cs.calendar("winter") is None

            assert await cs.event("rally") == by_slug["rally"]
            assert await cs.event("nope") is None

            attendees = await cs.attendees("rally")  # three pages of two; the deleted one gone
            assert [a["email"] for a in attendees] == [f"a{i}@example.org" for i in range(5)]
            assert all(a["event"]["slug"] == "rally" for a in attendees)
            assert [a["join_organisation"] for a in attendees] == [True, False, True, False, True]
            items, page_meta = await cs.attendees_page("rally", 3)
            assert [a["email"] for a in items] == ["a4@example.org"]
            assert page_meta["total_pages"] == 3 and page_meta["next_page"] is None
            assert await cs.attendees("picnic") == []

            found = await cs.attendee_lookup("rally", "A3@Example.org")
            assert found is not None and found["id"] == attendees[3]["id"]
            assert await cs.attendee_lookup("rally", "gone@example.org") is None
            assert await cs.attendee_lookup("picnic", "a3@example.org") is None
            with pytest.raises(CSNotFound):
                await cs.attendees("nope")
    finally:
        sim.close()


@pytest.mark.anyio
async def test_broken_event_pagination_from_the_simulator() -> None:
    sim = ControlShiftSim(page_size=1, requests_per_minute=None, now=lambda: T0)
    for n, slug in enumerate(["a", "b", "c"]):
        _event(sim, slug, n)
    sim.meta_override = lambda path, page, meta: {**meta, "next_page": "2"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            cs = ControlShiftClient(http, "http://cs.test", api_key="cs-test-key",
                                    limiter=TokenBucket(1e6))
            with pytest.raises(CSBadPage, match="/events page 1: meta.next_page"):
                await cs.events()
    finally:
        sim.close()
