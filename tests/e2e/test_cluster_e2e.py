"""End-to-end: two real ``csand run`` processes on one PostgreSQL database, and the leader dies.

Both drain the outbox through one Action Network budget; one polls. ``kill -9`` of the leader
mid-drain must cost nothing: the survivor takes over polling within 30 s, with no gap (what
ControlShift gained meanwhile arrives) and nothing polled twice, the leases the dead process held
come back once they expire, and AN ends up exactly as docs/rules.md says, with nobody subscribed
who did not opt in, nothing duplicated and never a request above the limit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.harness import Csand, World, make_world

pytestmark = pytest.mark.e2e

RATE = 20.0  # AN's limit in the simulator and in csand's config: the semantics of 4/s, faster


def leader(daemon: Csand) -> str | None:
    rows = daemon.query("SELECT holder FROM cluster_leader WHERE role = 'poller' "
                        "AND until > extract(epoch FROM clock_timestamp())")
    return rows[0][0] if rows else None


def events(daemon: Csand, name: str) -> list[dict]:
    return [e for e in daemon.log_events() if e.get("event") == name]


def test_two_instances_share_the_work_and_survive_the_leaders_death(
        tmp_path: Path, pg_url: str) -> None:
    for world in make_world(tmp_path, an_requests_per_second=RATE):
        leader_dies_mid_drain(world, pg_url)


def leader_dies_mid_drain(world: World, pg_url: str) -> None:
    scenario = world.populate(petitions=6, signatures=260, seed=23)
    common = {
        "action_network": {"requests_per_second": RATE},
        "sync": {"lease_seconds": 6.0, "workers": 4},
        "controlshift": {"poll_interval": 1.0},
    }
    a = world.csand(name="a", store_url=pg_url, **common).start()
    a.wait_for(lambda: leader(a) == "a", "instance a to lead")
    b = world.csand(name="b", store_url=pg_url, **common).start()
    started = time.monotonic()  # the simulator's clock
    b.wait_for(lambda: len(b.query("SELECT instance FROM cluster_instances")) == 2,
               "both instances' heartbeats")
    # Mid-drain: both instances are working through the backlog.
    a.wait_for(lambda: a.counts()["done"] >= 120, "a third of the backlog done")
    assert a.counts()["pending"] > 50
    a.kill9()
    killed, killed_mono = time.time(), time.monotonic()
    # What ControlShift gains after the leader died must still arrive.
    slug = next(p["slug"] for p in world.cs.petitions() if p["launched"])
    world.cs.add_signature(slug, email="after.kill@example.org", first_name="Kim",
                           join_organisation=True)
    world.cs.add_signature(slug, email="quiet.after.kill@example.org", first_name="Lou",
                           join_organisation=False)

    b.wait_for(lambda: leader(b) == "b", "b to take over", timeout=40)
    b.wait_for(lambda: float(b.meta("last_poll_at") or 0) > killed,
               "b's first poll", timeout=40)
    first_poll = next(e for e in events(b, "poll.cycle"))
    took_over = next(e for e in events(b, "cluster.leading"))
    failover = float(b.meta("last_poll_at") or 0) - killed
    assert failover <= 30.0, failover
    counts = b.wait_drained(after=killed)

    # AN matches the rules; nothing lost, nothing duplicated, nobody wrongly subscribed.
    world.check()
    assert world.an.person("after.kill@example.org")["status"] == "subscribed"
    assert world.an.person("quiet.after.kill@example.org")["status"] == "unsubscribed"
    assert counts["dead"] == 0 and counts["in_flight"] == 0
    assert counts["done"] >= len(scenario.people) // 2

    # Exactly one poller at a time: b polled only once it led.
    assert took_over["timestamp"] <= first_poll["timestamp"]
    assert events(b, "cluster.leading")[0]["instance"] == "b"
    # One AN budget for both: never a 429, never more than the limit in any second.
    stats = world.an.stats()
    assert stats["rate_limited"] == 0
    times = stats["request_times"]
    busiest = max(sum(1 for t in times[i:i + int(RATE) + 1] if t - times[i] < 1.0)
                  for i in range(len(times)))
    assert busiest <= RATE
    both = [t for t in times if started <= t <= killed_mono]
    rate = (len(both) - 1) / (both[-1] - both[0])
    print(f"failover {failover:.1f} s (took over {took_over['timestamp']}); combined AN "
          f"rate while both ran {rate:.2f}/s of {RATE:g} ({rate / RATE:.1%}); busiest "
          f"second {busiest}")
    assert rate <= RATE
    code, _ = b.terminate()
    assert code == 0
