"""End-to-end: the consent and no-loss sequences that cross processes, with the real ``csand``.

A shutdown in the middle of an activity, followed by a new process; and an operator's
``csand dead retry`` after ControlShift deleted a dead record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import AN_KEY, World, make_world
from tests.e2e.test_operator import csand
from tests.e2e.test_webhooks_e2e import SECRET, free_port, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def world(tmp_path: Path):
    yield from make_world(tmp_path, webhook_retry_delays=(0.05,))


def test_sigterm_mid_activity_continues_the_plan_and_never_resends_the_opt_in(
        world: World) -> None:
    """A creator opts in (the petition.launched webhook says so) and csand writes them
    subscribed; SIGTERM arrives while the mirrored petition is being created; the creator
    unsubscribes through an AN email; the next process continues and must not re-subscribe."""
    world.populate(petitions=2, signatures=3, seed=31)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = world.csand(
        controlshift={"poll_interval": 60.0, "webhook_secret": SECRET},
        http={"listen": f"127.0.0.1:{port}"}, sync={"shutdown_grace": 0.5},
    ).start()
    daemon.wait_for(lambda: daemon.meta("backfill_done") == "1" and daemon.counts()["pending"] == 0
                    and daemon.counts()["in_flight"] == 0, "the backfill")
    world.cs.add_webhook_endpoint(f"{base}/webhooks/controlshift", SECRET)
    world.an.faults.slow_routes = frozenset({"POST /petitions"})
    world.an.faults.slow_seconds, world.an.faults.slow_rate = 30.0, 1.0
    email = "founder@example.org"
    world.cs.add_petition(title="Save the river", creator={
        "first_name": "Fay", "last_name": "Lo", "email": email, "join_organisation": True})
    wait_until(lambda: (world.an.person(email) or {}).get("status") == "subscribed"
               and world.an.stats()["by_route"].get("POST /petitions", 0) >= 2,
               "the creator written and the petition creation in flight", timeout=60)

    code, seconds = daemon.terminate()
    assert code == 0 and seconds < 10
    (progress,) = daemon.query("SELECT progress FROM outbox WHERE source_key LIKE 'petition:%' "
                               "AND status = 'pending'")
    assert json.loads(progress[0]) == ["person_written"]

    uuid = world.an.person(email)["uuid"]
    httpx.put(f"{world.an_url}/api/v2/people/{uuid}", headers={"OSDI-API-Token": AN_KEY},
              json={"email_addresses": [{"address": email, "status": "unsubscribed"}]}
              ).raise_for_status()
    world.an.faults.slow_rate = 0.0
    again = world.csand(controlshift={"poll_interval": 60.0, "webhook_secret": SECRET},
                        http={"listen": f"127.0.0.1:{port}"}).start()
    again.wait_for(lambda: again.counts()["pending"] == 0 and again.counts()["in_flight"] == 0
                   and again.counts()["done"] > daemon.counts()["done"] - 1, "the rest of it")

    assert world.an.person(email)["status"] == "unsubscribed"
    history = world.an.history(email)
    assert [h["action"] for h in history].count("POST /people") == 1  # continued, not replayed
    assert sum(1 for before, after in zip([None, *history], history, strict=False)
               if after["status"] == "subscribed" and (before or {}).get("status") != "subscribed"
               ) == 1
    mirrored = [p for p in world.an.petitions() if p["title"] == "Save the river"]
    assert len(mirrored) == 1 and mirrored[0]["creator_uuid"] == uuid
    assert again.terminate()[0] == 0


def test_dead_retry_skips_a_record_deleted_on_controlshift_since(world: World) -> None:
    scenario = world.populate(petitions=2, signatures=10, seed=32)
    world.an.faults.error_rate = 1.0  # an outage longer than csand is willing to retry
    daemon = world.csand(sync={"max_attempts": 2, "retry_base": 0.05, "retry_cap": 0.1},
                         controlshift={"reconcile_interval": 1.0}).start()
    daemon.wait_drained()
    dead = json.loads(csand(daemon, "dead", "list", "--json").stdout)
    signatures = [d for d in dead if d["source_key"].startswith("signature:")]
    assert signatures
    victim = int(signatures[0]["source_key"].split(":")[1])
    world.cs.delete_signature(victim)  # "this wasn't me", after its item died
    daemon.wait_reconciled(after=time.time())

    world.an.faults.error_rate = 0.0
    retried = csand(daemon, "dead", "retry", "--all")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert f"{len(dead) - 1} item(s) queued again" in retried.stdout
    assert "1 item(s) not queued: their record was deleted on ControlShift" in retried.stdout
    daemon.wait_for(lambda: daemon.counts()["pending"] == 0 and daemon.counts()["in_flight"] == 0
                    and daemon.counts()["dead"] == 1, "the retried items")
    assert daemon.dead() and list(daemon.dead()) == [f"signature:{victim}"]
    world.check()  # the oracle reads ControlShift now: the deleted signature is not in AN
    assert scenario is not None
    assert daemon.terminate()[0] == 0
