"""Migrations from every earlier schema version, each with the data that version wrote.

A store is built the way an older csand left it (its migrations only, its kind of rows), then
opened by this version. What the current code would not have stored must be gone: above all
"this person is in AN (and subscribed)", which made csand skip the lookup and recreate a person
erased from AN since, subscribed.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from csand.model import parse_time, signature_activity
from csand.storage import open_store
from csand.storage import sqlite as store_module
from csand.storage.sqlite import MIGRATIONS
from tests.test_consent import drain, make_world, sig
from tests.test_worker import ORG, petition

EMAIL = "ann@example.org"


def old_payload(activity: Any) -> str:
    data = activity.to_json()
    data.pop("opted_in_at", None)  # versions before 5 did not have it
    return json.dumps(data)


def build_store(path: Path, version: int) -> None:
    """A database as csand at schema ``version`` left it, with the rows it wrote."""
    conn = sqlite3.connect(path)
    try:
        for script in MIGRATIONS[:version]:
            for statement in store_module._statements(script):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
        synced = sig(1, EMAIL, opted_in=True, created_at="2024-01-10T00:00:00Z")
        deleted = sig(2, "bo@example.org", opted_in=True)
        later = signature_activity({"id": 3, "email": "cy@example.org", "join_organisation": None,
                                    "created_at": "2024-02-01T00:00:00Z"}, petition(1), ORG)
        rows = [(synced, "done", 1.0), (deleted, "pending", None), (later, "pending", None)]
        for activity, status, finished in rows:
            conn.execute(
                "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
                "payload, occurred_at, status, enqueued_at, finished_at) "
                "VALUES (?, ?, ?, 1, ?, ?, ?, ?, 0, ?)",
                (activity.dedupe_key, activity.source_key, activity.person_key,
                 str(activity.kind), old_payload(activity), activity.occurred_at.isoformat(),
                 status, finished))
        conn.execute("INSERT INTO cs_signatures (cs_id, petition_id, fingerprint, deleted_at) "
                     "VALUES (1, 1, ?, NULL), (2, 1, 'deleted', '2024-02-02T00:00:00+00:00')",
                     (synced.fingerprint(),))
        # What versions before 4 kept of AN: present and subscribed.
        conn.execute("INSERT INTO an_people (email, exists_, uuid, subscribed, learned_at) "
                     "VALUES (?, 1, 'uuid-ann', 1, 0)", (EMAIL,))
        if version >= 2:
            conn.execute("INSERT INTO webhook_events (dedupe, type, body, received_at, "
                         "processed_at) VALUES ('jid:1', 'signature.created', '{}', 0, 0)")
        if version >= 4:
            conn.execute("UPDATE an_people SET unsubscribed_at = '2023-06-01T00:00:00+00:00'")
        conn.commit()
    finally:
        conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("version", range(1, 5))
async def test_every_version_before_5_migrates_with_its_data(tmp_path: Path, version: int) -> None:
    path = tmp_path / "csand.db"
    build_store(path, version)

    store = await open_store(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        person, applied = await store.knowledge(EMAIL, "signature:1")
        # AN's state is not trusted from an old store: looked up afresh.
        assert (person.exists, person.subscribed) == (None, None)
        assert person.uuid == "uuid-ann"
        # The opt-in that reached AN counts as applied, at the time the person opted in.
        assert applied is True
        assert person.opted_in_at == parse_time("2024-01-10T00:00:00Z")
        if version >= 4:
            assert person.unsubscribed_at == parse_time("2023-06-01T00:00:00Z")
        # A signature deleted before the upgrade is never synced.
        assert [i.activity.source_key for i in await store.lease(10, 60)] == ["signature:3"]
        counts = await store.counts()
        assert (counts["done"], counts["cancelled"], counts["in_flight"]) == (1, 1, 1)
        if version >= 2:
            assert await store.receive_event("jid:1", "signature.created", "{}") is False
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_person_erased_from_an_after_an_old_version_synced_them_is_not_recreated_subscribed(
        tmp_path: Path) -> None:
    """csand 4 knew Ann as present and subscribed; AN erased her since; she signs again
    without opting in. The lookup must happen, and she is created unsubscribed."""
    build_store(tmp_path / "csand.db", 4)
    async with make_world(tmp_path) as world:
        await world.mirrored()
        await world.store.drop_dead()
        await world.store.enqueue([sig(9, EMAIL, opted_in=False)])
        await drain(world.dispatcher(), 2)  # Cy's item from the old queue, and Ann's

        assert world.sim.person(EMAIL)["status"] == "unsubscribed"
        assert "GET /people" in world.transport.log
        assert world.subscriptions(EMAIL) == 0


@pytest.mark.anyio
async def test_version_5_gains_the_cluster_tables_and_keeps_its_queue(tmp_path: Path) -> None:
    path = tmp_path / "csand.db"
    build_store(path, 5)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE outbox SET status = 'in_flight', lease_token = 't', lease_until = 1 "
                 "WHERE source_key = 'signature:3'")
    conn.commit()
    conn.close()
    store = await open_store(path, instance="vm-1")
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        # A lease from before the upgrade (no owner recorded) is still released at start-up.
        assert await store.release_all_in_flight() == 1
        assert "signature:3" in [i.activity.source_key for i in await store.lease(10, 60)]
        assert await store.lead(15) == 1
        assert (await store.cluster())["leader"] == "vm-1"
        assert (await store.counts())["done"] == 1
    finally:
        await store.close()
