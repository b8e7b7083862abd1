"""Run the real ``csand run`` process against the simulators and watch its database."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.exports import BulkExports, StorageSim
from csand.sim.scenario import Scenario, populate
from csand.sim.server import ServedApp
from csand.sim.verify import compare

DEADLINE = 120.0  # generous: a CI machine may be slow; normal runs take a few seconds


class Csand:
    """One ``csand run`` child process with its config, database and log file."""

    def __init__(self, tmp: Path, cs_url: str, cs_key: str, an_url: str, an_key: str, *,
                 name: str = "csand", store_url: str | None = None,
                 **overrides: dict[str, Any]) -> None:
        """``store_url``: a PostgreSQL database shared with other instances (``name`` then
        names this instance and its files); else a SQLite file of its own."""
        self.tmp = tmp
        self.name = name
        self.store_url = store_url
        self.db = tmp / "csand.db"
        self.config = tmp / ("config.toml" if name == "csand" else f"{name}.toml")
        self.log_path = tmp / f"{name}.log"
        store: dict[str, Any] = ({"url": store_url, "instance": name} if store_url
                                 else {"path": str(self.db)})
        sections: dict[str, dict[str, Any]] = {
            "controlshift": {"url": cs_url, "api_key": cs_key, "poll_interval": 0.5,
                             "reconcile_interval": 3600.0},
            "action_network": {"url": an_url, "api_key": an_key, "requests_per_second": 50.0,
                               "timeout": 5.0},
            "sync": {"retry_base": 0.2, "retry_cap": 1.0, "auth_recheck_interval": 0.5},
            "store": store,
            "log": {"format": "json"},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        self.config.write_text(_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> Csand:
        self.runs += 1
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CSAND_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csand", "run", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- reading its state (WAL lets us read while it writes) ----

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.store_url:
            return pg_query(self.store_url, sql, params)
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []  # schema not created yet
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        counts = {"pending": 0, "in_flight": 0, "done": 0, "dead": 0, "cancelled": 0}
        counts.update(dict(self.query("SELECT status, COUNT(*) FROM outbox GROUP BY status")))
        return counts

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"csand exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log_tail())
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; counts={self.counts()}\n"
                             + self.log_tail())

    def wait_drained(self, after: float | None = None, timeout: float = DEADLINE) -> dict[str, int]:
        """Until a poll that started after ``after`` has completed and the queue is empty."""
        after = time.time() if after is None else after

        def drained() -> bool:
            polled = float(self.meta("last_poll_at") or 0)
            c = self.counts()
            return polled > after and c["pending"] == 0 and c["in_flight"] == 0

        self.wait_for(drained, "the queue to drain", timeout)
        return self.counts()

    def wait_reconciled(self, after: float, timeout: float = DEADLINE) -> dict[str, int]:
        def swept() -> bool:
            c = self.counts()
            return (float(self.meta("last_reconcile_at") or 0) > after
                    and c["pending"] == 0 and c["in_flight"] == 0)

        self.wait_for(swept, "a reconciliation sweep", timeout)
        return self.counts()

    def dead(self) -> dict[str, str]:
        return dict(self.query("SELECT source_key, last_error FROM outbox WHERE status = 'dead'"))

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8").splitlines() if self.log_path.exists() else []

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines()]

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_lines()[-n:])


def pg_query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The same read on PostgreSQL (``?`` placeholders become ``%s``)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        try:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []  # schema not created yet


def _toml_value(value: Any) -> str:
    """JSON is TOML for strings, numbers, booleans and lists; tables are inline tables."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


CS_KEY = "cs-e2e-secret-key-1234"
AN_KEY = "an-e2e-secret-key-5678"


class World:
    """Both simulators served on loopback, the generated scenario, and the csand processes."""

    def __init__(self, tmp: Path, cs: ControlShiftSim, an: ActionNetworkSim, cs_url: str,
                 an_url: str) -> None:
        self.tmp, self.cs, self.an, self.cs_url, self.an_url = tmp, cs, an, cs_url, an_url
        self.scenario: Scenario | None = None
        self.daemons: list[Csand] = []
        self.stack = ExitStack()  # servers started on demand (the export storage), closed last

    def serve_exports(self, **kwargs: Any) -> BulkExports:
        """ControlShift's bulk data exports: a storage simulator served on loopback, its files
        announced through the ControlShift simulator's webhooks (``kwargs``: BulkExports')."""
        storage = StorageSim()
        storage.base_url = self.stack.enter_context(ServedApp(storage.app)).url
        return BulkExports(self.cs, storage, **kwargs)

    def populate(self, **kwargs: Any) -> Scenario:
        self.scenario = populate(self.cs, self.an, **kwargs)
        return self.scenario

    def csand(self, *, name: str = "csand", store_url: str | None = None,
              **overrides: dict[str, Any]) -> Csand:
        daemon = Csand(self.tmp, self.cs_url, CS_KEY, f"{self.an_url}/api/v2", AN_KEY,
                       name=name, store_url=store_url, **overrides)
        self.daemons.append(daemon)
        return daemon

    def check(self) -> dict[str, Any]:
        """AN's end state matches docs/rules.md for the scenario."""
        assert self.scenario is not None
        result = compare(self.scenario, self.an)
        assert result["problems"] == []
        assert result["wrongly_subscribed"] == 0
        assert result["duplicate_petitions"] == 0
        assert result["duplicate_signatures"] == 0
        return result


def make_world(tmp_path: Path, **cs_kwargs: Any) -> Iterator[World]:
    an_rate = cs_kwargs.pop("an_requests_per_second", None)  # the AN simulator's limit
    cs = ControlShiftSim(api_key=CS_KEY, page_size=cs_kwargs.pop("page_size", 7), **cs_kwargs)
    an = ActionNetworkSim(api_key=AN_KEY, requests_per_second=an_rate, events_api=True)
    with ServedApp(cs.app) as cs_served, ServedApp(an.app) as an_served:
        world = World(tmp_path, cs, an, cs_served.url, an_served.url)
        try:
            yield world
        finally:
            for daemon in world.daemons:
                if daemon.alive():
                    daemon.kill9()
            cs.close()
            world.stack.close()
