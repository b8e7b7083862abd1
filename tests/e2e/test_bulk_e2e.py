"""End-to-end: org-wide unsubscribes whose webhook was lost reach Action Network from the bulk
data exports, through the real ``csand run`` process (issue #11)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import World, make_world
from tests.e2e.test_webhooks_e2e import free_port, wait_until

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-bulk-0123456789"


@pytest.fixture
def world(tmp_path: Path):
    yield from make_world(tmp_path, webhook_retry_delays=(0.05,))


def test_unsubscribes_whose_webhook_was_lost_arrive_by_export(world: World) -> None:
    world.populate(petitions=2, signatures=12, existing_in_an=0.3, seed=11)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    exports = world.serve_exports()
    # A long poll interval: what reaches AN quickly came by webhook or export.
    daemon = world.csand(
        controlshift={"poll_interval": 60.0, "webhook_secret": SECRET,
                      "webhook_url": f"{base}/webhooks/controlshift"},
        http={"listen": f"127.0.0.1:{port}"},
    ).start()
    daemon.wait_for(lambda: daemon.meta("backfill_done") == "1" and daemon.counts()["pending"] == 0
                    and daemon.counts()["in_flight"] == 0, "the backfill")
    exports.export_incremental()  # what the backfill already read: no endpoint yet, no webhook
    ann, bob = [p["email"] for p in world.an.people() if p["status"] == "subscribed"][:2]

    # (a) The unsubscribe.created webhook is lost (emitted before csand's endpoint exists); the
    # minute's incremental export brings it.
    world.cs.add_unsubscribe(ann, organisation=True, unsubscribable_type="Organisation")
    world.cs.add_webhook_endpoint(f"{base}/webhooks/controlshift", SECRET)
    exports.export_incremental()
    wait_until(lambda: world.an.person(ann)["status"] == "unsubscribed",
               "the unsubscribe from the incremental export", timeout=20)

    # (b) Lost again, and the incremental file expired before csand could read it: the
    # nightly full export brings it.
    world.cs.close()  # stop delivering: the next unsubscribe's webhook is never sent
    world.cs.add_unsubscribe(bob, organisation=True, unsubscribable_type="Organisation")
    assert world.cs.lose_queued_webhooks() == 1
    world.cs.enable_webhook_endpoint(world.cs.webhook_endpoints()[0]["id"])  # delivery resumes
    assert world.cs.wait_webhooks_idle(10)
    exports.lifetime = timedelta(0)
    (expired,) = exports.export_incremental()
    assert expired.table == "unsubscribes"
    daemon.wait_for(lambda: daemon.query(
        "SELECT COUNT(*) FROM bulk_files WHERE status = 'expired'") == [(1,)],
        "the expired file recorded")
    assert world.an.person(bob)["status"] == "subscribed"
    exports.lifetime = timedelta(hours=6)
    before = time.time()
    exports.export_full_all()
    wait_until(lambda: world.an.person(bob)["status"] == "unsubscribed",
               "the unsubscribe from the nightly export", timeout=20)
    daemon.wait_for(lambda: daemon.counts()["pending"] == 0 and daemon.counts()["in_flight"] == 0,
                    "the queue to drain")

    # One item per unsubscribe; the other tables' files were recorded, never downloaded.
    assert daemon.query("SELECT source_key, COUNT(*) FROM outbox WHERE kind = "
                        "'global_unsubscribe' GROUP BY source_key HAVING COUNT(*) > 1") == []
    assert [k.rsplit("/", 1)[-1].split("_")[0] for k, status in exports.storage.requests
            if status == 200] == ["unsubscribes", "unsubscribes"]
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "csand", "status", "--json", "--config", str(daemon.config)],
        capture_output=True, text=True, check=True).stdout)
    bulk = status["bulk"]
    assert bulk["expired"] == 1 and bulk["newest_expired"]["table"] == "unsubscribes"
    assert bulk["last_full_unsubscribes"]["reconciled_at"] >= time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(before - 1))
    assert bulk["failed"] == 0 and bulk["waiting"] == 0
    human = subprocess.run(
        [sys.executable, "-m", "csand", "status", "--config", str(daemon.config)],
        capture_output=True, text=True)
    assert "unsubscribes reconciled" in human.stdout and "expired" in human.stdout
    metrics = httpx.get(f"{base}/metrics").text
    assert 'csand_bulk_files_total{outcome="expired",table="unsubscribes"} 1.0' in metrics
    assert daemon.terminate()[0] == 0
