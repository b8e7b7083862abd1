"""A simulated organisation synced by the daemon in process, for the audit's tests: both
simulators behind ASGI transports, the scenario, and helpers to sync, audit and damage AN."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from csand import logs
from csand.audit import Report, run_audit
from csand.config import Settings
from csand.daemon import Daemon
from csand.model import global_unsubscribe_activity
from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import Scenario, populate
from csand.storage import open_store

CS_KEY = "cs-audit-key"
AN_KEY = "an-audit-key"
CS_URL = "http://cs.test"
AN_URL = "http://an.test/api/v2"


@dataclass
class Org:
    cs: ControlShiftSim
    an: ActionNetworkSim
    scenario: Scenario
    db: Path
    store_url: str | None = None  # PostgreSQL instead of the SQLite file ``db``

    def settings(self, **audit: Any) -> Settings:
        return Settings.model_validate({
            "controlshift": {"url": CS_URL, "api_key": CS_KEY, "poll_interval": 0.2,
                             "reconcile_interval": 3600.0, "requests_per_minute": 60_000.0},
            "action_network": {"url": AN_URL, "api_key": AN_KEY,
                               "requests_per_second": 1000.0},
            "sync": {"workers": 4, "retry_base": 0.1, "retry_cap": 0.5},
            "store": {"url": self.store_url} if self.store_url else {"path": str(self.db)},
            "audit": audit,
        })

    def transports(self) -> dict[str, httpx.AsyncBaseTransport]:
        return {"an_transport": httpx.ASGITransport(app=self.an.app),
                "cs_transport": httpx.ASGITransport(app=self.cs.app)}

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


def make_org(tmp_path: Path, *, petitions: int = 6, signatures: int = 80, seed: int = 5,
             events: int = 0, attendees: int = 0) -> Org:
    cs = ControlShiftSim(api_key=CS_KEY, page_size=25, requests_per_minute=None)
    an = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None, events_api=True)
    scenario = populate(cs, an, petitions=petitions, signatures=signatures, not_opted_in=0.4,
                        existing_in_an=0.3, existing_subscribed=0.5, seed=seed, events=events,
                        calendars=1 if events else 0, attendees=attendees)
    return Org(cs, an, scenario, tmp_path / "csand.db")


async def sync(org: Org, *, unsubscribe: Sequence[str] = ()) -> None:
    """Run the daemon until a poll cycle is done and the queue is empty. ``unsubscribe``: org-wide
    unsubscribes (as a webhook brings them) of these emails, queued once the daemon runs."""
    logs.configure("warning", "json", stream=io.StringIO())  # quiet, and never a closed stream
    daemon = Daemon(org.settings(), **org.transports())  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        assert daemon.store is not None and daemon.poller is not None
        if unsubscribe:
            now = datetime.now(UTC)
            await daemon.store.enqueue([global_unsubscribe_activity(f"audit-{i}", e, now)
                                        for i, e in enumerate(unsubscribe)])
        cycles = daemon.poller.cycles
        with anyio.fail_after(60):
            while True:
                await anyio.sleep(0.1)
                counts = await daemon.store.counts()
                if daemon.poller.cycles > cycles and not counts["pending"] \
                        and not counts["in_flight"]:
                    break
        daemon.request_stop()


async def audit(org: Org, **options: Any) -> Report:
    store = await open_store(org.store_url or org.db)
    try:
        return await run_audit(org.settings(), store, sample=options.pop("sample", 10_000),
                               petition=options.pop("petition", None),
                               repair=options.pop("repair", False),
                               duplicates=options.pop("duplicates", False),
                               an_rate=options.pop("an_rate", 1000.0), **org.transports(),
                               **options)
    finally:
        await store.close()


def kinds(report: Report) -> dict[str, int]:
    return {k: n for k, n in report.summary.by_kind().items() if n}
