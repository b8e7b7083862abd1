"""Bulk rows as REST records: the activities built from an export equal the ones polling builds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csand.controlshift.source import (
    petition_record,
    petition_url,
    record_json,
    signature_record,
)
from csand.controlshift.versions import see_signature
from csand.model import MalformedRecord, creator_activity, parse_time, signature_activity
from csand.sim.controlshift import ControlShiftSim
from csand.sim.exports import BulkExports, StorageSim

T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
ORG = "demo-org"


def joined(exports: BulkExports) -> dict[int, dict[str, Any]]:
    """Every petition of the export, joined as csand joins them."""
    users = {int(u["id"]): u for u in exports.rows("users")}
    names = {int(c["id"]): c["name"] for c in exports.rows("categories")}
    links: dict[int, list[str]] = {}
    for link in exports.rows("categorized_petitions"):
        links.setdefault(int(link["petition_id"]), []).append(names[int(link["category_id"])])
    out = {}
    for row in exports.rows("petitions"):
        pid = int(row["id"])
        out[pid] = petition_record(row, users.get(int(row["user_id"])), links.get(pid, []),
                                   f"https://{ORG}.example.org")
    return out


def test_signature_row_cells() -> None:
    record = signature_record({
        "id": "7", "petition_id": "3", "email": "A@x.org", "first_name": "", "last_name": "Lee",
        "join_organisation": "t", "opt_in_sms": "", "created_at": "2024-10-01 12:00:00.000000",
        "updated_at": "2024-10-01T12:05:00Z", "deleted_at": "",
        "additional_fields": '{"why": "because"}', "phone_number": "0123"})
    assert record["id"] == 7 and record["petition_id"] == 3
    assert record["first_name"] is None and record["last_name"] == "Lee"
    assert record["join_organisation"] is True and record["opt_in_sms"] is None
    assert record["created_at"] == datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
    assert record["updated_at"] == datetime(2024, 10, 1, 12, 5, tzinfo=UTC)
    assert record["deleted_at"] is None
    assert '"created_at":"2024-10-01T12:00:00+00:00"' in record_json(record)
    assert record["additional_fields"] == {"why": "because"}


@pytest.mark.parametrize("row, reason", [
    ({"id": "x", "petition_id": "1"}, "id is not an integer"),
    ({"id": "1", "petition_id": ""}, "petition_id is missing"),
    ({"id": "1", "petition_id": "1", "join_organisation": "yes"}, "join_organisation"),
    ({"id": "1", "petition_id": "1", "created_at": "yesterday"}, "created_at"),
])
def test_unreadable_cells_are_malformed(row: dict[str, str], reason: str) -> None:
    with pytest.raises(MalformedRecord, match=reason):
        signature_record(row)


def test_additional_fields_not_json_is_malformed_in_the_activity() -> None:
    record = signature_record({"id": "1", "petition_id": "1", "email": "a@x.org",
                               "additional_fields": "{not json"})
    petition = {"id": 1, "slug": "p", "title": "P", "creator": None, "categories": []}
    with pytest.raises(MalformedRecord, match="additional_fields"):
        signature_activity(record, petition, ORG)


def test_petition_url_and_unlaunched() -> None:
    assert petition_url("https://x.org/", "save") == "https://x.org/petitions/save"
    assert petition_url(None, "save") is None
    row = {"id": "4", "slug": "save", "title": "Save", "launched": "f", "user_id": ""}
    assert petition_record(row, None, [], None)["launched"] is False


names = st.one_of(st.none(), st.text(min_size=1, max_size=12).filter(lambda s: s.strip()))
signatures = st.lists(st.fixed_dictionaries({
    "first_name": names, "last_name": names, "postcode": names,
    "join_organisation": st.sampled_from([True, False, None]),
    "phone_number": st.sampled_from([None, "+44 20 7946 0000"]),
    "opt_in_sms": st.sampled_from([True, False, None]),
    "additional_fields": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["why", "age", "tags"]),
        st.one_of(st.text(max_size=8), st.integers(), st.booleans(),
                  st.lists(st.text(max_size=4), max_size=2)), max_size=3)),
    "confirm": st.booleans(), "delete": st.booleans(), "petition": st.integers(0, 1),
}), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sigs=signatures, timestamps=st.sampled_from(["db", "iso"]),
       categories=st.lists(st.sampled_from(["Parks", "Avoiding Taxes", "Local, \"quoted\""]),
                           max_size=2, unique=True))
def test_bulk_activities_equal_rest_activities(sigs: list[dict[str, Any]], timestamps: Any,
                                               categories: list[str]) -> None:
    """For every simulator signature, the activity built from its export row (joined with the
    petition, user and category rows) equals the one built from its REST record; the creator's
    equals the REST creator's with what the petition.* webhook adds (postcode, opt-in)."""
    at = [T0]

    def now() -> datetime:
        return at[0]

    sim = ControlShiftSim(now=now, org_slug=ORG)
    try:
        creators = [{"first_name": "Ann", "last_name": "Lee", "email": "Ann@X.org",
                     "phone_number": None, "postcode": "N1", "join_organisation": True},
                    {"first_name": "Bo", "last_name": None, "email": "bo@x.org",
                     "phone_number": "0207", "postcode": None, "join_organisation": None}]
        slugs = []
        for n, creator in enumerate(creators):
            p = sim.add_petition(title=f"Petition {n}", slug=f"p{n}", creator=creator,
                                 categories=categories if n == 0 else ())
            slugs.append(p["slug"])
        for n, s in enumerate(sigs):
            at[0] += timedelta(seconds=1)
            extra = {k: s[k] for k in ("phone_number", "opt_in_sms", "additional_fields")}
            made = sim.add_signature(slugs[s["petition"]], email=f"s{n}@x.org",
                                     first_name=s["first_name"], last_name=s["last_name"],
                                     postcode=s["postcode"],
                                     join_organisation=s["join_organisation"], **extra)
            if s["confirm"]:
                at[0] += timedelta(seconds=1)
                sim.update_signature(made["id"], confirmed_at=at[0], join_organisation=True)
            if s["delete"]:
                sim.delete_signature(made["id"])
        exports = BulkExports(sim, StorageSim(now=now), timestamps=timestamps)
        petitions = joined(exports)
        rest_petitions = {p["id"]: p for p in sim.petitions()}
        rows = {int(r["id"]): r for r in exports.rows("signatures")}
        for rest in sim.signatures():
            record = signature_record(rows[rest["id"]])
            rest_petition = rest_petitions[record["petition_id"]]
            petition = petitions[record["petition_id"]]
            if rest["deleted_at"]:
                bulk_seen = see_signature(record, petition, ORG, None)
                rest_seen = see_signature(rest, rest_petition, ORG, None)
                assert bulk_seen.row is not None and rest_seen.row is not None
                # The same moment (ISO text may differ in its UTC suffix).
                assert parse_time(bulk_seen.row.deleted_at) == parse_time(rest_seen.row.deleted_at)
                assert replace(bulk_seen.row, deleted_at=None) == replace(rest_seen.row,
                                                                          deleted_at=None)
                continue
            assert signature_activity(record, petition, ORG) == \
                signature_activity(rest, rest_petition, ORG)
            rest_seen = see_signature(rest, rest_petition, ORG, None)
            assert see_signature(record, petition, ORG, rest_seen.row) == see_signature(
                rest, rest_petition, ORG, rest_seen.row)
        for pid, petition in petitions.items():
            creator = creators[pid - min(petitions)]
            extra = {"for_email": creator["email"].lower()}
            if creator["join_organisation"] is not None:
                extra["join_organisation"] = creator["join_organisation"]
            if creator["postcode"]:
                extra["postcode"] = creator["postcode"]
            assert creator_activity(petition, ORG) == creator_activity(
                rest_petitions[pid], ORG, extra)
    finally:
        sim.close()
