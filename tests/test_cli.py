"""Operator commands (csand.cli) on a seeded database, through typer's test runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from csand.cli import app
from csand.model import signature_activity
from csand.storage import open_store

ORG = "test-org"
SIGNER = "ann@example"  # invalid (no TLD), as CS sent it: the reason quotes it
POLLED = "bob@example.org"


def _config(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[controlshift]\nurl = "https://cs.example.org"\n\n'
                    f'[store]\npath = "{db}"\n', encoding="utf-8")
    return path


def _seed(db: Path) -> int:
    async def go() -> int:
        store = await open_store(db)
        try:
            petition = {"id": 1, "slug": "p-1", "title": "P", "url": "https://cs.example.org/p-1",
                        "launched": True, "creator": {"email": "cleo@example.org"}}
            activity = signature_activity(
                {"id": 7, "email": SIGNER, "created_at": "2024-01-02T00:00:00Z",
                 "updated_at": "2024-01-02T00:00:00Z"}, petition, ORG)
            await store.enqueue([activity])
            [item] = await store.lease(1, 60)
            await store.finish(item.id, "dead", error=f"invalid email address '{SIGNER}'")
            await store.set_meta(last_poll_result=f"failed: CS answered 422 for {POLLED}")
            return item.id
        finally:
            await store.close()

    return anyio.run(go, backend="asyncio")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    db = tmp_path / "csand.db"
    _seed(db)
    return _config(tmp_path, db)


def invoke(*args: str) -> str:
    # Wide enough that rich never wraps an address across lines.
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.output


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["dead", "list"],
                                     ["dead", "list", "--json"]])
def test_operator_output_masks_emails_unless_revealed(config: Path, command: list[str]) -> None:
    masked = invoke(*command, "--config", str(config))
    assert SIGNER not in masked and "a***@example" in masked
    if command[0] == "status":
        assert POLLED not in masked and "b***@example.org" in masked
    revealed = invoke(*command, "--reveal", "--config", str(config))
    assert SIGNER in revealed
    if command[0] == "status":
        assert POLLED in revealed


def test_status_json_stays_machine_readable_when_masked(config: Path) -> None:
    data = json.loads(invoke("status", "--json", "--config", str(config)))
    assert data["dead"] == 1
    assert data["last_poll_result"] == "failed: CS answered 422 for b***@example.org"
    assert data["dead_reasons"] == [{"reason": "invalid email address 'a***@example'",
                                     "count": 1}]


def test_dead_show_masks_unless_revealed(config: Path) -> None:
    shown = invoke("dead", "show", "1", "--config", str(config))
    assert SIGNER not in shown and json.loads(shown)["last_error"]
    assert SIGNER in invoke("dead", "show", "1", "--reveal", "--config", str(config))


def test_status_tells_how_long_personal_data_is_kept(config: Path) -> None:
    assert json.loads(invoke("status", "--json", "--config", str(config)))["retention_days"] == 30
    assert "kept 30 days" in invoke("status", "--config", str(config))


# ---------------------------------------------------------------- PostgreSQL: the cluster


def _pg_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[controlshift]\nurl = "https://cs.example.org"\n\n'
                    f'[store]\nurl = "{url}"\n', encoding="utf-8")
    return path


def _two_instances(url: str, *, stale_b: bool = False) -> None:
    async def go() -> None:
        a = await open_store(url, instance="a")
        b = await open_store(url, instance="b", clock=(lambda: 1000.0) if stale_b else None)
        try:
            await a.heartbeat({"pid": 101, "workers": 4, "version": "1.0", "host": "host-a"})
            await b.heartbeat({"pid": 202, "workers": 2, "version": "1.0", "host": "host-b"})
            assert await a.lead(15) is not None
        finally:
            await a.close()
            await b.close()

    anyio.run(go, backend="asyncio")


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout, result.stderr


def test_status_shows_the_postgresql_cluster(tmp_path: Path, pg_url: str) -> None:
    _two_instances(pg_url, stale_b=True)  # b's heartbeat is from 1970: stale
    config = _pg_config(tmp_path, pg_url)
    _, out, _ = run_cli("status", "--config", str(config))
    assert "cluster (PostgreSQL, 2 instance(s))" in out
    assert re.search(r"leader a \(term 1, lease runs 1[0-5] s more\)", out), out
    row_a = next(line for line in out.splitlines() if "host-a" in line)
    row_b = next(line for line in out.splitlines() if "host-b" in line)
    assert "leader" in row_a and "stale" not in row_a and "s ago" in row_a
    assert "follower" in row_b and "stale, down?" in row_b

    _, out, _ = run_cli("status", "--json", "--config", str(config))
    cluster = json.loads(out)["cluster"]
    assert (cluster["leader"], cluster["term"], cluster["backend"], cluster["shared"]) == (
        "a", 1, "postgresql", True)
    assert 0 < cluster["leader_for_s"] <= 15
    by_name = {i["instance"]: i for i in cluster["instances"]}
    assert set(by_name) == {"a", "b"}
    assert by_name["a"]["pid"] == 101 and not by_name["a"]["stale"]
    assert by_name["b"]["stale"] and by_name["b"]["heartbeat_age_s"] > 30


def test_status_without_a_leader_says_so(tmp_path: Path, pg_url: str) -> None:
    config = _pg_config(tmp_path, pg_url)
    code, out, _ = run_cli("status", "--config", str(config))
    assert "no leader" in out and "cluster (PostgreSQL, 0 instance(s))" in out
    assert json.loads(run_cli("status", "--json", "--config", str(config))[1])["cluster"][
        "leader"] is None


def test_status_on_sqlite_shows_its_one_instance_in_a_line(config: Path) -> None:
    db = Path(config.read_text().split('path = "')[1].split('"')[0])

    async def beat() -> None:
        store = await open_store(db, instance="solo")
        try:
            await store.heartbeat({"pid": 1})
        finally:
            await store.close()

    anyio.run(beat, backend="asyncio")
    out = invoke("status", "--config", str(config))
    assert "instance solo (SQLite, single instance), heartbeat 0 s ago" in out
    assert "PostgreSQL" not in out
    cluster = json.loads(invoke("status", "--json", "--config", str(config)))["cluster"]
    assert (cluster["backend"], cluster["shared"]) == ("sqlite", False)
    assert [i["instance"] for i in cluster["instances"]] == ["solo"]


def test_status_with_an_unreachable_server_is_one_line_without_the_password(
    tmp_path: Path,
) -> None:
    password = "n0t-to-be-sh0wn"
    config = _pg_config(tmp_path, f"postgresql://csand:{password}@127.0.0.1:1/csand")
    code, out, err = run_cli("status", "--config", str(config))
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("csand: cannot connect to PostgreSQL at "
                          "postgresql://csand:***@127.0.0.1:1/csand: ")
    assert password not in err


def test_dead_list_works_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    code, out, _ = run_cli("dead", "list", "--json", "--config", str(_pg_config(tmp_path, pg_url)))
    assert code == 0 and json.loads(out) == []


def test_check_names_the_store_without_the_password(tmp_path: Path, pg_url: str) -> None:

    from csand import config as config_mod
    from csand.checks import check_store

    settings = config_mod.load(_pg_config(tmp_path, pg_url), secrets=False)
    result = anyio.run(check_store, settings, backend="asyncio")
    assert result["ok"], result
    assert "PostgreSQL, schema version" in result["detail"]
    for secret in config_mod.url_passwords(pg_url):
        assert secret not in result["detail"]
    bad = config_mod.load(_pg_config(tmp_path, "postgresql://csand:pw-hidden@127.0.0.1:1/x"),
                          secrets=False)
    result = anyio.run(check_store, bad, backend="asyncio")
    assert not result["ok"] and "pw-hidden" not in result["detail"]
    assert "cannot connect to PostgreSQL at postgresql://csand:***@127.0.0.1:1/x" \
        in result["detail"]


def test_backfill_on_postgresql_sees_a_running_instance_by_its_heartbeat(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from csand import config as config_mod
    from csand.backfill import _daemon_running
    from csand.cli import _backfill_log
    from csand.storage import open_store as open_

    settings = config_mod.load(_pg_config(tmp_path, pg_url), secrets=False)
    monkeypatch.chdir(tmp_path)
    assert _backfill_log(settings) == tmp_path / "csand.backfill.log"  # no database file

    async def go() -> tuple[bool, bool]:
        store = await open_(pg_url, instance="backfill")
        try:
            before = await _daemon_running(store, settings)
            other = await open_(pg_url, instance="daemon")
            await other.heartbeat({"pid": 1})
            await other.close()
            return before, await _daemon_running(store, settings)
        finally:
            await store.close()

    assert anyio.run(go, backend="asyncio") == (False, True)


def test_a_dry_run_on_postgresql_is_refused_with_one_line(tmp_path: Path, pg_url: str) -> None:
    """A dry run decides on a copy of the store; a shared database has no copy to work on."""
    config = _pg_config(tmp_path, pg_url)
    with config.open("a", encoding="utf-8") as f:
        f.write('\n[action_network]\napi_key = "an-key"\n')
    result = CliRunner().invoke(app, ["run", "--dry-run", "--config", str(config)],
                                env={"COLUMNS": "300", "CSAND_CONTROLSHIFT__API_KEY": "cs-key"})
    assert result.exit_code == 1, result.output
    assert "--dry-run" in result.output and "SQLite" in result.output


def test_status_shows_the_controlshift_budget(config: Path, tmp_path: Path) -> None:
    from csand.controlshift.budget import CSBudget, publish

    async def go() -> None:
        store = await open_store(tmp_path / "csand.db")
        try:
            budget = CSBudget(1000, 0.5)
            budget.saw_page("petitions", 25, {"next_page": 2})
            budget.saw_petitions([{"launched": True, "public_signature_count": 10}] * 50,
                                 lambda p: True)
            budget.record("poll")
            budget.finish_sweep(requests=52, events=0, seconds=30.0, ok=True)
            await publish(store, budget, reconcile_interval=3600, poll_interval=30)
        finally:
            await store.close()

    anyio.run(go, backend="asyncio")
    data = json.loads(invoke("status", "--json", "--config", str(config)))["cs_budget"]
    assert data["poll_budget_per_minute"] == 475.0 and data["page_size"] == {"petitions": 25}
    assert data["last_minute"]["poll"] == 1 and data["last_sweep"]["requests"] == 52
    assert data["sweep_estimate"]["requests"] == 52
    text = invoke("status", "--config", str(config))
    assert "CS poll budget" in text and "475/min" in text and "25 items" in text
    assert "last sweep" in text and "52 requests in 30 s" in text
