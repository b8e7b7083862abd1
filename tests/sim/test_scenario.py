"""The scenario generator and the expected-state oracle."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import (
    CREATOR_TAG,
    SIGNER_TAG,
    ExistingPerson,
    expected_state,
    normalize_email,
    populate,
)
from csand.sim.server import ServedApp

NOW = datetime(2024, 10, 1, 15, 30, tzinfo=UTC)


class FakeAN:
    def __init__(self) -> None:
        self.people: list[tuple[str, dict[str, Any]]] = []

    def add_person(self, email: str, **fields: Any) -> None:
        self.people.append((email, fields))


def make(seed: int = 0, **kwargs: Any) -> tuple[ControlShiftSim, FakeAN, Any]:
    cs = ControlShiftSim(now=lambda: NOW)
    an = FakeAN()
    return cs, an, populate(cs, an, seed=seed, **kwargs)


def test_deterministic_from_seed() -> None:
    cs1, an1, s1 = make(seed=3, bad_records=5)
    cs2, an2, s2 = make(seed=3, bad_records=5)
    assert cs1.petitions() == cs2.petitions()
    assert cs1.signatures() == cs2.signatures()
    assert an1.people == an2.people and s1.existing_people == s2.existing_people
    assert s1.expected_an_state() == s2.expected_an_state()
    cs3, _, _ = make(seed=4, bad_records=5)
    assert cs3.signatures() != cs1.signatures()


def test_shape_and_fractions() -> None:
    cs, an, sc = make(petitions=15, signatures=3000, unlaunched=2, seed=1)
    petitions = cs.petitions()
    assert len(petitions) == 15 and sum(not p["launched"] for p in petitions) == 2
    assert all(cs.signatures(p["slug"]) == [] for p in petitions if not p["launched"])
    assert all(0 <= len(p["categories"]) <= 3 for p in petitions)
    assert any(len(p["categories"]) == 0 for p in petitions)
    assert any(len(p["categories"]) >= 2 for p in petitions)

    sigs = cs.signatures()
    assert len(sigs) == 3000
    joins = Counter(s["join_organisation"] for s in sigs)
    assert 0.65 < joins[True] / 3000 < 0.75
    assert joins[False] > 300 and joins[None] > 300

    sizes = sorted((p["public_signature_count"] for p in petitions if p["launched"]), reverse=True)
    assert sizes[0] > 4 * sizes[-1]  # uneven: a few large petitions

    # Ordering: ids grow with created_at; everything is in the past months.
    by_id = sorted(sigs, key=lambda s: s["id"])
    assert [s["created_at"] for s in by_id] == sorted(s["created_at"] for s in by_id)
    oldest = datetime.fromisoformat(min(p["created_at"] for p in petitions))
    newest = datetime.fromisoformat(max(s["created_at"] for s in sigs))
    assert NOW - timedelta(days=190) < oldest and newest < NOW

    # Repeat signers, with their email typed differently at times.
    per_person = Counter(normalize_email(s["email"]) for s in sigs)
    repeaters = [e for e, n in per_person.items() if n > 1]
    assert 0.05 < sum(per_person[e] - 1 for e in repeaters) / 3000 < 0.15
    spellings: dict[str, set[str]] = {}
    for s in sigs:
        spellings.setdefault(normalize_email(s["email"]), set()).add(s["email"])
    assert any(len(v) > 1 for v in spellings.values())
    emails = [s["email"] for s in sigs]
    assert any(e != e.strip() for e in emails)
    assert any("+" in e for e in emails)
    assert any(e != e.lower() for e in emails)
    names = {s["first_name"] for s in sigs} | {s["last_name"] for s in sigs}
    assert {"José", "Zoë", "Łukasz", "田中"} & names
    assert any(n and not n.isascii() for n in names)
    assert all(normalize_email(s["email"]).isascii() for s in sigs)

    # People already in AN.
    people = set(sc.people)
    assert 0.15 < len(sc.existing_people) / len(people) < 0.25
    statuses = Counter(p.status for p in sc.existing_people.values())
    assert 0.4 < statuses["subscribed"] / len(sc.existing_people) < 0.6
    assert [e for e, _ in an.people] == list(sc.existing_people)
    assert set(sc.existing_people) <= people


def test_bad_records() -> None:
    cs, _, sc = make(signatures=50, bad_records=10)
    assert len(cs.signatures()) == 60 and len(sc.bad_records) == 10
    assert Counter(sc.bad_records.values()) == {
        "missing_email": 2,
        "invalid_email": 2,
        "null_names": 2,
        "long_first_name": 2,
        "non_ascii": 2,
    }
    dead = {d.signature_id: d.reason for d in sc.expected_dead()}
    for sig_id, kind in sc.bad_records.items():
        expected = {
            "missing_email": "missing email",
            "invalid_email": "invalid email",
            "long_first_name": "field too long",
        }.get(kind)
        assert dead.get(sig_id) == expected
    state = sc.expected_an_state()
    sigs = {s["id"]: s for s in cs.signatures()}
    for sig_id, kind in sc.bad_records.items():
        if kind in ("null_names", "non_ascii"):
            person = state[normalize_email(sigs[sig_id]["email"])]
            assert person.tags >= {SIGNER_TAG}


def test_scenario_is_served() -> None:
    cs, _, sc = make(petitions=4, signatures=40)
    with ServedApp(cs.app) as served:
        headers = {"Authorization": "Bearer cs-test-key"}
        with httpx.Client(base_url=served.url, headers=headers) as c:
            total = 0
            page: int | None = 1
            while page:
                body = c.get("/api/v1/petitions", params={"page": page}).json()
                for p in body["petitions"]:
                    total += p["public_signature_count"]
                page = body["meta"]["next_page"]
    assert total == 40 == sc.summary()["signatures"]


def test_oracle_is_live_and_populate_works_without_an() -> None:
    cs = ControlShiftSim(now=lambda: NOW)
    sc = populate(cs, None, petitions=3, signatures=30, unlaunched=0, not_opted_in=1.0)
    state = sc.expected_an_state()
    target = next(
        e for e, p in state.items() if SIGNER_TAG in p.tags and e not in sc.existing_people
    )
    assert state[target].status == "unsubscribed"
    sig = next(s for s in cs.signatures() if normalize_email(s["email"]) == target)
    cs.update_signature(sig["id"], join_organisation=True)
    assert sc.expected_an_state()[target].status == "subscribed"
    cs.delete_signature(sig["id"])
    assert any(d.signature_id == sig["id"] and d.reason == "deleted" for d in sc.expected_dead())


# -------------------------------------------------------------- the oracle on hand-made data


def petition(pid: int, slug: str, email: str, *, launched: bool = True, day: int = 1,
             categories: tuple[str, ...] = (), first: str | None = "Cy") -> dict[str, Any]:  # fmt: skip
    return {
        "id": pid,
        "slug": slug,
        "launched": launched,
        "created_at": f"2024-09-{day:02d}T10:00:00Z",
        "categories": [{"slug": c.lower(), "name": c} for c in categories],
        "creator": {"first_name": first, "last_name": "Creator", "email": email},
    }


def signature(sid: int, slug: str, email: str | None, join: bool | None, *, day: int,
              first: str | None = None, last: str | None = None, postcode: str | None = None,
              deleted: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "id": sid,
        "email": email,
        "first_name": first,
        "last_name": last,
        "postcode": postcode,
        "join_organisation": join,
        "deleted_at": "2024-09-28T00:00:00Z" if deleted else None,
        "created_at": f"2024-09-{day:02d}T12:00:00+00:00",
        "petition": {"slug": slug},
    }


def test_oracle_decision_table_tags_and_names() -> None:
    petitions = [
        petition(1, "tax", "creator@example.org", categories=("Avoiding Taxes", "Health")),
        petition(2, "bus", "opted@example.org", day=2, categories=("Public Transport",)),
        petition(3, "draft", "drafty@example.org", launched=False),
    ]
    signatures = [
        signature(1, "tax", "new-yes@example.org", True, day=5, first="Ann", postcode="2000"),
        signature(2, "tax", "new-no@example.org", False, day=5),
        signature(3, "tax", "sub-no@example.org", None, day=5),
        signature(4, "tax", "unsub-yes@example.org", True, day=5),
        signature(5, "tax", "unsub-no@example.org", False, day=5),
        signature(6, "tax", "OPTED@example.org ", True, day=3, first="Old", last="Name"),
        signature(7, "bus", " New-Yes@Example.org", None, day=9, first="Anna", postcode=""),
        signature(8, "bus", "new-no@example.org", False, day=6, deleted=True),
        signature(9, "bus", "not-an-email", True, day=6),
        signature(10, "bus", None, True, day=6),
        signature(11, "bus", "long@example.org", True, day=6, first="x" * 300),
    ]
    existing = {
        e: ExistingPerson(e, "Was", "There", status)
        for e, status in [
            ("sub-no@example.org", "subscribed"),
            ("unsub-yes@example.org", "unsubscribed"),
            ("unsub-no@example.org", "unsubscribed"),
            ("bystander@example.org", "subscribed"),
        ]
    }
    state, dead = expected_state(petitions, signatures, existing)

    assert {e: p.status for e, p in state.items()} == {
        "creator@example.org": "unsubscribed",  # creators carry no opt-in
        "opted@example.org": "subscribed",  # ... unless they also signed with one
        "new-yes@example.org": "subscribed",
        "new-no@example.org": "unsubscribed",
        "sub-no@example.org": "subscribed",
        "unsub-yes@example.org": "subscribed",
        "unsub-no@example.org": "unsubscribed",
        "bystander@example.org": "subscribed",
    }
    assert "drafty@example.org" not in state  # unlaunched petitions do not sync

    tax_tags = {SIGNER_TAG, "controlshift:Avoiding Taxes", "controlshift:Health"}
    assert state["creator@example.org"].tags == {
        CREATOR_TAG,
        "controlshift:Avoiding Taxes",
        "controlshift:Health",
    }
    assert state["opted@example.org"].tags == tax_tags | {
        CREATOR_TAG,
        "controlshift:Public Transport",
    }
    assert state["opted@example.org"].petitions == {"tax", "bus"}
    assert state["new-no@example.org"].tags == tax_tags  # the deleted "bus" signature is gone
    assert state["new-no@example.org"].petitions == {"tax"}
    assert state["bystander@example.org"].tags == frozenset()

    # Names follow the newest activity, falling back to older non-empty values, then AN's.
    ann = state["new-yes@example.org"]
    assert (ann.given_name, ann.family_name, ann.postal_code) == ("Anna", None, "2000")
    opted = state["opted@example.org"]  # signed day 3 as "Old Name", created day 2 as "Cy Creator"
    assert (opted.given_name, opted.family_name) == ("Old", "Name")
    assert (state["sub-no@example.org"].given_name, state["sub-no@example.org"].family_name) == (
        "Was",
        "There",
    )

    assert sorted((d.signature_id, d.reason) for d in dead) == [
        (8, "deleted"),
        (9, "invalid email"),
        (10, "missing email"),
        (11, "field too long"),
    ]


def test_populate_seeds_the_action_network_simulator() -> None:
    an_module = pytest.importorskip("csand.sim.actionnetwork")
    an = an_module.ActionNetworkSim()
    sc = populate(ControlShiftSim(now=lambda: NOW), an, signatures=200, existing_in_an=0.5)
    assert len(an.people()) == len(sc.existing_people) > 50
    for email, before in sc.existing_people.items():
        person = an.person(email)
        assert person is not None and person["status"] == before.status
        assert person["given_name"] == before.given_name


# ------------------------------------------------------------------ events


def test_events_are_generated_deterministically_and_leave_petitions_alone() -> None:
    cs0, an0, s0 = make(seed=5, signatures=150)
    cs1, an1, s1 = make(seed=5, signatures=150, events=10, calendars=3, attendees=200)
    cs2, _, s2 = make(seed=5, signatures=150, events=10, calendars=3, attendees=200)
    assert cs0.petitions() == cs1.petitions() and cs0.signatures() == cs1.signatures()
    assert an0.people == an1.people[: len(an0.people)]  # the petitions' people unchanged
    assert s0.events == s0.calendars == s0.attendees == [] and not s0.has_events()
    assert "events" not in s0.summary()
    assert cs1.events() == cs2.events() and cs1.attendees() == cs2.attendees()
    assert s1.expected_an_state() == s2.expected_an_state()
    assert s1.expected_events() == s2.expected_events()
    _, _, s3 = make(seed=6, signatures=150, events=10, calendars=3, attendees=200)
    assert s3.attendees != s1.attendees


def test_event_scenario_shape() -> None:
    cs, an, sc = make(seed=2, signatures=300, events=12, calendars=3, attendees=400)
    events = cs.events()
    assert len(events) == 12 and len(cs.calendars()) == 3 and len(cs.attendees()) == 400
    assert [e["launched_at"] is None for e in events].count(True) == 1
    assert events[-1]["launched_at"] is None  # the newest is unlaunched...
    assert [e["admin_status"] for e in events].count("inappropriate") == 1  # ...one flagged
    assert any(e["virtual"] and e["location"] is None for e in events)
    assert any(not e["virtual"] and e["location"] for e in events)
    assert any(e["calendar_slug"] for e in events) and any(not e["calendar_slug"] for e in events)
    attendees = cs.attendees()
    assert not cs.attendees(events[-1]["slug"])  # nobody RSVPs to a draft
    statuses = Counter(a["attending_status"] for a in attendees)
    assert set(statuses) == {"attending", "confirmed", "attended", "not_attending", "no_show"}
    assert set(Counter(a["join_organisation"] for a in attendees)) == {True, False, None}
    assert any(a["additional_fields"] for a in attendees)
    assert any(a["phone_number"] for a in attendees)
    signers = {normalize_email(s["email"]) for s in cs.signatures()}
    rsvps = {normalize_email(a["email"]) for a in attendees}
    hosts = {normalize_email(e["host"]["email"]) for e in events}
    assert rsvps & signers and hosts & signers  # the same people sign and turn up
    assert rsvps & set(sc.existing_people) and hosts & set(sc.existing_people)
    in_an = {sc.existing_people[e].status for e in rsvps & set(sc.existing_people)}
    assert in_an == {"subscribed", "unsubscribed"}
    summary = sc.summary()
    assert summary["events"] == 12 and summary["expected_events"] == 10
    assert 1 <= summary["expected_campaigns"] <= 3


def _event(cs: ControlShiftSim, slug: str, host: str, **kwargs: Any) -> None:
    cs.add_event(slug, title=slug.title(), description=None, start_at=NOW + timedelta(days=9),
                 end_at=None, host={"email": host, "first_name": "Hal", "last_name": "Host",
                                    "postcode": "2000", "join_organisation": True},
                 created_at=NOW - timedelta(days=30), **kwargs)


def _oracle_world() -> Any:
    """A hand-made world: a calendar, a synced event in it, one outside it, a draft and a flagged
    event; hosts and attendees of every kind."""
    from csand.sim.scenario import Scenario

    cs = ControlShiftSim(now=lambda: NOW)
    cs.add_calendar("summer", "Summer")
    cs.add_calendar("empty", "Empty")
    _event(cs, "picnic", "host@example.org", calendar_slug="summer")
    _event(cs, "online", "Signer@example.org ", virtual=True)
    _event(cs, "draft", "drafty@example.org", launched=False, calendar_slug="empty")
    _event(cs, "rude", "rude@example.org", admin_status="inappropriate", calendar_slug="empty")
    cs.add_petition(title="P", launched=True, categories=[], created_at=NOW - timedelta(days=60),
                    creator={"first_name": "C", "last_name": "C", "email": "c@example.org"})
    slug = cs.petitions()[0]["slug"]
    cs.add_signature(slug, email="signer@example.org", first_name="Sig", last_name="Ner",
                     join_organisation=False, created_at=NOW - timedelta(days=50))
    cs.add_signature(slug, email="decliner@example.org", first_name="D", last_name="D",
                     join_organisation=None, created_at=NOW - timedelta(days=50))
    day = NOW - timedelta(days=10)
    for email, status, join, event in [
        ("yes@example.org", "attending", True, "picnic"),
        ("no@example.org", "confirmed", False, "picnic"),
        ("null@example.org", "attended", None, "online"),
        ("decliner@example.org", "not_attending", True, "picnic"),  # signed: a person, unopted
        ("noshow@example.org", "no_show", True, "picnic"),  # nothing at all
        ("flagged@example.org", "attending", True, "rude"),  # an unsynced event
        ("unsub@example.org", "attending", True, "online"),  # in AN unsubscribed, opts in
        ("sub@example.org", "attending", False, "online"),  # in AN subscribed: stays
        ("Yes@Example.org", "attending", None, "online"),  # a second event for yes@
        ("host@example.org", "attending", None, "online"),  # a host attends elsewhere
    ]:
        cs.add_attendee(event, email=email, first_name="At", last_name="Tendee",
                        attending_status=status, join_organisation=join, created_at=day)
    existing = {e: ExistingPerson(e, "In", "An", s)  # type: ignore[arg-type]
                for e, s in [("unsub@example.org", "unsubscribed"),
                             ("sub@example.org", "subscribed")]}
    return Scenario(cs=cs, seed=0, petitions=cs.petitions(), signatures=cs.signatures(),
                    bad_records={}, existing_people=existing)


def test_oracle_for_events_hosts_and_attendees() -> None:
    from csand.sim.scenario import ATTENDEE_TAG, EVENT_HOST_TAG

    sc = _oracle_world()
    events = sc.expected_events()
    assert set(events) == {"picnic", "online"}  # not the draft, not the flagged one
    assert sc.expected_campaigns() == {"summer": "controlshift-demo-org:calendar-summer"}
    assert events["picnic"].identifier == "controlshift-demo-org:event-picnic"
    assert events["online"].calendar is None and events["online"].host == "signer@example.org"
    assert events["picnic"].attendances == {"host@example.org", "yes@example.org",
                                            "no@example.org"}
    assert events["online"].attendances == {
        "signer@example.org", "null@example.org", "unsub@example.org", "sub@example.org",
        "yes@example.org", "host@example.org"}

    state = sc.expected_an_state()
    assert {e: p.status for e, p in state.items()} == {
        "c@example.org": "unsubscribed",
        "signer@example.org": "unsubscribed",  # signed without, hosts (REST: no opt-in)
        "decliner@example.org": "unsubscribed",  # the decline's opt-in counts for nothing
        "host@example.org": "unsubscribed",  # a REST host never opts in
        "yes@example.org": "subscribed",
        "no@example.org": "unsubscribed",
        "null@example.org": "unsubscribed",
        "unsub@example.org": "subscribed",
        "sub@example.org": "subscribed",
    }
    assert "noshow@example.org" not in state and "flagged@example.org" not in state
    assert "drafty@example.org" not in state and "rude@example.org" not in state
    assert state["host@example.org"].tags == {EVENT_HOST_TAG, ATTENDEE_TAG}
    assert state["host@example.org"].events == {"picnic", "online"}
    # The REST host's full name is never split: the name is the attendance's, the postcode
    # the host's.
    assert (state["host@example.org"].given_name, state["host@example.org"].postal_code) == (
        "At", "2000")
    assert state["signer@example.org"].tags == {SIGNER_TAG, EVENT_HOST_TAG}
    assert state["decliner@example.org"].events == frozenset()
    assert state["yes@example.org"].events == {"picnic", "online"}

    # Heard through webhooks, the host's own consent and name count, and the flag is known.
    sc.host_consent_known = True
    state = sc.expected_an_state()
    assert state["host@example.org"].status == "subscribed"
    assert state["signer@example.org"].given_name == "Hal"  # hosting is newer than signing
    sc.moderation_known = False  # polling alone: a flagged event looks like any other
    assert set(sc.expected_events()) == {"picnic", "online", "rude"}
    assert sc.expected_an_state()["flagged@example.org"].status == "subscribed"


def _sync_perfectly(sc: Any, an_sim: Any) -> None:
    """Write the oracle's state into AN through its API, as a flawless csand would."""
    with ServedApp(an_sim.app) as served, httpx.Client(
        base_url=f"{served.url}/api/v2", headers={"OSDI-API-Token": an_sim.api_key}, timeout=5
    ) as an:
        state = sc.expected_an_state()
        for email, want in state.items():
            address: dict[str, Any] = {"address": email}
            if want.status == "subscribed" or an_sim.person(email) is None:
                address["status"] = want.status
            person = {"email_addresses": [address], "given_name": want.given_name,
                      "family_name": want.family_name}
            if want.postal_code:
                person["postal_addresses"] = [{"postal_code": want.postal_code}]
            for tag in want.tags:
                an_sim.add_tag(tag)
            response = an.post("/people", json={"person": person, "add_tags": sorted(want.tags)})
            assert response.status_code == 200, response.text
        for p in sc.cs.petitions():
            creator = an_sim.person(p["creator"]["email"])
            doc = an.post("/petitions", json={
                "title": p["title"], "description": p["url"], "origin_system":
                "Controlshift Petition", "identifiers": [f"controlshift-demo-org:petition-{p['id']}"],
                "_links": {"osdi:creator": {"href": f"{an.base_url}people/{creator['uuid']}"}}})
            uuid = doc.json()["_links"]["self"]["href"].rsplit("/", 1)[-1]
            for email, want in state.items():
                if p["slug"] in want.petitions:
                    an.post(f"/petitions/{uuid}/signatures",
                            json={"person": {"email_addresses": [{"address": email}]}})
        campaigns = {}
        for calendar, ident in sc.expected_campaigns().items():
            doc = an.post("/event_campaigns", json={"title": calendar, "identifiers": [ident],
                                                    "origin_system": "Controlshift Event"})
            campaigns[calendar] = doc.json()["_links"]["self"]["href"].rsplit("/", 1)[-1]
        for exp in sc.expected_events().values():
            host = an_sim.person(exp.host)
            body = {"title": exp.title, "identifiers": [exp.identifier],
                    "origin_system": "Controlshift Event",
                    "_links": {"osdi:creator": {"href": f"{an.base_url}people/{host['uuid']}"}}}
            path = f"/event_campaigns/{campaigns[exp.calendar]}/events" if exp.calendar \
                else "/events"
            doc = an.post(path, json=body).json()
            uuid = doc["_links"]["self"]["href"].rsplit("/", 1)[-1]
            for email in sorted(exp.attendances):
                response = an.post(f"/events/{uuid}/attendances",
                                   json={"person": {"email_addresses": [{"address": email}]}})
                assert response.status_code == 200, response.text


def test_compare_checks_events_campaigns_and_attendances() -> None:
    from csand.sim.actionnetwork import ActionNetworkSim
    from csand.sim.verify import compare

    sc = _oracle_world()
    an_sim = ActionNetworkSim(requests_per_second=None, events_api=True)
    for email, before in sc.existing_people.items():
        an_sim.add_person(email, before.given_name, before.family_name, status=before.status)
    empty = compare(sc, an_sim)
    assert "event picnic: missing in AN" in empty["problems"]
    assert "calendar summer: no event campaign in AN" in empty["problems"]
    assert empty["expected_events"] == 2 and empty["expected_attendances"] == 9

    _sync_perfectly(sc, an_sim)
    result = compare(sc, an_sim)
    assert result["problems"] == [] and result["wrongly_subscribed"] == 0
    assert result["attendances"] == 9 and result["duplicate_events"] == 0

    # A decliner's RSVP recorded anyway, and a no-show created (and subscribed) by the helper.
    [picnic] = [e for e in an_sim.events() if "controlshift-demo-org:event-picnic"
                in e["identifiers"]]
    with ServedApp(an_sim.app) as served, httpx.Client(
        base_url=f"{served.url}/api/v2", headers={"OSDI-API-Token": an_sim.api_key}, timeout=5
    ) as an:
        for email in ("decliner@example.org", "noshow@example.org"):
            an.post(f"/events/{picnic['uuid']}/attendances",
                    json={"person": {"email_addresses": [{"address": email}]}})
        an.post("/events", json={"title": "Rude", "origin_system": "Controlshift Event",
                                 "identifiers": ["controlshift-demo-org:event-rude"]})
    result = compare(sc, an_sim)
    problems = "\n".join(result["problems"])
    assert "event picnic: unexpected attendances" in problems
    assert "created in AN but should not exist" in problems
    assert "event controlshift-demo-org:event-rude: should not exist" in problems
    assert result["wrongly_subscribed"] == 1  # the no-show, subscribed by the helper
