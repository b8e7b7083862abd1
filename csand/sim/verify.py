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
    scenario: Scenario, an: ActionNetworkSim, origin_system: str = "Controlshift Petition"
) -> dict[str, Any]:
    """Check AN's end state against the oracle; returns counts and the first few differences."""
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
    creators = {p["slug"]: (p["creator"] or {}).get("email") for p in scenario.cs.petitions()}
    for petition in petitions_by_uuid.values():
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
        if cs_petition["url"] not in (petition["description"] or ""):
            problems.append(f"petition {slug}: description lacks the ControlShift URL")
        want_creator = (creators.get(slug) or "").strip().lower()
        if want_creator in expected and (creator is None or creator["email"].strip().lower() != want_creator):
            problems.append(f"petition {slug}: creator link missing or wrong")
    identifiers = [i for p in petitions_by_uuid.values() for i in p["identifiers"]]
    duplicates = len(identifiers) - len(set(identifiers))
    pairs = [(s["petition_uuid"], s["person_uuid"]) for s in an.signatures()]
    launched = sum(1 for p in scenario.cs.petitions() if p["launched"])
    if len(petitions_by_uuid) != launched:
        problems.append(f"{len(petitions_by_uuid)} mirrored petitions for {launched} launched")
    return {
        "expected_people": len(expected),
        "problems": problems,
        "wrongly_subscribed": wrongly_subscribed,
        "duplicate_petitions": duplicates,
        "duplicate_signatures": len(pairs) - len(set(pairs)),
    }
