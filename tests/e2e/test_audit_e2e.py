"""End-to-end: ``csand audit`` as its own process beside a running ``csand run`` on one SQLite
store. The daemon leaves the audit its announced share of AN's rate; the audit finds what was
damaged in AN, and ``--repair`` hands it to the running daemon, which puts it right."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from csand.ratelimit import HONOURED_KEY, RESERVATION_KEY, Reservation
from tests.e2e.harness import Csand, World

pytestmark = pytest.mark.e2e


def audit(daemon: Csand, *args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "csand", "audit", "--config",
                           str(daemon.config), "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def test_audit_beside_the_running_daemon_finds_and_repairs(world: World) -> None:
    world.populate(petitions=3, signatures=20, not_opted_in=0.4, seed=21)
    daemon = world.csand(audit={"an_share": 0.9, "cs_share": 1.0}).start()
    daemon.wait_drained()
    world.check()

    started = time.time()
    code, clean = audit(daemon)
    assert code == 0 and clean["checked"] >= 20 and not clean["findings"]
    # The daemon left the share the audit announced (at its heartbeat), and the audit took it
    # back when it ended.
    assert float(daemon.meta(HONOURED_KEY) or 0) > started
    assert Reservation.from_meta(daemon.meta(RESERVATION_KEY)) is None
    assert clean["an_rate"] == pytest.approx(50 * 0.9 * 0.97)

    signers = [e for (e,) in daemon.query(
        "SELECT DISTINCT person_key FROM outbox WHERE kind = 'signature' AND status = 'done'")]
    world.an.remove_tagging(signers[0], "controlshift-petition-signer")
    world.an.delete_person(signers[1])
    code, damaged = audit(daemon, "--repair")
    assert code == 1
    assert {(f["kind"]) for f in damaged["findings"]} == {"tag_missing", "person_missing"}
    assert damaged["repair"]["queued"] >= 2
    daemon.wait_drained()
    code, after = audit(daemon)
    assert code == 0, after["findings"]
    assert daemon.terminate()[0] == 0
