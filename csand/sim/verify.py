"""Compare the Action Network simulator's end state with what docs/rules.md says it must be.

Shared by the demo's closing summary and the end-to-end tests: the oracle is
:meth:`csand.sim.scenario.Scenario.expected_an_state`, computed from ControlShift's data alone.
"""

from __future__ import annotations

from typing import Any

from csand.logs import mask_email
from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.scenario import Scenario


def compare(
    scenario: Scenario,
    an: ActionNetworkSim,
    origin_system: str = "Controlshift Petition",
    event_origin_system: str = "Controlshift Event",
) -> dict[str, Any]:
    """Check AN's end state against the oracle; returns counts and the first few differences.

    When the scenario has events, also their AN mirrors (see :func:`_compare_events`)."""
    expected = scenario.expected_an_state()
    petitions_by_uuid = {p["uuid"]: p for p in an.petitions()}
    slug_of = {p["uuid"]: p["identifiers"] for p in an.petitions()}
    signed: dict[str, set[str]] = {}
    people_by_uuid = {p["uuid"]: p for p in an.people()}
    for sig in an.signatures():
        person = people_by_uuid.get(sig["person_uuid"])
        if person:
            signed.setdefault(person["email"].strip().lower(), set()).add(sig["petition_uuid"])
    cs_ids = {p["slug"]: p["id"] for p in scenario.cs.petitions()}
    problems: list[str] = []
    wrongly_subscribed = 0
    for email, want in expected.items():
        got = an.person(email)
        if got is None:
            problems.append(f"{mask_email(email)}: missing in AN")
            continue
        if got["status"] != want.status:
            problems.append(f"{mask_email(email)}: status {got['status']} != {want.status}")
            if got["status"] == "subscribed":
                wrongly_subscribed += 1
        if not want.tags <= set(got["tags"]):
            problems.append(f"{mask_email(email)}: missing tags {sorted(want.tags - set(got['tags']))}")
        want_ids = {cs_ids[s] for s in want.petitions}
        got_ids = {
            int(ident.rsplit("-", 1)[-1])
            for uuid in signed.get(email, ())
            for ident in slug_of.get(uuid, ())
            if ":petition-" in ident
        }
        if want_ids != got_ids:
            problems.append(f"{mask_email(email)}: petitions {sorted(got_ids)} != {sorted(want_ids)}")
        for field, key in (("given_name", "given_name"), ("family_name", "family_name")):
            if getattr(want, field) and got.get(key) != getattr(want, field):
                problems.append(f"{mask_email(email)}: {key} {got.get(key)!r} != {getattr(want, field)!r}")
        if want.postal_code and got.get("postal_code") != want.postal_code:
            problems.append(f"{mask_email(email)}: postal_code {got.get('postal_code')!r} != {want.postal_code!r}")
        if want.status == "unsubscribed" and any(
            h["status"] == "subscribed" for h in an.history(email)
        ):
            problems.append(f"{mask_email(email)}: was subscribed at some point without opting in")
            wrongly_subscribed += 1
    for person in people_by_uuid.values():
        key = person["email"].strip().lower()
        if person["created_by"] == "api" and key not in expected:
            problems.append(f"{mask_email(key)}: created in AN but should not exist")
            if person["status"] == "subscribed" or any(
                h["status"] == "subscribed" for h in an.history(key)
            ):
                wrongly_subscribed += 1
    creators = {p["slug"]: (p["creator"] or {}).get("email") for p in scenario.cs.petitions()}
    # The hosted integration's petitions (populate(hosted=...)): each CS petition with one must
    # have adopted it (it then carries csand's identifier), never got a second one; those left
    # unadopted (a duplicate a person chose against) are not csand's and are not counted.
    hosted_uuids = {u for uuids in scenario.hosted.values() for u in uuids}
    unadopted = {u for u in hosted_uuids if u in petitions_by_uuid and not any(
        ":petition-" in i for i in petitions_by_uuid[u]["identifiers"])}
    for slug, uuids in sorted(scenario.hosted.items()):
        ident_suffix = f":petition-{cs_ids[slug]}"
        twins = [p["uuid"] for p in petitions_by_uuid.values()
                 if any(i.endswith(ident_suffix) for i in p["identifiers"])]
        if len(uuids) == 1 and twins and twins != uuids:
            problems.append(f"petition {slug}: a second AN petition instead of adopting "
                            "the hosted integration's")
    for petition in petitions_by_uuid.values():
        if petition["uuid"] in unadopted:
            continue
        adopted = petition["uuid"] in hosted_uuids
        if petition["origin_system"] != origin_system:
            problems.append(f"petition {petition['identifiers']}: origin_system {petition['origin_system']!r}")
        creator = people_by_uuid.get(petition["creator_uuid"] or "")
        slug = next((s for s, i in cs_ids.items()
                     if any(ident.endswith(f":petition-{i}") for ident in petition["identifiers"])), None)
        cs_petition = next((p for p in scenario.cs.petitions() if p["slug"] == slug), None)
        if cs_petition is None:
            problems.append(f"petition {petition['identifiers']}: no such ControlShift petition")
            continue
        if petition["title"] != cs_petition["title"]:
            problems.append(f"petition {slug}: title {petition['title']!r}")
        if adopted:  # csand leaves what the hosted integration wrote as it is
            continue
        if cs_petition["url"] not in (petition["description"] or ""):
            problems.append(f"petition {slug}: description lacks the ControlShift URL")
        want_creator = (creators.get(slug) or "").strip().lower()
        if want_creator in expected and (creator is None or creator["email"].strip().lower() != want_creator):
            problems.append(f"petition {slug}: creator link missing or wrong")
    identifiers = [i for p in petitions_by_uuid.values() for i in p["identifiers"]]
    duplicates = len(identifiers) - len(set(identifiers))
    pairs = [(s["petition_uuid"], s["person_uuid"]) for s in an.signatures()]
    launched = sum(1 for p in scenario.cs.petitions() if p["launched"])
    if len(petitions_by_uuid) - len(unadopted) != launched:
        problems.append(f"{len(petitions_by_uuid) - len(unadopted)} mirrored petitions for "
                        f"{launched} launched")
    result = {
        "expected_people": len(expected),
        "problems": problems,
        "wrongly_subscribed": wrongly_subscribed,
        "duplicate_petitions": duplicates,
        "duplicate_signatures": len(pairs) - len(set(pairs)),
    }
    if scenario.has_events():
        result |= _compare_events(scenario, an, people_by_uuid, event_origin_system, problems)
    return result


def _compare_events(
    scenario: Scenario,
    an: ActionNetworkSim,
    people_by_uuid: dict[str, dict[str, Any]],
    origin_system: str,
    problems: list[str],
) -> dict[str, Any]:
    """Events, event campaigns and attendances (docs/rules.md §5): exactly one AN event per
    synced CS event and nothing else, in its calendar's campaign (exactly one campaign per
    calendar holding a synced event), with its title, origin system and host as creator, and
    exactly the expected people attending. People's tags and statuses are checked with the
    other people. Appends to ``problems``; returns the duplicate counts."""
    want = scenario.expected_events()
    want_campaigns = scenario.expected_campaigns()  # calendar slug -> identifier
    email_of = {uuid: p["email"].strip().lower() for uuid, p in people_by_uuid.items()}
    uuid_of = {email: uuid for uuid, email in email_of.items()}

    campaigns: dict[str, list[dict[str, Any]]] = {}
    for campaign in an.event_campaigns():
        matched = [i for i in campaign["identifiers"] if ":calendar-" in i]
        if not matched:
            problems.append(f"event campaign {campaign['identifiers']}: not a ControlShift calendar")
        for ident in matched:
            campaigns.setdefault(ident, []).append(campaign)
    wanted_ids = set(want_campaigns.values())
    for calendar, ident in sorted(want_campaigns.items()):
        if ident not in campaigns:
            problems.append(f"calendar {calendar}: no event campaign in AN")
    for ident, found in sorted(campaigns.items()):
        if ident not in wanted_ids:
            problems.append(f"event campaign {ident}: should not exist")
        if len(found) > 1:
            problems.append(f"event campaign {ident}: {len(found)} copies")

    events: dict[str, list[dict[str, Any]]] = {}
    for event in an.events():
        matched = [i for i in event["identifiers"] if ":event-" in i]
        if not matched:
            problems.append(f"event {event['identifiers']}: not a ControlShift event")
        for ident in matched:
            events.setdefault(ident, []).append(event)
    by_identifier = {e.identifier: e for e in want.values()}
    for ident, found in sorted(events.items()):
        if ident not in by_identifier:
            problems.append(f"event {ident}: should not exist (not launched, inappropriate or "
                            "unknown)")
        if len(found) > 1:
            problems.append(f"event {ident}: {len(found)} copies")

    attendance_count = 0
    for slug, exp in sorted(want.items()):
        found = events.get(exp.identifier)
        if not found:
            problems.append(f"event {slug}: missing in AN")
            continue
        event = found[0]
        if event.get("title") != exp.title:
            problems.append(f"event {slug}: title {event.get('title')!r}")
        if event.get("origin_system") != origin_system:
            problems.append(f"event {slug}: origin_system {event.get('origin_system')!r}")
        want_campaign = campaigns.get(exp.calendar_identifier or "", [])
        if exp.calendar is None and event["campaign_uuid"] is not None:
            problems.append(f"event {slug}: in an event campaign but has no calendar")
        elif exp.calendar is not None and event["campaign_uuid"] not in {
            c["uuid"] for c in want_campaign
        }:
            problems.append(f"event {slug}: not in calendar {exp.calendar}'s event campaign")
        if exp.host and uuid_of.get(exp.host) is not None and (
            event["creator_uuid"] != uuid_of[exp.host]
        ):
            problems.append(f"event {slug}: creator link missing or wrong")
        got: list[str] = [
            email_of.get(a["person_uuid"], f"<unknown person {a['person_uuid']}>")
            for a in an.attendances(event["uuid"])
        ]
        attendance_count += len(got)
        missing, extra = exp.attendances - set(got), set(got) - exp.attendances
        if missing:
            problems.append(f"event {slug}: attendances missing for "
                            f"{sorted(mask_email(e) for e in missing)}")
        if extra:
            problems.append(f"event {slug}: unexpected attendances for "
                            f"{sorted(mask_email(e) for e in extra)}")
    duplicate_attendances = an.duplicates()["attendances"]
    if duplicate_attendances:
        problems.append(f"{duplicate_attendances} duplicate attendances in AN")
    return {
        "expected_events": len(want),
        "expected_campaigns": len(want_campaigns),
        "expected_attendances": sum(len(e.attendances) for e in want.values()),
        "attendances": attendance_count,
        "duplicate_events": sum(len(f) - 1 for f in events.values()),
        "duplicate_event_campaigns": sum(len(f) - 1 for f in campaigns.values()),
        "duplicate_attendances": duplicate_attendances,
    }
