"""End-to-end: a large-ish organisation syncs through ``controlshift.source = "bulk"`` with the
real ``csand run`` process: Action Network ends as the rules say, ControlShift sees one request
per poll cycle (and the event list) whatever the number of petitions, and a ``kill -9`` in the middle of the nightly
signatures file loses and duplicates nothing (issue #11)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.harness import World, make_world
from tests.e2e.test_webhooks_e2e import free_port

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-bulk-source-0123456789"


@pytest.fixture
def world(tmp_path: Path):
    yield from make_world(tmp_path, webhook_retry_delays=(0.05,))


def test_a_large_organisation_syncs_from_the_exports_and_survives_a_crash_mid_file(
        world: World) -> None:
    world.populate(petitions=300, signatures=1200, existing_in_an=0.2, seed=21)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    exports = world.serve_exports(compression="none")
    world.cs.add_webhook_endpoint(f"{base}/webhooks/controlshift", SECRET)
    daemon = world.csand(
        controlshift={"source": "bulk", "poll_interval": 0.5, "webhook_secret": SECRET,
                      "webhook_url": f"{base}/webhooks/controlshift"},
        action_network={"requests_per_second": 400.0},
        sync={"workers": 8},
        http={"listen": f"127.0.0.1:{port}"},
    ).start()
    daemon.wait_for(lambda: daemon.meta("backfill_done") == "1", "the first cycle")

    def files_done() -> bool:
        (counts,) = daemon.query(
            "SELECT COUNT(*), SUM(status IN ('done', 'skipped')) FROM bulk_files") or [(0, 0)]
        return counts[0] == len(exports.exports) and counts[1] == counts[0]

    def synced() -> bool:
        c = daemon.counts()
        return (files_done() and daemon.query("SELECT COUNT(*) FROM bulk_parked") == [(0,)]
                and c["pending"] == 0 and c["in_flight"] == 0)

    # The first nightly export brings everything: no petition is walked.
    world.cs.reset_stats()
    exports.export_full_all()
    daemon.wait_for(synced, "the nightly export synced")
    world.check()
    assert daemon.query("SELECT COUNT(*) FROM bulk_parked") == [(0,)]
    routes = world.cs.stats()["by_route"]
    assert not [r for r in routes if "petitions" in r and "{slug}" not in r], routes
    assert not [r for r in routes if "signatures" in r], routes

    # ControlShift's request rate: per cycle, the organisation and the (short) event list,
    # whatever the 300 petitions.
    world.cs.reset_stats()
    started = time.monotonic()
    time.sleep(3.0)
    stats = world.cs.stats()
    cycles = (time.monotonic() - started) / 0.5
    assert stats["requests"] <= 2 * (cycles + 1), stats
    assert set(stats["by_route"]) <= {"GET /api/v1/organisation", "GET /api/v1/events"}, stats

    # New signatures and late opt-ins whose webhooks are lost: a slow nightly signatures
    # file brings them; csand is killed in the middle of it and started again.
    world.cs.close()  # no delivery: the webhooks of these changes are lost
    petitions = [p for p in world.cs.petitions() if p["launched"]]
    for n in range(60):
        world.cs.add_signature(petitions[n % len(petitions)]["slug"], email=f"late{n}@x.org",
                               first_name="Late", last_name=f"Signer{n}",
                               join_organisation=n % 2 == 0)
    synced_once = {key for (key,) in daemon.query(
        "SELECT source_key FROM outbox WHERE kind = 'signature' AND status = 'done' "
        "GROUP BY source_key HAVING COUNT(*) = 1")}
    late_opt_ins = [s["id"] for s in world.cs.signatures()
                    if s["join_organisation"] is not True and not s["deleted_at"]
                    and f"signature:{s['id']}" in synced_once][:40]
    assert len(late_opt_ins) == 40
    for sid in late_opt_ins:
        world.cs.update_signature(sid, join_organisation=True)
    world.cs.lose_queued_webhooks()
    world.cs.enable_webhook_endpoint(world.cs.webhook_endpoints()[0]["id"])
    assert world.cs.wait_webhooks_idle(10)
    exports.storage.chunk_size = 4096
    exports.storage.chunk_delay = 0.01
    full = exports.export_full("signatures")
    assert full.rows > 1000

    def mid_file() -> bool:
        rows = daemon.query("SELECT status, rows_done FROM bulk_files WHERE table_name = "
                            "'signatures' AND kind = 'full' ORDER BY id DESC LIMIT 1")
        return bool(rows) and rows[0][0] == "processing" and 0 < rows[0][1] < full.rows

    daemon.wait_for(mid_file, "the nightly signatures file half read", timeout=60)
    daemon.kill9()
    exports.storage.chunk_delay = 0.0
    daemon.start()
    daemon.wait_for(synced, "the nightly file finished after the restart")
    world.check()
    done = [e for e in daemon.log_events() if e.get("event") == "bulk.file_done"
            and e.get("table") == "signatures" and e.get("kind") == "full"]
    assert done[-1]["resumed_after"] and done[-1]["rows"] == full.rows
    # One item per version: every late opt-in once, every new signature once.
    assert daemon.query("SELECT source_key, COUNT(*) FROM outbox WHERE source_key IN ("
                        + ",".join(f"'signature:{sid}'" for sid in late_opt_ins)
                        + ") GROUP BY source_key HAVING COUNT(*) <> 2") == []
    assert daemon.query("SELECT COUNT(*) FROM outbox WHERE payload LIKE '%late%@x.org%'") == [
        (60,)]
    assert daemon.terminate()[0] == 0
