"""Events, calendars and attendees in the ControlShift simulator: REST over real HTTP, and the
``event.*`` / ``attendee.*`` webhooks received over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from csand.sim.controlshift import WEBHOOK_SIGNATURE_HEADER, ControlShiftSim, webhook_signature
from csand.sim.server import ServedApp

KEY = {"Authorization": "Bearer cs-test-key"}
T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
START = datetime(2024, 11, 5, 18, 30, tzinfo=UTC)
SECRET = "whsec-events-0123456789"

REST_EVENT_KEYS = {
    "slug",
    "title",
    "url",
    "description",
    "start_at",
    "end_at",
    "start_in_zone",
    "end_in_zone",
    "time_zone",
    "virtual",
    "launched_at",
    "locale",
    "host_address",
    "max_attendees_count",
    "external_id",
    "host",
    "location",
    "location_venue",
    "shifts",
    "petition",
    "labels",
    "mentor",
    "calendar",
}
REST_LOCATION_KEYS = {
    "query",
    "latitude",
    "longitude",
    "street_number",
    "street",
    "locality",
    "region",
    "postal_code",
    "country",
    "created_at",
    "extra_location_info",
}
WEBHOOK_EVENT_KEYS = {
    "slug",
    "title",
    "start_at",
    "end_at",
    "virtual",
    "location",
    "location_venue",
    "unconfirmed_location",
    "host",
    "url",
    "admin_status",
    "administered_at",
    "admin_reason",
    "created_at",
    "updated_at",
    "shifts",
    "image_url",
    "petition",
    "mentor",
}
WEBHOOK_HOST_KEYS = {
    "id",
    "email",
    "first_name",
    "last_name",
    "phone_number",
    "postcode",
    "country",
    "join_organisation",
    "email_opt_in_type",
    "opt_in_sms",
    "sms_opt_in_type",
    "confirmed_at",
}
ATTENDEE_KEYS = {
    "id",
    "first_name",
    "last_name",
    "email",
    "phone_number",
    "postcode",
    "country",
    "notification_level",
    "attending_status",
    "join_organisation",
    "new_mobile_subscriber",
    "opt_in_sms",
    "additional_fields",
    "partnership_opt_ins",
    "email_opt_in_type",
    "eu_data_processing_consent",
    "member",
    "event",
    "created_at",
    "updated_at",
    "unsubscribe_at",
    "confirmed_at",
    "confirmed_reason",
    "source",
}


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def host(**extra: Any) -> dict[str, Any]:
    return {
        "email": "Hana@Example.org",
        "first_name": "Hana",
        "last_name": "Okafor",
        "phone_number": "07700 900123",
        "postcode": "E1 6AN",
        "join_organisation": True,
        "opt_in_sms": False,
        **extra,
    }


def place(**extra: Any) -> dict[str, Any]:
    return {
        "query": "Town Hall, 1 High St, London",
        "latitude": 51.5,
        "longitude": -0.07,
        "street_number": "1",
        "street": "High St",
        "locality": "London",
        "region": "Greater London",
        "postal_code": "E1 6AN",
        "country": "GB",
        "extra_location_info": "Side door",
        **extra,
    }


def make_event(sim: ControlShiftSim, slug: str, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "title": f"Event {slug}",
        "description": "Bring a friend",
        "start_at": START,
        "end_at": START + timedelta(hours=2),
        "host": host(),
        "location": place(),
        **extra,
    }
    return sim.add_event(slug, **fields)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[ControlShiftSim]:
    s = ControlShiftSim(clock=clock, now=lambda: T0, page_size=3, webhook_retry_delays=(0.01,))
    yield s
    s.close()


@pytest.fixture
def client(sim: ControlShiftSim) -> Iterator[httpx.Client]:
    with (
        ServedApp(sim.app) as served,
        httpx.Client(base_url=served.url, headers=KEY, timeout=5) as c,
    ):
        yield c


class Receiver:
    """Records every webhook POST (path, headers, raw body) and answers ``script`` then 200."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[dict[str, str], bytes, int]] = []
        self.script: list[int] = []
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            status = self.script.pop(0) if self.script else 200
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.calls.append((headers, body, status))
        return JSONResponse({}, status)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body, status in self.calls if status < 300]


@pytest.fixture
def receiver(sim: ControlShiftSim) -> Iterator[Receiver]:
    rec = Receiver()
    with ServedApp(rec.app) as served:
        sim.add_webhook_endpoint(f"{served.url}/hook", SECRET)
        yield rec
        sim.close()


def idle(sim: ControlShiftSim) -> None:
    assert sim.wait_webhooks_idle(timeout=10)


def walk(client: httpx.Client, path: str, key: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page: int | None = 1
    while page is not None:
        body = client.get(path, params={"page": page}).json()
        assert body["meta"]["current_page"] == page
        items += body[key]
        page = body["meta"]["next_page"]
    return items


# ---------------------------------------------------------------------------------- REST


def test_event_list_pages_every_event_newest_first(
    sim: ControlShiftSim, client: httpx.Client
) -> None:
    made = [
        make_event(sim, f"e{i}", launched=i != 3, created_at=T0 + timedelta(minutes=i))
        for i in range(7)
    ]
    first = client.get("/api/v1/events").json()
    assert first["meta"] == {
        "current_page": 1,
        "total_pages": 3,
        "previous_page": None,
        "next_page": 2,
    }
    assert len(first["events"]) == 3
    # Unlaunched events are listed too, with a null launched_at.
    listed = walk(client, "/api/v1/events", "events")
    assert [e["slug"] for e in listed] == [e["slug"] for e in made][::-1]
    assert [e["launched_at"] is None for e in listed] == [i == 3 for i in range(7)][::-1]
    sim.event_order = "asc"
    assert [e["slug"] for e in walk(client, "/api/v1/events", "events")] == [
        e["slug"] for e in made
    ]
    beyond = client.get("/api/v1/events", params={"page": 9}).json()
    assert beyond["events"] == [] and beyond["meta"]["next_page"] is None


def test_rest_event_fields(sim: ControlShiftSim, client: httpx.Client) -> None:
    sim.add_calendar("autumn", "Autumn of Action", description="Many events")
    sim.add_petition(
        title="Save the Library",
        creator={"first_name": "C", "last_name": "N", "email": "c@example.org"},
    )
    made = make_event(
        sim,
        "library-vigil",
        time_zone="Europe/London",
        calendar_slug="autumn",
        petition="save-the-library",
        max_attendees_count=40,
        location_venue="Town Hall",
        labels=["vigil"],
        admin_status="inappropriate",
    )
    body = client.get("/api/v1/events/library-vigil").json()
    event = body["event"]
    assert event == made
    assert set(event) == REST_EVENT_KEYS
    assert "id" not in event and "created_at" not in event and "updated_at" not in event
    assert "admin_status" not in event
    assert event["url"] == "https://demo-org.example.org/events/library-vigil"
    assert event["start_at"] == "2024-11-05T18:30:00.000000Z"
    assert event["start_in_zone"] == "2024-11-05T18:30:00.000Z"  # GMT in November
    assert event["end_in_zone"] == "2024-11-05T20:30:00.000Z"
    assert event["time_zone"] == "Europe/London"
    record = sim.events()[0]
    assert event["launched_at"] == record["launched_at"].isoformat().replace("+00:00", "Z")
    assert event["launched_at"].startswith("2024-10-01T12:00:00.0000")
    assert event["host"] == {
        "member_id": sim.member_id("hana@example.org"),
        "full_name": "Hana Okafor",
        "email": "Hana@Example.org",
        "phone_number": "07700 900123",
        "postcode": "E1 6AN",
    }
    assert set(event["location"]) == REST_LOCATION_KEYS
    assert event["location"]["extra_location_info"] == "Side door"
    assert event["location"]["created_at"] == event["launched_at"]
    assert event["calendar"] == {
        "name": "Autumn of Action",
        "slug": "autumn",
        "url": "https://demo-org.example.org/calendars/autumn",
    }
    assert event["petition"] == {
        "slug": "save-the-library",
        "url": "https://demo-org.example.org/petitions/save-the-library",
    }
    assert event["max_attendees_count"] == 40 and event["labels"] == ["vigil"]

    summer = make_event(sim, "summer", time_zone="America/New_York", virtual=True, location=None)
    assert summer["calendar"] is None and summer["location"] is None and summer["virtual"] is True
    assert summer["start_in_zone"] == "2024-11-05T13:30:00.000-05:00"
    assert client.get("/api/v1/events/summer").json()["event"]["calendar"] is None
    assert client.get("/api/v1/events/nope").status_code == 404


def test_rest_hides_cancellation_and_moderation(sim: ControlShiftSim, client: httpx.Client) -> None:
    make_event(sim, "gone", admin_status="unreviewed")
    before = client.get("/api/v1/events/gone").json()["event"]
    sim.update_event("gone", cancelled_at=T0, admin_status="inappropriate")
    after = client.get("/api/v1/events/gone").json()["event"]
    assert after == before
    assert [e["slug"] for e in walk(client, "/api/v1/events", "events")] == ["gone"]
    record = sim.events()[0]
    assert record["cancelled_at"] == T0 and record["admin_status"] == "inappropriate"


def test_calendar_endpoint_and_no_calendar_list(sim: ControlShiftSim, client: httpx.Client) -> None:
    sim.add_calendar("autumn", "Autumn of Action", description="Many events")
    sim.add_calendar("other", "Other", url="https://elsewhere.example.org/cal")
    for i in range(4):
        make_event(sim, f"a{i}", calendar_slug="autumn", launched=i != 0)
    make_event(sim, "loose")
    make_event(sim, "o1", calendar_slug="other")

    body = client.get("/api/v1/calendars/autumn").json()
    assert body == {
        "calendar": {
            "name": "Autumn of Action",
            "description": "Many events",
            "slug": "autumn",
            "url": "https://demo-org.example.org/calendars/autumn",
            "partnership": None,
        }
    }
    first = client.get("/api/v1/calendars/autumn/events").json()
    assert first["calendar"] == body["calendar"]
    assert first["meta"]["total_pages"] == 2
    listed = walk(client, "/api/v1/calendars/autumn/events", "events")
    assert sorted(e["slug"] for e in listed) == ["a0", "a1", "a2", "a3"]
    assert all(e["calendar"]["slug"] == "autumn" for e in listed)
    other = client.get("/api/v1/events/o1").json()["event"]["calendar"]
    assert other["url"] == "https://elsewhere.example.org/cal"

    assert client.get("/api/v1/calendars").status_code == 404
    assert client.get("/api/v1/calendars/nope").status_code == 404
    assert client.get("/api/v1/calendars/nope/events").status_code == 404

    sim.update_event("loose", calendar_slug="other")
    assert client.get("/api/v1/calendars/other/events").json()["meta"]["total_pages"] == 1
    assert len(client.get("/api/v1/calendars/other/events").json()["events"]) == 2
    with pytest.raises(KeyError):
        make_event(sim, "bad", calendar_slug="nope")


def test_attendee_list_and_lookup(sim: ControlShiftSim, client: httpx.Client) -> None:
    make_event(sim, "vigil")
    made = [
        sim.add_attendee(
            "vigil",
            email=f"a{i}@example.org",
            first_name="A",
            last_name=str(i),
            created_at=T0 + timedelta(minutes=i),
        )
        for i in range(5)
    ]
    first = client.get("/api/v1/events/vigil/attendees").json()
    assert set(first) == {"meta", "event", "attendees"}
    assert first["event"]["slug"] == "vigil"
    assert first["meta"]["total_pages"] == 2
    listed = walk(client, "/api/v1/events/vigil/attendees", "attendees")
    assert listed == made
    assert set(listed[0]) == ATTENDEE_KEYS
    assert listed[0]["event"] == {
        "url": "https://demo-org.example.org/events/vigil",
        "slug": "vigil",
    }
    assert listed[0]["member"] == {"id": sim.member_id("a0@example.org")}
    sim.attendee_order = "desc"
    assert walk(client, "/api/v1/events/vigil/attendees", "attendees") == made[::-1]

    found = client.get("/api/v1/events/vigil/attendees/lookup", params={"email": " A2@Example.org"})
    assert found.status_code == 200 and found.json() == {"attendee": made[2]}

    sim.delete_attendee(made[2]["id"])
    assert (
        client.get(
            "/api/v1/events/vigil/attendees/lookup", params={"email": "a2@example.org"}
        ).status_code
        == 404
    )
    remaining = walk(client, "/api/v1/events/vigil/attendees", "attendees")
    assert made[2]["id"] not in [a["id"] for a in remaining] and len(remaining) == 4
    assert len(sim.attendees("vigil")) == 4 and len(sim.attendees(include_deleted=True)) == 5
    with pytest.raises(KeyError):
        sim.update_attendee(made[2]["id"], attending_status="not_attending")

    assert client.get("/api/v1/events/nope/attendees").status_code == 404
    assert client.get("/api/v1/events/vigil/attendees/lookup").status_code == 404
    with pytest.raises(ValueError):
        sim.add_attendee("vigil", email="x@example.org", attending_status="maybe")


def test_auth_rate_limit_and_faults_cover_the_new_routes(
    sim: ControlShiftSim, client: httpx.Client, clock: FakeClock
) -> None:
    sim.add_calendar("autumn", "Autumn")
    make_event(sim, "vigil", calendar_slug="autumn")
    paths = [
        "/api/v1/events",
        "/api/v1/events/vigil",
        "/api/v1/events/vigil/attendees",
        "/api/v1/events/vigil/attendees/lookup?email=x@example.org",
        "/api/v1/calendars/autumn",
        "/api/v1/calendars/autumn/events",
        "/api/v1/calendars",
    ]
    for path in paths:
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, headers={"Authorization": ""}).status_code == 401

    sim.requests_per_minute = 3
    clock.t = 6000.0
    statuses = [client.get(path).status_code for path in paths[:4]]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    limited = client.get("/api/v1/calendars/autumn")
    assert limited.status_code == 429 and limited.headers["RateLimit-Remaining"] == "0"
    clock.t = 6060.0
    ok = client.get("/api/v1/calendars/autumn")
    assert ok.status_code == 200 and ok.headers["RateLimit-Limit"] == "3"

    sim.requests_per_minute = None
    sim.faults.fail_next = 1
    sim.faults.paths = ("/api/v1/events",)
    assert client.get("/api/v1/calendars/autumn").status_code == 200
    assert client.get("/api/v1/events/vigil/attendees").status_code == 500
    assert sim.stats()["by_route"]["GET /api/v1/events/{slug}/attendees"] >= 1

    sim.meta_override = lambda path, page, meta: None
    assert client.get("/api/v1/events").json()["meta"] is None


def test_signatures_carry_custom_fields_phone_and_sms_opt_in(
    sim: ControlShiftSim, client: httpx.Client, receiver: Receiver
) -> None:
    p = sim.add_petition(
        title="Fields", creator={"first_name": "C", "last_name": "N", "email": "c@example.org"}
    )
    made = sim.add_signature(
        p["slug"],
        email="ann@example.org",
        phone_number="123-456",
        opt_in_sms=True,
        additional_fields={"ward": "North", "skills": "", "age": 42},
    )
    assert made["additional_fields"] == {"ward": "North", "skills": "", "age": 42}
    assert made["phone_number"] == "123-456" and made["opt_in_sms"] is True
    listed = client.get(f"/api/v1/petitions/{p['slug']}/signatures").json()["signatures"]
    assert listed == [made]
    looked = client.get(
        f"/api/v1/petitions/{p['slug']}/signatures/lookup", params={"email": "ann@example.org"}
    ).json()["signature"]
    assert looked == made
    updated = sim.update_signature(
        made["id"], additional_fields={"ward": "South"}, opt_in_sms=False
    )
    idle(sim)
    bodies = [e for e in receiver.events() if e["type"].startswith("signature.")]
    assert [e["data"] for e in bodies] == [made, updated]
    assert bodies[1]["data"]["additional_fields"] == {"ward": "South"}
    assert bodies[1]["data"]["opt_in_sms"] is False


# ---------------------------------------------------------------------------------- webhooks


def test_event_webhooks(sim: ControlShiftSim, receiver: Receiver) -> None:
    sim.add_calendar("autumn", "Autumn")
    made = make_event(sim, "vigil", calendar_slug="autumn", petition="p1", time_zone="Asia/Tokyo")
    make_event(sim, "draft", launched=False)
    make_event(sim, "pending", admin_status="unreviewed")
    sim.update_event("vigil", title="Candle vigil", host={"first_name": "Hanna"})
    sim.update_event("draft", launched=True)
    sim.update_event("pending", admin_status="good")
    sim.update_event("vigil", admin_status="inappropriate", admin_reason="spam")
    sim.update_event("vigil", cancelled_at=T0)
    idle(sim)
    events = receiver.events()
    assert [(e["type"], e["data"]["slug"]) for e in events] == [
        ("event.created", "vigil"),
        ("event.created.requires_moderation", "pending"),
        ("event.updated", "vigil"),
        ("event.created", "draft"),
        ("event.updated", "pending"),
        ("event.updated", "vigil"),
        ("event.updated", "vigil"),
    ]
    created = events[0]["data"]
    assert set(created) == WEBHOOK_EVENT_KEYS
    for absent in ("id", "description", "time_zone", "calendar", "max_attendees_count"):
        assert absent not in created
    assert created["url"] == made["url"] and created["petition"] == {"slug": "p1"}
    assert created["admin_status"] == "good"
    assert created["created_at"] == created["updated_at"] == "2024-10-01T12:00:00.000000Z"
    assert set(created["location"]) == REST_LOCATION_KEYS - {"extra_location_info"}
    assert set(created["host"]) == WEBHOOK_HOST_KEYS
    assert created["host"]["id"] == sim.member_id("hana@example.org")
    assert created["host"]["first_name"] == "Hana" and created["host"]["last_name"] == "Okafor"
    assert created["host"]["join_organisation"] is True
    assert created["host"]["email_opt_in_type"]["mailable"] is True
    assert created["host"]["opt_in_sms"] is False
    assert created["host"]["sms_opt_in_type"]["mailable"] is False

    renamed = events[2]["data"]
    assert renamed["title"] == "Candle vigil" and renamed["host"]["first_name"] == "Hanna"
    assert renamed["host"]["last_name"] == "Okafor"
    assert renamed["updated_at"] > created["updated_at"]
    assert events[1]["data"]["admin_status"] == "unreviewed"
    assert events[4]["data"]["admin_status"] == "good"
    assert events[4]["data"]["administered_at"] is not None
    inappropriate = events[5]["data"]
    assert inappropriate["admin_status"] == "inappropriate"
    assert inappropriate["admin_reason"] == "spam"
    # Cancelling shows nowhere in the payload: only updated_at moves.
    cancelled = events[6]["data"]
    assert {k: v for k, v in cancelled.items() if k != "updated_at"} == {
        k: v for k, v in inappropriate.items() if k != "updated_at"
    }
    assert cancelled == sim.event_webhook_data("vigil")


def test_attendee_webhooks(sim: ControlShiftSim, receiver: Receiver) -> None:
    make_event(sim, "vigil")
    make_event(sim, "draft", launched=False)
    created = sim.add_attendee(
        "vigil",
        email="Ann@Example.org",
        first_name="Ann",
        last_name="Lee",
        phone_number="123-456",
        opt_in_sms=True,
        additional_fields={"dietary": "vegan"},
        utm_source="newsletter",
    )
    sim.add_attendee("draft", email="quiet@example.org")  # unlaunched: no webhook
    updated = sim.update_attendee(
        created["id"], attending_status="not_attending", join_organisation=True
    )
    confirmed = sim.confirm_attendee(created["id"])
    deleted = sim.delete_attendee(created["id"])
    assert sim.delete_attendee(created["id"]) == deleted  # nothing more is emitted
    idle(sim)
    events = [e for e in receiver.events() if e["type"].startswith("attendee.")]
    assert [e["type"] for e in events] == [
        "attendee.created",
        "attendee.updated",
        "attendee.confirmed",
        "attendee.deleted",
    ]
    assert [e["data"] for e in events] == [created, updated, confirmed, deleted]
    assert set(created) == ATTENDEE_KEYS | {"utm_source"}
    assert created["member"] == {"id": sim.member_id("ann@example.org")}
    assert created["event"] == {"url": "https://demo-org.example.org/events/vigil", "slug": "vigil"}
    assert created["additional_fields"] == {"dietary": "vegan"}
    assert created["opt_in_sms"] is True and created["phone_number"] == "123-456"
    assert created["join_organisation"] is None and created["confirmed_at"] is None
    assert created["email_opt_in_type"]["mailable"] is False
    assert "sms_opt_in_type" not in created
    assert updated["attending_status"] == "not_attending"
    assert updated["email_opt_in_type"]["mailable"] is True
    assert confirmed["confirmed_at"] == confirmed["updated_at"]
    assert deleted == confirmed  # the last body, unchanged
    assert len({e["jid"] for e in events}) == 4


def test_event_webhooks_are_signed_retried_and_duplicated(
    sim: ControlShiftSim, receiver: Receiver
) -> None:
    receiver.script = [500, 503]
    make_event(sim, "vigil")
    idle(sim)
    with receiver.lock:
        calls = list(receiver.calls)
    assert [status for _, _, status in calls] == [500, 503, 200]
    assert len({body for _, body, _ in calls}) == 1  # retried byte for byte
    headers, body, _ = calls[-1]
    assert headers[WEBHOOK_SIGNATURE_HEADER] == webhook_signature(body, SECRET)
    assert [d["attempt"] for d in sim.webhook_deliveries()] == [1, 2, 3]

    sim.webhook_duplicate_rate = 1.0
    sim.add_attendee("vigil", email="dup@example.org")
    idle(sim)
    dup = [e for e in receiver.events() if e["type"] == "attendee.created"]
    assert len(dup) == 2 and dup[0] == dup[1]


def test_mutator_guards(sim: ControlShiftSim) -> None:
    make_event(sim, "vigil")
    with pytest.raises(ValueError):
        make_event(sim, "vigil")
    with pytest.raises(TypeError):
        make_event(sim, "with-id", id=7)
    with pytest.raises(ValueError):
        make_event(sim, "bad-zone", time_zone="Mars/Olympus")
    with pytest.raises(TypeError):
        sim.update_event("vigil", created_at=T0)
    a = sim.add_attendee("vigil", email="a@example.org")
    with pytest.raises(TypeError):
        sim.update_attendee(a["id"], member={"id": 1})
    with pytest.raises(KeyError):
        sim.add_attendee("nope", email="a@example.org")
    record = sim.events()[0]
    assert record["slug"] == "vigil" and record["launched_at"] == T0
    assert sim.calendars() == []
