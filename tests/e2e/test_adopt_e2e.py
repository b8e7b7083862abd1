"""End-to-end: an organisation switching from ControlShift's hosted AN integration to csand.
``csand adopt`` (deciding the ambiguous petitions), then ``csand run``: no AN petition made twice,
and new signatures land on the petitions the hosted integration made."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from csand.sim.scenario import SIGNER_TAG
from tests.e2e.harness import Csand, World

pytestmark = pytest.mark.e2e


def csand(daemon: Csand, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csand", *args, "--config", str(daemon.config)],
                          capture_output=True, text=True, timeout=120)


def test_switch_from_the_hosted_integration(world: World) -> None:
    scenario = world.populate(petitions=7, signatures=50, hosted=5, hosted_duplicates=1,
                              existing_in_an=0.4, seed=21)
    hosted = scenario.hosted
    before = {p["uuid"] for p in world.an.petitions()}
    daemon = world.csand()

    dry = csand(daemon, "adopt", "--dry-run", "--json")
    assert dry.returncode == 1, dry.stdout + dry.stderr  # the duplicate is ambiguous
    report = json.loads(dry.stdout)
    ambiguous = {v["slug"]: v["candidates"] for v in report["ambiguous"]}
    (doubled,) = [slug for slug, uuids in hosted.items() if len(uuids) == 2]
    assert sorted(ambiguous[doubled]) == sorted(hosted[doubled])
    decisions = ["--pick", f"{doubled}={hosted[doubled][1]}"]
    for slug in ambiguous.keys() - {doubled}:  # a CS petition of the same title, if any
        decisions += ["--create", slug]
    assert csand(daemon, "adopt", *decisions).returncode == 0
    adopted = csand(daemon, "adopt")
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    assert "matched (adopted): 4" in adopted.stdout

    daemon.start()
    daemon.wait_drained()
    result = world.check()  # the oracle: adopted, not duplicated; everyone's actions in place
    assert result["duplicate_petitions"] == 0
    petitions = {p["uuid"]: p for p in world.an.petitions()}
    ids = {p["slug"]: p["id"] for p in world.cs.petitions()}
    twin = {slug: next(u for u, p in petitions.items()
                       if f"controlshift-demo-org:petition-{ids[slug]}" in p["identifiers"])
            for slug in hosted}
    assert twin == {slug: uuids[-1] for slug, uuids in hosted.items()}
    assert hosted[doubled][0] in petitions and hosted[doubled][0] not in twin.values()
    launched = sum(1 for p in world.cs.petitions() if p["launched"])
    assert len(petitions) - len(before) == launched - len(hosted)  # only the others created

    # New signatures on the adopted petitions land on them.
    slug = next(s for s, uuids in hosted.items() if len(uuids) == 1)
    for i in range(3):
        world.cs.add_signature(slug, email=f"new{i}@example.org", first_name="New",
                               last_name=f"Signer {i}", join_organisation=True)
    daemon.wait_drained()
    for i in range(3):
        person = world.an.person(f"new{i}@example.org")
        assert person is not None and SIGNER_TAG in person["tags"]
        assert any(s["petition_uuid"] == twin[slug] and s["person_uuid"] == person["uuid"]
                   for s in world.an.signatures())
    world.check()
    status = json.loads(csand(daemon, "status", "--json").stdout)
    assert status["adoption_ambiguous"] == [] and status["dead"] == 0
    assert daemon.terminate()[0] == 0
