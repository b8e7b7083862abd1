"""Files csand creates hold personal data (or sit beside it): owner-only, whatever the umask."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from csand import logs
from csand.dryrun import copy_database
from csand.storage import open_store
from csand.storage.sqlite import single_instance
from tests.fakes import ManualClock
from tests.storage import sig


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual login umask, under which files are created world-readable by default."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.anyio
async def test_a_new_database_its_wal_and_shm_are_owner_only(tmp_path: Path, umask_022: None
                                                             ) -> None:
    db = tmp_path / "state" / "csand.db"
    store = await open_store(db, clock=ManualClock())
    try:
        await store.enqueue([sig(1, "ann@example.org")])
        modes = {p.name: mode(p) for p in db.parent.iterdir()}
    finally:
        await store.close()
    assert modes == {"csand.db": 0o600, "csand.db-wal": 0o600, "csand.db-shm": 0o600}


@pytest.mark.anyio
async def test_an_existing_readable_database_is_left_as_is_with_a_warning(
    tmp_path: Path, umask_022: None
) -> None:
    db = tmp_path / "csand.db"
    sqlite3.connect(db).close()  # created by someone else, 0644
    os.chmod(db, 0o644)
    with capture_logs() as events:
        store = await open_store(db, clock=ManualClock())
        await store.close()
    assert mode(db) == 0o644  # the operator's choice: not csand's to change
    warned = [e for e in events if e["event"] == "store.readable_by_others"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["mode"] == "0644"


@pytest.mark.anyio
async def test_a_private_existing_database_opens_without_a_warning(tmp_path: Path) -> None:
    db = tmp_path / "csand.db"
    await (await open_store(db, clock=ManualClock())).close()  # created by csand
    with capture_logs() as events:
        store = await open_store(db, clock=ManualClock())
        await store.close()
    assert not [e for e in events if e["event"] == "store.readable_by_others"]


def test_the_lock_file_is_owner_only(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "csand.db"
    with single_instance(db):
        assert mode(tmp_path / "csand.db.lock") == 0o600


def test_a_private_log_file_is_created_owner_only_and_appended_to(tmp_path: Path,
                                                                   umask_022: None) -> None:
    path = tmp_path / "csand.backfill.log"
    with logs.open_private(path) as f:
        f.write("one\n")
    with logs.open_private(path) as f:
        f.write("two\n")
    assert mode(path) == 0o600
    assert path.read_text() == "one\ntwo\n"


def test_a_dry_run_copy_of_the_database_is_owner_only(tmp_path: Path, umask_022: None) -> None:
    source = tmp_path / "csand.db"
    sqlite3.connect(source).execute("CREATE TABLE t (x)").connection.close()
    target = tmp_path / "scratch" / "csand.db"
    copy_database(source, target)
    assert mode(target) == 0o600
