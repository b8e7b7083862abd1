"""csand benchmark: the real daemon against the built-in simulators, served on loopback.

Run ``python bench/bench.py [--quick]``. Seven measurements, each checked against the sync rules
with :func:`csand.sim.verify.compare` (a warning is printed when AN's end state is wrong):

1. AN requests per synced action on a realistic mix, next to a naive client's count.
2. Achieved AN request rate vs the configured 4 req/s while draining a backlog, 429s counted
   (plus a run against a stricter AN bucket, ``burst=1``).
3. Engine capacity with the rate limit lifted: actions/s over the drain of a backlog that
   csand's own poller queued beforehand (so the figure is the dispatcher's, not the CS walk's),
   in-process with 8 and 4 workers and as a ``csand run`` child process, whose peak RSS
   (VmHWM) is the memory figure since it excludes the simulators.
4. Latency of one new signature while idle (``poll_interval = 2 s``): p50/p95/max.
5. The same for a signature pushed by a signed webhook (polling an hour away).
6. PostgreSQL (a throwaway server started here, or ``--pg-url``): capacity of one and of two
   ``csand run`` instances on one database with the AN limit lifted; two instances sharing
   AN's real 4 req/s limit; failover time after ``kill -9`` of the leader.
7. ControlShift cost by organisation size (1,000, 5,000 and 20,000 petitions, the CS simulator
   at 25 a page and 1000 requests/minute): requests per idle poll cycle and per minute, a sweep's
   requests and its duration at the poll budget, new-signature latency by polling and webhook.

csand logs (JSON, level warning) go to a temporary file; a summary of what it logged is printed.
The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import random
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg

from csand import config as config_mod
from csand import logs
from csand.controlshift.bulksource import BulkSource
from csand.controlshift.client import ControlShiftClient
from csand.controlshift.ingest import BulkIngest, TableHandlers
from csand.controlshift.poller import Poller
from csand.daemon import Daemon
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import SIGNATURE, ActionNetworkSim
from csand.sim.controlshift import WEBHOOK_SIGNATURE_HEADER, ControlShiftSim, webhook_signature
from csand.sim.exports import BulkExports, StorageSim
from csand.sim.scenario import Scenario, populate, unsyncable_reason
from csand.sim.server import ServedApp
from csand.sim.verify import compare
from csand.storage import open_store

DRAIN_TIMEOUT = 600.0
STEADY_MARGIN = 2.0  # seconds excluded at each end of the drain for the steady rate

FIGURES: dict[str, Any] = {}
WARNINGS: list[str] = []


# --------------------------------------------------------------------------- helpers


def say(text: str = "") -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    WARNINGS.append(text)
    say(f"  WARNING: {text}")


def row(label: str, value: str, note: str = "") -> None:
    say(f"  {label:<44} {value:>14}  {note}".rstrip())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def make_settings(
    cs_url: str, cs: ControlShiftSim, an_url: str, an: ActionNetworkSim, db: Path, *,
    an_rate: float, workers: int = 4, poll_interval: float = 2.0,
) -> config_mod.Settings:
    return config_mod.Settings.model_validate(settings_dict(
        cs_url, cs, an_url, an, db, an_rate=an_rate, workers=workers,
        poll_interval=poll_interval,
    ))


def settings_dict(
    cs_url: str, cs: ControlShiftSim, an_url: str, an: ActionNetworkSim, db: Path, *,
    an_rate: float, workers: int = 4, poll_interval: float = 2.0,
) -> dict[str, dict[str, Any]]:
    return {
        "controlshift": {"url": cs_url, "api_key": cs.api_key, "poll_interval": poll_interval,
                         "reconcile_interval": 3600.0},
        "action_network": {"url": f"{an_url}/api/v2", "api_key": an.api_key,
                           "requests_per_second": an_rate},
        "sync": {"workers": workers, "retry_base": 0.5, "retry_cap": 5.0},
        "store": {"path": str(db)},
    }


def check(scenario: Scenario, an: ActionNetworkSim, what: str) -> bool:
    """compare() the AN end state with the oracle; warn on any difference."""
    result = compare(scenario, an)
    bad = (len(result["problems"]) + result["duplicate_petitions"]
           + result["duplicate_signatures"])
    if bad:
        warn(f"{what}: AN end state does not match the rules: {len(result['problems'])} "
             f"problems, {result['wrongly_subscribed']} wrongly subscribed, "
             f"{result['duplicate_petitions']} duplicate petitions, "
             f"{result['duplicate_signatures']} duplicate signatures; first: "
             f"{result['problems'][:3]}")
    return not bad


def _connect(db: Path | str) -> Any:
    """A read-only SQLite connection, or an autocommit psycopg one for a ``postgresql://`` URL."""
    if is_pg(db):
        return psycopg.connect(str(db), autocommit=True)
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def is_pg(db: Path | str) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql:", "postgres:"))


def _outbox_figures_on(conn: Any) -> dict[str, Any]:
    counts = dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
    first, last = conn.execute(
        "SELECT MIN(finished_at), MAX(finished_at) FROM outbox WHERE status = 'done'"
    ).fetchone()
    return {"counts": counts, "first": first, "last": last}


def outbox_figures(db: Path | str) -> dict[str, Any]:
    """Counts and first/last finish time of the done items, read from csand's database."""
    conn = _connect(db)
    try:
        return _outbox_figures_on(conn)
    except (sqlite3.OperationalError, psycopg.Error):
        return {"counts": {}, "first": None, "last": None}
    finally:
        conn.close()


def quarter_rates(db: Path | str) -> tuple[float, float]:
    """actions/s over the first and over the last quarter of the done items (by finish time)."""
    conn = _connect(db)
    try:
        times = [t for (t,) in conn.execute(
            "SELECT finished_at FROM outbox WHERE status = 'done' ORDER BY finished_at")]
    finally:
        conn.close()
    q = len(times) // 4
    if q < 2:
        return 0.0, 0.0
    return (q / max(1e-9, times[q] - times[0]), q / max(1e-9, times[-1] - times[-1 - q]))


def drain_rate(fig: dict[str, Any]) -> tuple[float, float]:
    """(actions/s from the first item done to the last, that span in seconds)."""
    done = fig["counts"].get("done", 0)
    if not done or fig["first"] is None:
        return 0.0, 0.0
    span = max(1e-9, fig["last"] - fig["first"])
    return (done - 1) / span, span


def naive_requests(cs: ControlShiftSim) -> tuple[int, int]:
    """(requests, actions) of a naive client: per action a lookup, an upsert, one tagging per
    tag and a signature; plus one petition creation per launched petition."""
    requests = actions = 0
    for p in cs.petitions():
        if not p["launched"]:
            continue
        requests += 1  # create the mirrored petition
        n_tags = 1 + len(p["categories"])  # role tag + category tags
        c = p["creator"] or {}
        if unsyncable_reason(c.get("email"), c.get("first_name"), c.get("last_name")) is None:
            actions += 1
            requests += 3 + n_tags
        for s in cs.signatures(p["slug"]):
            if s["deleted_at"] or unsyncable_reason(
                s["email"], s["first_name"], s["last_name"], s["postcode"]
            ):
                continue
            actions += 1
            requests += 3 + n_tags
    return requests, actions


async def run_daemon(settings: config_mod.Settings,
                     body: Callable[[Daemon], Awaitable[Any]]) -> tuple[Daemon, Any]:
    """Run the daemon in this process while ``body`` watches it; stop it when body returns."""
    daemon = Daemon(settings)
    result: Any = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        try:
            result = await body(daemon)
        finally:
            daemon.request_stop()
    return daemon, result


async def wait_drained(daemon: Daemon, limit: float = DRAIN_TIMEOUT) -> dict[str, int]:
    """Until the first poll cycle has finished and nothing is pending or in flight.

    The queue is watched through a separate read-only connection with an index-only query, so
    the watching neither queues behind nor holds csand's writer connection.
    """
    assert daemon.poller is not None
    db = Path(daemon.settings.store.path)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        with anyio.fail_after(limit):
            while True:
                await anyio.sleep(0.1)
                if daemon.poller.cycles < 1:
                    continue
                busy = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE status = 'pending') "
                    "OR EXISTS (SELECT 1 FROM outbox WHERE status = 'in_flight')"
                ).fetchone()[0]
                if not busy:
                    break
    finally:
        conn.close()
    return outbox_figures(db)["counts"]


async def prefill(cs_url: str, cs: ControlShiftSim, db: Path | str,
                  instance: str | None = None) -> float:
    """Queue the whole backlog with csand's own poller (one backfill cycle, CS limit lifted)
    into a SQLite file or a PostgreSQL database (``instance``: the name it opens it under)."""
    started = time.monotonic()
    store = await open_store(db, **({"instance": instance} if instance else {}))
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            client = ControlShiftClient(http, cs_url, api_key=cs.api_key,
                                        limiter=TokenBucket(100000.0))
            await Poller(client, store).cycle()
    finally:
        await store.close()
    return time.monotonic() - started


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- 1. requests/action


def bench_requests_per_action(tmp: Path, quick: bool) -> None:
    signatures = 600 if quick else 2000
    say(f"\n[1] AN requests per synced action (petitions=20, signatures={signatures}, "
        "30% not opted in, 20% already in AN; no AN rate limit)")
    cs = ControlShiftSim(seed=1)
    an = ActionNetworkSim(requests_per_second=None, seed=1)
    scenario = populate(cs, an, petitions=20, signatures=signatures, not_opted_in=0.3,
                        existing_in_an=0.2, seed=1)
    an.reset_stats()
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        settings = make_settings(cs_s.url, cs, an_s.url, an, tmp / "m1.db", an_rate=1000.0)
        started = time.monotonic()
        daemon, counts = anyio.run(run_daemon, settings, wait_drained, backend="asyncio")
        elapsed = time.monotonic() - started
    ok = check(scenario, an, "[1]")
    stats = an.stats()
    assert daemon.dispatcher is not None
    done, dead = daemon.dispatcher.stats.done, daemon.dispatcher.stats.dead
    per_action = stats["requests"] / max(1, done)
    naive, naive_actions = naive_requests(cs)
    naive_per_action = naive / max(1, naive_actions)
    if naive_actions != done:
        warn(f"[1] {done} actions synced but the data holds {naive_actions} syncable actions")
    row("synced actions (done / dead)", f"{done} / {dead}", f"in {elapsed:.1f} s")
    row("AN requests (csand)", f"{stats['requests']}",
        f"429s {stats['rate_limited']}, client-side count {daemon.dispatcher.an.requests}")
    row("csand: AN requests per action", f"{per_action:.3f}")
    row("naive: AN requests per action", f"{naive_per_action:.3f}", f"({naive} requests)")
    row("naive / csand", f"{naive_per_action / per_action:.2f}x")
    say("  csand requests by route:")
    for route, n in sorted(stats["by_route"].items(), key=lambda kv: -kv[1]):
        say(f"    {route:<42} {n:>6}  ({n / max(1, done):.3f}/action)")
    FIGURES["requests_per_action"] = {
        "signatures": signatures, "actions_done": done, "dead": dead, "counts": counts,
        "an_requests": stats["requests"], "csand_per_action": round(per_action, 4),
        "naive_requests": naive, "naive_per_action": round(naive_per_action, 4),
        "naive_over_csand": round(naive_per_action / per_action, 3),
        "by_route": stats["by_route"], "rate_limited": stats["rate_limited"],
        "seconds": round(elapsed, 2), "end_state_ok": ok,
    }


def bench_requests_per_attendee(tmp: Path, quick: bool) -> None:
    """1b: the same figure for events: AN requests per host and attendee synced."""
    attendees = 300 if quick else 1500
    say(f"\n[1b] AN requests per synced RSVP (events=20 in 5 calendars, attendees={attendees}, "
        "30% not opted in, 20% already in AN; no AN rate limit)")
    cs = ControlShiftSim(seed=1)
    an = ActionNetworkSim(requests_per_second=None, seed=1, events_api=True)
    scenario = populate(cs, an, petitions=2, signatures=1, unlaunched=0, events=20, calendars=5,
                        attendees=attendees, not_opted_in=0.3, existing_in_an=0.2, seed=1)
    scenario.moderation_known = False  # by polling: REST events show no moderation status
    scenario.host_consent_known = False
    an.reset_stats()
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        settings = make_settings(cs_s.url, cs, an_s.url, an, tmp / "m1b.db", an_rate=1000.0)
        started = time.monotonic()
        daemon, counts = anyio.run(run_daemon, settings, wait_drained, backend="asyncio")
        elapsed = time.monotonic() - started
    ok = check(scenario, an, "[1b]")
    stats = an.stats()
    assert daemon.dispatcher is not None
    done = daemon.dispatcher.stats.done
    rsvps = sum(1 for r in stats["by_route"] if "attendances" in r) and done
    per_rsvp = stats["requests"] / max(1, done)
    row("synced actions (hosts, attendees, 2 signature items)", f"{done}",
        f"in {elapsed:.1f} s")
    row("csand: AN requests per action", f"{per_rsvp:.3f}", "target for an opted-in attendee: 1")
    say("  csand requests by route:")
    for route, n in sorted(stats["by_route"].items(), key=lambda kv: -kv[1]):
        say(f"    {route:<42} {n:>6}  ({n / max(1, done):.3f}/action)")
    FIGURES["requests_per_rsvp"] = {
        "attendees": attendees, "actions_done": done, "counts": counts, "rsvp_items": rsvps,
        "an_requests": stats["requests"], "per_action": round(per_rsvp, 4),
        "by_route": stats["by_route"], "seconds": round(elapsed, 2), "end_state_ok": ok,
    }


# --------------------------------------------------------------------------- 2. rate vs limit


def bench_rate(tmp: Path, *, burst: float | None, name: str, signatures: int,
               target: bool) -> None:
    label = "AN burst default (=4)" if burst is None else f"AN burst={burst:g}"
    say(f"\n[2{name}] Achieved AN rate vs limit 4 req/s, 4 workers, backlog petitions=5, "
        f"signatures={signatures} ({label})")
    cs = ControlShiftSim(seed=2)
    an = ActionNetworkSim(requests_per_second=4.0, burst=burst, seed=2)
    scenario = populate(cs, an, petitions=5, signatures=signatures, seed=2)
    an.reset_stats()
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        settings = make_settings(cs_s.url, cs, an_s.url, an, tmp / f"m2{name}.db",
                                 an_rate=4.0, workers=4)
        started = time.monotonic()
        daemon, _ = anyio.run(run_daemon, settings, wait_drained, backend="asyncio")
        elapsed = time.monotonic() - started
    ok = check(scenario, an, f"[2{name}]")
    stats = an.stats()
    times = sorted(stats["request_times"])
    assert daemon.dispatcher is not None
    first, last = times[0], times[-1]
    lo, hi = first + STEADY_MARGIN, last - STEADY_MARGIN
    steady = [t for t in times if lo <= t < hi]
    window = max(1e-9, hi - lo)
    achieved = len(steady) / window
    overall = (len(times) - 1) / max(1e-9, last - first)
    gaps = [b - a for a, b in zip(steady, steady[1:], strict=False)]
    long_gaps = sum(1 for g in gaps if g > 0.5)
    fraction = achieved / 4.0
    row("synced actions (done / dead)",
        f"{daemon.dispatcher.stats.done} / {daemon.dispatcher.stats.dead}", f"in {elapsed:.1f} s")
    row("accepted AN requests (429s)", f"{len(times)} ({stats['rate_limited']})",
        f"drain {last - first:.1f} s, overall {overall:.2f} req/s")
    note = ""
    if target:
        note = (f"target >= 90%: {verdict(fraction >= 0.9)}; "
                f"429s <= 3: {verdict(stats['rate_limited'] <= 3)}")
    row("steady achieved rate", f"{achieved:.3f} req/s", f"{fraction:.1%} of 4.0  {note}")
    if gaps:
        row("steady inter-request gap p50 / max",
            f"{statistics.median(gaps) * 1000:.0f} / {max(gaps) * 1000:.0f} ms",
            f"{long_gaps} gaps > 500 ms")
    key = "rate" if burst is None else "rate_burst1"
    FIGURES[key] = {
        "signatures": signatures, "sim_burst": burst, "actions_done": daemon.dispatcher.stats.done,
        "accepted_requests": len(times), "rate_limited": stats["rate_limited"],
        "drain_seconds": round(last - first, 2), "steady_window_s": round(window, 2),
        "steady_requests": len(steady), "achieved_rps": round(achieved, 4),
        "fraction_of_limit": round(fraction, 4), "overall_rps": round(overall, 4),
        "gaps_over_500ms": long_gaps,
        "max_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "client_rate_limited": daemon.dispatcher.an.limiter.rate_limited_count,
        "end_state_ok": ok,
    }
    if target:
        FIGURES[key]["pass_rate"] = fraction >= 0.9
        FIGURES[key]["pass_429"] = stats["rate_limited"] <= 3


# --------------------------------------------------------------------------- 3. capacity


def capacity_scenario(signatures: int) -> tuple[ControlShiftSim, ActionNetworkSim, Scenario]:
    cs = ControlShiftSim(seed=3, requests_per_minute=None)
    an = ActionNetworkSim(requests_per_second=None, seed=3)
    scenario = populate(cs, an, petitions=20, signatures=signatures, seed=3)
    return cs, an, scenario


def bench_capacity_inprocess(tmp: Path, signatures: int, workers: int) -> None:
    cs, an, scenario = capacity_scenario(signatures)
    db = tmp / f"m3-w{workers}.db"
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        walk = anyio.run(prefill, cs_s.url, cs, db, backend="asyncio")
        queued = outbox_figures(db)["counts"].get("pending", 0)
        an.reset_stats()
        settings = make_settings(cs_s.url, cs, an_s.url, an, db, an_rate=100000.0,
                                 workers=workers)
        cpu0 = time.process_time()
        started = time.monotonic()
        anyio.run(run_daemon, settings, wait_drained, backend="asyncio")
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu0
    ok = check(scenario, an, f"[3] in-process, {workers} workers")
    fig = outbox_figures(db)
    rate, span = drain_rate(fig)
    q_first, q_last = quarter_rates(db)
    requests = an.stats()["requests"]
    row(f"in-process, {workers} workers: actions/s", f"{rate:.1f}",
        f"{fig['counts'].get('done', 0)} done in {span:.1f} s, {requests / span:.0f} AN req/s; "
        f">= 150: {verdict(rate >= 150)}")
    row("  first / last quarter of the backlog", f"{q_first:.0f} / {q_last:.0f}", "actions/s")
    FIGURES[f"capacity_inprocess_w{workers}"] = {
        "signatures": signatures, "queued": queued, "prefill_walk_s": round(walk, 2),
        "done": fig["counts"].get("done", 0), "dead": fig["counts"].get("dead", 0),
        "drain_s": round(span, 2), "actions_per_s": round(rate, 1),
        "first_quarter_per_s": round(q_first, 1), "last_quarter_per_s": round(q_last, 1),
        "an_requests": requests, "an_requests_per_s": round(requests / max(span, 1e-9), 1),
        "process_cpu_s": round(cpu, 1), "wall_s": round(elapsed, 1),
        "bench_peak_rss_mib_incl_sims": round(peak_rss_mib(), 1), "end_state_ok": ok,
        "pass_150": rate >= 150,
    }


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def bench_capacity_subprocess(tmp: Path, signatures: int, workers: int) -> None:
    cs, an, scenario = capacity_scenario(signatures)
    db = tmp / f"m3-proc-w{workers}.db"
    config = tmp / f"m3-proc-w{workers}.toml"
    log_path = tmp / f"m3-proc-w{workers}.log"
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        anyio.run(prefill, cs_s.url, cs, db, backend="asyncio")
        total = sum(outbox_figures(db)["counts"].values())
        an.reset_stats()
        sections = settings_dict(cs_s.url, cs, an_s.url, an, db, an_rate=100000.0,
                                 workers=workers)
        sections["log"] = {"level": "warning", "format": "json"}
        config.write_text(_toml(sections))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CSAND_")}
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "csand", "run", "--config", str(config)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            rss_max = 0
            cpu_at_first_done: float | None = None
            while True:
                time.sleep(0.1)
                if proc.poll() is not None:
                    raise RuntimeError(f"csand run exited with {proc.returncode}: "
                                       + log_path.read_text()[-2000:])
                rss_max = max(rss_max, int(_proc_status(proc.pid)["VmRSS"].split()[0]))
                counts = outbox_figures(db)["counts"]
                if cpu_at_first_done is None and counts.get("done"):
                    cpu_at_first_done = _proc_cpu_seconds(proc.pid)
                finished = counts.get("done", 0) + counts.get("dead", 0)
                if finished >= total and not counts.get("pending") and not counts.get("in_flight"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"csand run did not drain in time: {counts}")
            status = _proc_status(proc.pid)
            hwm_kib = int(status["VmHWM"].split()[0])
            cpu = _proc_cpu_seconds(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
    if code != 0:
        warn(f"[3] csand run exited with {code} after SIGTERM")
    ok = check(scenario, an, f"[3] csand run, {workers} workers")
    fig = outbox_figures(db)
    rate, span = drain_rate(fig)
    q_first, q_last = quarter_rates(db)
    requests = an.stats()["requests"]
    hwm_mib = hwm_kib / 1024.0
    done = fig["counts"].get("done", 0)
    drain_cpu = cpu - (cpu_at_first_done or 0.0)
    row(f"csand run process, {workers} workers: actions/s", f"{rate:.1f}",
        f"{done} done in {span:.1f} s, csand CPU {drain_cpu:.1f} s "
        f"({drain_cpu / max(span, 1e-9):.0%} of one core, {drain_cpu / max(1, done) * 1000:.1f} "
        f"ms/action); >= 150: {verdict(rate >= 150)}")
    row("  first / last quarter of the backlog", f"{q_first:.0f} / {q_last:.0f}", "actions/s")
    row(f"csand run process, {workers} workers: peak RSS", f"{hwm_mib:.1f} MiB",
        f"VmHWM; <= 150 MB: {verdict(hwm_kib * 1024 <= 150e6)}")
    FIGURES[f"capacity_process_w{workers}"] = {
        "signatures": signatures, "queued": total, "done": fig["counts"].get("done", 0),
        "dead": fig["counts"].get("dead", 0), "drain_s": round(span, 2),
        "actions_per_s": round(rate, 1), "an_requests": requests,
        "first_quarter_per_s": round(q_first, 1), "last_quarter_per_s": round(q_last, 1),
        "csand_cpu_s_total": round(cpu, 2), "csand_cpu_s_drain": round(drain_cpu, 2),
        "peak_rss_mib": round(hwm_mib, 1), "max_sampled_rss_mib": round(rss_max / 1024.0, 1),
        "exit_code": code, "log_events": log_summary(log_path),
        "end_state_ok": ok, "pass_150": rate >= 150, "pass_rss": hwm_kib * 1024 <= 150e6,
    }


# --------------------------------------------------------------------------- 4. latency


async def _latency_samples(daemon: Daemon, cs: ControlShiftSim, an: ActionNetworkSim,
                           samples: int, rng: random.Random) -> list[float]:
    await wait_drained(daemon)
    launched = [p for p in cs.petitions() if p["launched"]]
    mirrored = {
        int(i.rsplit("-", 1)[1]): p["uuid"]
        for p in an.petitions() for i in p["identifiers"] if ":petition-" in i
    }
    latencies: list[float] = []
    for n in range(samples):
        await anyio.sleep(rng.uniform(0.2, 2.4))  # a random phase of the 2 s poll cycle
        petition = rng.choice(launched)
        email = f"latency.sample{n}.{rng.randrange(10**6)}@example.org"
        started = time.monotonic()
        cs.add_signature(petition["slug"], email=email, first_name="Lat", last_name="Ency",
                         postcode="6011", join_organisation=True)
        with anyio.fail_after(60):
            while True:
                person = an.person(email)
                if person is not None and person["status"] == "subscribed" and any(
                    h.get("action") == SIGNATURE
                    and h.get("petition_uuid") == mirrored.get(petition["id"])
                    for h in an.history(email)
                ):
                    break
                await anyio.sleep(0.02)
        latencies.append(time.monotonic() - started)
    await wait_drained(daemon)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[index]


def bench_latency(tmp: Path, quick: bool) -> None:
    samples = 5 if quick else 20
    poll_interval = 2.0
    say(f"\n[4] Latency of a new opted-in signature while idle (poll_interval {poll_interval:g} s, "
        f"AN limit 4 req/s, {samples} samples)")
    cs = ControlShiftSim(seed=4)
    an = ActionNetworkSim(requests_per_second=4.0, seed=4)
    scenario = populate(cs, an, petitions=5, signatures=20, seed=4)
    rng = random.Random(4)
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        settings = make_settings(cs_s.url, cs, an_s.url, an, tmp / "m4.db", an_rate=4.0,
                                 poll_interval=poll_interval)

        async def body(daemon: Daemon) -> list[float]:
            return await _latency_samples(daemon, cs, an, samples, rng)

        _, latencies = anyio.run(run_daemon, settings, body, backend="asyncio")
    ok = check(scenario, an, "[4]")
    p50 = statistics.median(latencies)
    p95 = percentile(latencies, 0.95)
    target = poll_interval + 3.0
    row("latency p50 / p95 / max",
        f"{p50:.2f} / {p95:.2f} / {max(latencies):.2f} s",
        f"p95 <= {target:g} s: {verdict(p95 <= target)}")
    FIGURES["latency"] = {
        "samples": samples, "poll_interval": poll_interval, "p50_s": round(p50, 3),
        "p95_s": round(p95, 3), "max_s": round(max(latencies), 3),
        "all_s": [round(x, 3) for x in latencies], "target_s": target,
        "pass": p95 <= target, "end_state_ok": ok,
    }


def bench_webhook_latency(tmp: Path, quick: bool) -> None:
    """A signature pushed by a signed webhook, until AN has it (the poll is an hour away)."""
    samples = 5 if quick else 20
    say(f"\n[5] Webhook → Action Network latency while idle (poll_interval 3600 s, AN limit "
        f"4 req/s, {samples} samples)")
    cs = ControlShiftSim(seed=5, webhook_retry_delays=(0.2,))
    an = ActionNetworkSim(requests_per_second=4.0, seed=5)
    scenario = populate(cs, an, petitions=5, signatures=20, seed=5)
    rng = random.Random(5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "bench-webhook-secret"
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        data = settings_dict(cs_s.url, cs, an_s.url, an, tmp / "m5.db", an_rate=4.0,
                             poll_interval=3600.0)
        data["controlshift"]["webhook_secret"] = secret
        data["http"] = {"listen": f"127.0.0.1:{port}"}
        settings = config_mod.Settings.model_validate(data)

        async def body(daemon: Daemon) -> list[float]:
            await wait_drained(daemon)
            cs.add_webhook_endpoint(f"http://127.0.0.1:{port}/webhooks/controlshift", secret)
            return await _latency_samples(daemon, cs, an, samples, rng)

        _, latencies = anyio.run(run_daemon, settings, body, backend="asyncio")
    cs.close()
    ok = check(scenario, an, "[5]")
    p50 = statistics.median(latencies)
    p95 = percentile(latencies, 0.95)
    row("latency p50 / p95 / max", f"{p50:.2f} / {p95:.2f} / {max(latencies):.2f} s",
        f"p95 <= 2 s: {verdict(p95 <= 2.0)}")
    FIGURES["webhook_latency"] = {
        "samples": samples, "p50_s": round(p50, 3), "p95_s": round(p95, 3),
        "max_s": round(max(latencies), 3), "target_s": 2.0, "pass": p95 <= 2.0,
        "end_state_ok": ok,
    }


# --------------------------------------------------------------------------- 6. PostgreSQL


def _load_pgserver() -> Any:
    """tests/pgserver.py (throwaway server, fresh databases), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "tests" / "pgserver.py"
    spec = importlib.util.spec_from_file_location("csand_bench_pgserver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PgDatabases:
    """Fresh databases on a PostgreSQL server: one started here (thrown away at the end), or the
    existing one at ``--pg-url`` (an admin URL; the databases made here are dropped again)."""

    def __init__(self, pg_url: str | None) -> None:
        self.pgserver = _load_pgserver()
        self.server: Any = None
        self.base_dir: Path | None = None
        self.admin_url = pg_url
        self.made: list[str] = []
        self.postmaster: int | None = None

    def __enter__(self) -> PgDatabases:
        if self.admin_url is None:
            # Not under the bench's temporary directory: the postgres user must reach it.
            self.base_dir = Path(tempfile.mkdtemp(prefix="csand-bench-pg-"))
            self.server = self.pgserver.PostgresServer(self.base_dir)
            self.admin_url = self.server.start()
            pid_file = self.server.data_dir / "postmaster.pid"
            self.postmaster = int(pid_file.read_text().split()[0])
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        FIGURES.setdefault("pg", {})["server_version"] = version
        FIGURES["pg"]["server"] = "started by the bench" if self.server else "--pg-url"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
            return
        for name in self.made:
            try:
                self.pgserver.drop_database(self.admin_url, name)
            except psycopg.Error as e:
                warn(f"[6] could not drop database {name}: {e}")

    def fresh(self, name: str) -> str:
        name = f"csand_bench_{name}_{os.getpid()}"
        self.pgserver.drop_database(self.admin_url, name)
        self.made.append(name)
        return str(self.pgserver.create_database(self.admin_url, name))

    def server_cpu(self) -> float | None:
        """CPU seconds of the server started here: the postmaster and its reaped children, plus
        its live backends. None for a server at --pg-url."""
        if self.postmaster is None:
            return None
        ticks = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry) == self.postmaster:
                ticks += sum(int(x) for x in fields[11:15])
            elif int(fields[1]) == self.postmaster:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


class CsandProcess:
    """One ``csand run`` child on a PostgreSQL database, named ``name`` in the cluster."""

    def __init__(self, tmp: Path, tag: str, name: str, sections: dict[str, dict[str, Any]],
                 url: str) -> None:
        self.name = name
        sections = {k: dict(v) for k, v in sections.items()}
        sections["store"] = {"url": url, "instance": name}
        sections["log"] = {"level": "warning", "format": "json"}
        config = tmp / f"{tag}-{name}.toml"
        config.write_text(_toml(sections))
        self.log_path = tmp / f"{tag}-{name}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CSAND_", "PG"))}
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "csand", "run", "--config", str(config)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )
        self.pid = self.proc.pid
        self.rss_max_kib = 0
        self.hwm_kib = 0
        self.cpu_s = 0.0
        self.cpu_at_first_done: float | None = None
        self.code: int | None = None

    def sample(self, any_done: bool) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"csand run ({self.name}) exited with {self.proc.returncode}: "
                               + self.log_path.read_text()[-2000:])
        status = _proc_status(self.pid)
        self.rss_max_kib = max(self.rss_max_kib, int(status["VmRSS"].split()[0]))
        self.hwm_kib = int(status["VmHWM"].split()[0])
        self.cpu_s = _proc_cpu_seconds(self.pid)
        if any_done and self.cpu_at_first_done is None:
            self.cpu_at_first_done = self.cpu_s

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.code = self.proc.wait(30)
        return self.code

    def kill9(self) -> None:
        self.proc.kill()
        self.code = self.proc.wait(10)

    def summary(self) -> dict[str, Any]:
        drain_cpu = self.cpu_s - (self.cpu_at_first_done or 0.0)
        return {"peak_rss_mib": round(self.hwm_kib / 1024.0, 1),
                "max_sampled_rss_mib": round(self.rss_max_kib / 1024.0, 1),
                "cpu_s_total": round(self.cpu_s, 2), "cpu_s_drain": round(drain_cpu, 2),
                "exit_code": self.code, "log_events": log_summary(self.log_path)}


def _stop_all(procs: list[CsandProcess], what: str) -> None:
    for p in procs:
        try:
            code = p.stop()
        except subprocess.TimeoutExpired:
            p.kill9()
            code = -9
        if code != 0:
            warn(f"{what}: csand run ({p.name}) exited with {code} after SIGTERM")


def _pg_stats(conn: Any) -> dict[str, int]:
    """The database's committed transactions and rows written per table, so far."""
    stats = dict(conn.execute(
        "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables").fetchall())
    stats["(transactions)"] = conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        "WHERE datname = current_database()").fetchone()[0]
    return stats


def _watch_drain(conn: Any, procs: list[CsandProcess], total: int,
                 pg: PgDatabases | None = None,
                 stats_at_first: dict[str, int] | None = None) -> dict[str, float | None]:
    """Sample the processes every 0.1 s until every queued item is finished and nothing is
    pending or in flight; returns the server's and this process's (the simulators') CPU
    seconds at the first item done (and fills ``stats_at_first`` with :func:`_pg_stats`)."""
    if stats_at_first is None:
        stats_at_first = {}
    deadline = time.monotonic() + DRAIN_TIMEOUT
    at_first: dict[str, float | None] = {}
    while True:
        time.sleep(0.1)
        counts = _outbox_figures_on(conn)["counts"]
        any_done = bool(counts.get("done"))
        if any_done and not at_first:
            at_first = {"server": pg.server_cpu() if pg is not None else None,
                        "bench": time.process_time()}
            if pg is not None:
                stats_at_first.update(_pg_stats(conn))
        for p in procs:
            p.sample(any_done)
        finished = counts.get("done", 0) + counts.get("dead", 0) + counts.get("cancelled", 0)
        if finished >= total and not counts.get("pending") and not counts.get("in_flight"):
            return at_first
        if time.monotonic() > deadline:
            raise RuntimeError(f"csand run did not drain in time: {counts}")


def _done_by_instance(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {str(owner): n for owner, n in conn.execute(
            "SELECT lease_owner, COUNT(*) FROM outbox WHERE status = 'done' "
            "GROUP BY lease_owner ORDER BY lease_owner").fetchall()}


def bench_pg_capacity(pg: PgDatabases, tmp: Path, signatures: int, instances: int,
                      workers: int = 8) -> None:
    cs, an, scenario = capacity_scenario(signatures)
    tag = f"m6a-{instances}i"
    url = pg.fresh(f"m6a_{instances}i")
    names = ["a", "b", "c", "d"][:instances]
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        walk = anyio.run(prefill, cs_s.url, cs, url, "bench-prefill", backend="asyncio")
        total = sum(outbox_figures(url)["counts"].values())
        an.reset_stats()
        sections = settings_dict(cs_s.url, cs, an_s.url, an, tmp / "unused.db",
                                 an_rate=100000.0, workers=workers)
        server_cpu0 = server_cpu1 = None
        stats0: dict[str, int] = {}
        procs: list[CsandProcess] = []
        try:
            procs = [CsandProcess(tmp, tag, name, sections, url) for name in names]
            with psycopg.connect(url, autocommit=True) as conn:
                at_first = _watch_drain(conn, procs, total, pg, stats0)
            server_cpu0, server_cpu1 = at_first["server"], pg.server_cpu()
            bench_cpu = time.process_time() - (at_first["bench"] or 0.0)
        finally:
            _stop_all(procs, f"[6a] {instances} instance(s)")
        time.sleep(0.6)  # the backends' last statistics reach the server
        with psycopg.connect(url, autocommit=True) as conn:
            stats1 = _pg_stats(conn)
    ok = check(scenario, an, f"[6a] PostgreSQL, {instances} csand run instance(s)")
    fig = outbox_figures(url)
    rate, span = drain_rate(fig)
    q_first, q_last = quarter_rates(url)
    requests = an.stats()["requests"]
    done = fig["counts"].get("done", 0)
    by_instance = _done_by_instance(url)
    cpu_drain = sum(p.cpu_s - (p.cpu_at_first_done or 0.0) for p in procs)
    server_cpu = (server_cpu1 - server_cpu0
                  if server_cpu0 is not None and server_cpu1 is not None else None)
    label = "1 instance" if instances == 1 else f"{instances} instances"
    row(f"PostgreSQL, {label} x {workers} workers: actions/s", f"{rate:.1f}",
        f"{done} done in {span:.1f} s, {requests / max(span, 1e-9):.0f} AN req/s; "
        f">= 150: {verdict(rate >= 150)}")
    row("  first / last quarter of the backlog", f"{q_first:.0f} / {q_last:.0f}", "actions/s")
    for p in procs:
        s = p.summary()
        row(f"  instance {p.name}: peak RSS / CPU in drain",
            f"{s['peak_rss_mib']:.1f} MiB",
            f"{s['cpu_s_drain']:.1f} s CPU ({s['cpu_s_drain'] / max(span, 1e-9):.0%} of one "
            f"core), {by_instance.get(p.name, 0)} done; <= 150 MB: "
            f"{verdict(p.hwm_kib * 1024 <= 150e6)}")
    cpu_note = f"csand {cpu_drain / max(1, done) * 1000:.1f} ms/action"
    if server_cpu is not None:
        cpu_note += (f", PostgreSQL server {server_cpu:.1f} s CPU = "
                     f"{server_cpu / max(1, done) * 1000:.1f} ms/action")
    cpu_note += f", simulators (this process) {bench_cpu / max(1, done) * 1000:.1f} ms/action"
    row("  CPU in drain, all csand instances", f"{cpu_drain:.1f} s", cpu_note)
    written = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1}
    per_action = {k: round(v / max(1, done), 2) for k, v in sorted(written.items()) if v}
    row("  PostgreSQL transactions per action", f"{per_action.get('(transactions)', 0):.1f}",
        "rows written per action: " + ", ".join(
            f"{k} {v}" for k, v in per_action.items() if k != "(transactions)")
        + " (from the first item done; includes the bench's own watching, ~20 tx/s)")
    FIGURES.setdefault("pg", {})[f"capacity_{instances}i"] = {
        "signatures": signatures, "instances": instances, "workers_each": workers,
        "queued": total, "prefill_walk_s": round(walk, 2), "done": done,
        "dead": fig["counts"].get("dead", 0), "done_by_instance": by_instance,
        "drain_s": round(span, 2), "actions_per_s": round(rate, 1),
        "first_quarter_per_s": round(q_first, 1), "last_quarter_per_s": round(q_last, 1),
        "an_requests": requests, "an_requests_per_s": round(requests / max(span, 1e-9), 1),
        "csand_cpu_s_drain": round(cpu_drain, 2),
        "csand_cpu_ms_per_action": round(cpu_drain / max(1, done) * 1000, 2),
        "server_cpu_s_drain": None if server_cpu is None else round(server_cpu, 2),
        "simulators_cpu_s_drain": round(bench_cpu, 2),
        "pg_written_per_action": per_action,
        "instances_detail": {p.name: p.summary() for p in procs},
        "end_state_ok": ok, "pass_150": rate >= 150,
        "pass_rss": all(p.hwm_kib * 1024 <= 150e6 for p in procs),
    }


def bench_pg_rate(pg: PgDatabases, tmp: Path, signatures: int) -> None:
    say(f"\n[6b] Two instances sharing AN's limit: AN sim and csand at 4 req/s, 4 workers each, "
        f"queued backlog petitions=5, signatures={signatures}")
    cs = ControlShiftSim(seed=2, requests_per_minute=None)
    an = ActionNetworkSim(requests_per_second=4.0, seed=2)
    scenario = populate(cs, an, petitions=5, signatures=signatures, seed=2)
    url = pg.fresh("m6b")
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        anyio.run(prefill, cs_s.url, cs, url, "bench-prefill", backend="asyncio")
        total = sum(outbox_figures(url)["counts"].values())
        an.reset_stats()
        sections = settings_dict(cs_s.url, cs, an_s.url, an, tmp / "unused.db",
                                 an_rate=4.0, workers=4)
        procs: list[CsandProcess] = []
        started = time.monotonic()
        try:
            procs = [CsandProcess(tmp, "m6b", name, sections, url) for name in ("a", "b")]
            with psycopg.connect(url, autocommit=True) as conn:
                _watch_drain(conn, procs, total)
        finally:
            _stop_all(procs, "[6b]")
        elapsed = time.monotonic() - started
    ok = check(scenario, an, "[6b] PostgreSQL, two instances at 4 req/s")
    stats = an.stats()
    times = sorted(stats["request_times"])
    first, last = times[0], times[-1]
    lo, hi = first + STEADY_MARGIN, last - STEADY_MARGIN
    steady = [t for t in times if lo <= t < hi]
    window = max(1e-9, hi - lo)
    achieved = len(steady) / window
    overall = (len(times) - 1) / max(1e-9, last - first)
    gaps = [b - a for a, b in zip(steady, steady[1:], strict=False)]
    long_gaps = sum(1 for g in gaps if g > 0.5)
    fraction = achieved / 4.0
    by_instance = _done_by_instance(url)
    done = sum(by_instance.values())
    one = FIGURES.get("rate")
    if one is not None:
        ref_fraction, ref_429 = one["fraction_of_limit"], one["rate_limited"]
        ref = f"2a this run: {ref_fraction:.1%}, {ref_429} 429s"
    else:  # bench/README.md's figure for one SQLite instance (measurement 2a)
        ref_fraction, ref_429 = 0.971, 0
        ref = "2a (README, not run now): 97.1%, 0 429s"
    in_band = 0.97 <= fraction <= 1.0
    row("synced actions (done by a / b)",
        f"{by_instance.get('a', 0)} / {by_instance.get('b', 0)}", f"in {elapsed:.1f} s")
    row("accepted AN requests (429s)", f"{len(times)} ({stats['rate_limited']})",
        f"drain {last - first:.1f} s, overall {overall:.2f} req/s")
    row("steady achieved rate, two instances", f"{achieved:.3f} req/s",
        f"{fraction:.1%} of 4.0; 97-100%: {verdict(in_band)}; 429s <= one instance's: "
        f"{verdict(stats['rate_limited'] <= ref_429)}  ({ref})")
    if gaps:
        row("steady inter-request gap p50 / max",
            f"{statistics.median(gaps) * 1000:.0f} / {max(gaps) * 1000:.0f} ms",
            f"{long_gaps} gaps > 500 ms")
    FIGURES.setdefault("pg", {})["shared_rate"] = {
        "signatures": signatures, "queued": total, "done": done, "done_by_instance": by_instance,
        "accepted_requests": len(times), "rate_limited": stats["rate_limited"],
        "drain_seconds": round(last - first, 2), "steady_window_s": round(window, 2),
        "steady_requests": len(steady), "achieved_rps": round(achieved, 4),
        "fraction_of_limit": round(fraction, 4), "overall_rps": round(overall, 4),
        "gaps_over_500ms": long_gaps,
        "max_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "one_instance_fraction": ref_fraction, "one_instance_429": ref_429,
        "one_instance_source": "2a this run" if one is not None else "README",
        "instances_detail": {p.name: p.summary() for p in procs},
        "pass_band": in_band, "pass_429": stats["rate_limited"] <= ref_429, "end_state_ok": ok,
    }


def _leader(conn: Any) -> tuple[str | None, float | None]:
    rows = conn.execute(
        "SELECT holder, until FROM cluster_leader WHERE role = 'poller'").fetchall()
    return (rows[0][0], rows[0][1]) if rows else (None, None)


def _last_poll_at(conn: Any) -> float:
    rows = conn.execute("SELECT value FROM meta WHERE key = 'last_poll_at'").fetchall()
    try:
        return float(rows[0][0]) if rows and rows[0][0] is not None else 0.0
    except ValueError:
        return 0.0


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"[6c] timed out waiting for {what}")
        time.sleep(0.05)


FAILOVER_RATE = 10.0  # AN limit in 6c: slow enough that the backlog outlasts the kills


def bench_pg_failover(pg: PgDatabases, tmp: Path, repeats: int, signatures: int) -> None:
    say(f"\n[6c] Failover: two instances draining a backlog (AN sim and csand at "
        f"{FAILOVER_RATE:g} req/s, 4 workers each, lease_seconds 10, poll_interval 2), "
        f"kill -9 of the leader x {repeats}, petitions=5, signatures={signatures}")
    cs = ControlShiftSim(seed=6, requests_per_minute=None)
    an = ActionNetworkSim(requests_per_second=FAILOVER_RATE, seed=6)
    scenario = populate(cs, an, petitions=5, signatures=signatures, seed=6)
    rng = random.Random(6)
    launched = [p for p in cs.petitions() if p["launched"]]
    url = pg.fresh("m6c")
    results: list[dict[str, Any]] = []
    drained_before_kill = 0
    names = iter("cdefghij")
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        anyio.run(prefill, cs_s.url, cs, url, "bench-prefill", backend="asyncio")
        sections = settings_dict(cs_s.url, cs, an_s.url, an, tmp / "unused.db",
                                 an_rate=FAILOVER_RATE, workers=4, poll_interval=2.0)
        sections["sync"]["lease_seconds"] = 10.0  # the dead leader's leases come back soon
        procs: dict[str, CsandProcess] = {}
        try:
            for name in ("a", "b"):
                procs[name] = CsandProcess(tmp, "m6c", name, sections, url)
            with psycopg.connect(url, autocommit=True) as conn:
                def live() -> set[str]:
                    return {str(r[0]) for r in conn.execute(
                        "SELECT instance FROM cluster_instances").fetchall()}

                start = time.time()
                _wait_for("a leader's first poll", lambda: _leader(conn)[0] in procs
                          and _last_poll_at(conn) > start)
                for rep in range(repeats):
                    alive = {n for n, p in procs.items() if p.proc.poll() is None}
                    _wait_for("two live instances' heartbeats", lambda a=alive: a <= live())
                    time.sleep(1.0)  # mid-drain, both working
                    holder, until = _leader(conn)
                    assert holder is not None
                    counts = _outbox_figures_on(conn)["counts"]
                    if not counts.get("pending"):
                        drained_before_kill += 1
                        warn(f"[6c] repeat {rep + 1}: the backlog was drained before the kill")
                    victim = procs[holder]
                    victim.sample(True)
                    killed = time.time()
                    victim.kill9()
                    # What ControlShift gains after the leader died must still arrive.
                    petition = rng.choice(launched)
                    for k, opted in enumerate((True, False)):
                        cs.add_signature(petition["slug"],
                                         email=f"after.kill{rep}.{k}@example.org",
                                         first_name="Kim", last_name="Ill", postcode="6011",
                                         join_organisation=opted)
                    survivors = alive - {holder}
                    took_over: float | None = None
                    while True:
                        time.sleep(0.05)
                        new_holder, _ = _leader(conn)
                        if new_holder in survivors and took_over is None:
                            took_over = time.time() - killed
                        if new_holder in survivors and _last_poll_at(conn) > killed:
                            polled = time.time() - killed
                            break
                        if time.time() - killed > 120:
                            raise RuntimeError("[6c] no survivor polled within 120 s")
                    poll_started = _last_poll_at(conn) - killed
                    result = {"killed": holder, "new_leader": new_holder,
                              "lease_left_at_kill_s": round((until or killed) - killed, 2),
                              "takeover_s": round(took_over or polled, 2),
                              "poll_started_s": round(poll_started, 2),
                              "first_poll_done_s": round(polled, 2),
                              "pending_at_kill": counts.get("pending", 0)}
                    results.append(result)
                    row(f"repeat {rep + 1}: kill -9 {holder} -> {new_holder} polled after",
                        f"{polled:.2f} s",
                        f"lease had {result['lease_left_at_kill_s']:.1f} s left, took over "
                        f"at {result['takeover_s']:.1f} s, {result['pending_at_kill']} pending "
                        "at the kill")
                    if rep + 1 < repeats:  # a replacement, so two instances share the work again
                        name = next(names)
                        procs[name] = CsandProcess(tmp, "m6c", name, sections, url)
                total = sum(_outbox_figures_on(conn)["counts"].values())
                _watch_drain(conn, [p for p in procs.values() if p.proc.poll() is None], total)
        finally:
            _stop_all([p for p in procs.values() if p.proc.poll() is None], "[6c]")
    ok = check(scenario, an, "[6c] PostgreSQL failover")
    fig = outbox_figures(url)
    worst = max(r["first_poll_done_s"] for r in results)
    lost = [f"after.kill{r}.{k}" for r in range(len(results)) for k in (0, 1)
            if an.person(f"after.kill{r}.{k}@example.org") is None]
    row("failover: kill to first poll, max", f"{worst:.2f} s",
        f"of {len(results)}; <= 30 s: {verdict(worst <= 30)}")
    row("end state after the kills", verdict(ok and not lost),
        f"done {fig['counts'].get('done', 0)}, dead {fig['counts'].get('dead', 0)}, "
        f"signatures added after the kills missing in AN: {len(lost)}")
    FIGURES.setdefault("pg", {})["failover"] = {
        "signatures": signatures, "repeats": repeats, "an_rate": FAILOVER_RATE,
        "results": results, "max_s": worst, "target_s": 30.0, "pass": worst <= 30,
        "counts": fig["counts"], "added_after_kill_missing": lost,
        "drained_before_kill": drained_before_kill,
        "instances_detail": {n: p.summary() for n, p in procs.items()},
        "end_state_ok": ok,
    }



# --------------------------------------------------------------------------- 7. organisation size


ORG_SIZES = (1000, 5000, 20000)
ORG_POLL_INTERVAL = 5.0
ORG_SAMPLE_PETITIONS = 3  # their items reach AN; the rest of the backfill is set aside


def org_scenario(petitions: int) -> tuple[ControlShiftSim, ActionNetworkSim, list[str]]:
    """A large organisation, made fast: ``petitions`` launched petitions, every 10th with 3
    signatures, every 100th with 60 (three pages of 25)."""
    cs = ControlShiftSim(seed=7, page_size=25, requests_per_minute=1000,
                         webhook_retry_delays=(0.2,))
    an = ActionNetworkSim(requests_per_second=4.0, seed=7)
    for n in range(petitions):
        slug = f"campaign-{n}"
        cs.add_petition(title=f"Campaign {n}", slug=slug, creator={
            "first_name": "Cleo", "last_name": f"Ng{n}", "email": f"creator{n}@example.org"})
        signers = 60 if n % 100 == 0 else 3 if n % 10 == 0 else 0
        for k in range(signers):
            cs.add_signature(slug, email=f"signer{n}.{k}@example.org", first_name="Sam",
                             last_name="Signer", postcode="6011", join_organisation=True)
    # Samples at a quarter, half and three quarters down the list, whatever its order.
    picks = [petitions * k // (ORG_SAMPLE_PETITIONS + 1) + 1
             for k in range(1, ORG_SAMPLE_PETITIONS + 1)]
    return cs, an, [f"campaign-{n}" for n in picks]


def set_aside_backlog(db: Path, keep: list[int]) -> int:
    """Cancel the backfill's queued items but those of the ``keep`` petitions (so AN's drain of
    thousands of petitions does not stand in the way of the CS figures)."""
    conn = sqlite3.connect(db)
    try:
        marks = ",".join("?" * len(keep))
        cur = conn.execute(f"UPDATE outbox SET status = 'cancelled' WHERE status = 'pending' "
                           f"AND (petition_id IS NULL OR petition_id NOT IN ({marks}))", keep)
        conn.commit()
        return cur.rowcount
    finally:
        conn.close()


async def _until_in_an(an: ActionNetworkSim, email: str, limit: float) -> None:
    with anyio.fail_after(limit):
        while True:
            person = an.person(email)
            if person is not None and person["status"] == "subscribed" and any(
                    h.get("action") == SIGNATURE for h in an.history(email)):
                return
            await anyio.sleep(0.02)


async def _until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await anyio.sleep(0.01)


def bench_org_size(tmp: Path, petitions: int, quick: bool) -> None:
    cycles = 3 if petitions <= 1000 else 2 if petitions <= 5000 else 1
    poll_samples = 4 if petitions <= 1000 else 2
    hook_samples = 5
    say(f"\n[7] Organisation of {petitions} petitions (CS sim: 25 a page, 1000 requests/minute; "
        f"poll_interval {ORG_POLL_INTERVAL:g} s, AN 4 req/s)")
    made = time.monotonic()
    cs, an, samples = org_scenario(petitions)
    db = tmp / f"m7-{petitions}.db"
    secret = "bench-webhook-secret"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rng = random.Random(7)
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s:
        # The backfill, with the CS limit lifted: its requests are a full sweep's (every page of
        # every petition, and the list).
        cs.requests_per_minute = None
        cs.reset_stats()
        walk = anyio.run(prefill, cs_s.url, cs, db, backend="asyncio")
        sweep_requests = cs.stats()["requests"]
        cs.requests_per_minute = 1000
        keep = [cs.petition(s)["id"] for s in samples]
        aside = set_aside_backlog(db, keep)
        data = settings_dict(cs_s.url, cs, an_s.url, an, db, an_rate=4.0,
                             poll_interval=ORG_POLL_INTERVAL)
        data["controlshift"]["webhook_secret"] = secret
        data["http"] = {"listen": f"127.0.0.1:{port}"}
        settings = config_mod.Settings.model_validate(data)

        async def body(daemon: Daemon) -> dict[str, Any]:
            poller = daemon.poller
            assert poller is not None
            await wait_drained(daemon)
            # Idle polling, from one cycle's start to a later one's, with polling-latency
            # samples at random moments (each adds one petition's walk to its cycle).
            start_cycles = poller.cycles
            await _until(lambda: poller.cycles > start_cycles)
            t0, stats0, c0 = time.monotonic(), cs.stats(), poller.cycles
            polled: list[float] = []
            for n in range(poll_samples):
                await anyio.sleep(rng.uniform(0.5, ORG_POLL_INTERVAL))
                email = f"org.poll{n}@example.org"
                began = time.monotonic()
                cs.add_signature(rng.choice(samples), email=email, first_name="Pol",
                                 last_name="Ling", postcode="6011", join_organisation=True)
                await _until_in_an(an, email, 900)
                polled.append(time.monotonic() - began)
            # ... to the end of a cycle: whole cycles only, at least ``cycles`` of them.
            seen = poller.cycles
            await _until(lambda: poller.cycles > seen and poller.cycles >= c0 + cycles)
            t1, stats1, c1 = time.monotonic(), cs.stats(), poller.cycles
            # Webhooks: the same polling goes on meanwhile.
            cs.add_webhook_endpoint(f"http://127.0.0.1:{port}/webhooks/controlshift", secret)
            hooked: list[float] = []
            for n in range(hook_samples):
                await anyio.sleep(rng.uniform(0.2, 1.0))
                email = f"org.hook{n}@example.org"
                began = time.monotonic()
                cs.add_signature(rng.choice(samples), email=email, first_name="Hoo",
                                 last_name="King", postcode="6011", join_organisation=True)
                await _until_in_an(an, email, 120)
                hooked.append(time.monotonic() - began)
            budget = getattr(poller.cs, "budget", None)
            return {"t": t1 - t0, "cycles": c1 - c0, "requests": stats1["requests"]
                    - stats0["requests"], "by_route": {
                        k: v - stats0["by_route"].get(k, 0) for k, v in stats1["by_route"].items()},
                    "rate_limited": stats1["rate_limited"] - stats0["rate_limited"],
                    "polled": polled, "hooked": hooked, "budget": budget}

        _, run = anyio.run(run_daemon, settings, body, backend="asyncio")
    cs.close()
    minutes = run["t"] / 60
    listing = sum(v for k, v in run["by_route"].items()
                  if k in ("GET /api/v1/petitions", "GET /api/v1/events"))
    idle_per_cycle = listing / max(1, run["cycles"])
    per_minute = run["requests"] / minutes
    period = run["t"] / max(1, run["cycles"])
    fig: dict[str, Any] = {
        "petitions": petitions, "poll_interval": ORG_POLL_INTERVAL, "cycles": run["cycles"],
        "window_s": round(run["t"], 1), "cs_requests": run["requests"],
        "idle_requests_per_cycle": round(idle_per_cycle, 1),
        "requests_per_minute": round(per_minute, 1), "cycle_period_s": round(period, 1),
        "cs_429s": run["rate_limited"], "sweep_requests": sweep_requests,
        "backfill_walk_s_unlimited": round(walk, 1), "set_aside": aside,
        "poll_latency_s": [round(x, 2) for x in run["polled"]],
        "webhook_latency_s": [round(x, 2) for x in run["hooked"]],
        "setup_s": round(time.monotonic() - made, 1),
    }
    budget = run["budget"]
    if budget is not None:  # the pace a sweep of those requests gets at this budget
        from csand.controlshift.budget import idle_rate, plan_sweep

        incremental = idle_rate(idle_per_cycle, poll_rate=budget.poll_rate,
                                poll_interval=ORG_POLL_INTERVAL)
        for asked in (True, False):
            plan = plan_sweep(sweep_requests, reconcile_interval=3600.0,
                              poll_rate=budget.poll_rate, incremental_rate=incremental,
                              asked=asked)
            key = "sweep_fastest" if asked else "sweep_scheduled"
            fig[key] = {"seconds": round(plan.seconds, 1),
                        "rate_per_minute": round(plan.rate * 60, 1), "fits_hour": plan.fits}
        fig["poll_budget_per_minute"] = round(budget.poll_rate * 60, 1)
        fig["learned_page_size"] = dict(budget.page_sizes)
        fig["sweep_estimate_by_csand"] = budget.estimate()  # what csand status shows
    poll_p50 = statistics.median(run["polled"])
    hook_p50 = statistics.median(run["hooked"])
    row("CS requests per idle cycle", f"{idle_per_cycle:.0f}",
        f"cycle every {period:.1f} s ({run['cycles']} cycles in {run['t']:.0f} s)")
    row("CS requests per minute", f"{per_minute:.0f}",
        f"of 1000; 429s {run['rate_limited']}; incl. {len(run['polled'])} sample walks")
    sweep_note = ""
    if "sweep_fastest" in fig:
        fast, sched = fig["sweep_fastest"], fig["sweep_scheduled"]
        sweep_note = (f"at this budget: {_span(fast['seconds'])} at {fast['rate_per_minute']:g}"
                      f"/min; scheduled {_span(sched['seconds'])}"
                      + ("" if sched["fits_hour"] else " (longer than the hour)"))
    row("sweep: CS requests", f"{sweep_requests}", sweep_note)
    if fig.get("sweep_estimate_by_csand") is not None:
        row("  csand's own estimate (learned page size)", f"{fig['sweep_estimate_by_csand']}")
    row("new signature by polling p50 / max",
        f"{poll_p50:.1f} / {max(run['polled']):.1f} s", f"{len(run['polled'])} samples")
    row("new signature by webhook p50 / max",
        f"{hook_p50:.2f} / {max(run['hooked']):.2f} s", f"{len(run['hooked'])} samples")
    fig["poll_latency_p50_s"] = round(poll_p50, 2)
    fig["webhook_latency_p50_s"] = round(hook_p50, 2)
    FIGURES.setdefault("org_size", {})[str(petitions)] = fig


BULK_TICK = 10.0  # seconds between incremental exports here (ControlShift: every minute)


async def prefill_bulk(cs: ControlShiftSim, exports: BulkExports, db: Path) -> float:
    """The first nightly export, processed with csand's own bulk handlers (what the daemon
    would do with it), and every row exported incrementally once (no webhook is sent: the
    simulator has no endpoint), so the next incremental files hold only what is new."""
    started = time.monotonic()
    store = await open_store(db)
    org_url = f"https://{cs.org_slug}.example.org"
    await store.set_meta(org_slug=cs.org_slug, org_url=org_url)

    async def org() -> str:
        return cs.org_slug

    async def url() -> str:
        return org_url

    handlers = TableHandlers()
    BulkSource(store, org, url).register(handlers)
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            ingest = BulkIngest(store, http, handlers)
            for export in exports.export_full_all():
                await ingest.announce(json.dumps(
                    {"type": export.type, "data": export.data, "jid": None}))
            await ingest.run_due()
        exports.export_incremental()
    finally:
        await store.close()
    return time.monotonic() - started


def bench_org_size_bulk(tmp: Path, petitions: int, quick: bool) -> None:
    """Measurement 7 with controlshift.source = "bulk": the same organisation, its signatures
    from the export files. Incremental exports every BULK_TICK s, announced to csand's endpoint
    (signed like ControlShift's); no other webhook, so a new signature reaches AN only through
    the bulk path."""
    samples_n = 3 if quick else 5
    say(f"\n[7b] Organisation of {petitions} petitions, source = \"bulk\" (poll_interval "
        f"{ORG_POLL_INTERVAL:g} s, an incremental export every {BULK_TICK:g} s, AN 4 req/s)")
    made = time.monotonic()
    cs, an, samples = org_scenario(petitions)
    db = tmp / f"m7b-{petitions}.db"
    secret = "bench-webhook-secret-bulk"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rng = random.Random(7)
    storage = StorageSim()
    with ServedApp(cs.app) as cs_s, ServedApp(an.app) as an_s, \
            ServedApp(storage.app) as storage_s:
        storage.base_url = storage_s.url
        exports = BulkExports(cs, storage)
        prefill_s = anyio.run(prefill_bulk, cs, exports, db, backend="asyncio")
        keep = [cs.petition(s)["id"] for s in samples]
        aside = set_aside_backlog(db, keep)
        data = settings_dict(cs_s.url, cs, an_s.url, an, db, an_rate=4.0,
                             poll_interval=ORG_POLL_INTERVAL)
        data["controlshift"].update(webhook_secret=secret, source="bulk")
        data["http"] = {"listen": f"127.0.0.1:{port}"}
        settings = config_mod.Settings.model_validate(data)
        hook = f"http://127.0.0.1:{port}/webhooks/controlshift"

        async def body(daemon: Daemon) -> dict[str, Any]:
            poller = daemon.poller
            assert poller is not None
            await wait_drained(daemon)
            ticks: list[float] = []

            async def tick() -> None:
                async with httpx.AsyncClient(timeout=30) as http:
                    n = 0
                    while True:
                        await anyio.sleep(BULK_TICK)
                        ticks.append(time.monotonic())
                        for export in await anyio.to_thread.run_sync(exports.export_incremental):
                            n += 1
                            payload = json.dumps({"type": export.type, "data": export.data,
                                                  "jid": f"bench-{n}"}).encode()
                            await http.post(hook, content=payload, headers={
                                WEBHOOK_SIGNATURE_HEADER: webhook_signature(payload, secret)})

            start_cycles = poller.cycles
            await _until(lambda: poller.cycles > start_cycles)
            t0, stats0, c0 = time.monotonic(), cs.stats(), poller.cycles
            latency: list[float] = []
            processing: list[float] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                for n in range(samples_n):
                    await anyio.sleep(rng.uniform(0.5, BULK_TICK))
                    email = f"org.bulk{n}@example.org"
                    began = time.monotonic()
                    cs.add_signature(rng.choice(samples), email=email, first_name="Bul",
                                     last_name="King", postcode="6011", join_organisation=True)
                    await _until_in_an(an, email, 300)
                    arrived = time.monotonic()
                    latency.append(arrived - began)
                    exported = min(t for t in ticks if t >= began)
                    processing.append(arrived - exported)
                seen = poller.cycles
                await _until(lambda: poller.cycles > seen and poller.cycles >= c0 + 3)
                tg.cancel_scope.cancel()
            t1, stats1, c1 = time.monotonic(), cs.stats(), poller.cycles
            return {"t": t1 - t0, "cycles": c1 - c0,
                    "requests": stats1["requests"] - stats0["requests"],
                    "by_route": {k: v - stats0["by_route"].get(k, 0)
                                 for k, v in stats1["by_route"].items()},
                    "rate_limited": stats1["rate_limited"] - stats0["rate_limited"],
                    "latency": latency, "processing": processing}

        _, run = anyio.run(run_daemon, settings, body, backend="asyncio")
    cs.close()
    minutes = run["t"] / 60
    per_minute = run["requests"] / minutes
    fig: dict[str, Any] = {
        "petitions": petitions, "source": "bulk", "poll_interval": ORG_POLL_INTERVAL,
        "export_every_s": BULK_TICK, "cycles": run["cycles"], "window_s": round(run["t"], 1),
        "cs_requests": run["requests"], "by_route": {k: v for k, v in run["by_route"].items()
                                                     if v},
        "requests_per_minute": round(per_minute, 1), "cs_429s": run["rate_limited"],
        "prefill_s": round(prefill_s, 1), "set_aside": aside,
        "latency_s": [round(x, 2) for x in run["latency"]],
        "processing_s": [round(x, 2) for x in run["processing"]],
        "setup_s": round(time.monotonic() - made, 1),
    }
    lat50, proc50 = statistics.median(run["latency"]), statistics.median(run["processing"])
    row("CS requests per minute (bulk)", f"{per_minute:.0f}",
        f"of 1000; {run['cycles']} cycles in {run['t']:.0f} s; routes "
        + ", ".join(f"{k} {v}" for k, v in fig["by_route"].items()))
    row("new signature via export p50 / max", f"{lat50:.1f} / {max(run['latency']):.1f} s",
        f"export every {BULK_TICK:g} s; {len(run['latency'])} samples")
    row("  from its export to AN p50 / max",
        f"{proc50:.2f} / {max(run['processing']):.2f} s",
        "processing: at a one-minute cadence add 0-60 s of waiting for the export")
    fig["latency_p50_s"] = round(lat50, 2)
    fig["processing_p50_s"] = round(proc50, 2)
    FIGURES.setdefault("org_size_bulk", {})[str(petitions)] = fig


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- main


def log_summary(path: Path) -> dict[str, int]:
    events: collections.Counter[str] = collections.Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            events["(unparsed line)"] += 1
            continue
        events[f"{event.get('level', '?')}:{event.get('event', '?')}"] += 1
    return dict(events.most_common())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 2 minutes)")
    parser.add_argument("--only", default="1234567",
                        help="which measurements to run, e.g. --only 36 (default: all)")
    parser.add_argument("--pg-url", default=None,
                        help="admin URL of an existing PostgreSQL server for measurement 6 "
                        "(it creates and drops its own databases); default: start a "
                        "throwaway server with tests/pgserver.py")
    parser.add_argument("--org-sizes", default=None,
                        help="petition counts of measurement 7, e.g. 1000,5000 (default: "
                        "1000,5000,20000; --quick: 1000,5000)")
    parser.add_argument("--source", choices=["rest", "bulk", "both"], default="both",
                        help="measurement 7: polling (rest), the bulk-data exports (bulk) or "
                        "both (default)")
    args = parser.parse_args()
    only = set(args.only)
    quick = args.quick
    began = time.monotonic()
    sniffio = importlib.util.find_spec("sniffio") is not None
    say(f"csand benchmark ({'quick' if quick else 'full'}), Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, sniffio {'installed' if sniffio else 'NOT installed'}")
    FIGURES["sniffio_installed"] = sniffio
    with tempfile.TemporaryDirectory(prefix="csand-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log_path = tmp / "csand.log"
        with log_path.open("w", encoding="utf-8") as log_file:
            logs.configure("warning", "json", stream=log_file)
            if "1" in only:
                bench_requests_per_action(tmp, quick)
                bench_requests_per_attendee(tmp, quick)
            if "2" in only:
                bench_rate(tmp, burst=None, name="a", signatures=60 if quick else 400, target=True)
                bench_rate(tmp, burst=1.0, name="b", signatures=30 if quick else 80, target=False)
            if "3" in only:
                signatures = 1000 if quick else 5000
                say(f"\n[3] Engine capacity, AN limit lifted (csand 100000 req/s), queued "
                    f"backlog petitions=20, signatures={signatures}")
                for workers in (8, 4):
                    bench_capacity_inprocess(tmp, signatures, workers)
                bench_capacity_subprocess(tmp, signatures, 8)
            if "4" in only:
                bench_latency(tmp, quick)
            if "5" in only:
                bench_webhook_latency(tmp, quick)
            if "6" in only:
                with PgDatabases(args.pg_url) as pg:
                    signatures = 1000 if quick else 5000
                    say(f"\n[6a] PostgreSQL ({FIGURES['pg']['server_version']}), engine capacity "
                        f"with the AN limit lifted, csand run processes, queued backlog "
                        f"petitions=20, signatures={signatures}")
                    for instances in (1, 2):
                        bench_pg_capacity(pg, tmp, signatures, instances)
                    bench_pg_rate(pg, tmp, 80 if quick else 300)
                    bench_pg_failover(pg, tmp, 1 if quick else 3, 200 if quick else 600)
            if "7" in only:
                sizes = ([int(n) for n in args.org_sizes.split(",")] if args.org_sizes
                         else list(ORG_SIZES[:2] if quick else ORG_SIZES))
                for petitions in sizes:
                    if args.source in ("rest", "both"):
                        bench_org_size(tmp, petitions, quick)
                    if args.source in ("bulk", "both"):
                        bench_org_size_bulk(tmp, petitions, quick)
        FIGURES["csand_log_events"] = log_summary(log_path)
    elapsed = time.monotonic() - began
    FIGURES["mode"] = "quick" if quick else "full"
    FIGURES["bench_seconds"] = round(elapsed, 1)
    FIGURES["warnings"] = WARNINGS
    say(f"\ncsand log (in-process runs, level warning): {FIGURES['csand_log_events'] or 'empty'}")
    say(f"done in {elapsed:.0f} s, {len(WARNINGS)} warnings")
    say(json.dumps(FIGURES, separators=(",", ":"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
