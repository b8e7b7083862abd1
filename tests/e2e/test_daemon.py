"""End-to-end: the real ``csand run`` process against both simulators over loopback HTTP.

Each test builds a ControlShift with generated data, lets csand sync it into the Action Network
simulator, and checks AN's end state against the oracle of docs/rules.md
(:func:`csand.sim.verify.compare`), plus the guarantees: nothing lost, nothing duplicated, nobody
subscribed without opting in, across faults, rate limiting and ``kill -9``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from csand.model import global_unsubscribe_activity
from csand.sim.scenario import Scenario
from csand.storage import open_store
from tests.e2e.harness import AN_KEY, CS_KEY, Csand, World, make_world

pytestmark = pytest.mark.e2e

def assert_logs_clean(daemon: Csand, scenario: Scenario) -> None:
    """Every line is JSON; no API key and no raw email address anywhere."""
    lines = daemon.log_lines()
    assert lines
    for line in lines:
        json.loads(line)
        assert CS_KEY not in line and AN_KEY not in line
    text = "\n".join(lines).lower()
    emails = {e for e in scenario.people if "@" in e}
    leaked = [e for e in emails if e in text or e.replace("@", "%40") in text]
    assert leaked == []


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_backfill_then_incremental_matches_the_rules(tmp_path: Path, order: str) -> None:
    for world in make_world(tmp_path, signature_order=order):
        scenario = world.populate(petitions=6, signatures=120, bad_records=5, seed=11)
        daemon = world.csand().start()
        counts = daemon.wait_drained()
        world.check()
        # Bad records are kept as dead letters with a reason; everything else synced.
        dead = daemon.dead()
        assert len(dead) == len(scenario.expected_dead()) - sum(
            1 for d in scenario.expected_dead() if d.reason == "deleted")
        assert all(reason for reason in dead.values())
        assert counts["done"] > 100

        # Incremental: new signatures, a late opt-in, a deletion, a single-petition unsubscribe.
        before = world.an.stats()["requests"]
        slug = next(p["slug"] for p in world.cs.petitions() if p["launched"])
        world.cs.add_signature(slug, email=" New.Person@Example.org ", first_name="Åsa",
                               last_name="Öberg", postcode="113 30", join_organisation=True)
        world.cs.add_signature(slug, email="private@example.org", first_name="Pat",
                               join_organisation=False)
        sigs = [s for s in world.cs.signatures() if not s["deleted_at"] and s["email"]
                and "@" in s["email"] and len(s["first_name"] or "") < 100]
        late = next(s for s in sigs if s["join_organisation"] is not True)
        world.cs.update_signature(late["id"], join_organisation=True)
        unsub = next(s for s in sigs if s["id"] != late["id"])
        world.cs.update_signature(unsub["id"], unsubscribe_at="2026-11-01T00:00:00Z")
        mark = time.time()
        daemon.wait_drained(after=mark)
        assert world.an.person("new.person@example.org")["status"] == "subscribed"
        assert world.an.person("private@example.org")["status"] == "unsubscribed"
        # the petition-level unsubscribe changed nothing and cost no request beyond the new ones
        assert world.an.stats()["requests"] - before <= 6
        code, seconds = daemon.terminate()
        assert code == 0 and seconds < 15
        assert_logs_clean(daemon, scenario)

        # The late opt-in moves no change signal: the reconciliation sweep finds it.
        daemon2 = world.csand(controlshift={"reconcile_interval": 1.0}).start()
        daemon2.wait_reconciled(after=time.time())
        late_email = late["email"].strip().lower()
        assert world.an.person(late_email)["status"] == "subscribed"
        world.check()
        assert daemon2.terminate()[0] == 0


def test_three_kill9_mid_drain_lose_and_duplicate_nothing(world: World) -> None:
    world.populate(petitions=8, signatures=220, bad_records=3, seed=5)
    world.an.requests_per_second = 60.0
    world.an.faults.fail_after_commit_rate = 0.05  # AN wrote, csand never heard: replay safely
    daemon = world.csand(action_network={"requests_per_second": 60.0})
    target = 0
    for _ in range(3):
        daemon.start()
        target += 40
        daemon.wait_for(lambda t=target: daemon.counts()["done"] >= t, f"{target} items done")
        daemon.kill9()
        assert daemon.counts()["in_flight"] >= 0
    daemon.start()
    daemon.wait_drained()
    world.check()
    assert world.an.stats()["duplicate_identifier_posts"] == 0
    starts = [e for e in daemon.log_events() if e.get("event") == "daemon.start"]
    assert len(starts) == 4
    assert daemon.terminate()[0] == 0


def test_faults_and_rate_limits_are_ridden_out(world: World) -> None:
    world.populate(petitions=5, signatures=120, bad_records=2, seed=9)
    world.an.requests_per_second = 25.0
    world.an.faults.error_rate = 0.05
    world.an.faults.empty_200_rate = 0.05
    world.an.faults.drop_rate = 0.03
    world.an.faults.slow_rate = 0.02
    world.an.faults.slow_seconds = 6.0  # past csand's 5 s timeout
    world.cs.faults.error_rate = 0.05
    world.cs.faults.drop_rate = 0.02
    # csand is configured faster than AN allows: it must adapt to the 429s.
    daemon = world.csand(action_network={"requests_per_second": 40.0}).start()
    daemon.wait_drained()
    world.check()
    stats = world.an.stats()
    assert stats["rate_limited"] > 0
    assert sum(stats["faults"].values()) > 0
    events = daemon.log_events()
    assert any(e.get("event") == "an.rate_limited" for e in events)
    assert any(e.get("event") == "sync.retry" for e in events)
    assert daemon.terminate()[0] == 0


def test_bad_an_key_pauses_instead_of_burning_the_queue(world: World) -> None:
    world.populate(petitions=3, signatures=30, seed=3)
    world.an.api_key = "rotated-key-that-csand-does-not-have"
    daemon = world.csand().start()
    daemon.wait_for(lambda: daemon.counts()["pending"] > 0 and daemon.meta("an_paused") is not None,
                    "workers to pause")
    assert daemon.counts()["dead"] == 0 and daemon.counts()["done"] == 0
    status = subprocess.run(
        [sys.executable, "-m", "csand", "status", "--json", "--config", str(daemon.config)],
        capture_output=True, text=True,
    )
    assert status.returncode == 3  # unhealthy: a monitoring check alerts
    data = json.loads(status.stdout)
    assert data["an_paused"] and data["pending"] > 0
    assert any("paused" in problem for problem in data["problems"])
    for key in ("pending", "in_flight", "done", "dead"):
        assert isinstance(data[key], int)
    assert any(e.get("event") == "an.auth_failed" and e.get("level") == "error"
               for e in daemon.log_events())
    world.an.api_key = AN_KEY  # the operator fixes the key: csand resumes by itself
    daemon.wait_drained()
    world.check()
    assert daemon.terminate()[0] == 0


def test_sigterm_mid_drain_exits_zero_and_releases_work(world: World) -> None:
    world.populate(petitions=4, signatures=80, seed=4)
    world.an.faults.slow_rate = 0.3
    world.an.faults.slow_seconds = 0.5
    daemon = world.csand(action_network={"requests_per_second": 10.0}).start()
    daemon.wait_for(lambda: daemon.counts()["done"] >= 10, "some progress")
    code, seconds = daemon.terminate()
    assert code == 0
    assert seconds < 15
    assert daemon.counts()["in_flight"] == 0
    # Work handed back on shutdown is not charged an attempt.
    assert daemon.query("SELECT COUNT(*) FROM outbox WHERE status = 'pending' "
                        "AND attempts > 0") == [(0,)]
    assert any(e.get("event") == "daemon.stopped" for e in daemon.log_events())
    world.an.faults.slow_rate = 0
    daemon.start()
    daemon.wait_drained()
    world.check()
    assert daemon.terminate()[0] == 0


def test_status_json_while_running(world: World) -> None:
    world.populate(petitions=2, signatures=20, seed=2)
    daemon = world.csand().start()
    daemon.wait_drained()
    out = subprocess.run(
        [sys.executable, "-m", "csand", "status", "--json", "--config", str(daemon.config)],
        capture_output=True, text=True, check=True,
    ).stdout
    data = json.loads(out)
    assert data["pending"] == 0 and data["in_flight"] == 0 and data["done"] >= 20
    assert re.match(r"\d{4}-\d\d-\d\dT", data["last_poll_at"])
    human = subprocess.run(
        [sys.executable, "-m", "csand", "status", "--config", str(daemon.config)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "pending" in human and "last poll" in human
    assert daemon.terminate()[0] == 0


def test_second_daemon_on_the_same_database_refuses(world: World) -> None:
    world.populate(petitions=2, signatures=5, seed=1)
    daemon = world.csand().start()
    daemon.wait_drained()
    second = subprocess.run(
        [sys.executable, "-m", "csand", "run", "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=30,
    )
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert daemon.terminate()[0] == 0


def test_broken_config_stops_with_one_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[controlshift]\nurl = "http://127.0.0.1:9"\napi_key = "x"\n'
                      '[action_network]\nrequests_per_second = "fast"\nworkerz = 3\n')
    result = subprocess.run(
        [sys.executable, "-m", "csand", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "action_network.requests_per_second" in result.stderr
    assert "action_network.workerz: unknown key" in result.stderr
    assert result.stderr.count("\n") == 1


def test_the_daemon_prunes_personal_data_past_the_retention_at_start(world: World) -> None:
    world.populate(petitions=2, signatures=5, seed=1)
    daemon = world.csand(store={"retention_days": 30})
    long_ago = time.time() - 40 * 86400

    async def seed() -> None:  # an item synced 40 days ago, by an earlier csand
        store = await open_store(daemon.db, clock=lambda: long_ago)
        try:
            await store.enqueue([global_unsubscribe_activity(1, "old.signer@example.org", None)])
            [item] = await store.lease(1, 60)
            await store.finish(item.id, "done", note="unsubscribed")
        finally:
            await store.close()

    anyio.run(seed, backend="asyncio")
    daemon.start()
    daemon.wait_for(lambda: any(e.get("event") == "store.pruned" for e in daemon.log_events()),
                    "the start-up prune")
    daemon.wait_drained()
    [pruned] = [e for e in daemon.log_events() if e.get("event") == "store.pruned"]
    assert (pruned["outbox"], pruned["webhook_events"]) == (1, 0)
    [(person_key, payload)] = daemon.query(
        "SELECT person_key, payload FROM outbox WHERE source_key = 'unsubscribe:1'")
    assert person_key.startswith("pruned:") and "old.signer" not in payload
    assert daemon.counts()["done"] >= 4  # the pruned item still counts; the new ones synced
    assert daemon.terminate()[0] == 0
