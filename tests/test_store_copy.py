"""Moving from SQLite to PostgreSQL: csand.storage.copy and ``csand store-copy``.

A SQLite store is filled through the storage interfaces, copied, and both stores are then compared
through the same interfaces: what the copy keeps is what csand reads, not rows.
"""

from __future__ import annotations

import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from typer.testing import CliRunner

from csand.cli import app
from csand.model import Person, SignatureSeen
from csand.storage import StoreError, open_store
from csand.storage.copy import copy_sqlite_to_postgres
from tests.fakes import ManualClock
from tests.storage import T0, petition_state, seen_row, sig

ANN, BOB, CAT, DAN, EVE = (f"{n}@example.org" for n in ("ann", "bob", "cat", "dan", "eve"))
OPTED_IN = datetime(2024, 1, 2, tzinfo=UTC)
UNSUBSCRIBED = datetime(2024, 3, 1, tzinfo=UTC)


async def _fill(db: Path) -> dict[str, Any]:
    """A store with something of every kind; returns ids the checks need."""
    clock = ManualClock(T0)
    store = await open_store(db, clock=clock)
    try:
        await store.commit_poll(
            petition_state(1), [seen_row(n) for n in (1, 2, 3, 4)],
            [sig(1, ANN), sig(2, BOB), sig(3, CAT), sig(4, DAN)])
        items = {i.activity.email: i for i in await store.lease(10, 60)}
        assert set(items) == {ANN, BOB, CAT, DAN}
        assert await store.finish(
            items[ANN].id, "done", token=items[ANN].token, opt_in_source="signature:1",
            person=(ANN, Person(exists=True, uuid="an-ann", subscribed=True,
                                opted_in_at=OPTED_IN)))
        assert await store.finish(items[BOB].id, "dead", token=items[BOB].token,
                                  error="invalid email address")
        # CAT stays in flight; DAN's record is deleted on ControlShift while in flight.
        await store.commit_poll(None, [SignatureSeen(4, 1, "fp4", "2024-02-01T00:00:00Z")],
                                deleted_sources=["signature:4"])
        await store.save_person(EVE, Person(exists=False, unsubscribed_at=UNSUBSCRIBED))
        await store.save_tags([("Climate", "tag-1"), ("Later", None)])
        await store.set_petition_uuid(1, "petition-1", "an-petition-1")
        await store.set_meta(backfill_done="1", last_poll_at=T0)
        assert await store.receive_event("jid-1", "signature.created", '{"n": 1}')
        assert await store.receive_event("jid-2", "signature.created", '{"n": 2}')
        processed, failed = await store.events_due(2)
        await store.commit_poll(None, event_id=processed.id)
        await store.event_failed(failed.id, "CS answered 500", T0 + 1000)
        assert await store.receive_event("jid-3", "signature.updated", '{"n": 3}')
        assert await store.record_bulk_file(
            url="https://s3.example/org/unsubscribes_1.csv.bz2?X-Amz-Signature=x", jid="jid-4",
            table="unsubscribes", kind="full", compression="bzip2", body="{}", expires_at=None)
        (bulk,) = await store.bulk_files_due()
        await store.commit_poll(None, bulk_progress=(bulk.id, 500))  # processing when copied
        return {"cat": items[CAT].id, "dan": items[DAN].id, "failed": failed.id}
    finally:
        await store.close()


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.mark.anyio
async def test_the_copy_keeps_what_csand_reads(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "csand.db"
    ids = await _fill(db)
    seen: list[tuple[str, int, int]] = []
    copied = await copy_sqlite_to_postgres(db, pg_url, progress=lambda *a: seen.append(a))
    assert copied == {"meta": 2, "outbox": 4, "cs_petitions": 1, "cs_signatures": 4,
                      "an_people": 2, "an_tags": 2, "opt_ins": 1, "webhook_events": 3,
                      "cs_events": 0, "cs_calendars": 0, "cs_attendees": 0, "bulk_files": 1,
                      "bulk_records": 0, "bulk_parked": 0}
    assert ("outbox", 4, 4) in seen and ("an_people", 0, 2) in seen

    clock = ManualClock(T0 + 10)
    old = await open_store(db, clock=clock)
    new = await open_store(pg_url, clock=clock, instance="test")
    try:
        before, after = await old.items(), await new.items()
        assert [i["id"] for i in after] == [i["id"] for i in before]
        for b, a in zip(before, after, strict=True):
            if b["id"] not in (ids["cat"], ids["dan"]):
                assert a == b
            else:
                assert a["payload"] == b["payload"] and b["status"] == "in_flight"
        # A file being processed is due again at once, from the rows committed.
        (bulk,) = await new.bulk_files_due()
        assert (bulk.table, bulk.kind, bulk.rows_done) == ("unsubscribes", "full", 500)
        cat = next(i for i in after if i["id"] == ids["cat"])
        assert (cat["status"], cat["lease_until"], cat["finished_at"]) == ("pending", None, None)
        dan = next(i for i in after if i["id"] == ids["dan"])
        assert dan["status"] == "cancelled" and "deleted on ControlShift" in dan["note"]

        for email, source in ((ANN, "signature:1"), (BOB, "signature:2"), (EVE, "signature:9")):
            assert await new.knowledge(email, source) == await old.knowledge(email, source)
        person, applied = await new.knowledge(ANN, "signature:1")
        assert applied and person.opted_in_at == OPTED_IN and person.subscribed is True
        person, _ = await new.knowledge(EVE, "signature:9")
        assert person.unsubscribed_at == UNSUBSCRIBED and person.exists is False
        assert await new.knowledge(BOB, "signature:2") == (Person(), False)

        assert await new.petition_state(1) == await old.petition_state(1)
        assert (await new.petition_state(1)).an_uuid == "an-petition-1"  # type: ignore[union-attr]
        assert await new.signatures_seen(1) == await old.signatures_seen(1)
        assert (await new.signatures_seen(1))[4].deleted_at is not None
        assert await new.tags() == await old.tags() == {"climate": ("Climate", "tag-1"),
                                                        "later": ("Later", None)}
        for key in ("backfill_done", "last_poll_at"):
            assert await new.get_meta(key) == await old.get_meta(key) is not None

        # Webhooks: the processed one stays processed, the failed one waits for its retry.
        assert [e.type for e in await new.events_due()] == ["signature.updated"]
        clock.t = T0 + 2000  # past the retry, and past the claim of the first answer
        assert [e.id for e in await new.events_due()] == [ids["failed"], 3]

        # The released item is leased again; new rows get ids after the copied ones.
        assert await new.enqueue([sig(5, "fay@example.org")]) == 1
        assert (await new.items())[-1]["id"] > max(i["id"] for i in before)
        assert {i.id for i in await new.lease(10, 60)} >= {ids["cat"]}
        assert await new.receive_event("jid-4", "signature.created", "{}")
        clock.t += 100
        assert max(e.id for e in await new.events_due()) > 3
    finally:
        await old.close()
        await new.close()


@pytest.mark.anyio
async def test_a_database_with_csand_data_is_refused(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "csand.db"
    await _fill(db)
    await copy_sqlite_to_postgres(db, pg_url)
    with pytest.raises(StoreError, match="already holds csand data"):
        await copy_sqlite_to_postgres(db, pg_url)
    store = await open_store(pg_url)
    try:
        assert len(await store.items()) == 4  # nothing merged, nothing doubled
    finally:
        await store.close()


@pytest.mark.anyio
async def test_refused_while_a_daemon_holds_the_lock_and_without_a_database(
    tmp_path: Path, pg_url: str,
) -> None:
    db = tmp_path / "csand.db"
    with pytest.raises(StoreError, match="no SQLite database"):
        await copy_sqlite_to_postgres(db, pg_url)
    assert not db.exists()
    await _fill(db)
    fd = os.open(db.with_name("csand.db.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as csand run holds it
        with pytest.raises(StoreError, match="another csand is already running"):
            await copy_sqlite_to_postgres(db, pg_url)
    finally:
        os.close(fd)
    assert (await copy_sqlite_to_postgres(db, pg_url))["outbox"] == 4
    # The copy released the lock: a daemon can take it again.
    fd = os.open(db.with_name("csand.db.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def _config(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[controlshift]\nurl = "https://cs.example.org"\n\n[store]\n{store}\n',
                    encoding="utf-8")
    return path


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_store_copy_command(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "csand.db"
    anyio.run(_fill, db, backend="asyncio")
    config = _config(tmp_path, f'path = "{db}"')
    password = "s3cret-pw-never-shown"
    url = _with_password(pg_url, password)  # the test server trusts local connections
    result = _cli("store-copy", "--config", str(config), "--to", url)
    assert result.exit_code == 0, result.stderr
    assert password not in result.stdout + result.stderr
    assert "webhook_events" in result.stdout and "replace [store] path" in result.stdout
    outbox = next(line for line in result.stdout.splitlines() if "outbox" in line)
    assert "4" in outbox

    again = _cli("store-copy", "--config", str(config), "--to", url)
    assert again.exit_code == 1 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "already holds csand data" in again.stderr
    assert password not in again.stderr


def test_store_copy_reads_the_url_from_a_file(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "csand.db"
    anyio.run(_fill, db, backend="asyncio")
    secret = tmp_path / "store_url"
    secret.write_text(pg_url + "\n", encoding="utf-8")
    result = _cli("store-copy", "--config", str(_config(tmp_path, f'path = "{db}"')),
                  "--to-file", str(secret))
    assert result.exit_code == 0, result.stderr


def test_store_copy_refusals_are_one_line(tmp_path: Path) -> None:
    password = "pw-not-shown"
    url = f"postgresql://csand:{password}@127.0.0.1:1/csand"
    result = _cli("store-copy", "--config", str(_config(tmp_path, f'url = "{url}"')),
                  "--to", url)
    assert result.exit_code == 2 and "already names a PostgreSQL store" in result.stderr
    config = _config(tmp_path, f'path = "{tmp_path / "none.db"}"')
    result = _cli("store-copy", "--config", str(config), "--to", url)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "no SQLite database" in result.stderr
    assert not (tmp_path / "none.db").exists()
    anyio.run(_fill, tmp_path / "none.db", backend="asyncio")
    result = _cli("store-copy", "--config", str(config), "--to", url)  # unreachable
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot connect to PostgreSQL" in result.stderr and password not in result.stderr
    assert _cli("store-copy", "--config", str(config)).exit_code == 2


def test_every_table_and_column_of_both_schemas_is_copied_or_deliberately_left(
        tmp_path: Path, pg_url: str) -> None:
    """A migration that adds a table or a column must teach the copy about it."""
    import sqlite3

    import psycopg

    from csand.storage.copy import TABLES

    left_out = {"cluster_leader", "cluster_instances", "rate_buckets", "csand_schema"}

    async def make() -> None:
        for target in (tmp_path / "csand.db", pg_url):
            store = await open_store(target)
            await store.close()

    anyio.run(make, backend="asyncio")
    with sqlite3.connect(tmp_path / "csand.db") as conn:
        lite = {t: {c[1] for c in conn.execute(f"PRAGMA table_info({t})")}
                for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    with psycopg.connect(pg_url) as conn:
        pg: dict[str, set[str]] = {}
        for table, column in conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema()"):
            pg.setdefault(table, set()).add(column)
    for schema in (lite, pg):
        assert set(schema) - left_out == set(TABLES)
        for table, columns in TABLES.items():
            assert schema[table] == set(columns), table
