"""End-to-end: the real ``csand run`` process receiving signed webhooks from simulated ControlShift."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from csand.controlshift.webhooks import SIGNATURE_HEADER, sign
from tests.e2e.harness import World, make_world

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-abcdef123456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def world(tmp_path: Path):
    yield from make_world(tmp_path, webhook_retry_delays=(0.05,), webhook_duplicate_rate=0.3)


def test_webhooks_sync_in_real_time_and_apply_unsubscribe_rules(world: World) -> None:
    scenario = world.populate(petitions=3, signatures=30, existing_in_an=0.3, seed=21)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A long poll interval: anything that lands quickly came through the webhook.
    daemon = world.csand(
        controlshift={"poll_interval": 60.0, "webhook_secret": SECRET,
                      "webhook_url": f"{base}/webhooks/controlshift"},
        http={"listen": f"127.0.0.1:{port}"},
    ).start()
    daemon.wait_for(lambda: daemon.meta("backfill_done") == "1" and daemon.counts()["pending"] == 0
                    and daemon.counts()["in_flight"] == 0, "the backfill")
    world.check()
    world.cs.add_webhook_endpoint(f"{base}/webhooks/controlshift", SECRET)

    # A new signature arrives by webhook and reaches AN well before the next poll.
    slug = next(p["slug"] for p in world.cs.petitions() if p["launched"])
    sent = time.monotonic()
    world.cs.add_signature(slug, email="fresh@example.org", first_name="Fen",
                           join_organisation=True)
    wait_until(lambda: (world.an.person("fresh@example.org") or {}).get("status") == "subscribed",
               "the webhook's signature in AN", timeout=10)
    assert time.monotonic() - sent < 5

    # A late confirmation by webhook: the person becomes subscribed then.
    quiet = world.cs.add_signature(slug, email="quiet@example.org", join_organisation=None)
    wait_until(lambda: world.an.person("quiet@example.org") is not None, "the quiet signer")
    assert world.an.person("quiet@example.org")["status"] == "unsubscribed"
    world.cs.confirm_signature(quiet["id"])
    wait_until(lambda: world.an.person("quiet@example.org")["status"] == "subscribed",
               "the confirmation")

    # Org-wide unsubscribe: the AN person becomes unsubscribed; never creates anyone.
    subscribed = next(p for p in world.an.people() if p["status"] == "subscribed"
                      and p["email"] != "fresh@example.org")
    world.cs.add_unsubscribe(subscribed["email"], organisation=True,
                             unsubscribable_type="Organisation")
    world.cs.add_unsubscribe("stranger@example.org", organisation=True,
                             unsubscribable_type="Organisation")
    # A single-petition unsubscribe changes nothing.
    world.cs.add_unsubscribe("fresh@example.org", organisation=False,
                             unsubscribable_type="Signature")
    wait_until(lambda: world.an.person(subscribed["email"])["status"] == "unsubscribed",
               "the org-wide unsubscribe")
    assert world.cs.wait_webhooks_idle(10)
    daemon.wait_for(lambda: daemon.counts()["pending"] == 0 and daemon.counts()["in_flight"] == 0,
                    "the queue to drain")
    assert world.an.person("stranger@example.org") is None
    assert world.an.person("fresh@example.org")["status"] == "subscribed"

    # Forged webhooks are refused and change nothing.
    forged = json.dumps({"type": "unsubscribe.created", "jid": "forged", "data": {
        "id": 999, "email": "fresh@example.org", "unsubscribe_organisation": True,
        "unsubscribable_type": "Organisation", "created_at": "2026-11-01T00:00:00Z"}}).encode()
    response = httpx.post(f"{base}/webhooks/controlshift", content=forged,
                          headers={SIGNATURE_HEADER: sign(forged, "not-the-secret")})
    assert response.status_code == 401
    # ... and a correctly signed replay of an event is acknowledged but synced once.
    replay = json.dumps({"type": "signature.created", "jid": "replay-1",
                         "data": world.cs.signatures(slug)[-1]}).encode()
    for _ in range(2):
        assert httpx.post(f"{base}/webhooks/controlshift", content=replay,
                          headers={SIGNATURE_HEADER: sign(replay, SECRET)}).status_code == 200
    assert world.an.person("fresh@example.org")["status"] == "subscribed"

    # Nothing synced twice: one outbox item per signature version, one AN signature each.
    versions = daemon.query("SELECT source_key, COUNT(*) FROM outbox WHERE kind = 'signature' "
                            "GROUP BY source_key HAVING COUNT(*) > 2")
    assert versions == []
    pairs = [(s["petition_uuid"], s["person_uuid"]) for s in world.an.signatures()]
    assert len(pairs) == len(set(pairs))

    health = httpx.get(f"{base}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'csand_webhooks_total{result="accepted"}' in metrics
    assert 'csand_webhooks_total{result="rejected"}' in metrics
    assert "csand_an_requests_total" in metrics and "csand_poll_cycle_seconds" in metrics
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "csand", "status", "--json", "--config", str(daemon.config)],
        capture_output=True, text=True, check=True).stdout)
    assert status["webhooks_received"] > 0 and status["webhooks_failed"] == 0
    assert daemon.terminate()[0] == 0
    assert scenario is not None


def test_disabled_webhook_endpoint_is_reported(world: World) -> None:
    world.populate(petitions=2, signatures=5, seed=2)
    port = free_port()
    dead_url = "http://127.0.0.1:9/webhooks/controlshift"  # nothing listens there
    world.cs.add_webhook_endpoint(dead_url, SECRET)
    world.cs.webhook_retry_delays = (0.0,)
    world.cs.add_signature(next(p["slug"] for p in world.cs.petitions() if p["launched"]),
                           email="x@example.org", join_organisation=True)
    assert world.cs.wait_webhooks_idle(10)
    assert world.cs.webhook_endpoints()[0]["disabled_at"]
    daemon = world.csand(
        controlshift={"webhook_secret": SECRET, "webhook_url": dead_url,
                      "webhook_check_interval": 0.5},
        http={"listen": f"127.0.0.1:{port}"},
    ).start()
    daemon.wait_for(lambda: daemon.meta("webhook_endpoint") is not None
                    and json.loads(daemon.meta("webhook_endpoint")).get("disabled_at"),
                    "the endpoint check")
    health = httpx.get(f"http://127.0.0.1:{port}/healthz")
    assert health.status_code == 503
    assert any("disabled" in r for r in health.json()["reasons"])
    assert any(e.get("event") == "webhook.endpoint_unhealthy" for e in daemon.log_events())
    human = subprocess.run(
        [sys.executable, "-m", "csand", "status", "--config", str(daemon.config)],
        capture_output=True, text=True)
    assert human.returncode == 3 and "DISABLED" in human.stdout
    assert daemon.terminate()[0] == 0
