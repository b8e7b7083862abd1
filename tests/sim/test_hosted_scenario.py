"""The scenario's hosted-integration petitions and the oracle's view of adopting them."""

from __future__ import annotations

from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import normalize_email, populate
from csand.sim.verify import compare
from csand.sync.adoption import named_slugs


def test_populate_seeds_what_the_hosted_integration_made() -> None:
    cs, an = ControlShiftSim(), ActionNetworkSim(requests_per_second=None)
    scenario = populate(cs, an, petitions=8, signatures=60, hosted=5, hosted_duplicates=2,
                        existing_in_an=0.5, seed=2)
    launched = [p for p in scenario.petitions if p["launched"]]
    assert list(scenario.hosted) == [p["slug"] for p in launched[:5]]
    assert [len(u) for u in scenario.hosted.values()] == [2, 2, 1, 1, 1]
    by_uuid = {p["uuid"]: p for p in an.petitions()}
    for petition in launched[:5]:
        for uuid in scenario.hosted[petition["slug"]]:
            made = by_uuid[uuid]
            assert made["title"] == petition["title"]
            assert made["origin_system"] == "Controlshift Petition"
            assert made["identifiers"] == [f"action_network:{uuid}"]
            single = len(scenario.hosted[petition["slug"]]) == 1
            assert named_slugs(made["description"]) == ({petition["slug"]} if single else set())
    # Signed by people already in AN who signed on ControlShift.
    emails = {p["uuid"]: p["email"] for p in an.people()}
    signers = {normalize_email(emails[s["person_uuid"]]) for s in an.signatures()}
    assert signers and signers <= set(scenario.existing_people)


def test_the_oracle_wants_the_hosted_petition_adopted_not_a_second_one() -> None:
    cs, an = ControlShiftSim(), ActionNetworkSim(requests_per_second=None)
    scenario = populate(cs, an, petitions=3, signatures=0, unlaunched=0, hosted=1, seed=3)
    (slug, [hosted]), = scenario.hosted.items()
    cs_id = next(p["id"] for p in cs.petitions() if p["slug"] == slug)

    def petition_problems() -> list[str]:
        return [p for p in compare(scenario, an)["problems"] if p.startswith("petition")
                or "mirrored petitions" in p]

    assert any("mirrored petitions for 3 launched" in p for p in petition_problems())
    an.add_petition("Copy", description=cs.petitions()[0]["url"],
                    identifiers=[f"controlshift-{cs.org_slug}:petition-{cs_id}"])
    assert any("instead of adopting" in p for p in petition_problems())
