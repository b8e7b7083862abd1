"""End-to-end: the real ``csand run`` syncs ControlShift events, calendars, hosts and attendees
into the Action Network simulator (docs/rules.md §5), checked against the oracle
(:func:`csand.sim.verify.compare`, which checks events, event campaigns and attendances when the
scenario has events), also across ``kill -9``.

The harness's ``make_world`` builds an AN simulator without the events API, so these tests build
their world from the same pieces with ``ActionNetworkSim(events_api=True)``.
"""

from __future__ import annotations

import time
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
    world.cs.add_attendee(slug, email="answers@example.org", first_name="Ana",
                          last_name="Swers", attending_status="confirmed", join_organisation=None,
                          additional_fields={"diet": "vegan", "seats": 2},
                          phone_number="0412 555 666")
    daemon.wait_drained()
    check_events(world)
    assert world.an.person("late.comer@example.org")["status"] == "subscribed"
    assert world.an.person("declines@example.org") is None
    answers = world.an.person("answers@example.org")
    assert answers["status"] == "unsubscribed"  # no opt-in: created explicitly unsubscribed
    assert answers["custom_fields"] == {"diet": "vegan", "seats": "2",
                                        "phone_number": "0412 555 666"}
    assert daemon.terminate()[0] == 0


def test_a_withdrawn_rsvp_and_a_deleted_attendee_while_queued_reach_nothing(world: World) -> None:
    """Both happen while their RSVPs wait for an unreachable AN: nothing of them reaches AN once
    it is back (across a kill -9), and an RSVP given again, unchanged, afterwards does."""
    scenario = populate(world, petitions=2, signatures=10, events=4, calendars=1, attendees=20,
                        seed=5)
    slug = sorted(scenario.expected_events())[0]  # the sweeps below walk every event
    daemon = world.csand(sync={"phone": "mobile", "phone_country": "AU"}).start()
    daemon.wait_drained()
    daemon.terminate()
    gone = world.cs.add_attendee(slug, email="gone@example.org", first_name="Gon",
                                 attending_status="attending", join_organisation=True)
    back = world.cs.add_attendee(slug, email="back@example.org", first_name="Bac",
                                 attending_status="attending", join_organisation=True,
                                 phone_number="0413 777 888", opt_in_sms=True)
    first = world.csand(sync={"phone": "mobile", "phone_country": "AU"},
                        controlshift={"reconcile_interval": 1.0},
                        action_network={"url": "http://127.0.0.1:9/api/v2"})  # AN unreachable
    first.start()
    first.wait_for(lambda: first.counts()["pending"] >= 2, "the RSVPs queued")
    # While they wait for AN: one attendee deletes their account, the other declines.
    world.cs.delete_attendee(gone["id"])
    world.cs.update_attendee(back["id"], attending_status="not_attending")
    first.wait_for(lambda: first.counts()["cancelled"] >= 2, "both RSVPs cancelled")
    first.kill9()
    again = world.csand(sync={"phone": "mobile", "phone_country": "AU"},
                        controlshift={"reconcile_interval": 1.0})
    again.start()
    again.wait_reconciled(after=time.time())
    assert world.an.person("gone@example.org") is None
    assert world.an.person("back@example.org") is None
    world.cs.update_attendee(back["id"], attending_status="attending")  # given again, unchanged
    again.wait_reconciled(after=time.time())
    back_in_an = world.an.person("back@example.org")
    assert back_in_an["status"] == "subscribed"
    assert [(p["number"], p["status"]) for p in back_in_an["phone_numbers"]] == [
        ("+61413777888", "subscribed")]
    assert again.terminate()[0] == 0


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
