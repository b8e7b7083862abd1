"""csand benchmark: the real daemon against the built-in simulators, served on loopback.

Run ``python bench/bench.py [--quick]``. Four measurements, each checked against the sync rules
with :func:`csand.sim.verify.compare` (a warning is printed when AN's end state is wrong):

1. AN requests per synced action on a realistic mix, next to a naive client's count.
2. Achieved AN request rate vs the configured 4 req/s while draining a backlog, 429s counted
   (plus a run against a stricter AN bucket, ``burst=1``).
3. Engine capacity with the rate limit lifted: actions/s over the drain of a backlog that
   csand's own poller queued beforehand (so the figure is the dispatcher's, not the CS walk's),
   in-process with 8 and 4 workers and as a ``csand run`` child process, whose peak RSS
   (VmHWM) is the memory figure since it excludes the simulators.
4. Latency of one new signature while idle (``poll_interval = 2 s``): p50/p95/max.

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

from csand import config as config_mod
from csand import logs
from csand.controlshift.client import ControlShiftClient
from csand.controlshift.poller import Poller
from csand.daemon import Daemon
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import SIGNATURE, ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
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


def outbox_figures(db: Path) -> dict[str, Any]:
    """Counts and first/last finish time of the done items, read from csand's database."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status"))
        first, last = conn.execute(
            "SELECT MIN(finished_at), MAX(finished_at) FROM outbox WHERE status = 'done'"
        ).fetchone()
    except sqlite3.OperationalError:
        return {"counts": {}, "first": None, "last": None}
    finally:
        conn.close()
    return {"counts": counts, "first": first, "last": last}


def quarter_rates(db: Path) -> tuple[float, float]:
    """actions/s over the first and over the last quarter of the done items (by finish time)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
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


async def prefill(cs_url: str, cs: ControlShiftSim, db: Path) -> float:
    """Queue the whole backlog with csand's own poller (one backfill cycle, CS limit lifted)."""
    started = time.monotonic()
    store = await open_store(db)
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
    parser.add_argument("--only", default="12345",
                        help="which measurements to run, e.g. --only 3 (default: all)")
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
