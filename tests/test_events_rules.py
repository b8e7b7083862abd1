"""Events, hosts and attendees (docs/rules.md §5): from ControlShift's records to activities, and
the plan the rules make for them. Pure, no network."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csand.model import (
    ATTENDEE_TAG,
    EVENT_HOST_TAG,
    Activity,
    ActivityKind,
    MalformedRecord,
    Person,
    attendee_activity,
    calendar_ref,
    event_ref,
    host_activity,
    is_attending,
    is_syncable_event,
)
from csand.sync.rules import (
    AttendAs,
    Done,
    EnsureEvent,
    EnsureTags,
    LookupPerson,
    Progress,
    RecordAttendance,
    Signup,
    after_lookup,
    after_person_write,
    next_step,
    opts_in,
)

ORG = "org"

REST_EVENT: dict[str, Any] = {
    "slug": "picnic", "title": "Park picnic", "url": "https://cs.example.org/events/picnic",
    "description": "Bring food", "start_at": "2024-06-01T10:00:00Z",
    "end_at": "2024-06-01T13:00:00Z", "virtual": False, "launched_at": "2024-05-01T00:00:00Z",
    "location_venue": "Rose Garden",
    "location": {"street_number": "1", "street": "Park Rd", "locality": "Sydney",
                 "region": "NSW", "postal_code": "2000", "country": "AU", "query": "x"},
    "host": {"member_id": 9, "full_name": "Hana Host", "email": " Hana@Example.org"},
}
WEBHOOK_EVENT: dict[str, Any] = {
    **{k: v for k, v in REST_EVENT.items() if k not in ("description", "launched_at")},
    "admin_status": "good", "created_at": "2024-05-01T00:00:00Z",
    "host": {"id": 9, "email": "hana@example.org", "first_name": "Hana", "last_name": "Host",
             "join_organisation": True},
}
CALENDAR = {"slug": "summer", "name": "Summer of action", "url": "https://cs.example.org/c/summer"}


def attendee(**extra: Any) -> dict[str, Any]:
    return {"id": 31, "email": "ann@example.org", "first_name": "Ann", "last_name": "Lee",
            "postcode": "2000", "attending_status": "attending", "join_organisation": True,
            "created_at": "2024-05-02T00:00:00Z", "updated_at": "2024-05-02T00:00:00Z",
            "event": {"slug": "picnic"}, **extra}


# ---------------------------------------------------------------- records → activities


def test_an_event_becomes_its_an_mirror_keyed_by_slug() -> None:
    ref = event_ref(REST_EVENT, ORG, calendar_ref(CALENDAR, ORG))
    assert ref.identifier == "controlshift-org:event-picnic"
    assert (ref.title, ref.description, ref.start_at, ref.end_at) == (
        "Park picnic", "Bring food", "2024-06-01T10:00:00+00:00", "2024-06-01T13:00:00+00:00")
    assert dict(ref.location) == {"venue": "Rose Garden", "address_lines": "1 Park Rd",
                                  "locality": "Sydney", "region": "NSW", "postal_code": "2000",
                                  "country": "AU"}
    assert ref.calendar is not None and ref.calendar.identifier == "controlshift-org:calendar-summer"
    assert ref.host_email == "hana@example.org"
    assert event_ref({**REST_EVENT, "virtual": True}, ORG).location == ()
    with pytest.raises(MalformedRecord):
        event_ref({**REST_EVENT, "slug": " "}, ORG)


def test_a_changed_title_time_or_place_changes_the_content_not_the_identity() -> None:
    ref = event_ref(REST_EVENT, ORG)
    moved = event_ref({**REST_EVENT, "start_at": "2024-06-02T10:00:00Z"}, ORG)
    assert moved.identifier == ref.identifier and moved.content() != ref.content()
    assert event_ref(dict(REST_EVENT), ORG).content() == ref.content()


@pytest.mark.parametrize("event, inappropriate, synced", [
    (REST_EVENT, False, True),
    ({**REST_EVENT, "launched_at": None}, False, False),  # REST lists unlaunched events too
    (REST_EVENT, True, False),  # a webhook said inappropriate: remembered
    (WEBHOOK_EVENT, False, True),
    ({**WEBHOOK_EVENT, "admin_status": "inappropriate"}, False, False),
])
def test_only_launched_events_not_moderated_as_inappropriate_sync(
        event: dict[str, Any], inappropriate: bool, synced: bool) -> None:
    assert is_syncable_event(event, inappropriate=inappropriate) is synced


@pytest.mark.parametrize("status, attending", [("attending", True), ("confirmed", True),
                                               ("attended", True), ("not_attending", False),
                                               ("no_show", False), (None, False)])
def test_declines_and_no_shows_are_not_attending(status: str | None, attending: bool) -> None:
    assert is_attending(attendee(attending_status=status)) is attending


def test_an_attendee_is_an_rsvp_activity_like_a_signature() -> None:
    ref = event_ref(REST_EVENT, ORG)
    a = attendee_activity(attendee(confirmed_at="2024-05-03T00:00:00Z", phone_number="0412 345 678",
                                   additional_fields={"diet": "vegan"}), ref)
    assert (a.kind, a.source_key, a.email, a.tags, a.event) == (
        ActivityKind.ATTENDANCE, "attendee:31", "ann@example.org", (ATTENDEE_TAG,), ref)
    assert a.opted_in and a.opted_in_at == datetime(2024, 5, 3, tzinfo=UTC)
    assert a.custom_fields == (("diet", "vegan"),) and a.phone == "0412 345 678"
    assert not attendee_activity(attendee(join_organisation=None), ref).opted_in
    assert Activity.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_a_rest_host_is_never_split_nor_opted_in_and_a_webhook_host_is_as_given() -> None:
    ref = event_ref(REST_EVENT, ORG)
    rest = host_activity(REST_EVENT, ref)
    assert (rest.source_key, rest.email, rest.first_name, rest.last_name, rest.opted_in) == (
        "event:picnic:host", "hana@example.org", None, None, False)
    assert rest.tags == (EVENT_HOST_TAG,)
    hook = host_activity(WEBHOOK_EVENT, event_ref(WEBHOOK_EVENT, ORG))
    assert (hook.first_name, hook.last_name, hook.opted_in) == ("Hana", "Host", True)
    with pytest.raises(MalformedRecord):
        host_activity({**REST_EVENT, "host": "hana"}, ref)


# ---------------------------------------------------------------- the plans


def drive(a: Activity, progress: Progress, *, exists: bool | None = None) -> list[Any]:
    """The operations the rules ask for, answered as AN would (person uuid "u-1")."""
    steps: list[Any] = []
    p = progress
    for _ in range(12):
        step = next_step(a, p)
        steps.append(step)
        if isinstance(step, Done):
            return steps
        if isinstance(step, EnsureTags):
            p = replace(p, tags_ready=True)
        elif isinstance(step, EnsureEvent):
            p = replace(p, event_uuid="ev-1")
        elif isinstance(step, LookupPerson):
            p = after_lookup(p, "u-1" if exists else None, False if exists else None)
        elif isinstance(step, RecordAttendance | Signup):
            p = after_person_write(p, a, step, "u-1", None)
        elif isinstance(step, AttendAs):
            p = replace(p, attended=True)
    raise AssertionError(steps)


def kinds(steps: list[Any]) -> list[str]:
    return [type(s).__name__ for s in steps]


def test_an_opted_in_attendee_takes_one_attendance_request() -> None:
    a = attendee_activity(attendee(), event_ref(REST_EVENT, ORG))
    steps = drive(a, Progress())
    assert kinds(steps) == ["EnsureTags", "EnsureEvent", "RecordAttendance", "Done"]
    assert steps[1].creator_uuid is None
    assert steps[2].status == "subscribed"


def test_an_attendee_without_opt_in_is_looked_up_and_never_subscribed() -> None:
    a = attendee_activity(attendee(join_organisation=False), event_ref(REST_EVENT, ORG))
    new = drive(a, Progress(), exists=False)
    assert kinds(new) == ["EnsureTags", "EnsureEvent", "LookupPerson", "Signup", "AttendAs",
                          "Done"]
    assert new[3].status == "unsubscribed"
    present = drive(a, Progress(), exists=True)
    assert kinds(present) == ["EnsureTags", "EnsureEvent", "LookupPerson", "RecordAttendance",
                              "Done"]
    assert present[3].status is None


def test_the_host_is_written_first_and_linked_as_the_events_creator() -> None:
    ref = event_ref(WEBHOOK_EVENT, ORG)
    steps = drive(host_activity(WEBHOOK_EVENT, ref), Progress())
    assert kinds(steps) == ["EnsureTags", "Signup", "EnsureEvent", "AttendAs", "Done"]
    assert steps[1].status == "subscribed" and steps[2].creator_uuid == "u-1"
    rest = drive(host_activity(REST_EVENT, event_ref(REST_EVENT, ORG)), Progress(), exists=False)
    assert kinds(rest) == ["EnsureTags", "LookupPerson", "Signup", "EnsureEvent", "AttendAs",
                           "Done"]
    assert rest[2].status == "unsubscribed"


def test_an_event_activity_without_its_event_is_dead() -> None:
    a = replace(attendee_activity(attendee(), event_ref(REST_EVENT, ORG)), event=None)
    assert type(next_step(a, Progress())).__name__ == "Dead"


T0 = datetime(2024, 5, 2, tzinfo=UTC)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(host=st.booleans(), join=st.sampled_from([True, False, None]),
       exists=st.sampled_from([None, True, False]), applied=st.booleans(),
       unsubscribed=st.sampled_from([None, -1, 1]), tags=st.booleans(), event=st.booleans(),
       written=st.booleans())
def test_no_plan_step_can_subscribe_a_host_or_attendee_who_did_not_opt_in(
        host: bool, join: bool | None, exists: bool | None, applied: bool,
        unsubscribed: int | None, tags: bool, event: bool, written: bool) -> None:
    ref = event_ref(WEBHOOK_EVENT, ORG)
    if host:
        a = host_activity({**WEBHOOK_EVENT, "host": {**WEBHOOK_EVENT["host"],
                                                     "join_organisation": join}}, ref)
    else:
        a = attendee_activity(attendee(join_organisation=join), ref)
    person = Person(exists=exists, uuid="u-1" if exists else None,
                    unsubscribed_at=None if unsubscribed is None
                    else T0 + timedelta(days=unsubscribed))
    p = Progress(person=person, opt_in_applied=applied, tags_ready=tags,
                 event_uuid="ev-1" if event else None, person_written=written and exists is True)
    step = next_step(a, p)
    status = getattr(step, "status", None)
    if status == "subscribed":
        assert opts_in(a, p)
    if isinstance(step, RecordAttendance) and status is None:
        assert p.person.exists is True  # the helper subscribes people new to the list


def test_a_change_to_a_mirrored_event_is_one_update_and_nothing_without_a_mirror() -> None:
    from csand.model import event_change_activity
    from csand.sync.rules import UpdateEvent

    ref = event_ref({**REST_EVENT, "title": "Park picnic (moved)"}, ORG)
    change = event_change_activity(ref, datetime(2024, 5, 10, tzinfo=UTC))
    assert change.person_key == "event:picnic"  # an event's changes queue per event
    assert next_step(change, Progress(event_uuid="ev-1")) == UpdateEvent("ev-1", ref)
    assert isinstance(next_step(change, Progress(event_uuid="ev-1", attended=True)), Done)
    assert isinstance(next_step(change, Progress()), Done)
    again = event_change_activity(event_ref(REST_EVENT, ORG), change.occurred_at)
    assert again.dedupe_key != change.dedupe_key  # each content is its own version


def test_a_single_event_unsubscribe_changes_nothing_in_action_network() -> None:
    """``unsubscribe_at`` on an attendee (docs/rules.md §5): the same version, nothing to send."""
    ref = event_ref(REST_EVENT, ORG)
    assert (attendee_activity(attendee(unsubscribe_at="2024-05-05T00:00:00Z"), ref).dedupe_key
            == attendee_activity(attendee(), ref).dedupe_key)
