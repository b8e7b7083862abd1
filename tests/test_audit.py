"""``csand audit`` against a simulated organisation the daemon synced: a clean sync audits clean
(opt-outs, org-wide unsubscribes, deletions, people already in AN), a damaged AN shows every
kind of drift, and ``--repair`` puts back the repairable ones through the outbox, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from csand.drift import Kind
from csand.model import normalize_email
from tests.audit_world import Org, audit, kinds, make_org, sync


def _petition_uuids(org: Org) -> dict[int, str]:
    return {cs_id: uuid for cs_id, uuid in org.query(
        "SELECT cs_id, an_uuid FROM cs_petitions WHERE an_uuid IS NOT NULL")}


def _left_unsubscribed_never_opted_in(org: Org) -> list[str]:
    """People csand left unsubscribed who never opted in nor unsubscribed org-wide."""
    rows = org.query("SELECT email FROM an_people WHERE opted_in_at IS NULL "
                     "AND unsubscribed_at IS NULL ORDER BY email")
    out = []
    for (email,) in rows:
        notes = [n for (n,) in org.query(
            "SELECT note FROM outbox WHERE person_key = ? AND status = 'done' "
            "ORDER BY finished_at DESC, id DESC", (email,)) if n]
        person = org.an.person(email)
        if notes and notes[0].endswith("(unsubscribed)") and person and \
                person["status"] == "unsubscribed":
            out.append(email)
    return out


@pytest.fixture
def org(tmp_path: Path) -> Org:
    world = make_org(tmp_path, events=5, attendees=25)
    yield world  # type: ignore[misc]
    world.cs.close()


@pytest.mark.anyio
async def test_a_clean_sync_audits_clean_and_a_damaged_an_is_found_and_repaired(
        org: Org) -> None:
    scenario = org.scenario
    # Org-wide unsubscribes: of people in AN (subscribed ones among them) and of one who is not.
    opted_in = [normalize_email(s["email"]) for s in scenario.signatures
                if s["join_organisation"] is True]
    unsubscribers = sorted(set(opted_in))[:3] + ["nobody-in-an@example.org"]
    # A signature deleted on ControlShift before csand saw it: never synced.
    org.cs.delete_signature(scenario.signatures[0]["id"])
    await sync(org, unsubscribe=unsubscribers)
    assert org.query("SELECT COUNT(*) FROM outbox WHERE status = 'dead'") == [(0,)]
    # ...and one deleted after it synced, which csand has not heard of yet (CS says so now).
    org.cs.delete_signature(scenario.signatures[1]["id"])

    clean = await audit(org, duplicates=True)
    assert clean.summary.findings == [], [f.detail for f in clean.summary.findings]
    assert clean.checked > 80
    assert clean.skipped == {"deleted on ControlShift since": 1}
    assert 2.5 < clean.an_requests / clean.checked < 3.5
    assert scenario.existing_people  # people already in AN were part of it

    # Damage AN the ways an admin or another tool could.
    uuids = _petition_uuids(org)
    signer_rows = org.query(
        "SELECT person_key, petition_id FROM outbox WHERE kind = 'signature' AND status = 'done' "
        "AND source_deleted_at IS NULL ORDER BY id")
    by_petition: dict[int, list[str]] = {}
    for email, pid in signer_rows:
        by_petition.setdefault(pid, []).append(email)
    biggest = sorted(by_petition, key=lambda p: -len(by_petition[p]))
    keep, gone_petition = biggest[0], biggest[-1]
    never = [e for e in _left_unsubscribed_never_opted_in(org)
             if e not in by_petition[gone_petition]]
    untouched = [e for e in by_petition[keep] if e not in unsubscribers and e not in never
                 and e not in by_petition[gone_petition]]
    tag_victim, sig_victim, erased = untouched[0], untouched[1], untouched[2]
    org.an.remove_tagging(tag_victim, "controlshift-petition-signer")
    org.an.delete_signature(sig_victim, uuids[keep])
    org.an.delete_person(erased)
    org.an.set_status(never[0], "subscribed")
    resubscribed = next(e for e in unsubscribers
                        if (org.an.person(e) or {}).get("status") == "unsubscribed")
    org.an.set_status(resubscribed, "subscribed")
    org.an.delete_petition(uuids[gone_petition])
    attendee, event_uuid = next(
        (e, u) for e, u in org.query(
            "SELECT o.person_key, e.an_uuid FROM outbox o JOIN cs_events e "
            "ON e.slug = o.event_slug WHERE o.kind = 'attendance' AND o.status = 'done' "
            "AND e.an_uuid IS NOT NULL ORDER BY o.id")
        if e not in (tag_victim, sig_victim, erased, never[0], resubscribed))
    org.an.delete_attendance(attendee, event_uuid)
    copied = org.an.petitions()[0]
    org.an.add_petition(copied["title"], origin_system="Controlshift Petition")

    damaged = await audit(org, duplicates=True)
    found = kinds(damaged)
    assert set(found) == {str(k) for k in Kind}, found
    by_kind: dict[Kind, set] = {}
    for f in damaged.summary.findings:
        by_kind.setdefault(f.kind, set()).add(f.email if f.email else f.petition_id)
    assert by_kind[Kind.TAG_MISSING] == {tag_victim}
    assert by_kind[Kind.SIGNATURE_MISSING] == {sig_victim}
    assert by_kind[Kind.ATTENDANCE_MISSING] == {attendee}
    assert by_kind[Kind.PERSON_MISSING] == {erased}
    assert by_kind[Kind.SUBSCRIBED_WITHOUT_OPT_IN] == {never[0]}
    assert by_kind[Kind.UNSUBSCRIBE_NOT_APPLIED] == {resubscribed}
    assert by_kind[Kind.PETITION_MISSING] == {gone_petition}
    assert len(by_kind[Kind.PETITION_DUPLICATED]) == 1

    # Repair: queued once, however often asked while it waits.
    first = await audit(org, repair=True)
    assert first.repair is not None and first.repair["queued"] > 0
    second = await audit(org, repair=True)
    assert second.repair is not None and second.repair["queued"] == 0
    await sync(org)
    after = await audit(org, duplicates=True)
    # What csand never does by itself stays: a copy is not deleted, and no status is set that
    # the rules do not give.
    assert kinds(after) == {"petition_duplicated": 1, "subscribed_without_opt_in": 1}, \
        [f.detail for f in after.summary.findings]
    assert org.an.person(resubscribed)["status"] == "unsubscribed"  # type: ignore[index]
    assert org.an.person(erased) is not None
    assert (await audit(org, repair=True)).repair["queued"] == 0  # type: ignore[index]


@pytest.mark.anyio
async def test_one_petition_fully(org: Org) -> None:
    await sync(org)
    uuids = _petition_uuids(org)
    cs_id = max(uuids, key=lambda p: org.query(
        "SELECT COUNT(*) FROM outbox WHERE petition_id = ?", (p,))[0][0])
    slug = next(p["slug"] for p in org.cs.petitions() if p["id"] == cs_id)
    clean = await audit(org, petition=slug)
    assert clean.summary.findings == []
    assert clean.checked == org.query(
        "SELECT COUNT(DISTINCT source_key) FROM outbox WHERE petition_id = ? "
        "AND status = 'done'", (cs_id,))[0][0]
    # Per activity the person and their taggings; the signatures come by pages of 25.
    pages = -(-clean.checked // 25)
    assert clean.an_requests <= 2 * clean.checked + pages + 4

    signer = org.query("SELECT person_key FROM outbox WHERE petition_id = ? AND "
                       "kind = 'signature' AND status = 'done' LIMIT 1", (cs_id,))[0][0]
    org.an.delete_signature(signer, uuids[cs_id])
    damaged = await audit(org, petition=slug)
    assert [(str(f.kind), f.email) for f in damaged.summary.findings] == [
        ("signature_missing", signer)]
    org.an.delete_petition(uuids[cs_id])
    gone = await audit(org, petition=slug)
    assert [(str(f.kind), f.petition_id) for f in gone.summary.findings] == [
        ("petition_missing", cs_id)]
    with pytest.raises(LookupError):
        await audit(org, petition="no-such-petition")


@pytest.mark.anyio
async def test_on_postgresql_through_the_shared_bucket(org: Org, pg_url: str) -> None:
    org.store_url = pg_url
    await sync(org)
    clean = await audit(org, sample=30)
    assert clean.checked == 30 and clean.summary.findings == []
    email = next(p["email"] for p in org.an.people() if "controlshift-petition-signer" in p["tags"])
    org.an.remove_tagging(email, "controlshift-petition-signer")
    first = await audit(org, repair=True)
    assert kinds(first) == {"tag_missing": 1}
    assert first.repair is not None and first.repair["queued"] == 1
    second = await audit(org, repair=True)
    assert second.repair is not None and second.repair["queued"] == 0
    await sync(org)
    assert (await audit(org)).summary.findings == []
