"""``csand demo``: the real daemon against built-in simulators of both services, live.

Starts the ControlShift and Action Network simulators on loopback, fills ControlShift with
generated petitions and signatures (opt-outs, people already in AN, categories, a few broken
records), runs the daemon with a progress display, signs a few more petitions while it runs (and
confirms a late opt-in, and an org-wide unsubscribe arrives) to show the incremental path, exports
ControlShift's bulk data every few seconds (announced by webhook, read from a storage simulator),
and ends with what landed in Action Network,
checked against the rules of docs/rules.md.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from csand import config as config_mod
from csand import logs
from csand.daemon import Daemon
from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.exports import BulkExports, StorageSim
from csand.sim.scenario import Scenario, populate
from csand.sim.server import ServedApp
from csand.sim.verify import compare

RECONCILE_SECONDS = 8.0  # short, so the demo also shows a reconciliation sweep
EXPORT_SECONDS = 3.0  # ControlShift's bulk data export runs each minute; here every few seconds
WEBHOOK_SECRET = "demo-webhook-secret"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(*, petitions: int, signatures: int, rate: float, faults: bool, seed: int,
             events: int = 6, attendees: int = 60, source: str = "rest") -> int:
    """``source = "bulk"``: petitions and signatures come from the simulated bulk-data exports
    (a nightly export at the start, then the incremental ones)."""
    console = Console()
    cs = ControlShiftSim(page_size=25, seed=seed)
    an = ActionNetworkSim(requests_per_second=rate, seed=seed, events_api=True)
    scenario = populate(cs, an, petitions=petitions, signatures=signatures, bad_records=4,
                        events=events, calendars=min(2, events), attendees=attendees, seed=seed)
    # The backfill polls: ControlShift's REST events show no moderation status and hosts without
    # their opt-in (webhooks carry both, and bring what happens from now on).
    scenario.moderation_known = False
    scenario.host_consent_known = False
    if faults:
        an.faults.error_rate = 0.02
        an.faults.empty_200_rate = 0.02
        an.faults.drop_rate = 0.01
    tmp = tempfile.mkdtemp(prefix="csand-demo-")  # kept: the user may inspect log and queue
    storage = StorageSim()
    with ServedApp(cs.app) as cs_served, ServedApp(an.app) as an_served, \
            ServedApp(storage.app) as storage_served:
        storage.base_url = storage_served.url
        exports = BulkExports(cs, storage)
        port = _free_port()
        webhook_url = f"http://127.0.0.1:{port}/webhooks/controlshift"
        settings = config_mod.Settings.model_validate({
            "controlshift": {"url": cs_served.url, "api_key": cs.api_key, "poll_interval": 2.0,
                             "reconcile_interval": RECONCILE_SECONDS,
                             "webhook_secret": WEBHOOK_SECRET, "webhook_url": webhook_url,
                             "source": source},
            "http": {"listen": f"127.0.0.1:{port}"},
            "action_network": {"url": f"{an_served.url}/api/v2", "api_key": an.api_key,
                               "requests_per_second": rate},
            "sync": {"retry_base": 0.5, "retry_cap": 5.0},
            "store": {"path": str(Path(tmp) / "csand.db")},
        })
        (Path(tmp) / "config.toml").write_text(
            f'[controlshift]\nurl = "{cs_served.url}"\napi_key = "{cs.api_key}"\n'
            f'[action_network]\nurl = "{an_served.url}/api/v2"\napi_key = "{an.api_key}"\n'
            f'[store]\npath = "{settings.store.path}"\n'
        )
        log_path = Path(tmp) / "csand.log"
        with log_path.open("w") as log_file:
            logs.configure("info", "json", stream=log_file, secrets=settings.secrets())
            console.print(
                f"[bold]csand demo[/bold]: ControlShift simulator on {cs_served.url}, "
                f"Action Network simulator on {an_served.url} ({rate:g} req/s"
                f"{', faults injected' if faults else ''})"
                + ("; petitions and signatures from the bulk-data exports" if source == "bulk"
                   else "")
            )
            summary = scenario.summary()
            console.print(
                f"Generated {summary['launched']} launched petitions, {summary['signatures']} "
                f"signatures from {summary['people']} people ({summary['existing_in_an']} already "
                f"in Action Network, {summary['bad_records']} broken records)"
                + (f"; {summary['events']} events in {summary['calendars']} calendars with "
                   f"{summary['attendees']} RSVPs." if summary.get("events") else ".")
            )
            started = time.monotonic()
            cs.add_webhook_endpoint(webhook_url, WEBHOOK_SECRET)  # what happens from now on
            daemon = Daemon(settings)
            try:
                anyio.run(_drive, daemon, cs, exports, scenario, console, source == "bulk",
                          backend="asyncio")
            finally:
                cs.close()
            elapsed = time.monotonic() - started
        return _summarise(console, scenario, an, daemon, elapsed, log_path)


async def _drive(daemon: Daemon, cs: ControlShiftSim, exports: BulkExports, scenario: Scenario,
                 console: Console, bulk: bool = False) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        exporting = anyio.CancelScope()

        async def export_each_minute() -> None:
            with exporting:
                if bulk:  # the nightly export brings what exists
                    files = await anyio.to_thread.run_sync(exports.export_full_all)
                    console.print(f"ControlShift's nightly export: {len(files)} files "
                                  f"({sum(f.rows for f in files)} rows), announced by webhook.")
                await _export_each_minute(exports)

        tg.start_soon(export_each_minute)
        await daemon.started.wait()
        assert daemon.store is not None and daemon.poller is not None
        store = daemon.store
        live_added = False
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
        ) as progress:
            task = progress.add_task("syncing", total=None, detail="backfill")
            while True:
                await anyio.sleep(0.25)
                counts = await store.counts()
                finished = counts["done"] + counts["dead"] + counts["cancelled"]
                total = finished + counts["pending"] + counts["in_flight"]
                backfilled = daemon.poller.cycles > 0
                if bulk:  # the nightly export's files processed
                    files = (await store.status())["bulk"]
                    backfilled = backfilled and files["files"]["done"] > 0 and not files["waiting"]
                detail = (f"{counts['done']} done, {counts['dead']} dead, "
                          f"{counts['pending'] + counts['in_flight']} queued")
                progress.update(task, total=total or None, completed=finished, detail=detail)
                if backfilled and not live_added and finished >= total * 0.6:
                    _live_activity(cs, scenario)
                    live_added = True
                    progress.console.print("New signatures and a late opt-in arrive on "
                                           "ControlShift: its webhooks bring them in at once"
                                           + (", the next export brings them too (one item "
                                              "each)." if bulk else "."))
                    live_at = time.time()
                    daemon.poller.poked.set()
                swept = float(await store.get_meta("last_reconcile_at") or 0)
                if live_added and swept > live_at and total and finished == total:
                    break
        exporting.cancel()
        daemon.request_stop()


async def _export_each_minute(exports: BulkExports) -> None:
    """ControlShift's incremental bulk data export, announced by webhook (csand reads the
    ``unsubscribes`` files and records the others)."""
    while True:
        await anyio.sleep(EXPORT_SECONDS)
        await anyio.to_thread.run_sync(exports.export_incremental)


def _live_activity(cs: ControlShiftSim, scenario: Scenario) -> None:
    launched = [p for p in cs.petitions() if p["launched"]]
    target = launched[0]["slug"]
    cs.add_signature(target, email="new.supporter@example.org", first_name="Ngaio",
                     last_name="Marsh", postcode="6011", join_organisation=True)
    cs.add_signature(target, email="quiet.reader@example.org", first_name="Iris",
                     last_name="Murdoch", postcode="OX1 2JD", join_organisation=None)
    pending = [s for s in cs.signatures() if s["join_organisation"] is None
               and not s["deleted_at"] and s["email"] and "@" in s["email"]]
    if pending:  # a confirmation email clicked: a late opt-in
        cs.update_signature(pending[0]["id"], join_organisation=True)
    # An org-wide unsubscribe of someone AN does not know: its webhook and the next bulk export
    # both bring it (one item; it creates nobody in AN).
    cs.add_unsubscribe("left.long.ago@example.org", organisation=True,
                       unsubscribable_type="Organisation")


def _summarise(console: Console, scenario: Scenario, an: ActionNetworkSim, daemon: Daemon,
               elapsed: float, log_path: Path) -> int:
    result = compare(scenario, an)
    people = an.people()
    stats = an.stats()
    dispatcher = daemon.dispatcher
    assert dispatcher is not None
    table = Table(title="What landed in Action Network", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("people", str(len(people)))
    table.add_row("  subscribed", str(sum(1 for p in people if p["status"] == "subscribed")))
    table.add_row("  unsubscribed", str(sum(1 for p in people if p["status"] != "subscribed")))
    table.add_row("mirrored petitions", str(len(an.petitions())))
    table.add_row("signatures (Action History)", str(len(an.signatures())))
    if scenario.events:
        table.add_row("mirrored events (in event campaigns)",
                      f"{len(an.events())} ({len(an.event_campaigns())} campaigns)")
        table.add_row("attendances (Action History)", str(len(an.attendances())))
    tags = sorted(t for t in an.tag_names() if t.startswith("controlshift"))
    categories = [t for t in tags if t.startswith("controlshift:")]
    table.add_row("tags", f"{len(tags)}: role tags + {len(categories)} categories")
    table.add_row("  e.g.", ", ".join(categories[:2]))
    table.add_row("activities synced / dead", f"{dispatcher.stats.done} / {dispatcher.stats.dead}")
    table.add_row("AN requests (429s, faults)",
                  f"{stats['requests']} ({stats['rate_limited']}, {sum(stats['faults'].values())})")
    table.add_row("AN requests per synced activity",
                  f"{stats['requests'] / max(1, dispatcher.stats.done):.2f}")
    bulk = daemon.last_status.get("bulk") or {}
    files = bulk.get("files") or {}
    table.add_row("bulk data files (read / skipped)",
                  f"{files.get('done', 0)} / {files.get('skipped', 0)}")
    table.add_row("time", f"{elapsed:.1f} s")
    console.print(table)
    dead = anyio.run(_dead, daemon, backend="asyncio")
    if dead:
        dl = Table(title="Dead letters (kept, with the reason)")
        dl.add_column("record")
        dl.add_column("reason")
        for row in dead:
            dl.add_row(row["source_key"], row["last_error"] or "")
        console.print(dl)
    ok = not result["problems"] and not result["duplicate_petitions"] \
        and not result["duplicate_signatures"] and not result.get("duplicate_events") \
        and not result.get("duplicate_attendances")
    verdict = "[green]matches[/green]" if ok else "[red]DOES NOT match[/red]"
    console.print(
        f"Action Network {verdict} the sync rules for {result['expected_people']} people: "
        f"{result['wrongly_subscribed']} subscribed without opting in, "
        f"{result['duplicate_petitions']} duplicate petitions, "
        f"{result['duplicate_signatures']} duplicate signatures."
    )
    for problem in result["problems"][:10]:
        console.print(f"  [red]{problem}[/red]")
    console.print(f"The daemon's JSON log is {log_path}; its queue: "
                  f"csand status --config {log_path.parent / 'config.toml'}")
    return 0 if ok else 1


async def _dead(daemon: Daemon) -> list[dict[str, Any]]:
    from csand.storage import open_store

    store = await open_store(daemon.settings.store.path)
    try:
        return await store.dead_items()
    finally:
        await store.close()
