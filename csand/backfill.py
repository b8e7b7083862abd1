"""``csand backfill``: walk all of ControlShift now and drain the queue, with progress and an ETA.

Works whether or not the daemon is running. If it is not, the daemon runs here, in the
foreground, until the sweep is done and the queue is empty. If it is (systemd), the sweep is done
here and the running daemon drains the queue while this watches. Either way everything goes
through the outbox, so an interrupted backfill just continues when run again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from csand.checks import STALE_AFTER_S, open_configured_store
from csand.config import Settings
from csand.daemon import Daemon
from csand.storage import Storage
from csand.storage.sqlite import AlreadyRunning, single_instance

REQUESTS_PER_ITEM = 1.5  # typical AN requests per activity (README benchmarks), for the ETA


async def run_backfill(settings: Settings, since: str | None, console: Console | None = None
                       ) -> int:
    console = console or Console()
    started = time.time()
    store = await open_configured_store(settings)
    try:
        if since:
            result = await store.requeue_since(since)
            console.print(f"{result.queued} activities since {since} queued again")
            if result.skipped_deleted:
                console.print(f"{result.skipped_deleted} not queued: deleted on ControlShift")
            if result.skipped_pruned:
                console.print(f"{result.skipped_pruned} more could not be: their personal data "
                              f"was pruned (store.retention_days = "
                              f"{settings.store.retention_days:g})")
        if await _daemon_running(store, settings):
            # One sweeper only: two would share ControlShift's 1000 requests/minute unknowingly.
            console.print("The daemon is running: asking it for a full sweep, and watching.")
            await _ask_for_sweep(store)
            await _watch(store, settings, console, started, sweep_done=_swept_since(store, started))
            return 0
        # Nobody runs: the daemon runs here, asked for a full sweep at once.
        await _ask_for_sweep(store)
        daemon = Daemon(settings)
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await daemon.started.wait()

            await _watch(store, settings, console, started,
                         sweep_done=_swept_since(store, started))
            daemon.request_stop()
        return 0
    finally:
        await store.close()


async def _daemon_running(store: Storage, settings: Settings) -> bool:
    """SQLite: the daemon's lock file is held. PostgreSQL: some instance's heartbeat is fresh
    (its leader, or the one that takes over, then does the sweep asked for)."""
    if store.shared:
        cluster = await store.cluster()
        return any((i.get("heartbeat_age_s") is not None and i["heartbeat_age_s"] <= STALE_AFTER_S)
                   for i in cluster["instances"])
    try:
        with single_instance(Path(settings.store.path)):
            return False
    except AlreadyRunning:
        return True


async def _ask_for_sweep(store: Storage) -> None:
    """A full sweep at once; before the first backfill, the first poll cycle is that sweep."""
    if await store.get_meta("backfill_done"):
        await store.set_meta(last_reconcile_at=0)


def _swept_since(store: Storage, started: float) -> Callable[[], Awaitable[bool]]:
    async def swept() -> bool:
        return float(await store.get_meta("last_reconcile_at") or 0) >= started

    return swept


async def _watch(store: Storage, settings: Settings, console: Console, started: float,
                 sweep_done: Callable[[], Awaitable[bool]]) -> None:
    rate = settings.action_network.requests_per_second
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("backfill", total=None, detail="walking ControlShift")
        while True:
            counts = await store.counts()
            remaining = counts["pending"] + counts["in_flight"]
            finished = counts["done"] + counts["dead"]
            eta = remaining * REQUESTS_PER_ITEM / rate
            swept = await sweep_done()
            progress.update(
                task, total=finished + remaining, completed=finished,
                detail=(f"{remaining} to go, ETA {_duration(eta)} at {rate:g} req/s"
                        if swept else f"walking ControlShift; {remaining} queued so far"),
            )
            if swept and remaining == 0:
                break
            await anyio.sleep(0.5)
    counts = await store.counts()
    console.print(f"Backfill done in {_duration(time.time() - started)}: "
                  f"{counts['done']} synced, {counts['dead']} dead "
                  f"(see `csand dead list`).")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
