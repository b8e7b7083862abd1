"""``csand audit`` figures: a simulated organisation of 5,000 petitions synced by the daemon,
then ``csand audit --sample N`` as a child process against AN's real 4 requests/second (the
simulator enforces it) at the audit's default share, first on a clean AN, then on a deliberately
damaged one.

Run ``python bench/audit_bench.py [--petitions 5000] [--signatures 15000] [--sample 500]``.
The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from csand import config as config_mod
from csand import logs
from csand.daemon import Daemon
from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import populate
from csand.sim.server import ServedApp

CS_KEY = "cs-bench-key"
AN_KEY = "an-bench-key"


def settings(cs_url: str, an_url: str, db: Path, an_rate: float) -> dict[str, Any]:
    return {
        "controlshift": {"url": cs_url, "api_key": CS_KEY, "poll_interval": 1.0,
                         "reconcile_interval": 36000.0, "requests_per_minute": 1e6},
        "action_network": {"url": f"{an_url}/api/v2", "api_key": AN_KEY,
                           "requests_per_second": an_rate},
        "sync": {"workers": 8, "retry_base": 0.2, "retry_cap": 2.0},
        "store": {"path": str(db)},
        "log": {"level": "warning", "format": "json"},
    }


async def sync(conf: dict[str, Any]) -> float:
    started = time.monotonic()
    logs.configure("warning", "json", stream=io.StringIO())
    daemon = Daemon(config_mod.Settings.model_validate(conf))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        assert daemon.store is not None and daemon.poller is not None
        while True:
            await anyio.sleep(1.0)
            counts = await daemon.store.counts()
            if daemon.poller.cycles >= 1 and not counts["pending"] and not counts["in_flight"]:
                break
        daemon.request_stop()
    return time.monotonic() - started


def toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def audit(conf: dict[str, Any], tmp: Path, *args: str) -> tuple[int, dict[str, Any], float]:
    path = tmp / "audit.toml"
    path.write_text(toml(conf), encoding="utf-8")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "csand", "audit", "--config", str(path),
                           "--json", *args], capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    try:
        return done.returncode, json.loads(done.stdout), seconds
    except ValueError:
        raise SystemExit(f"audit failed ({done.returncode}): {done.stderr[-2000:]}") from None


def damage(an: ActionNetworkSim, db: Path, rng: random.Random) -> dict[str, int]:
    """Remove the signer tag of 5% of the signers, a signature of 2%, erase 1% of the people,
    subscribe 20 people csand left unsubscribed who never opted in, delete 10 mirrored
    petitions and copy 3."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    signers = conn.execute(
        "SELECT DISTINCT o.person_key, p.an_uuid FROM outbox o JOIN cs_petitions p "
        "ON p.cs_id = o.petition_id WHERE o.kind = 'signature' AND o.status = 'done'"
    ).fetchall()
    never = [e for (e,) in conn.execute(
        "SELECT email FROM an_people WHERE opted_in_at IS NULL AND unsubscribed_at IS NULL")]
    petitions = [u for (u,) in conn.execute(
        "SELECT an_uuid FROM cs_petitions WHERE an_uuid IS NOT NULL")]
    conn.close()
    rng.shuffle(signers)
    n = len(signers)
    done = {"tags_removed": 0, "signatures_deleted": 0, "people_erased": 0,
            "subscribed_without_opt_in": 0, "petitions_deleted": 0, "petitions_copied": 0}
    touched: set[str] = set()
    gone_petitions = set(rng.sample(petitions, 10))
    for email, _ in signers[: n // 20]:
        if email not in touched and an.person(email):
            try:
                an.remove_tagging(email, "controlshift-petition-signer")
            except KeyError:
                continue
            touched.add(email)
            done["tags_removed"] += 1
    for email, petition in signers[n // 20: n // 20 + n // 50]:
        if email not in touched and petition not in gone_petitions:
            try:
                an.delete_signature(email, petition)
            except KeyError:
                continue
            touched.add(email)
            done["signatures_deleted"] += 1
    for email, _ in signers[n // 20 + n // 50: n // 20 + n // 50 + n // 100]:
        if email not in touched and an.person(email):
            an.delete_person(email)
            touched.add(email)
            done["people_erased"] += 1
    for email in never:
        person = an.person(email)
        if email not in touched and person and person["status"] == "unsubscribed":
            an.set_status(email, "subscribed")
            touched.add(email)
            done["subscribed_without_opt_in"] += 1
            if done["subscribed_without_opt_in"] == 20:
                break
    for uuid in gone_petitions:
        an.delete_petition(uuid)
        done["petitions_deleted"] += 1
    for p in rng.sample([p for p in an.petitions()], 3):
        an.add_petition(p["title"], origin_system=p["origin_system"])
        done["petitions_copied"] += 1
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--petitions", type=int, default=5000)
    parser.add_argument("--signatures", type=int, default=15000)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--skip-clean", action="store_true")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="csand-audit-bench-") as scratch:
        tmp = Path(scratch)
        cs = ControlShiftSim(api_key=CS_KEY, page_size=100, requests_per_minute=None)
        an = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)
        t = time.monotonic()
        scenario = populate(cs, an, petitions=args.petitions, signatures=args.signatures,
                            not_opted_in=0.3, existing_in_an=0.2, unlaunched=10, seed=11)
        figures["generated_s"] = round(time.monotonic() - t, 1)
        figures["scenario"] = scenario.summary()
        with ServedApp(cs.app) as cs_served, ServedApp(an.app) as an_served:
            db = tmp / "csand.db"
            figures["sync_s"] = round(anyio.run(sync, settings(
                cs_served.url, an_served.url, db, 5000.0), backend="asyncio"), 1)
            print(f"synced in {figures['sync_s']} s: {scenario.summary()}", flush=True)
            an.requests_per_second = 4.0  # AN's real limit from here on
            conf = settings(cs_served.url, an_served.url, db, 4.0)
            if not args.skip_clean:
                code, report, seconds = audit(conf, tmp, "--sample", str(args.sample))
                figures["clean"] = {"exit": code, "wall_s": round(seconds, 1), **{
                    k: report[k] for k in ("checked", "an_requests", "cs_requests",
                                           "an_requests_per_activity", "an_rate", "by_kind",
                                           "skipped")}}
                print(f"clean: {figures['clean']}", flush=True)
            figures["damage"] = damage(an, db, random.Random(3))
            print(f"damage: {figures['damage']}", flush=True)
            an.reset_stats()
            code, report, seconds = audit(conf, tmp, "--sample", str(args.sample))
            figures["damaged"] = {"exit": code, "wall_s": round(seconds, 1), **{
                k: report[k] for k in ("checked", "an_requests", "cs_requests",
                                       "an_requests_per_activity", "an_rate", "by_kind",
                                       "skipped")}}
            figures["damaged"]["sim_429s"] = an.stats()["rate_limited"]
            print(f"damaged: {figures['damaged']}", flush=True)
        cs.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
