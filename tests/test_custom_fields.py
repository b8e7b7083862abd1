"""Custom fields and phone numbers (docs/rules.md §5): from ControlShift's records to what csand
sends AN, pure, no network."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csand.actionnetwork.client import _person_json
from csand.model import (
    Activity,
    Fields,
    MalformedRecord,
    Person,
    custom_answers,
    signature_activity,
)
from csand.sync.rules import (
    PHONE_FIELD,
    PHONE_KEY,
    Progress,
    RecordSignature,
    Signup,
    SyncOptions,
    after_person_write,
    fields_for,
    mobile_number,
    next_step,
    opts_in,
    phone_problem,
)

ORG = "org"
T0 = datetime(2024, 1, 2, tzinfo=UTC)
PETITION = {"id": 1, "slug": "p-1", "title": "P", "url": "https://cs.example.org/p-1",
            "launched": True, "creator": {"email": "cleo@example.org"}}


def signature(**extra: Any) -> Activity:
    record = {"id": 7, "email": "ann@example.org", "first_name": "Ann", "last_name": "Lee",
              "postcode": "2000", "join_organisation": True,
              "created_at": "2024-01-02T00:00:00Z", "updated_at": "2024-01-02T00:00:00Z",
              **extra}
    return signature_activity(record, PETITION, ORG)


# ---------------------------------------------------------------- from ControlShift's record


def test_answers_become_sorted_text_and_empty_ones_are_left_out() -> None:
    answers = custom_answers({"ward": "North", "age": 42, "member": True, "topics": ["a", " b", ""],
                              "blank": "  ", "none": None, "nested": {"x": 1}, "": "no name"})
    assert answers == (("age", "42"), ("member", "true"), ("nested", '{"x": 1}'),
                       ("topics", "a, b"), ("ward", "North"))


def test_additional_fields_that_are_not_an_object_are_malformed() -> None:
    with pytest.raises(MalformedRecord, match="additional_fields is not an object"):
        signature(additional_fields=["ward"])
    assert signature(additional_fields=None).custom_fields == ()


@pytest.mark.parametrize("raw, kept", [("0412 345 678", "0412 345 678"), (412345678, "412345678"),
                                       ({"n": 1}, None), (True, None), ("  ", None)])
def test_a_phone_number_is_free_text_and_anything_else_is_dropped_not_the_activity(
        raw: Any, kept: str | None) -> None:
    assert signature(phone_number=raw).phone == kept


def test_only_an_explicit_true_is_an_sms_opt_in() -> None:
    assert signature(opt_in_sms=True).sms_opt_in
    assert signature(opt_in_sms="t").sms_opt_in
    for value in (None, False, "f", "yes", 1):
        assert not signature(opt_in_sms=value).sms_opt_in


def old_fingerprint(a: Activity) -> str:
    """The fingerprint as computed before custom fields and phones existed."""
    data = [str(a.kind), a.source_key, a.email, a.first_name, a.last_name, a.postcode,
            a.opted_in, a.fields_at.isoformat() if a.fields_at else None,
            a.petition.cs_id if a.petition else None, sorted(a.tags)]
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()[:20]


def test_records_without_answers_or_phone_keep_their_fingerprint_across_the_upgrade() -> None:
    """Otherwise every record would look changed after an upgrade and sync again."""
    plain = signature()
    assert plain.fingerprint() == old_fingerprint(plain)
    assert signature(ward="North").fingerprint() == old_fingerprint(plain)  # unknown keys: no
    assert signature(additional_fields={"ward": "North"}).fingerprint() != plain.fingerprint()
    assert signature(phone_number="0412 345 678").fingerprint() != plain.fingerprint()
    assert (signature(phone_number="1", opt_in_sms=True).fingerprint()
            != signature(phone_number="1").fingerprint())


def test_answers_and_phone_survive_the_outbox() -> None:
    a = signature(additional_fields={"ward": "North"}, phone_number="0412 345 678", opt_in_sms=True)
    assert Activity.from_json(json.loads(json.dumps(a.to_json()))) == a


# ---------------------------------------------------------------- what is sent


@pytest.mark.parametrize("chosen, sent", [
    ("all", {"ward": "North", "age": "42"}),
    ("none", {}),
    (("ward",), {"ward": "North"}),
    ({"ward": "Ward (CS)"}, {"Ward (CS)": "North"}),
])
def test_which_custom_fields_are_sent_and_under_which_name(chosen: Any, sent: dict[str, str]
                                                           ) -> None:
    a = signature(additional_fields={"ward": "North", "age": 42})
    fields = fields_for(a, Person(), SyncOptions(custom_fields=chosen, phone="off"))
    assert dict(fields.custom_fields) == sent


def test_a_custom_field_follows_the_persons_most_recent_activity() -> None:
    a = signature(additional_fields={"ward": "North", "age": 42})
    newer = MappingProxyType({"custom:ward": T0 + timedelta(days=1)})
    older = MappingProxyType({"custom:ward": T0 - timedelta(days=1)})
    assert dict(fields_for(a, Person(fields_at=newer)).custom_fields) == {"age": "42"}
    assert dict(fields_for(a, Person(fields_at=older)).custom_fields) == {"age": "42",
                                                                          "ward": "North"}


def test_phone_modes() -> None:
    a = signature(phone_number="0412 345 678", opt_in_sms=True)
    assert dict(fields_for(a, Person()).custom_fields) == {PHONE_FIELD: "0412 345 678"}
    assert fields_for(a, Person()).mobile is None
    off = fields_for(a, Person(), SyncOptions(phone="off"))
    assert (off.custom_fields, off.mobile) == ((), None)
    mobile = SyncOptions(phone="mobile", phone_country="AU")
    assert fields_for(a, Person(), mobile).mobile == ("+61412345678", None)
    assert fields_for(a, Person(), mobile, sms_subscribe=True).mobile == ("+61412345678",
                                                                          "subscribed")
    newer = MappingProxyType({PHONE_KEY: T0 + timedelta(days=1)})
    assert fields_for(a, Person(fields_at=newer), mobile).mobile is None


def test_an_unparseable_number_is_dropped_with_a_reason_and_the_rest_syncs() -> None:
    a = signature(phone_number="123-456", additional_fields={"ward": "North"})
    mobile = SyncOptions(phone="mobile", phone_country="US")
    assert mobile_number("123-456", "US") is None
    assert phone_problem(a, mobile) == "not a valid phone number"
    assert phone_problem(a, SyncOptions()) is None  # as a custom field it is text
    fields = fields_for(a, Person(), mobile)
    assert fields.mobile is None and dict(fields.custom_fields) == {"ward": "North"}
    assert mobile_number("+44 20 7946 0958", None) == "+442079460958"  # + needs no country
    assert mobile_number("020 7946 0958", None) is None


MOBILE = SyncOptions(phone="mobile", phone_country="AU")


def first_write(a: Activity, progress: Progress) -> RecordSignature | Signup:
    p = replace(progress, tags_ready=True, petition_uuid="pet-1")
    step = next_step(a, p, MOBILE)
    while not isinstance(step, RecordSignature | Signup):
        if step.__class__.__name__ == "LookupPerson":
            p = replace(p, person=replace(p.person, exists=True, uuid="u-1", subscribed=False))
        else:
            raise AssertionError(step)
        step = next_step(a, p, MOBILE)
    return step


def test_sms_is_subscribed_with_the_email_opt_in_that_is_the_newest_consent_only() -> None:
    both = signature(phone_number="0412 345 678", opt_in_sms=True)
    assert first_write(both, Progress()).fields.mobile == ("+61412345678", "subscribed")
    # No email opt-in: the number is sent, its SMS status left alone.
    sms_only = signature(phone_number="0412 345 678", opt_in_sms=True, join_organisation=False)
    assert first_write(sms_only, Progress()).fields.mobile == ("+61412345678", None)
    # The same record again (its opt-in reached AN before): never re-subscribed.
    again = first_write(both, Progress(opt_in_applied=True))
    assert again.fields.mobile == ("+61412345678", None)
    # An org-wide unsubscribe newer than the opt-in: not subscribed to SMS either.
    later = Progress(person=Person(unsubscribed_at=T0 + timedelta(days=1)))
    assert first_write(both, later).fields.mobile == ("+61412345678", None)


def test_what_was_sent_sets_the_precedence_of_later_activities() -> None:
    a = signature(additional_fields={"ward": "North"}, phone_number="0412 345 678")
    step = first_write(a, Progress())
    p = after_person_write(Progress(), a, step, "u-1", None)
    assert p.person.fields_at["custom:ward"] == a.fields_at
    assert p.person.fields_at[PHONE_KEY] == a.fields_at


def test_the_person_payload_carries_custom_fields_and_the_mobile_number() -> None:
    payload = _person_json(Fields(email="ann@example.org", custom_fields=(("ward", "North"),),
                                  mobile=("+61412345678", None)), "subscribed")
    assert payload["custom_fields"] == {"ward": "North"}
    assert payload["phone_numbers"] == [{"number": "+61412345678", "number_type": "Mobile"}]
    payload = _person_json(Fields(email="ann@example.org", mobile=("+61412345678", "subscribed")),
                           None)
    assert payload["phone_numbers"][0]["status"] == "subscribed"
    assert "custom_fields" not in _person_json(Fields(email="ann@example.org"), None)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(opted_in=st.booleans(), sms=st.sampled_from([True, False, None, "t"]),
       applied=st.booleans(), unsubscribed=st.sampled_from([None, -1, 1]),
       exists=st.sampled_from([None, True, False]))
def test_never_subscribed_to_sms_without_an_explicit_sms_opt_in_that_is_the_newest_consent(
        opted_in: bool, sms: Any, applied: bool, unsubscribed: int | None, exists: bool | None
) -> None:
    a = signature(join_organisation=opted_in, opt_in_sms=sms, phone_number="0412 345 678")
    person = Person(exists=exists, uuid="u-1" if exists else None,
                    unsubscribed_at=None if unsubscribed is None
                    else T0 + timedelta(days=unsubscribed))
    p = Progress(person=person, opt_in_applied=applied, tags_ready=True, petition_uuid="pet-1")
    step = next_step(a, p, MOBILE)
    fields = getattr(step, "fields", None)
    if fields is not None and fields.mobile is not None:
        assert fields.mobile[1] in (None, "subscribed")  # csand never lowers an SMS status
        if fields.mobile[1] == "subscribed":
            assert a.sms_opt_in and opts_in(a, p)
