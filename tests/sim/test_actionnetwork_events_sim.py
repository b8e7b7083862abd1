"""The Action Network simulator's events, event campaigns, attendances, custom fields and phone
numbers behave as spec/events-api.md section B says (the stricter reading where it guesses)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.server import ServedApp

KEY = "an-test-key"


class Plug:
    """One loopback server for the whole module; each test plugs its own simulator in."""

    def __init__(self) -> None:
        self.sim: ActionNetworkSim | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.sim is not None
        await self.sim.app(scope, receive, send)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Plug]]:
    plug = Plug()
    with ServedApp(plug) as served:
        yield served.url, plug


def _client(server: tuple[str, Plug], sim: ActionNetworkSim) -> Iterator[httpx.Client]:
    url, plug = server
    plug.sim = sim
    headers = {"OSDI-API-Token": KEY}
    try:
        with httpx.Client(base_url=f"{url}/api/v2", headers=headers, timeout=5.0) as client:
            yield client
    finally:
        plug.sim = None


@pytest.fixture
def sim() -> ActionNetworkSim:
    return ActionNetworkSim(requests_per_second=None, events_api=True)


@pytest.fixture
def an(sim: ActionNetworkSim, server: tuple[str, Plug]) -> Iterator[httpx.Client]:
    yield from _client(server, sim)


def person(email: str, **extra: Any) -> dict[str, Any]:
    return {"email_addresses": [{"address": email}], **extra}


def post_event(an: httpx.Client, path: str = "/events", **extra: Any) -> dict[str, Any]:
    body = {
        "title": "Picnic",
        "origin_system": "Controlshift Event",
        "start_date": "2030-05-01T10:00:00Z",
        "end_date": "2030-05-01T12:00:00Z",
        **extra,
    }
    response = an.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def an_id(doc: dict[str, Any]) -> str:
    return next(i for i in doc["identifiers"] if i.startswith("action_network:")).split(":")[1]


def attend(an: httpx.Client, event_uuid: str, body: dict[str, Any]) -> httpx.Response:
    return an.post(f"/events/{event_uuid}/attendances", json=body)


# ------------------------------------------------------------------ events


def test_events_are_off_unless_asked_for(server: tuple[str, Plug]) -> None:
    plain = ActionNetworkSim(requests_per_second=None)
    for client in _client(server, plain):
        assert client.get("/events").status_code == 404
        assert "osdi:events" not in client.get("/").json()["_links"]
        assert client.get("/metadata/custom_fields").status_code == 200


def test_event_is_created_with_fields_links_and_no_browser_url(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    host = sim.add_person("host@example.org")
    href = f"{an.base_url}people/{host}"
    location = {
        "venue": "Park",
        "address_lines": ["1 Main St"],
        "locality": "Sydney",
        "region": "NSW",
        "postal_code": "2000",
        "country": "AU",
        "location": {"latitude": -33.8, "longitude": 151.2},
    }
    doc = post_event(
        an,
        identifiers=["controlshift-org:event-picnic"],
        description="Bring food",
        capacity=50,
        location=location,
        _links={"osdi:creator": {"href": href}, "osdi:organizer": {"href": href}},
    )
    uuid = an_id(doc)
    assert doc["identifiers"] == [f"action_network:{uuid}", "controlshift-org:event-picnic"]
    assert (doc["title"], doc["status"], doc["total_accepted"]) == ("Picnic", "confirmed", 0)
    assert doc["location"] == location and doc["capacity"] == 50
    assert "browser_url" not in doc  # API-created events get no page on actionnetwork.org
    links = doc["_links"]
    assert links["osdi:creator"]["href"].endswith(f"/people/{host}")
    assert links["osdi:organizer"]["href"].endswith(f"/people/{host}")
    assert links["osdi:record_attendance_helper"]["href"].endswith(f"/events/{uuid}/attendances")
    assert an.get(f"/events/{uuid}").json()["title"] == "Picnic"
    [event] = sim.events()
    assert (event["uuid"], event["campaign_uuid"], event["creator_uuid"]) == (uuid, None, host)
    assert event["location"] == location and event["description"] == "Bring food"
    assert an.get("/events/nope").status_code == 404


def test_event_links_title_and_dates_are_validated(an: httpx.Client) -> None:
    bad_link = {"_links": {"osdi:creator": {"href": f"{an.base_url}people/nobody"}}}
    assert an.post("/events", json={"title": "X", **bad_link}).status_code == 400
    assert an.post("/events", json={"description": "no title"}).status_code == 400
    assert an.post("/events", json={"title": "X", "start_date": "soon"}).status_code == 400
    backwards = {"title": "X", "start_date": "2030-05-02T00:00:00Z", "end_date": "2030-05-01"}
    assert an.post("/events", json=backwards).status_code == 400
    assert an.post("/events", json={"title": "X", "status": "postponed"}).status_code == 400
    assert an.get("/events").json()["total_records"] == 0


def test_identifiers_are_unique_across_events_campaigns_and_petitions(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    post_event(an, identifiers=["cs:event-1"])
    refused = an.post("/events", json={"title": "Again", "identifiers": ["cs:event-1"]})
    assert (refused.status_code, refused.json()) == (400, {"error": "identifier already in use"})
    assert (
        an.post("/petitions", json={"title": "P", "identifiers": ["cs:event-1"]}).status_code == 400
    )
    an.post("/petitions", json={"title": "P", "identifiers": ["cs:petition-1"]})
    assert (
        an.post("/events", json={"title": "E", "identifiers": ["cs:petition-1"]}).status_code == 400
    )
    campaign = an.post("/event_campaigns", json={"title": "C", "identifiers": ["cs:cal-1"]})
    assert campaign.status_code == 200
    assert (
        an.post("/event_campaigns", json={"title": "C", "identifiers": ["cs:cal-1"]}).status_code
        == 400
    )
    assert an.post("/events", json={"title": "E", "identifiers": ["cs:cal-1"]}).status_code == 400
    # without identifiers nothing is deduplicated: the same event twice is two events
    post_event(an)
    post_event(an)
    assert len(sim.events()) == 3
    assert sim.stats()["duplicate_identifier_posts"] == 5
    assert sim.duplicates() == {"events": 0, "event_campaigns": 0, "attendances": 0}


def test_events_list_pages_and_filters_by_identifier(an: httpx.Client) -> None:
    for n in range(27):
        post_event(an, identifiers=[f"cs:event-{n}"], title=f"Event {n}")
    first = an.get("/events").json()
    assert (first["total_records"], len(first["_embedded"]["osdi:events"])) == (27, 25)
    second = an.get(first["_links"]["next"]["href"]).json()
    assert len(second["_embedded"]["osdi:events"]) == 2 and "next" not in second["_links"]
    found = an.get("/events", params={"filter": "identifier eq 'cs:event-7'"}).json()
    assert [e["title"] for e in found["_embedded"]["osdi:events"]] == ["Event 7"]
    none = an.get("/events", params={"filter": "identifier eq 'cs:event-99'"}).json()
    assert none["_embedded"]["osdi:events"] == []


def test_put_updates_fields_replaces_location_and_ignores_status(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    uuid = an_id(post_event(an, location={"venue": "Park", "locality": "Sydney"}))
    changes = {
        "title": "Big picnic",
        "description": "Now with cake",
        "start_date": "2030-06-01T10:00:00Z",
        "end_date": "2030-06-01T14:00:00Z",
        "browser_url": "https://cs.example.org/events/picnic",
        "location": {"venue": "Hall"},
        "status": "cancelled",
        "identifiers": ["cs:event-late"],
    }
    response = an.put(f"/events/{uuid}", json=changes)
    assert response.status_code == 200
    doc = response.json()
    assert (doc["title"], doc["browser_url"], doc["location"]) == (
        "Big picnic",
        "https://cs.example.org/events/picnic",
        {"venue": "Hall"},  # the whole location is replaced
    )
    assert doc["status"] == "confirmed"  # status changes are silently ignored
    assert "cs:event-late" not in doc["identifiers"]
    [event] = sim.events()
    assert (event["start_date"], event["status"]) == ("2030-06-01T10:00:00Z", "confirmed")
    assert sim.quirks()["event_status_ignored"] == 1
    bad = an.put(f"/events/{uuid}", json={"end_date": "2030-01-01T00:00:00Z"})
    assert bad.status_code == 400  # before the stored start_date
    assert an.put("/events/nope", json={"title": "X"}).status_code == 404


def test_nothing_can_be_deleted(sim: ActionNetworkSim, an: httpx.Client) -> None:
    uuid = an_id(post_event(an))
    attendance = an_id(attend(an, uuid, {"person": person("a@example.org")}).json())
    campaign = an_id(an.post("/event_campaigns", json={"title": "C"}).json())
    for path in (
        f"/events/{uuid}",
        f"/events/{uuid}/attendances/{attendance}",
        f"/event_campaigns/{campaign}",
        "/metadata/custom_fields",
    ):
        response = an.delete(path)
        assert response.status_code == 405 and "error" in response.json()
    assert len(sim.events()) == 1 and len(sim.attendances()) == 1
    assert sim.stats()["by_route"]["DELETE /events/{uuid}"] == 1


# ------------------------------------------------------------------ event campaigns


def test_event_campaign_crud_and_filter(sim: ActionNetworkSim, an: httpx.Client) -> None:
    body = {
        "title": "Calendar",
        "description": "All the picnics",
        "host_pitch": "Host one",
        "host_instructions": "Bring a rug",
        "browser_url": "https://cs.example.org/calendars/picnics",
        "host_url": "https://cs.example.org/calendars/picnics/host",
        "origin_system": "Controlshift Event",
        "identifiers": ["cs:calendar-picnics"],
    }
    doc = an.post("/event_campaigns", json=body).json()
    uuid = an_id(doc)
    assert {k: doc[k] for k in body if k != "identifiers"} == {
        k: v for k, v in body.items() if k != "identifiers"
    }
    assert (doc["total_events"], doc["total_rsvps"]) == (0, 0)
    put = an.put(f"/event_campaigns/{uuid}", json={"title": "Picnic calendar"}).json()
    assert (put["title"], put["description"]) == ("Picnic calendar", "All the picnics")
    assert an.get(f"/event_campaigns/{uuid}").json()["title"] == "Picnic calendar"
    found = an.get("/event_campaigns", params={"filter": "identifier eq 'cs:calendar-picnics'"})
    assert [an_id(c) for c in found.json()["_embedded"]["osdi:event_campaigns"]] == [uuid]
    assert an.post("/event_campaigns", json={"description": "x"}).status_code == 400
    assert sim.event_campaigns()[0]["title"] == "Picnic calendar"


def test_event_posted_into_a_campaign_and_never_moved(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    campaign = an_id(an.post("/event_campaigns", json={"title": "C"}).json())
    inside = post_event(an, f"/event_campaigns/{campaign}/events", identifiers=["cs:event-in"])
    outside = an_id(post_event(an, identifiers=["cs:event-out"]))
    assert inside["_links"]["action_network:event_campaign"]["href"].endswith(campaign)
    attend(an, an_id(inside), {"person": person("a@example.org")})
    totals = an.get(f"/event_campaigns/{campaign}").json()
    assert (totals["total_events"], totals["total_rsvps"]) == (1, 1)
    listed = an.get(f"/event_campaigns/{campaign}/events").json()["_embedded"]["osdi:events"]
    assert [an_id(e) for e in listed] == [an_id(inside)]
    # a PUT cannot move an event into a campaign
    link = {"action_network:event_campaign": {"href": f"{an.base_url}event_campaigns/{campaign}"}}
    assert an.put(f"/events/{outside}", json={"_links": link}).status_code == 200
    by_uuid = {e["uuid"]: e for e in sim.events()}
    assert by_uuid[an_id(inside)]["campaign_uuid"] == campaign
    assert by_uuid[outside]["campaign_uuid"] is None
    assert an.post("/event_campaigns/nope/events", json={"title": "X"}).status_code == 404


# ------------------------------------------------------------------ attendances


def test_attendance_helper_subscribes_a_new_person_and_records_one_attendance(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    event = an_id(post_event(an))
    sim.add_tag("controlshift-event-attendee")
    body = {
        "person": person(
            "new@example.org",
            given_name="Nia",
            family_name="Ng",
            postal_addresses=[{"postal_code": "2000"}],
        ),
        "add_tags": ["controlshift-event-attendee", "no-such-tag"],
        "identifiers": ["cs:attendee-1"],
    }
    response = attend(an, event, body)
    assert response.status_code == 200
    doc = response.json()
    stored = sim.person("new@example.org")
    assert stored is not None
    assert (stored["status"], stored["given_name"], stored["postal_code"]) == (
        "subscribed",
        "Nia",
        "2000",
    )
    assert stored["tags"] == {"controlshift-event-attendee"}  # unknown tags silently ignored
    assert "no-such-tag" not in sim.tag_names()
    assert doc["status"] == "accepted"
    assert (doc["action_network:person_id"], doc["action_network:event_id"]) == (
        stored["uuid"],
        event,
    )
    assert "cs:attendee-1" in doc["identifiers"]
    assert an.get(f"/events/{event}").json()["total_accepted"] == 1
    assert sim.history("new@example.org")[-1]["event_uuid"] == event
    assert sim.stats()["by_route"]["POST /events/{uuid}/attendances"] == 1


def test_attendance_helper_leaves_an_existing_persons_status_alone(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    event = an_id(post_event(an))
    sim.add_person("old@example.org", status="unsubscribed", given_name="Old")
    assert attend(an, event, {"person": person("OLD@example.org ")}).status_code == 200
    stored = sim.person("old@example.org")
    assert stored is not None and stored["status"] == "unsubscribed"
    assert [h["status"] for h in sim.history("old@example.org")] == ["unsubscribed"] * 2
    # an explicit "subscribed" is the one status the helper takes, and it is honoured
    attend(
        an,
        event,
        {
            "person": person(
                "old@example.org",
                email_addresses=[{"address": "old@example.org", "status": "subscribed"}],
            )
        },
    )
    assert sim.person("old@example.org")["status"] == "subscribed"  # type: ignore[index]


def test_one_attendance_per_person_per_event(sim: ActionNetworkSim, an: httpx.Client) -> None:
    event, other = an_id(post_event(an)), an_id(post_event(an))
    first = attend(an, event, {"person": person("a@example.org")}).json()
    again = attend(
        an, event, {"person": person("A@example.org"), "identifiers": ["cs:attendee-9"]}
    ).json()
    assert an_id(first) == an_id(again) and "cs:attendee-9" in again["identifiers"]
    uuid = sim.person("a@example.org")["uuid"]  # type: ignore[index]
    by_link = attend(
        an, event, {"_links": {"osdi:person": {"href": f"{an.base_url}people/{uuid}"}}}
    )
    assert an_id(by_link.json()) == an_id(first)
    attend(an, other, {"person": person("a@example.org")})
    assert len(sim.attendances(event)) == 1 and len(sim.attendances()) == 2
    assert an.get(f"/events/{event}").json()["total_accepted"] == 1
    listed = an.get(f"/events/{event}/attendances").json()
    assert listed["total_records"] == 1
    assert [an_id(a) for a in listed["_embedded"]["osdi:attendances"]] == [an_id(first)]
    assert sim.duplicates()["attendances"] == 0


def test_attendance_status_is_always_accepted(sim: ActionNetworkSim, an: httpx.Client) -> None:
    event = an_id(post_event(an))
    doc = attend(an, event, {"person": person("a@example.org"), "status": "declined"}).json()
    assert doc["status"] == "accepted"
    path = f"/events/{event}/attendances/{an_id(doc)}"
    put = an.put(path, json={"status": "declined", "identifiers": ["cs:attendee-2"]})
    assert put.status_code == 200
    assert put.json()["status"] == "accepted" and "cs:attendee-2" in put.json()["identifiers"]
    assert an.get(path).json()["status"] == "accepted"
    assert [a["status"] for a in sim.attendances()] == ["accepted"]
    assert sim.quirks()["attendance_status_ignored"] == 2
    assert an.put(f"/events/{event}/attendances/nope", json={}).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"person": {"given_name": "No email"}},
        {"person": {"email_addresses": [{"address": "not-an-email"}]}},
        {"person": person("a@example.org", phone_numbers=[{"number": "12"}])},
        {"person": person("a@example.org", custom_fields={"age": 30})},
        {"person": {"email_addresses": [{"address": "a@example.org", "status": "unsubscribed"}]}},
        {"person": person("a@example.org"), "identifiers": ["cs:taken"]},
        {"_links": {"osdi:person": {"href": "https://x/api/v2/people/nobody"}}},
        {},
    ],
)
def test_a_failed_attendance_helper_answers_200_empty_and_writes_nothing(
    sim: ActionNetworkSim, an: httpx.Client, body: dict[str, Any]
) -> None:
    event = an_id(post_event(an, identifiers=["cs:taken"]))
    response = attend(an, event, body)
    assert (response.status_code, response.json()) == (200, {})
    assert sim.people() == [] and sim.attendances() == []
    assert sim.quirks()["helper_failures"] == 1


def test_attendance_helper_empty_200_fault_and_unknown_event(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    event = an_id(post_event(an))
    assert attend(an, "nope", {"person": person("a@example.org")}).status_code == 404
    sim.faults.empty_200_rate = 1.0
    response = attend(an, event, {"person": person("a@example.org")})
    assert (response.status_code, response.json()) == (200, {})
    assert sim.people() == [] and sim.stats()["faults"] == {"empty_200": 1}
    assert an.get("/events").status_code == 200  # only the helpers answer {}


# ------------------------------------------------------------------ custom fields


def test_custom_fields_overwrite_through_every_write(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    event = an_id(post_event(an))
    petition = an_id(an.post("/petitions", json={"title": "P"}).json())
    an.post("/people", json={"person": person("a@example.org", custom_fields={"color": "red"})})
    an.post(
        f"/petitions/{petition}/signatures",
        json={"person": person("a@example.org", custom_fields={"size": "L"})},
    )
    attend(an, event, {"person": person("a@example.org", custom_fields={"color": "blue"})})
    stored = sim.person("a@example.org")
    assert stored is not None and stored["custom_fields"] == {"color": "blue", "size": "L"}
    an.put(f"/people/{stored['uuid']}", json={"custom_fields": {"size": ""}})
    assert sim.person("a@example.org")["custom_fields"] == {  # type: ignore[index]
        "color": "blue",
        "size": "",
    }
    got = an.get(f"/people/{stored['uuid']}").json()
    assert got["custom_fields"] == {"color": "blue", "size": ""}
    names = an.get("/metadata/custom_fields").json()["action_network:custom_fields"]
    assert [f["name"] for f in names] == ["color", "size"]
    assert set(names[0]) == {"name", "created_date", "modified_date", "notes", "numeric_id"}
    assert an.post("/metadata/custom_fields", json={"name": "x"}).status_code == 405
    assert an.put(f"/people/{stored['uuid']}", json={"custom_fields": {"n": 1}}).status_code == 400


def test_locked_custom_fields_drop_unknown_keys(server: tuple[str, Plug]) -> None:
    sim = ActionNetworkSim(requests_per_second=None, custom_fields_locked=True, events_api=True)
    sim.add_custom_field("phone_number", notes="from ControlShift")
    for an in _client(server, sim):
        fields = {"phone_number": "0400 000 000", "shoe_size": "42"}
        response = an.post(
            "/people", json={"person": person("a@example.org", custom_fields=fields)}
        )
        assert response.json()["custom_fields"] == {"phone_number": "0400 000 000"}
        metadata = an.get("/metadata/custom_fields").json()["action_network:custom_fields"]
        assert [(f["name"], f["notes"]) for f in metadata] == [
            ("phone_number", "from ControlShift")
        ]
    assert sim.person("a@example.org")["custom_fields"] == {  # type: ignore[index]
        "phone_number": "0400 000 000"
    }
    assert sim.quirks()["custom_fields_dropped"] == 1
    assert [f["name"] for f in sim.custom_fields()] == ["phone_number"]


# ------------------------------------------------------------------ phone numbers


def test_new_phone_defaults_unsubscribed_and_changes_only_when_sent(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    event = an_id(post_event(an))
    mobile = {"number": "+61 400 000 000", "number_type": "Mobile"}
    attend(an, event, {"person": person("a@example.org", phone_numbers=[mobile])})
    stored = sim.person("a@example.org")
    assert stored is not None
    assert stored["status"] == "subscribed"  # email: new to the list
    assert stored["phone_numbers"] == [
        {"number": "+61 400 000 000", "number_type": "Mobile", "status": "unsubscribed"}
    ]
    opt_in = [{"number": "+61400000000", "status": "subscribed"}]
    an.post("/people", json={"person": person("a@example.org", phone_numbers=opt_in)})
    # the same number again without a status: never lowered
    attend(an, event, {"person": person("a@example.org", phone_numbers=[mobile])})
    an.put(f"/people/{stored['uuid']}", json={"phone_numbers": [{"number": "61400000000"}]})
    after = sim.person("a@example.org")
    assert after is not None
    assert [p["status"] for p in after["phone_numbers"]] == ["subscribed"]
    an.put(
        f"/people/{stored['uuid']}",
        json={"phone_numbers": [{"number": "+61400000000", "status": "unsubscribed"}]},
    )
    assert [
        (h["action"], h["status"], h["previous"]) for h in sim.sms_history("a@example.org")
    ] == [
        ("POST /events/{uuid}/attendances", "unsubscribed", None),
        ("POST /people", "subscribed", "unsubscribed"),
        ("PUT /people/{uuid}", "unsubscribed", "subscribed"),
    ]
    got = an.get(f"/people/{stored['uuid']}").json()["phone_numbers"]
    assert got == [
        {
            "primary": True,
            "number": "+61 400 000 000",
            "number_type": "Mobile",
            "status": "unsubscribed",
        }
    ]
    bad = {"phone_numbers": [{"number": "+61400000000", "status": "opted-in"}]}
    assert an.put(f"/people/{stored['uuid']}", json=bad).status_code == 400


def test_sms_history_shows_no_subscription_without_opt_in(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    sim.add_person("old@example.org", phone_numbers={"+61411111111": "subscribed"})
    event = an_id(post_event(an))
    for email, number in (("new@example.org", "+61422222222"), ("old@example.org", "+61411111111")):
        phones = [{"number": number, "number_type": "Mobile"}]
        attend(an, event, {"person": person(email, phone_numbers=phones)})
    assert [h["status"] for h in sim.sms_history("new@example.org")] == ["unsubscribed"]
    assert [h["status"] for h in sim.sms_history("old@example.org")] == ["subscribed"]
    assert sim.sms_history("nobody@example.org") == []


def test_people_are_matched_on_phone_and_numbers_are_never_shared(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    sim.add_person("owner@example.org", phone_numbers={"+61433333333": "unsubscribed"})
    event = an_id(post_event(an))
    phones = [{"number": "+61 433 333 333"}]
    doc = attend(an, event, {"person": person("other@example.org", phone_numbers=phones)}).json()
    owner = sim.person("owner@example.org")
    assert owner is not None and doc["action_network:person_id"] == owner["uuid"]
    assert sim.person("other@example.org") is None  # matched by phone: the email is not added
    sim.add_person("third@example.org")
    an.post("/people", json={"person": person("third@example.org", phone_numbers=phones)})
    assert "phone_numbers" not in sim.person("third@example.org")  # type: ignore[operator]
    assert sim.quirks()["phone_numbers_dropped"] == 1


def test_deleting_a_person_drops_their_attendances_and_frees_their_number(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    event = an_id(post_event(an))
    phones = [{"number": "+61444444444"}]
    attend(an, event, {"person": person("a@example.org", phone_numbers=phones)})
    sim.delete_person("a@example.org")
    assert sim.attendances() == []
    attend(an, event, {"person": person("b@example.org", phone_numbers=phones)})
    assert sim.person("b@example.org")["phone_numbers"][0]["number"] == "+61444444444"  # type: ignore[index]
