"""Domain records (csand.model): email matching, timestamps, CS record mapping, fingerprints."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csand.model import (
    CREATOR_TAG,
    SIGNER_TAG,
    Activity,
    ActivityKind,
    MalformedRecord,
    PetitionRef,
    category_tag,
    category_tags,
    creator_activity,
    dead_letter,
    global_unsubscribe_activity,
    normalize_email,
    parse_time,
    petition_identifier,
    signature_activity,
    valid_email,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
ORG = "acme"


def cs_petition(**overrides) -> dict:
    petition = {
        "id": 12,
        "slug": "stop-tax-avoidance",
        "title": "Stop tax avoidance",
        "url": "https://acme.controlshift.app/petitions/stop-tax-avoidance",
        "launched": True,
        "created_at": "2024-03-01T09:00:00Z",
        "categories": [{"slug": "avoiding-taxes", "name": "Avoiding Taxes"}],
        "creator": {
            "full_name": "Cleo Creator",
            "first_name": "Cleo",
            "last_name": "Creator",
            "email": "Cleo@Example.org",
            "phone_number": None,
        },
    }
    petition.update(overrides)
    return petition


def cs_signature(**overrides) -> dict:
    signature = {
        "id": 42,
        "email": "  Ann.Lee@Example.ORG ",
        "first_name": "Ann",
        "last_name": "Lee",
        "postcode": "2000",
        "join_organisation": True,
        "created_at": "2024-03-02T10:00:00Z",
        "updated_at": "2024-03-02T10:00:00Z",
        "unsubscribe_at": None,
        "deleted_at": None,
    }
    signature.update(overrides)
    return signature


# ---- emails -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ann@example.org", "ann@example.org"),
        ("  Ann@Example.ORG\t", "ann@example.org"),
        ("ANN+tag@EXAMPLE.org\n", "ann+tag@example.org"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_normalize_email(raw: str | None, expected: str | None) -> None:
    assert normalize_email(raw) == expected


@PROPERTY_SETTINGS
@given(st.emails())
def test_normalize_email_matches_case_and_whitespace_variants(email: str) -> None:
    variants = [email, email.upper(), f"  {email} ", f"\t{email.swapcase()}\n"]
    normalised = {normalize_email(v) for v in variants}
    assert normalised == {email.lower()}
    assert normalize_email(normalize_email(email)) == normalize_email(email)


@pytest.mark.parametrize(
    "email", ["ann@example.org", "ann.lee+cs@mail.example.co.uk", "a@b.io", "o'neil@example.org"]
)
def test_valid_email(email: str) -> None:
    assert valid_email(email)


@pytest.mark.parametrize(
    "email",
    [None, "", "ann", "ann@", "@example.org", "ann@example", "ann lee@example.org",
     "ann@exa mple.org", "ann@@example.org", "ann@example.org "],
)
def test_invalid_email(email: str | None) -> None:
    assert not valid_email(email)


# ---- timestamps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-02T10:00:00Z", datetime(2024, 3, 2, 10, tzinfo=UTC)),
        ("2024-03-02T10:00:00.123Z", datetime(2024, 3, 2, 10, 0, 0, 123000, tzinfo=UTC)),
        ("2024-03-02T10:00:00+00:00", datetime(2024, 3, 2, 10, tzinfo=UTC)),
        ("2024-03-02T20:00:00+10:00", datetime(2024, 3, 2, 10, tzinfo=UTC)),
        ("2024-03-02T05:30:00-04:30", datetime(2024, 3, 2, 10, tzinfo=UTC)),
        ("2024-03-02T10:00:00", datetime(2024, 3, 2, 10, tzinfo=UTC)),  # naive → UTC
        (" 2024-03-02T10:00:00Z ", datetime(2024, 3, 2, 10, tzinfo=UTC)),
        (datetime(2024, 3, 2, 10), datetime(2024, 3, 2, 10, tzinfo=UTC)),
        (datetime(2024, 3, 2, 12, tzinfo=timezone(timedelta(hours=2))),
         datetime(2024, 3, 2, 10, tzinfo=UTC)),
    ],
)
def test_parse_time(value, expected: datetime) -> None:
    parsed = parse_time(value)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize("value", [None, "", "   ", "yesterday", "2024-13-45T99:00:00Z", "12:00",
                                   "not a date Z", 12345])
def test_parse_time_garbage_is_none(value) -> None:
    assert parse_time(value) is None


@PROPERTY_SETTINGS
@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=10)),
                                               timezone(timedelta(hours=-7, minutes=-30))])))
def test_parse_time_round_trips_and_sorts_as_text(dt: datetime) -> None:
    parsed = parse_time(dt.isoformat())
    assert parsed == dt
    assert parsed.tzinfo is UTC
    later = parse_time((dt + timedelta(seconds=1)).isoformat())
    assert parsed.isoformat() < later.isoformat()


# ---- mapping CS records -------------------------------------------------------------------


def test_signature_activity_maps_a_cs_signature() -> None:
    activity = signature_activity(cs_signature(), cs_petition(), ORG)
    assert activity.kind is ActivityKind.SIGNATURE
    assert activity.source_key == "signature:42"
    assert activity.email == "ann.lee@example.org"
    assert activity.raw_email == "  Ann.Lee@Example.ORG "
    assert (activity.first_name, activity.last_name, activity.postcode) == ("Ann", "Lee", "2000")
    assert activity.opted_in is True
    assert activity.fields_at == datetime(2024, 3, 2, 10, tzinfo=UTC)
    assert activity.occurred_at == datetime(2024, 3, 2, 10, tzinfo=UTC)
    assert activity.tags == (SIGNER_TAG, "controlshift:Avoiding Taxes")
    assert activity.petition == PetitionRef(
        cs_id=12, slug="stop-tax-avoidance", title="Stop tax avoidance",
        url="https://acme.controlshift.app/petitions/stop-tax-avoidance",
        identifier="controlshift-acme:petition-12", creator_email="cleo@example.org",
    )
    assert activity.person_key == "ann.lee@example.org"


def test_creator_activity_maps_a_launched_petition() -> None:
    activity = creator_activity(cs_petition(), ORG)
    assert activity.kind is ActivityKind.PETITION_CREATED
    assert activity.source_key == "petition:12:creator"
    assert activity.email == "cleo@example.org"
    assert activity.raw_email == "Cleo@Example.org"
    assert (activity.first_name, activity.last_name) == ("Cleo", "Creator")
    assert activity.opted_in is False  # the REST petition carries no opt-in for its creator
    assert activity.tags == (CREATOR_TAG, "controlshift:Avoiding Taxes")
    assert activity.fields_at == activity.occurred_at == datetime(2024, 3, 1, 9, tzinfo=UTC)
    assert activity.petition.identifier == "controlshift-acme:petition-12"


@pytest.mark.parametrize(
    ("join", "opted_in"),
    [(True, True), (False, False), (None, False), ("missing", False)],
)
def test_only_an_explicit_true_is_an_opt_in(join, opted_in: bool) -> None:
    signature = cs_signature()
    creator = dict(cs_petition()["creator"])
    if join == "missing":
        del signature["join_organisation"]
    else:
        signature["join_organisation"] = join
        creator["join_organisation"] = join
    assert signature_activity(signature, cs_petition(), ORG).opted_in is opted_in
    assert creator_activity(cs_petition(creator=creator), ORG).opted_in is opted_in


@pytest.mark.parametrize("join", ["true", 1, 0, "yes", [True]])
def test_any_other_opt_in_value_is_malformed_never_an_opt_in(join: object) -> None:
    # Neither guessed as an opt-in nor silently read as "no": the record is a dead letter.
    signature = cs_signature() | {"join_organisation": join}
    with pytest.raises(MalformedRecord, match="join_organisation is not true, false or null"):
        signature_activity(signature, cs_petition(), ORG)
    creator = dict(cs_petition()["creator"]) | {"join_organisation": join}
    with pytest.raises(MalformedRecord, match="creator.join_organisation"):
        creator_activity(cs_petition(creator=creator), ORG)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("id", "42", "id is not an integer (str)"),
    ("id", True, "id is not an integer (bool)"),
    ("id", None, "id is missing"),
    ("email", 42, "email is not a string (int)"),
    ("email", {"a": 1}, "email is not a string (dict)"),
    ("first_name", ["Ann"], "first_name is not a string (list)"),
    ("last_name", 3.5, "last_name is not a string (float)"),
    ("postcode", 2000, "postcode is not a string (int)"),
    ("created_at", 1700000000, "created_at is not a timestamp (int)"),
    ("updated_at", "soon", "updated_at is not a timestamp ('soon')"),
])
def test_a_field_of_the_wrong_type_is_malformed(field: str, value: object, message: str) -> None:
    signature = cs_signature() | {field: value}
    with pytest.raises(MalformedRecord) as info:
        signature_activity(signature, cs_petition(), ORG)
    assert str(info.value) == message


def test_dead_letter_names_the_record_and_the_field() -> None:
    record = cs_signature() | {"email": 42}
    try:
        signature_activity(record, cs_petition(), ORG)
    except MalformedRecord as exc:
        letter = dead_letter("signature", record, exc, petition_id=12)
    assert letter.reason == f"malformed ControlShift signature {record['id']}: email is not a string (int)"
    assert letter.source_key == f"signature:{record['id']}"
    again = dead_letter("signature", dict(reversed(list(record.items()))), MalformedRecord("x"))
    assert again.dedupe_key == letter.dedupe_key  # the same record: one dead letter
    changed = dead_letter("signature", record | {"email": 43}, MalformedRecord("x"))
    assert changed.dedupe_key != letter.dedupe_key


@pytest.mark.parametrize(
    ("categories", "tags"),
    [
        ([], ()),
        (None, ()),
        ([{"slug": "avoiding-taxes", "name": "Avoiding Taxes"}], ("controlshift:Avoiding Taxes",)),
        ([{"slug": "x", "name": "  Clean Air & Water "}], ("controlshift:Clean Air & Water",)),
        ([{"slug": "b", "name": "Rivers"}, {"slug": "a", "name": "Avoiding Taxes"},
          {"slug": "a2", "name": "Avoiding Taxes"}],
         ("controlshift:Avoiding Taxes", "controlshift:Rivers")),
        ([{"slug": "e", "name": ""}, {"slug": "n", "name": None}], ()),
        (["Housing"], ("controlshift:Housing",)),
    ],
)
def test_category_tags_use_the_name_as_cs_shows_it(categories, tags) -> None:
    petition = cs_petition(categories=categories)
    assert category_tags(petition) == tags
    assert signature_activity(cs_signature(), petition, ORG).tags == (SIGNER_TAG, *tags)
    assert creator_activity(petition, ORG).tags == (CREATOR_TAG, *tags)


def test_category_tag_keeps_case_and_spaces() -> None:
    assert category_tag("Avoiding Taxes") == "controlshift:Avoiding Taxes"


@pytest.mark.parametrize(
    ("first", "last", "postcode", "expected"),
    [
        ("  Ann ", " Lee", " 2000 ", ("Ann", "Lee", "2000")),
        ("", "   ", None, (None, None, None)),
        (None, "Lee", "", (None, "Lee", None)),
    ],
)
def test_names_are_stripped_and_empty_is_none(first, last, postcode, expected) -> None:
    activity = signature_activity(
        cs_signature(first_name=first, last_name=last, postcode=postcode), cs_petition(), ORG
    )
    assert (activity.first_name, activity.last_name, activity.postcode) == expected
    creator = {"email": "c@example.org", "first_name": first, "last_name": last,
               "postcode": postcode}
    made = creator_activity(cs_petition(creator=creator), ORG)
    assert (made.first_name, made.last_name, made.postcode) == expected


def test_missing_email_maps_to_none() -> None:
    activity = signature_activity(cs_signature(email=None), cs_petition(), ORG)
    assert activity.email is None and activity.raw_email is None
    assert activity.person_key == "invalid:signature:42"
    blank = signature_activity(cs_signature(email="   "), cs_petition(), ORG)
    assert blank.email is None and blank.raw_email == "   "
    creator = creator_activity(cs_petition(creator=None), ORG)
    assert creator.email is None


def test_updated_signature_orders_by_update_but_fields_by_creation() -> None:
    activity = signature_activity(
        cs_signature(updated_at="2024-04-01T00:00:00Z"), cs_petition(), ORG
    )
    assert activity.occurred_at == datetime(2024, 4, 1, tzinfo=UTC)
    assert activity.fields_at == datetime(2024, 3, 2, 10, tzinfo=UTC)


def test_petition_without_title_uses_slug() -> None:
    activity = creator_activity(cs_petition(title="  "), ORG)
    assert activity.petition.title == "stop-tax-avoidance"


def test_petition_identifier_is_globally_unique_per_org_and_id() -> None:
    assert petition_identifier("acme", 12) == "controlshift-acme:petition-12"
    assert petition_identifier("acme", 12) != petition_identifier("other", 12)


def test_global_unsubscribe_activity() -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    activity = global_unsubscribe_activity(7, " Ann@Example.org", at)
    assert activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE
    assert activity.source_key == "unsubscribe:7"
    assert activity.email == "ann@example.org"
    assert activity.petition is None and activity.tags == ()
    assert activity.opted_in is False


# ---- fingerprints -------------------------------------------------------------------------


def sig_fp(**overrides) -> str:
    petition_overrides = overrides.pop("petition", {})
    return signature_activity(cs_signature(**overrides), cs_petition(**petition_overrides),
                              ORG).fingerprint()


def test_same_record_same_fingerprint() -> None:
    assert sig_fp() == sig_fp()
    a = creator_activity(cs_petition(), ORG)
    assert a.fingerprint() == creator_activity(cs_petition(), ORG).fingerprint()
    assert len(sig_fp()) == 20


@pytest.mark.parametrize(
    "change",
    [
        {"updated_at": "2024-06-01T00:00:00Z"},
        {"unsubscribe_at": "2024-06-01T00:00:00Z", "updated_at": "2024-06-01T00:00:00Z"},
        {"unsubscribe_at": "2024-06-01T00:00:00Z"},
        {"email": "ann.lee@example.org"},  # same address, different spelling
        {"petition": {"title": "Stop tax avoidance now"}},
        {"petition": {"url": "https://acme.controlshift.app/p/other"}},
    ],
    ids=["updated_at", "single-petition-unsubscribe", "unsubscribe_at", "email-case", "title",
         "url"],
)
def test_changes_that_do_not_change_an_keep_the_fingerprint(change: dict) -> None:
    assert sig_fp(**change) == sig_fp()


@pytest.mark.parametrize(
    "change",
    [
        {"join_organisation": False},
        {"first_name": "Annie"},
        {"postcode": "3000"},
        {"email": "someone.else@example.org"},
        {"petition": {"categories": [{"slug": "avoiding-taxes", "name": "Avoiding Taxes"},
                                     {"slug": "rivers", "name": "Rivers"}]}},
        {"petition": {"categories": []}},
        {"petition": {"id": 13}},
    ],
    ids=["opt-in", "first_name", "postcode", "email", "category-added", "category-removed",
         "other-petition"],
)
def test_changes_that_matter_change_the_fingerprint(change: dict) -> None:
    assert sig_fp(**change) != sig_fp()


def test_opt_in_on_confirmation_is_a_new_version() -> None:
    before = sig_fp(join_organisation=False)
    after = sig_fp(join_organisation=True, updated_at="2024-03-03T10:00:00Z")
    assert before != after
    assert sig_fp(join_organisation=None) == sig_fp(join_organisation=False)


def test_dedupe_key_combines_source_and_fingerprint() -> None:
    activity = signature_activity(cs_signature(), cs_petition(), ORG)
    assert activity.dedupe_key == f"signature:42@{activity.fingerprint()}"


# ---- JSON round trip ----------------------------------------------------------------------

texts = st.one_of(st.none(), st.text(max_size=30))
times = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                 timezones=st.just(UTC)),
)
petitions = st.builds(
    PetitionRef,
    cs_id=st.integers(1, 10**9),
    slug=st.text(min_size=1, max_size=20),
    title=st.text(max_size=40),
    url=texts,
    identifier=st.text(min_size=1, max_size=40),
    creator_email=texts,
)
activities = st.builds(
    Activity,
    kind=st.sampled_from(list(ActivityKind)),
    source_key=st.text(min_size=1, max_size=30),
    email=texts,
    raw_email=texts,
    first_name=texts,
    last_name=texts,
    postcode=texts,
    opted_in=st.booleans(),
    occurred_at=times,
    fields_at=times,
    petition=st.one_of(st.none(), petitions),
    tags=st.lists(st.text(max_size=20), max_size=5).map(tuple),
)


@PROPERTY_SETTINGS
@given(activities)
def test_activity_json_round_trip(activity: Activity) -> None:
    data = json.loads(json.dumps(activity.to_json()))
    back = Activity.from_json(data)
    assert back == activity
    assert back.fingerprint() == activity.fingerprint()
    assert back.dedupe_key == activity.dedupe_key


def test_mapped_activity_json_round_trip() -> None:
    for activity in (signature_activity(cs_signature(), cs_petition(), ORG),
                     creator_activity(cs_petition(), ORG),
                     global_unsubscribe_activity(1, "a@b.org", datetime(2024, 1, 1, tzinfo=UTC))):
        assert Activity.from_json(json.loads(json.dumps(activity.to_json()))) == activity


def test_to_json_is_plain_json() -> None:
    data = signature_activity(cs_signature(), cs_petition(), ORG).to_json()
    assert data["kind"] == "signature"
    assert data["occurred_at"] == "2024-03-02T10:00:00+00:00"
    assert data["tags"] == [SIGNER_TAG, "controlshift:Avoiding Taxes"]
    assert data["petition"]["identifier"] == "controlshift-acme:petition-12"


def test_is_launched_only_for_true_or_an_absent_field() -> None:
    from csand.model import is_launched

    assert is_launched({"launched": True})
    assert not is_launched({"launched": False})
    assert not is_launched({"launched": None})
    assert is_launched({})  # not the documented shape: syncing beats silently skipping
