"""End-to-end: the real ``csand run`` syncs ControlShift events, calendars, hosts and attendees
into the Action Network simulator (docs/rules.md §5), checked against the oracle
(:func:`csand.sim.verify.compare`, which checks events, event campaigns and attendances when the
scenario has events), also across ``kill -9``.

The harness's ``make_world`` builds an AN simulator without the events API, so these tests build
their world from the same pieces with ``ActionNetworkSim(events_api=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import Scenario
from csand.sim.server import ServedApp
from csand.sim.verify import compare
from tests.e2e.harness import AN_KEY, CS_KEY, World

pytestmark = pytest.mark.e2e


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    cs = ControlShiftSim(api_key=CS_KEY, page_size=7)
    an = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None, events_api=True)
    with ServedApp(cs.app) as cs_served, ServedApp(an.app) as an_served:
        world = World(tmp_path, cs, an, cs_served.url, an_served.url)
        try:
            yield world
        finally:
            for daemon in world.daemons:
                if daemon.alive():
                    daemon.kill9()
            cs.close()


def populate(world: World, **kwargs: Any) -> Scenario:
    scenario = world.populate(**kwargs)
    # csand here only polls: REST shows neither a host's opt-in nor an event's moderation, so a
    # host never opts in and the flagged event looks like any launched one (rules §5).
    scenario.host_consent_known = False
    scenario.moderation_known = False
    return scenario


def check_events(world: World) -> dict[str, Any]:
    assert world.scenario is not None
    assert compare(world.scenario, world.an)["problems"] == []  # shown when they are not
    result = world.check()
    assert result["expected_events"] > 3 and result["expected_attendances"] > 20
    assert result["attendances"] == result["expected_attendances"]
    assert result["duplicate_events"] == result["duplicate_event_campaigns"] == 0
    assert result["duplicate_attendances"] == 0
    return result


def test_events_hosts_and_attendees_reach_action_network(world: World) -> None:
    scenario = populate(world, petitions=4, signatures=60, events=8, calendars=3, attendees=90,
                        seed=21)
    daemon = world.csand().start()
    daemon.wait_drained()
    check_events(world)
    assert len(world.an.event_campaigns()) == len(scenario.expected_campaigns()) >= 1

    # Later: a new RSVP with an opt-in, and a decline that changes nothing already synced, on an
    # upcoming event (polling walks only recent events' attendees between sweeps).
    synced = scenario.expected_events()
    slug = next(e["slug"] for e in world.cs.events()
                if e["slug"] in synced and e["end_at"] > world.cs.now())
    world.cs.add_attendee(slug, email=" Late.Comer@Example.org", first_name="Late",
                          last_name="Comer", attending_status="attending", join_organisation=True)
    world.cs.add_attendee(slug, email="declines@example.org", first_name="De",
                          last_name="Cline", attending_status="not_attending",
                          join_organisation=True)
    daemon.wait_drained()
    check_events(world)
    assert world.an.person("late.comer@example.org")["status"] == "subscribed"
    assert world.an.person("declines@example.org") is None
    assert daemon.terminate()[0] == 0


def test_kill9_mid_drain_loses_and_duplicates_no_event_or_attendance(world: World) -> None:
    populate(world, petitions=3, signatures=40, events=10, calendars=2, attendees=140, seed=8)
    world.an.requests_per_second = 60.0
    world.an.faults.fail_after_commit_rate = 0.05  # AN wrote, csand never heard: replay safely
    daemon = world.csand(action_network={"requests_per_second": 60.0})
    target = 0
    for _ in range(3):
        daemon.start()
        target += 30
        daemon.wait_for(lambda t=target: daemon.counts()["done"] >= t, f"{target} items done")
        daemon.kill9()
    daemon.start()
    daemon.wait_drained()
    check_events(world)
    assert world.an.stats()["duplicate_identifier_posts"] == 0
    assert daemon.terminate()[0] == 0
