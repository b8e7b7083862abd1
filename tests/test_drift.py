"""The audit's decisions (csand.drift): table-driven for every kind, and properties: what
matches reports nothing, and a subscription is reported only when csand's records prove it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csand.drift import (
    ANPerson,
    ANPetition,
    Consent,
    CSState,
    Kind,
    Summary,
    Synced,
    activity_findings,
    consent_from,
    cs_state,
    duplicate_petitions,
    petition_findings,
    status_in_note,
    subscription_finding,
)
from csand.model import Person, creator_activity, global_unsubscribe_activity
from tests.storage import ORG, petition, sig, signature

T = datetime(2024, 3, 1, tzinfo=UTC)
PET = "pet-uuid"
SIGNER = sig(7, "ann@example.org", pid=1, join_organisation=None)
TAGS = frozenset(t.lower() for t in SIGNER.tags)


def an(subscribed: bool | None = False, tags: frozenset[str] = TAGS,
       petitions: frozenset[str] | None = frozenset({PET})) -> ANPerson:
    return ANPerson("person-uuid", subscribed, tags, petitions)


def kinds(found: list) -> list[str]:
    return [str(f.kind) for f in found]


SYNCED = Synced(11, SIGNER, PET)


@pytest.mark.parametrize(("cs", "consent", "person", "want"), [
    # In AN as synced: nothing.
    (CSState.SAME, Consent(last_status="unsubscribed"), an(), []),
    (CSState.UNKNOWN, Consent(last_status="subscribed"), an(True), []),
    # Gone from AN, tag off, signature off.
    (CSState.SAME, Consent(), None, ["person_missing"]),
    (CSState.SAME, Consent(), an(tags=frozenset({"controlshift-petition-signer"})), []),
    (CSState.SAME, Consent(), an(tags=frozenset()), ["tag_missing"]),
    (CSState.SAME, Consent(), an(petitions=frozenset()), ["signature_missing"]),
    (CSState.SAME, Consent(), an(petitions=None), []),  # not asked: not judged
    # ControlShift deleted or changed it since: its own sync decides, nothing is drift.
    (CSState.GONE, Consent(), None, []),
    (CSState.CHANGED, Consent(), an(tags=frozenset()), []),
    # Subscribed though csand left them unsubscribed and they never opted in.
    (CSState.SAME, Consent(last_status="unsubscribed"), an(True), ["subscribed_without_opt_in"]),
    # ... but not while their sync is unfinished, nor when csand last saw them subscribed.
    (CSState.SAME, Consent(last_status="unsubscribed", settled=False), an(True), []),
    (CSState.SAME, Consent(last_status="subscribed"), an(True), []),
    (CSState.SAME, Consent(last_status=None), an(True), []),
    (CSState.SAME, Consent(last_status="absent", unsubscribed_at=T), an(True), []),
    # They opted in once: a later subscription in AN may be theirs.
    (CSState.SAME, Consent(opted_in_at=T, last_status="unsubscribed"), an(True), []),
    # Their newest consent is an org-wide unsubscribe.
    (CSState.SAME, Consent(unsubscribed_at=T, last_status="unsubscribed", unsubscribe_item=3),
     an(True), ["unsubscribe_not_applied"]),
    (CSState.SAME, Consent(unsubscribed_at=T, opted_in_at=T, last_status="unsubscribed"),
     an(True), ["unsubscribe_not_applied"]),  # a tie: the unsubscribe wins (§2)
    (CSState.SAME, Consent(unsubscribed_at=T, opted_in_at=T + timedelta(seconds=1),
                           last_status="unsubscribed"), an(True), []),
    # Unsubscribed in AN is never reported: the person may have unsubscribed there.
    (CSState.SAME, Consent(opted_in_at=T, last_status="subscribed"), an(False), []),
])
def test_activity_findings(cs: CSState, consent: Consent, person: ANPerson | None,
                           want: list[str]) -> None:
    assert kinds(activity_findings(SYNCED, cs, consent, person)) == want


def test_repairs_name_the_items_that_put_them_right() -> None:
    consent = Consent(unsubscribed_at=T, last_status="unsubscribed", unsubscribe_item=3)
    (tag, sub) = activity_findings(SYNCED, CSState.SAME, consent, an(True, tags=frozenset()))
    assert (tag.kind, tag.items, tag.repairable) == (Kind.TAG_MISSING, (11,), True)
    assert (sub.kind, sub.items, sub.repairable) == (Kind.UNSUBSCRIBE_NOT_APPLIED, (3,), True)
    assert sub.source_key == "signature:7" and sub.email == "ann@example.org"
    (never,) = activity_findings(SYNCED, CSState.SAME, Consent(last_status="unsubscribed"),
                                 an(True))
    assert not never.repairable  # csand never sets a status the rules do not give
    assert never.to_json()["repairable"] is False


def test_an_org_wide_unsubscribe_is_checked_for_the_subscription_only() -> None:
    unsub = Synced(5, global_unsubscribe_activity(1, "ann@example.org", T))
    consent = Consent(unsubscribed_at=T, last_status="unsubscribed", unsubscribe_item=5)
    assert activity_findings(unsub, CSState.UNKNOWN, consent, None) == []  # never creates
    assert kinds(activity_findings(unsub, CSState.UNKNOWN, consent, an(True, tags=frozenset()))
                 ) == ["unsubscribe_not_applied"]
    assert activity_findings(unsub, CSState.UNKNOWN, consent, an(False)) == []


def test_a_creator_is_checked_like_a_signer() -> None:
    creator = Synced(2, creator_activity(petition(1, categories=[{"name": "Climate"}]), ORG), PET)
    (found,) = activity_findings(creator, CSState.UNKNOWN, Consent(),
                                 an(tags=frozenset({"controlshift-petition-creator"})))
    assert found.detail == "tags missing: controlshift:Climate"
    assert "creator" in activity_findings(creator, CSState.UNKNOWN, Consent(), None)[0].detail


@pytest.mark.parametrize(("note", "status"), [
    ("signer synced (unsubscribed)", "unsubscribed"),
    ("creator synced (subscribed)", "subscribed"),
    ("signer synced (status unchanged)", None),
    ("unsubscribed in Action Network", "unsubscribed"),
    ("not in Action Network; a global unsubscribe never creates a person", "absent"),
    ("the person opted in again after this unsubscribe: subscription kept", None),
    (None, None),
])
def test_status_in_note(note: str | None, status: str | None) -> None:
    assert status_in_note(note) == status


def test_consent_from_the_latest_finished_item_that_says() -> None:
    items = [
        {"id": 1, "kind": "signature", "status": "done", "note": "signer synced (subscribed)",
         "finished_at": 10.0},
        {"id": 2, "kind": "global_unsubscribe", "status": "done",
         "note": "unsubscribed in Action Network", "finished_at": 20.0},
        {"id": 3, "kind": "signature", "status": "done",
         "note": "signer synced (status unchanged)", "finished_at": 30.0},
        {"id": 4, "kind": "signature", "status": "cancelled", "note": None, "finished_at": 40.0},
    ]
    consent = consent_from(Person(unsubscribed_at=T), items)
    assert consent == Consent(None, T, "unsubscribed", True, 2)
    pending = [*items, {"id": 5, "kind": "signature", "status": "pending", "note": None,
                        "finished_at": None}]
    assert consent_from(Person(), pending).settled is False
    assert consent_from(Person(), []) == Consent()


@pytest.mark.parametrize(("change", "state"), [
    ({}, CSState.SAME),
    ({"email": " ANN@example.org "}, CSState.SAME),
    ({"updated_at": "2024-05-01T00:00:00Z", "unsubscribe_at": "2024-05-01T00:00:00Z"},
     CSState.SAME),  # a single-petition unsubscribe changes nothing AN holds
    ({"join_organisation": True}, CSState.CHANGED),
    ({"first_name": "Bea"}, CSState.CHANGED),
    ({"deleted_at": "2024-05-01T00:00:00Z"}, CSState.GONE),
])
def test_cs_state(change: dict, state: CSState) -> None:
    record = signature(7, "ann@example.org", join_organisation=None) | change
    assert cs_state(record, SIGNER) is state
    assert cs_state(None, SIGNER) is CSState.GONE


@pytest.mark.parametrize(("check", "want"), [
    (ANPetition("a", True, "a"), []),
    (ANPetition("a", None, "a"), []),
    (ANPetition("a", False, None), ["petition_missing"]),
    (ANPetition(None, None, None), ["petition_missing"]),
    (ANPetition("a", False, "b"), ["petition_missing"]),  # the record is stale: replay finds b
    (ANPetition("a", True, "b"), ["petition_duplicated"]),
])
def test_petition_findings(check: ANPetition, want: list[str]) -> None:
    found = petition_findings(1, "save-it", check, [4, 5])
    assert kinds(found) == want
    assert all(f.repairable == (f.kind is Kind.PETITION_MISSING) for f in found)


def test_a_copy_of_a_mirrored_petition_is_a_duplicate_and_a_namesake_is_not() -> None:
    prefix = f"controlshift-{ORG}:petition-"
    petitions = [
        {"title": "Save it", "origin_system": "Controlshift Petition",
         "identifiers": ["action_network:a", f"{prefix}1"]},
        {"title": "Save it", "origin_system": "Controlshift Petition",
         "identifiers": ["action_network:b", f"{prefix}2"]},  # another CS petition, same title
        {"title": "Save it", "origin_system": "Someone else", "identifiers": ["action_network:c"]},
        {"title": "Other", "origin_system": "Controlshift Petition",
         "identifiers": ["action_network:d"]},
    ]
    assert duplicate_petitions(petitions, prefix, "Controlshift Petition") == []
    copy = {"title": "Save it ", "origin_system": "Controlshift Petition",
            "identifiers": ["action_network:e"]}
    found = duplicate_petitions([*petitions, copy], prefix, "Controlshift Petition")
    assert sorted(f.petition_id for f in found) == [1, 2]
    assert all(f.kind is Kind.PETITION_DUPLICATED and not f.repairable for f in found)


def test_summary_counts_a_person_subscription_once() -> None:
    consent = Consent(last_status="unsubscribed")
    summary = Summary()
    for n in (1, 2):
        other = Synced(n, replace(SIGNER, source_key=f"signature:{n}"), PET)
        summary.add(activity_findings(other, CSState.SAME, consent, an(True, tags=frozenset())))
    assert summary.by_kind()["subscribed_without_opt_in"] == 1
    assert summary.by_kind()["tag_missing"] == 2
    assert summary.repair_items() == [1, 2]


# ---- properties ----

moments = st.none() | st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1),
                                   timezones=st.just(UTC))
consents = st.builds(Consent, moments, moments,
                     st.sampled_from(["subscribed", "unsubscribed", "absent", None]),
                     st.booleans(), st.none() | st.integers(1, 9))


@given(consents, st.booleans() | st.none())
def test_what_matches_reports_nothing_but_a_subscription(consent: Consent,
                                                         subscribed: bool | None) -> None:
    """A person with every tag and the signature: at most a subscription finding."""
    found = activity_findings(SYNCED, CSState.SAME, consent, an(subscribed))
    assert all(f.kind in (Kind.UNSUBSCRIBE_NOT_APPLIED, Kind.SUBSCRIBED_WITHOUT_OPT_IN)
               for f in found)
    assert len(found) <= 1


@given(consents, st.booleans() | st.none())
def test_a_subscription_is_reported_only_when_csands_records_prove_it(
        consent: Consent, subscribed: bool | None) -> None:
    found = subscription_finding(consent, an(subscribed))
    if found is None:
        return
    # Never an unsubscribed person, never an unfinished sync, never someone csand last saw
    # subscribed, never one whose newest consent is an opt-in.
    assert subscribed is True and consent.settled and consent.last_status == "unsubscribed"
    newest_opt_in = consent.opted_in_at is not None and (
        consent.unsubscribed_at is None or consent.opted_in_at > consent.unsubscribed_at)
    assert not newest_opt_in


def test_an_attendee_and_a_host_need_their_attendance_on_the_mirrored_event() -> None:
    from csand.model import EventRef, attendee_activity

    event = EventRef("meet-up", "Meet up", None, f"controlshift-{ORG}:event-meet-up")
    rsvp = attendee_activity({"id": 3, "email": "bo@example.org", "attending_status": "attending",
                              "created_at": "2024-01-02T00:00:00Z"}, event)
    synced = Synced(9, rsvp, None, "event-uuid")
    tags = frozenset({"controlshift-event-attendee"})
    there = ANPerson("p", False, tags, None, frozenset({"event-uuid"}))
    assert activity_findings(synced, CSState.UNKNOWN, Consent(), there) == []
    gone = ANPerson("p", False, tags, None, frozenset())
    (found,) = activity_findings(synced, CSState.UNKNOWN, Consent(), gone)
    assert (found.kind, found.repairable) == (Kind.ATTENDANCE_MISSING, True)
    assert "attendee" in found.detail
    assert kinds(activity_findings(synced, CSState.UNKNOWN, Consent(), None)) == [
        "person_missing"]
