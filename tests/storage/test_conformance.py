"""One suite every storage backend must pass: the rules csand relies on, through the interfaces
of :mod:`csand.storage` only (no SQL, no backend internals).

The ``storage`` fixture is parametrized over :data:`BACKENDS`; a new backend joins by adding one
factory there. Backend-specific checks (migrations, files, transactions) live beside the backend's
own tests (``tests/test_store.py`` for SQLite).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from csand.model import (
    AttendeeSeen,
    DeadLetter,
    Person,
    SignatureSeen,
    creator_activity,
    global_unsubscribe_activity,
    parse_time,
)
from csand.storage import (
    BULK_CLAIM_SECONDS,
    EVENT_CLAIM_SECONDS,
    FORGET_INSTANCE_SECONDS,
    ANKnowledge,
    BulkInbox,
    BulkRecords,
    Cluster,
    EventState,
    Meta,
    NotLeader,
    Outbox,
    SeenRecords,
    Storage,
    WebhookInbox,
    open_store,
)
from csand.storage.bulk import BulkChanges, Parked
from tests.fakes import ManualClock
from tests.storage import ORG, T0, attendance, host, petition, petition_state, seen_row, sig

Factory = Callable[[Any, ManualClock], Awaitable[Storage]]


async def _sqlite(tmp_path: Path, clock: ManualClock) -> Storage:
    return await open_store(tmp_path / "state" / "csand.db", clock=clock)


async def _postgres(url: str, clock: ManualClock) -> Storage:
    return await open_store(url, clock=clock, instance="test")


# backend name → how to open an empty store of it on the given clock (from a path for files, a
# fresh database's URL for servers)
BACKENDS: dict[str, Factory] = {"sqlite": _sqlite, "postgres": _postgres}
SERVERS = {"postgres": "pg_url"}  # backends whose store lives in a server: its fixture


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=sorted(BACKENDS))
async def storage(request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
                  ) -> AsyncIterator[Storage]:
    where = (request.getfixturevalue(SERVERS[request.param]) if request.param in SERVERS
             else tmp_path)
    s = await BACKENDS[request.param](where, clock)
    try:
        yield s
    finally:
        await s.close()


DAY = 86_400.0
RETENTION = 30 * DAY


# ---------------------------------------------------------------- the interfaces


@pytest.mark.anyio
async def test_the_backend_implements_every_interface(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    for interface in (Outbox, WebhookInbox, BulkInbox, BulkRecords, SeenRecords, ANKnowledge, Meta, Cluster):
        for name, member in vars(interface).items():
            if inspect.iscoroutinefunction(member):
                assert inspect.iscoroutinefunction(getattr(storage, name)), (interface, name)
    assert isinstance(storage.listeners, list)
    assert await storage.schema_version() >= 1


# ---------------------------------------------------------------- enqueue and deduplication


@pytest.mark.anyio
async def test_enqueue_dedupes_same_version_and_adds_changed_one(storage: Storage) -> None:
    a = sig(1, "ann@example.org", join_organisation=None)
    assert await storage.enqueue([a]) == 1
    assert await storage.enqueue([a]) == 0
    # Only a CS-side timestamp moved (e.g. a single-petition unsubscribe): same version.
    bumped = sig(1, "ann@example.org", join_organisation=None, updated_at="2024-03-01T00:00:00Z")
    assert bumped.fingerprint() == a.fingerprint()
    assert await storage.enqueue([bumped]) == 0
    assert len(await storage.items()) == 1

    opted_in = sig(1, "ann@example.org", join_organisation=True)
    assert opted_in.fingerprint() != a.fingerprint()
    assert await storage.enqueue([opted_in]) == 1
    items = await storage.items()
    assert len(items) == 2
    assert {r["source_key"] for r in items} == {"signature:1"}
    assert {r["person_key"] for r in items} == {"ann@example.org"}


@pytest.mark.anyio
async def test_enqueue_notifies_listeners_only_when_something_was_added(storage: Storage) -> None:
    calls: list[int] = []
    storage.listeners.append(lambda: calls.append(1))
    a = sig(1, "ann@example.org")
    await storage.enqueue([a])
    await storage.enqueue([a])
    assert calls == [1]


# ---------------------------------------------------------------- leasing


@pytest.mark.anyio
@pytest.mark.parametrize(
    "times",
    [
        ["2024-01-03T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"],
        # Whole second vs fractional second, and an offset that normalises to an earlier UTC.
        ["2024-01-01T00:00:00.500000Z", "2024-01-01T00:00:00Z", "2024-01-01T02:00:01+03:00"],
    ],
)
async def test_lease_one_per_person_in_occurred_order(storage: Storage, times: list[str]) -> None:
    activities = [sig(i + 1, "ann@example.org", t) for i, t in enumerate(times)]
    await storage.enqueue(activities)  # enqueued out of time order
    expected = sorted(activities, key=lambda a: a.occurred_at)  # type: ignore[arg-type, return-value]

    applied: list[str] = []
    for _ in expected:
        leased = await storage.lease(10, 60)
        assert len(leased) == 1
        applied.append(leased[0].activity.source_key)
        await storage.finish(leased[0].id, "done")
    assert applied == [a.source_key for a in expected]
    assert await storage.lease(10, 60) == []


@pytest.mark.anyio
async def test_lease_takes_one_item_for_each_person(storage: Storage) -> None:
    await storage.enqueue([
        sig(1, "ann@example.org", "2024-01-02T00:00:00Z"),
        sig(2, "ann@example.org", "2024-01-01T00:00:00Z"),
        sig(3, "bob@example.org", "2024-01-01T00:00:00Z"),
        sig(4, "cat@example.org", "2024-01-01T00:00:00Z"),
    ])
    leased = await storage.lease(10, 60)
    assert sorted(i.activity.source_key for i in leased) == ["signature:2", "signature:3", "signature:4"]
    assert len({i.activity.person_key for i in leased}) == len(leased)
    assert (await storage.counts())["in_flight"] == 3


@pytest.mark.anyio
async def test_never_two_in_flight_for_one_person_across_lease_calls(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org", "2024-01-01T00:00:00Z")])
    first = await storage.lease(1, 60)
    assert [i.activity.source_key for i in first] == ["signature:1"]
    # A newer activity of the same person arrives while the first is in flight.
    await storage.enqueue([sig(2, "ann@example.org", "2024-01-05T00:00:00Z"),
                         sig(3, "bob@example.org", "2024-01-05T00:00:00Z")])
    second = await storage.lease(10, 60)
    assert [i.activity.source_key for i in second] == ["signature:3"]
    await storage.finish(first[0].id, "done")
    third = await storage.lease(10, 60)
    assert [i.activity.source_key for i in third] == ["signature:2"]


@pytest.mark.anyio
async def test_item_scheduled_in_the_future_is_not_leased(storage: Storage, clock: ManualClock) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, 60)
    await storage.finish(item.id, "pending", error="boom", next_attempt_at=clock() + 30)
    assert await storage.lease(10, 60) == []
    clock.t += 29.9
    assert await storage.lease(10, 60) == []
    clock.t += 0.1
    (again,) = await storage.lease(10, 60)
    assert again.id == item.id
    assert again.attempts == 1


@pytest.mark.anyio
async def test_expired_lease_is_reclaimed(storage: Storage, clock: ManualClock) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, lease_seconds=30)
    assert (await storage.items())[0]["lease_until"] == pytest.approx(T0 + 30)
    clock.t += 30
    assert await storage.lease(10, 30) == []  # not yet expired (strictly past the lease)
    clock.t += 0.5
    (again,) = await storage.lease(10, 30)
    assert again.id == item.id
    assert again.attempts == 0  # a crash does not use up an attempt
    assert (await storage.items())[0]["lease_until"] == pytest.approx(clock.t + 30)


@pytest.mark.anyio
async def test_renewed_lease_is_not_reclaimed(storage: Storage, clock: ManualClock) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, lease_seconds=30)
    clock.t += 20
    await storage.renew_leases([item.id], 30)  # the worker is still on it
    clock.t += 25
    assert await storage.lease(10, 30) == []  # 45 s after leasing, yet not handed out twice
    clock.t += 6
    assert [i.id for i in await storage.lease(10, 30)] == [item.id]


@pytest.mark.anyio
async def test_release_all_in_flight(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    assert len(await storage.lease(10, 3600)) == 2
    assert await storage.lease(10, 3600) == []
    assert await storage.release_all_in_flight() == 2
    counts = await storage.counts()
    assert counts["pending"] == 2 and counts["in_flight"] == 0
    assert all(r["lease_until"] is None for r in await storage.items())
    assert len(await storage.lease(10, 3600)) == 2
    assert await storage.release_all_in_flight() == 2


# ---------------------------------------------------------------- signatures behind their creator


async def _creator_and_signature(storage: Storage) -> None:
    creator = creator_activity(petition(7), ORG)
    signer = sig(70, "ann@example.org", pid=7)
    # The signature is the older activity and is enqueued first: it still waits.
    await storage.enqueue([signer, creator])


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["done", "dead"])
async def test_signature_waits_for_its_petition_creator(storage: Storage, outcome: str) -> None:
    await _creator_and_signature(storage)
    (creator_item,) = await storage.lease(10, 60)
    assert creator_item.activity.kind == "petition_created"
    assert await storage.lease(10, 60) == []  # creator in flight: still waiting

    await storage.finish(creator_item.id, "pending", next_attempt_at=T0)
    leased = await storage.lease(10, 60)
    assert [i.activity.kind for i in leased] == ["petition_created"]  # creator pending: waiting

    await storage.finish(leased[0].id, outcome, error="x" if outcome == "dead" else None)
    (signer_item,) = await storage.lease(10, 60)
    assert signer_item.activity.source_key == "signature:70"


@pytest.mark.anyio
async def test_signature_leasable_once_petition_is_mirrored(storage: Storage) -> None:
    await _creator_and_signature(storage)
    notified: list[int] = []
    storage.listeners.append(lambda: notified.append(1))
    await storage.set_petition_uuid(7, "petition-7", "an-petition-uuid")
    assert notified == [1]
    assert await storage.petition_uuid(7) == "an-petition-uuid"
    leased = await storage.lease(10, 60)
    assert sorted(str(i.activity.kind) for i in leased) == ["petition_created", "signature"]


@pytest.mark.anyio
async def test_signature_of_other_petition_does_not_wait(storage: Storage) -> None:
    await storage.enqueue([creator_activity(petition(7), ORG), sig(80, "ann@example.org", pid=8)])
    leased = await storage.lease(10, 60)
    assert len(leased) == 2


# ---------------------------------------------------------------- outcomes and dead letters


@pytest.mark.anyio
async def test_finish_done_dead_and_pending(storage: Storage, clock: ManualClock) -> None:
    await storage.enqueue([sig(1, "a@example.org"), sig(2, "b@example.org"),
                         sig(3, "c@example.org"), sig(4, "d@example.org")])
    items = {i.activity.source_key: i for i in await storage.lease(10, 60)}
    clock.t += 5
    await storage.finish(items["signature:1"].id, "done", note="signer synced (subscribed)")
    await storage.finish(items["signature:2"].id, "dead", error="Action Network refused the record (400): bad")
    await storage.finish(items["signature:3"].id, "pending", error="503", next_attempt_at=clock() + 40)
    await storage.finish(items["signature:4"].id, "pending", error="shutdown", count_attempt=False)

    by_source = {r["source_key"]: r for r in await storage.items()}
    done = by_source["signature:1"]
    assert (done["status"], done["attempts"], done["note"]) == ("done", 1, "signer synced (subscribed)")
    assert done["finished_at"] == pytest.approx(clock())
    assert done["lease_until"] is None
    dead = by_source["signature:2"]
    assert (dead["status"], dead["attempts"]) == ("dead", 1)
    assert dead["last_error"] == "Action Network refused the record (400): bad"
    retry = by_source["signature:3"]
    assert (retry["status"], retry["attempts"], retry["last_error"]) == ("pending", 1, "503")
    assert retry["next_attempt_at"] == pytest.approx(clock() + 40)
    assert retry["lease_until"] is None and retry["finished_at"] is None
    released = by_source["signature:4"]
    assert (released["status"], released["attempts"]) == ("pending", 0)
    assert released["next_attempt_at"] == pytest.approx(clock())

    status = await storage.status()
    assert status["retrying"] == 1
    assert status["dead_reasons"] == [{"reason": "Action Network refused the record (400): bad", "count": 1}]
    (dead_item,) = await storage.dead_items()
    assert dead_item["source_key"] == "signature:2"
    assert datetime.fromisoformat(dead_item["finished_at"]).timestamp() == pytest.approx(clock())

    assert (await storage.requeue_dead()).queued == 1
    requeued = {r["source_key"]: r for r in await storage.items()}["signature:2"]
    assert (requeued["status"], requeued["attempts"]) == ("pending", 0)


@pytest.mark.anyio
async def test_finish_records_what_was_learned_about_the_person(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, 60)
    person = Person(exists=True, uuid="p-1", subscribed=True)
    await storage.finish(item.id, "done", person=("ann@example.org", person))
    assert await storage.person("ann@example.org") == person


# ---------------------------------------------------------------- what was seen, committed with its items


async def _nothing_visible(storage: Storage) -> None:
    assert await storage.items() == []
    assert await storage.signatures_seen(1) == {}
    assert await storage.petition_state(1) is None


@pytest.mark.anyio
async def test_commit_poll_records_and_enqueues_together(storage: Storage) -> None:
    added = await storage.commit_poll(
        petition_state(), [seen_row(1), seen_row(2)], [sig(1, "a@example.org"), sig(2, "b@example.org")]
    )
    assert added == 2
    assert set(await storage.signatures_seen(1)) == {1, 2}
    state = await storage.petition_state(1)
    assert state is not None and state.public_count == 2 and state.content == "abc"
    assert await storage.petition_state(2) is None
    assert len(await storage.items()) == 2


@pytest.mark.anyio
async def test_commit_poll_is_atomic_when_an_activity_cannot_be_serialised(
    storage: Storage
) -> None:
    good = sig(1, "a@example.org")
    broken_ref = dataclasses.replace(good.petition, title=object())  # type: ignore[arg-type]
    broken = dataclasses.replace(sig(2, "b@example.org"), petition=broken_ref)
    with pytest.raises(TypeError):
        await storage.commit_poll(petition_state(), [seen_row(1), seen_row(2)], [good, broken, sig(3, "c@example.org")])
    await _nothing_visible(storage)


@pytest.mark.anyio
async def test_deleted_signature_cancels_only_its_pending_items(storage: Storage) -> None:
    await storage.enqueue([sig(1, "a@example.org"), sig(2, "b@example.org")])
    await storage.enqueue([sig(2, "b@example.org", first_name="Bea")])  # a second version, same person
    (b1,) = [i for i in await storage.lease(10, 60) if i.activity.source_key == "signature:2"]
    await storage.finish(b1.id, "done")

    added = await storage.commit_poll(
        None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z"),
               SignatureSeen(2, 1, "deleted", "2024-02-01T00:00:00Z")],
        deleted_sources=["signature:1", "signature:2"],
    )
    assert added == 0
    statuses = [(r["source_key"], r["status"]) for r in await storage.items()]
    assert statuses == [("signature:1", "in_flight"), ("signature:2", "done"), ("signature:2", "cancelled")]

    await storage.release_all_in_flight()  # the deletion arrived while it was in flight
    by_id = await storage.items()
    assert by_id[0]["status"] == "cancelled"
    assert by_id[0]["note"] == "signature deleted on ControlShift while it was being synced"
    await storage.commit_poll(None, deleted_sources=["signature:1"])  # seen again: no change
    assert (await storage.counts())["cancelled"] == 2
    seen = await storage.signatures_seen(1)
    assert seen[1].deleted_at == "2024-02-01T00:00:00Z"
    assert (await storage.status())["signatures_deleted"] == 2
    assert await storage.lease(10, 60) == []


# ---------------------------------------------------------------- people, tags, meta, status


@pytest.mark.anyio
async def test_person_knowledge_round_trip(storage: Storage) -> None:
    assert await storage.person("nobody@example.org") == Person()
    fields_at = {
        "given_name": datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "postal_code": datetime(2023, 12, 31, tzinfo=UTC),
    }
    person = Person(exists=True, uuid="u-1", subscribed=False, fields_at=MappingProxyType(fields_at))
    await storage.save_person("ann@example.org", person)
    loaded = await storage.person("ann@example.org")
    assert loaded == person
    assert dict(loaded.fields_at) == fields_at
    assert loaded.fields_at["given_name"].tzinfo is not None

    unknown = Person(exists=None, uuid=None, subscribed=None)
    await storage.save_person("ann@example.org", unknown)
    assert await storage.person("ann@example.org") == unknown

    absent = Person(exists=False)
    await storage.save_person("bob@example.org", absent)
    assert await storage.person("bob@example.org") == absent


@pytest.mark.anyio
async def test_tags_round_trip_case_insensitively(storage: Storage) -> None:
    await storage.save_tags([("controlshift:Avoiding Taxes", "t-1"), ("Signer", None)])
    await storage.save_tags([("signer", "t-2")])
    assert await storage.tags() == {
        "controlshift:avoiding taxes": ("controlshift:Avoiding Taxes", "t-1"),
        "signer": ("Signer", "t-2"),
    }


@pytest.mark.anyio
async def test_status_figures(storage: Storage, clock: ManualClock) -> None:
    status = await storage.status()
    for key in ("pending", "in_flight", "done", "dead", "cancelled"):
        assert type(status[key]) is int and status[key] == 0
    assert status["last_poll_at"] is None
    assert status["last_reconcile_at"] is None
    assert status["backfill_done"] is False
    assert status["oldest_pending_age_s"] is None

    await storage.enqueue([sig(1, "a@example.org"), sig(2, "b@example.org"), sig(3, "c@example.org")])
    items = await storage.lease(2, 60)
    await storage.finish(items[0].id, "done")
    await storage.set_meta(last_poll_at=clock(), backfill_done="1", last_reconcile_at=clock() - 60)
    clock.t += 12.5
    status = await storage.status()
    assert (status["pending"], status["in_flight"], status["done"], status["dead"]) == (1, 1, 1, 0)
    assert datetime.fromisoformat(status["last_poll_at"]) == datetime.fromtimestamp(T0, UTC)
    assert datetime.fromisoformat(status["last_reconcile_at"]) == datetime.fromtimestamp(T0 - 60, UTC)
    assert status["backfill_done"] is True
    assert status["oldest_pending_age_s"] == 12.5


@pytest.mark.anyio
async def test_a_stale_poll_never_undoes_a_deletion_or_a_newer_version(storage: Storage) -> None:
    """The poller read a page; a webhook then recorded a deletion; the poll's commit comes last."""
    await storage.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00+00:00",
                                                 "2024-02-01T00:00:00+00:00")])
    stale = sig(1, "ann@example.org")
    await storage.commit_poll(None, [SignatureSeen(1, 1, stale.fingerprint(), None,
                                                 "2024-01-02T00:00:00+00:00")], [stale])
    assert (await storage.counts())["pending"] == 0
    assert (await storage.signature_seen(1)).deleted_at is not None
    newer = SignatureSeen(2, 1, "fp-new", None, "2024-03-01T00:00:00+00:00")
    await storage.commit_poll(None, [newer])
    older = sig(2, "bob@example.org")
    await storage.commit_poll(None, [SignatureSeen(2, 1, older.fingerprint(), None,
                                                 "2024-01-02T00:00:00+00:00")], [older])
    assert (await storage.counts())["pending"] == 0
    assert (await storage.signature_seen(2)).fingerprint == "fp-new"


# ---------------------------------------------------------------- retention


async def _by_source(storage: Storage) -> dict[str, dict[str, Any]]:
    return {r["source_key"]: r for r in await storage.items()}


@pytest.mark.anyio
async def test_prune_reduces_old_finished_items_to_what_dedupe_and_reports_need(
    storage: Storage, clock: ManualClock
) -> None:
    old_done, recent_done = sig(1, "ann@example.org"), sig(2, "bob@example.org")
    old_dead, dropped, pending = (sig(3, "cy@example.org"), sig(4, "dee@example.org"),
                                  sig(5, "eve@example.org"))
    await storage.enqueue([old_done, recent_done, old_dead, dropped, pending])
    ids = {r["source_key"]: r["id"] for r in await storage.items()}
    await storage.finish(ids["signature:1"], "done", note="signer synced (subscribed)",
                       error="AN 503 for ann@example.org")  # an earlier attempt's error
    await storage.finish(ids["signature:3"], "dead", error="invalid email address 'cy@example.org'")
    await storage.finish(ids["signature:4"], "dead", error="invalid email address 'dee@example.org'")
    await storage.drop_dead([ids["signature:4"]])
    clock.t += 2 * DAY
    await storage.finish(ids["signature:2"], "done", note="signer synced (subscribed)")
    before = await _by_source(storage)
    counts_before = await storage.counts()

    clock.t = T0 + 31 * DAY  # signature 1 and the dropped 4 finished 31 days ago; 2, 29 days ago
    assert await storage.prune(RETENTION) == {"outbox": 2, "webhook_events": 0}

    after = await _by_source(storage)
    for source in ("signature:1", "signature:4"):
        row, was = after[source], before[source]
        assert row["payload"] == {"kind": "signature", "source_key": source,
                                              "pruned": True}
        assert row["person_key"] == f"pruned:{row['id']}"
        assert row["last_error"] is None
        kept = ("id", "dedupe_key", "source_key", "petition_id", "kind", "status", "occurred_at",
                "finished_at", "enqueued_at", "note", "attempts")
        assert [row[k] for k in kept] == [was[k] for k in kept]
    for source in ("signature:2", "signature:3", "signature:5"):  # recent, dead, pending
        assert dict(after[source]) == dict(before[source])
    assert await storage.counts() == counts_before
    assert (await storage.dead_item(ids["signature:4"]))["activity"]["pruned"] is True

    # A pruned version seen again is still a duplicate; a second prune finds nothing to do.
    assert await storage.enqueue([old_done]) == 0
    assert await storage.prune(RETENTION) == {"outbox": 0, "webhook_events": 0}
    # The pending item is unaffected and leasable.
    (item,) = await storage.lease(10, 60)
    assert item.activity == pending


@pytest.mark.anyio
async def test_prune_works_in_batches(storage: Storage, clock: ManualClock) -> None:
    await storage.enqueue([sig(i, f"p{i}@example.org") for i in range(1, 8)])
    for row in await storage.items():
        await storage.finish(row["id"], "done")
    clock.t += 31 * DAY
    assert await storage.prune(RETENTION, batch=3) == {"outbox": 7, "webhook_events": 0}
    assert all(r["person_key"].startswith("pruned:") for r in await storage.items())


@pytest.mark.anyio
async def test_prune_of_processed_webhooks_keeps_a_redelivery_recognised(
    storage: Storage, clock: ManualClock
) -> None:
    body = '{"type":"signature.created","data":{"email":"ann@example.org"}}'
    assert await storage.receive_event("jid-old", "signature.created", body)
    assert await storage.receive_event("jid-waiting", "signature.created", body)
    assert await storage.receive_event("jid-failed", "signature.created", body)
    events = {e.id: e for e in await storage.events_due()}
    old, waiting, failed = sorted(events)
    await storage.commit_poll(None, event_id=old)
    await storage.event_failed(failed, "malformed: no petition", None)  # given up on: processed
    clock.t += 2 * DAY
    assert await storage.receive_event("jid-recent", "signature.created", body)
    (recent,) = [e.id for e in await storage.events_due() if e.id not in events]
    await storage.commit_poll(None, event_id=recent)

    clock.t = T0 + 31 * DAY
    assert await storage.prune(RETENTION) == {"outbox": 0, "webhook_events": 2}
    # CS redelivers a pruned event: still recognised, not processed again.
    assert await storage.receive_event("jid-old", "signature.created", body) is False
    assert [e.id for e in await storage.events_due()] == [waiting]
    assert await storage.prune(RETENTION) == {"outbox": 0, "webhook_events": 0}


@pytest.mark.anyio
async def test_requeue_since_skips_pruned_items_and_counts_them(
    storage: Storage, clock: ManualClock
) -> None:
    await storage.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org"),
                         sig(3, "cy@example.org")])
    ids = {r["source_key"]: r["id"] for r in await storage.items()}
    await storage.finish(ids["signature:1"], "done")
    await storage.finish(ids["signature:3"], "dead", error="bad")
    clock.t += 2 * DAY
    await storage.finish(ids["signature:2"], "done")
    clock.t = T0 + 31 * DAY
    await storage.prune(RETENTION)

    result = await storage.requeue_since("2000-01-01T00:00:00+00:00")
    assert (result.queued, result.skipped_deleted, result.skipped_pruned) == (2, 0, 1)
    queued = [r for r in await storage.items() if r["status"] == "pending"]
    assert sorted(r["source_key"] for r in queued) == ["signature:2", "signature:3"]
    assert all(not r["person_key"].startswith("pruned:") for r in queued)


# ---------------------------------------------------------------- lease tokens and the guard


@pytest.mark.anyio
async def test_a_lost_lease_records_nothing_and_its_guard_says_so(
    storage: Storage, clock: ManualClock
) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, 60)
    assert item.token
    assert await storage.guard(item.id, item.token) is None
    clock.t += 3600  # the clock jumped: the item is handed out again
    (again,) = await storage.lease(1, 60)
    assert again.id == item.id and again.token != item.token
    assert await storage.guard(item.id, item.token) == "lost"
    assert await storage.record_step(item.id, item.token, ["person"]) is False
    assert await storage.finish(item.id, "done", token=item.token) is False
    await storage.renew_leases([(item.id, item.token)], 3600)  # renews nothing of the new holder
    assert await storage.guard(again.id, again.token) is None
    assert await storage.finish(again.id, "done", token=again.token) is True
    assert await storage.guard(again.id, again.token) == "lost"  # finished: nothing more to send
    assert [r["status"] for r in await storage.items()] == ["done"]


@pytest.mark.anyio
async def test_acknowledged_steps_survive_a_retry(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, 60)
    assert item.done_steps == frozenset()
    person = Person(exists=True, uuid="p-1", subscribed=True)
    assert await storage.record_step(item.id, item.token, ["person", "tags"],
                                     person=("ann@example.org", person), opt_in="signature:1")
    assert await storage.finish(item.id, "pending", error="503", token=item.token)
    (again,) = await storage.lease(1, 60)
    assert again.done_steps == {"person", "tags"}
    assert again.attempts == 1
    assert await storage.knowledge("ann@example.org", "signature:1") == (person, True)
    assert await storage.knowledge("ann@example.org", "signature:2") == (person, False)
    assert await storage.knowledge("bob@example.org", "signature:1") == (Person(), True)


@pytest.mark.anyio
async def test_guard_sees_a_deletion_committed_while_in_flight(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, 60)
    await storage.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z")],
                              deleted_sources=["signature:1"])
    assert await storage.guard(item.id, item.token) == "deleted"
    # A retry of a deleted record is cancelled, never queued again.
    assert await storage.finish(item.id, "pending", error="503", token=item.token)
    assert (await storage.counts())["cancelled"] == 1
    assert await storage.lease(10, 60) == []


@pytest.mark.anyio
async def test_guard_sees_a_newer_org_wide_unsubscribe(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org")])
    (item,) = await storage.lease(1, 60)
    known = parse_time("2024-02-01T00:00:00Z")
    assert await storage.guard(item.id, item.token, known) is None
    await storage.enqueue([global_unsubscribe_activity(7, "ann@example.org",
                                                       parse_time("2024-03-01T00:00:00Z"))])
    assert await storage.guard(item.id, item.token, known) == "unsubscribed"
    newer = parse_time("2024-03-01T00:00:00Z")
    assert await storage.guard(item.id, item.token, newer) is None
    # The consent timeline learnt it when the unsubscribe was enqueued, not when it runs.
    assert (await storage.person("ann@example.org")).unsubscribed_at == newer


@pytest.mark.anyio
async def test_the_consent_timeline_only_moves_forward(storage: Storage) -> None:
    later, earlier = parse_time("2024-03-01T00:00:00Z"), parse_time("2024-01-01T00:00:00Z")
    await storage.save_person("ann@example.org",
                              Person(exists=True, unsubscribed_at=later, opted_in_at=later))
    await storage.save_person("ann@example.org",
                              Person(exists=True, unsubscribed_at=earlier, opted_in_at=earlier))
    person = await storage.person("ann@example.org")
    assert (person.unsubscribed_at, person.opted_in_at) == (later, later)


# ---------------------------------------------------------------- dead letters: retry and drop


@pytest.mark.anyio
async def test_dead_retry_skips_deleted_and_malformed_records(storage: Storage) -> None:
    await storage.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    for item in await storage.lease(10, 60):
        await storage.finish(item.id, "dead", error="bad", token=item.token)
    letter = DeadLetter("signature:3", "malformed ControlShift signature: no email", '{"id":3}', 1)
    await storage.commit_poll(None, dead_letters=[letter])
    await storage.commit_poll(None, dead_letters=[letter])  # seen again: one dead letter
    await storage.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z")],
                              deleted_sources=["signature:1"])
    assert (await storage.counts())["dead"] == 3
    dead = {d["source_key"]: d for d in await storage.dead_items()}
    assert set(dead) == {"signature:1", "signature:2", "signature:3"}
    assert (await storage.dead_item(dead["signature:3"]["id"]))["kind"] == "malformed"

    result = await storage.requeue_dead()
    assert (result.queued, result.skipped_deleted, result.skipped_malformed) == (1, 1, 1)
    (item,) = await storage.lease(10, 60)
    assert item.activity.source_key == "signature:2" and item.attempts == 0
    assert (await storage.requeue_dead([dead["signature:1"]["id"]])).skipped_deleted == 1

    assert await storage.drop_dead([dead["signature:3"]["id"]]) == 1
    assert await storage.drop_dead() == 1
    assert await storage.dead_items() == []
    counts = await storage.counts()
    assert (counts["dead"], counts["cancelled"], counts["in_flight"]) == (0, 2, 1)
    assert await storage.dead_item(10_000) is None


@pytest.mark.anyio
async def test_requeue_since_replays_the_latest_version_and_skips_deleted(
    storage: Storage, clock: ManualClock
) -> None:
    await storage.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    await storage.enqueue([sig(2, "bob@example.org", first_name="Bea")])
    while items := await storage.lease(10, 60):
        for item in items:
            await storage.finish(item.id, "done", token=item.token)
    await storage.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z")],
                              deleted_sources=["signature:1"])
    assert (await storage.requeue_since("2030-01-01T00:00:00+00:00")).queued == 0
    result = await storage.requeue_since("2000-01-01T00:00:00+00:00")
    assert (result.queued, result.skipped_deleted) == (1, 1)
    (item,) = await storage.lease(10, 60)
    assert item.activity == sig(2, "bob@example.org", first_name="Bea")


# ---------------------------------------------------------------- webhook inbox and seen records


@pytest.mark.anyio
async def test_webhook_events_are_received_once_and_retried_until_processed(
    storage: Storage, clock: ManualClock
) -> None:
    assert await storage.receive_event("jid-1", "signature.created", '{"a":1}')
    assert await storage.receive_event("jid-1", "signature.created", '{"a":1}') is False
    assert await storage.receive_event("jid-2", "petition.updated", '{"b":2}')
    first, second = await storage.events_due()
    assert (first.type, first.body, first.attempts) == ("signature.created", '{"a":1}', 0)
    await storage.event_failed(first.id, "AN unavailable", clock() + 30)
    await storage.event_failed(second.id, "malformed", None)  # given up on
    assert await storage.events_due() == []
    clock.t += 30
    (again,) = await storage.events_due()
    assert (again.id, again.attempts) == (first.id, 1)
    await storage.commit_poll(None, [], [sig(1, "ann@example.org")], event_id=first.id)
    assert await storage.events_due() == []
    status = await storage.status()
    assert (status["webhooks_received"], status["webhooks_waiting"], status["webhooks_failed"]) \
        == (2, 0, 1)


@pytest.mark.anyio
async def test_mirrored_petition_uuid_and_creator_details(storage: Storage) -> None:
    assert await storage.petition_uuid(7) is None
    await storage.commit_poll(None, creator_extra=(7, "petition-7", '{"postcode":"2000"}'))
    await storage.set_petition_uuid(7, "petition-7", "u-1")
    state = await storage.petition_state(7)
    assert state is not None and (state.an_uuid, state.creator_extra) == (
        "u-1", '{"postcode":"2000"}')
    await storage.clear_petition_uuid(7, "u-old")  # a newer uuid stays
    assert await storage.petition_uuid(7) == "u-1"
    await storage.clear_petition_uuid(7, "u-1")
    assert await storage.petition_uuid(7) is None


@pytest.mark.anyio
async def test_pending_signature_emails_and_meta(storage: Storage) -> None:
    await storage.enqueue([sig(1, "Ann@Example.org"), sig(2, "bob@example.org"),
                           sig(3, "cy@example.org", pid=2)])
    (first, *_) = await storage.lease(1, 60)
    assert await storage.pending_signature_emails(1) == {
        s: e for s, e in {"signature:1": "Ann@Example.org", "signature:2": "bob@example.org"}.items()
        if s != first.activity.source_key}
    assert await storage.get_meta("org_slug") is None
    await storage.set_meta(org_slug=ORG, an_rate=2.5, an_paused=None)
    assert (await storage.get_meta("org_slug"), await storage.get_meta("an_rate")) == (ORG, "2.5")
    assert await storage.get_meta("an_paused") is None


@pytest.mark.anyio
async def test_an_event_handed_out_is_not_handed_out_again_until_its_claim_runs_out(
    storage: Storage, clock: ManualClock
) -> None:
    assert await storage.receive_event("jid-1", "signature.created", '{"a":1}')
    (claimed,) = await storage.events_due()
    assert await storage.events_due() == []  # another worker (or instance) asking now
    clock.t += EVENT_CLAIM_SECONDS + 1  # its process died before recording anything
    (again,) = await storage.events_due()
    assert again.id == claimed.id
    await storage.commit_poll(None, event_id=again.id)
    clock.t += EVENT_CLAIM_SECONDS + 1
    assert await storage.events_due() == []


# ---------------------------------------------------------------- cluster


@pytest.mark.anyio
async def test_leadership_is_renewed_by_its_holder_and_taken_over_once_it_expires(
    storage: Storage, clock: ManualClock
) -> None:
    me = storage.instance
    term = await storage.lead(15)
    assert term is not None
    clock.t += 10
    assert await storage.lead(15) == term  # renewed: same term
    view = await storage.cluster()
    assert (view["leader"], view["term"], view["leader_for_s"]) == (me, term, 15.0)
    clock.t += 16  # not renewed in time: the lease ran out; whoever asks next leads anew
    assert (await storage.cluster())["leader"] is None
    assert await storage.lead(15) == term + 1


@pytest.mark.anyio
async def test_a_fenced_commit_is_refused_once_its_term_is_over(
    storage: Storage, clock: ManualClock
) -> None:
    term = await storage.lead(15)
    assert term is not None
    fence = (storage.instance, term)
    assert await storage.commit_poll(petition_state(1), [seen_row(1)],
                                     [sig(1, "ann@example.org")], fence=fence) == 1
    clock.t += 16  # the lease ran out: another instance may be polling by now
    with pytest.raises(NotLeader):
        await storage.commit_poll(petition_state(2), [seen_row(2, 2)],
                                  [sig(2, "bob@example.org", pid=2)], fence=fence)
    assert await storage.petition_state(2) is None  # nothing of it was written
    assert [r["source_key"] for r in await storage.items()] == ["signature:1"]
    new = await storage.lead(15)
    with pytest.raises(NotLeader):  # a stale term is refused even when renewed since
        await storage.commit_poll(None, [], [sig(2, "bob@example.org", pid=2)], fence=fence)
    assert await storage.commit_poll(None, [], [sig(2, "bob@example.org", pid=2)],
                                     fence=(storage.instance, new)) == 1


@pytest.mark.anyio
async def test_resigning_hands_leadership_over_at_once(storage: Storage) -> None:
    term = await storage.lead(15)
    await storage.resign()
    assert (await storage.cluster())["leader"] is None
    again = await storage.lead(15)
    assert again is not None and again != term


@pytest.mark.anyio
async def test_heartbeats_show_each_instance_with_its_age(storage: Storage, clock: ManualClock
                                                          ) -> None:
    await storage.heartbeat({"pid": 42, "workers": 8})
    clock.t += 7
    (row,) = (await storage.cluster())["instances"]
    assert (row["instance"], row["pid"], row["workers"], row["heartbeat_age_s"]) == \
        (storage.instance, 42, 8, 7.0)
    await storage.heartbeat({"pid": 42, "workers": 4})
    (row,) = (await storage.cluster())["instances"]
    assert (row["workers"], row["heartbeat_age_s"]) == (4, 0.0)
    await storage.forget_instance()
    assert (await storage.cluster())["instances"] == []


@pytest.mark.anyio
async def test_an_instance_silent_for_a_day_is_dropped_from_the_list(
    storage: Storage, clock: ManualClock
) -> None:
    me = storage.instance
    storage.instance = "decommissioned"  # another instance's row, written as it would be
    await storage.heartbeat({"pid": 1})
    storage.instance = me
    clock.t += FORGET_INSTANCE_SECONDS - 1
    await storage.heartbeat({"pid": 2})
    assert len((await storage.cluster())["instances"]) == 2  # silent, but not for a day yet
    clock.t += 2
    await storage.heartbeat({"pid": 2})
    assert [i["instance"] for i in (await storage.cluster())["instances"]] == [me]


@pytest.mark.anyio
async def test_request_slots_are_spaced_and_wait_out_a_pause(storage: Storage, clock: ManualClock
                                                             ) -> None:
    waits = [await storage.reserve("an", 0.25) for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75])
    clock.t += 10  # idle: no credit is saved up for a burst
    assert await storage.reserve("an", 0.25) == pytest.approx(0.0)
    assert await storage.reserve("an", 0.25) == pytest.approx(0.25)
    # A 429: nobody's slot starts before the pause is over.
    assert await storage.reserve("an", 0.25, pause=5.0) == pytest.approx(5.0)
    assert await storage.reserve("an", 0.25) == pytest.approx(5.25)
    assert await storage.reserve("other", 0.25) == pytest.approx(0.0)  # buckets are separate


# ---------------------------------------------------------------- events


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["done", "dead"])
async def test_an_attendance_waits_for_its_event_host_like_a_signature_for_its_creator(
    storage: Storage, outcome: str
) -> None:
    await storage.enqueue([host("picnic"), attendance(1, "ann@example.org"),
                           attendance(2, "bob@example.org", slug="other")])
    leased = await storage.lease(10, 60)
    # The host goes first; the other event has no host item: its attendance need not wait.
    assert sorted(i.activity.source_key for i in leased) == ["attendee:2", "event:picnic:host"]
    (first,) = [i for i in leased if i.activity.source_key == "event:picnic:host"]
    await storage.finish(first.id, outcome)
    assert [i.activity.source_key for i in await storage.lease(10, 60)] == ["attendee:1"]


@pytest.mark.anyio
async def test_an_attendance_is_leasable_once_its_event_is_mirrored(storage: Storage) -> None:
    await storage.enqueue([host("picnic"), attendance(1, "ann@example.org")])
    (held,) = await storage.lease(10, 60)
    assert held.activity.source_key == "event:picnic:host"
    await storage.set_event_uuid("picnic", "an-event-1")
    assert await storage.event_uuid("picnic") == "an-event-1"
    assert [i.activity.source_key for i in await storage.lease(10, 60)] == ["attendee:1"]
    await storage.clear_event_uuid("picnic", "another")  # a newer twin is not forgotten
    assert await storage.event_uuid("picnic") == "an-event-1"
    await storage.clear_event_uuid("picnic", "an-event-1")
    assert await storage.event_uuid("picnic") is None


@pytest.mark.anyio
async def test_what_was_seen_of_an_event_keeps_what_a_later_commit_does_not_say(
    storage: Storage
) -> None:
    assert await storage.event_state("picnic") is None
    await storage.commit_poll(None, event=EventState("picnic", content="c1",
                                                     calendar_slug="summer"))
    await storage.commit_poll(None, event=EventState("picnic", inappropriate=True,
                                                     host_extra='{"first_name":"Hana"}'))
    await storage.commit_poll(None, event=EventState("picnic", content="c2"))
    state = await storage.event_state("picnic")
    assert state == EventState("picnic", content="c2", calendar_slug="summer", inappropriate=True,
                               host_extra='{"first_name":"Hana"}', an_uuid=None)
    assert await storage.calendar_uuid("summer") is None
    await storage.set_calendar_uuid("summer", "an-campaign-1")
    assert await storage.calendar_uuid("summer") == "an-campaign-1"


@pytest.mark.anyio
async def test_an_older_attendee_version_never_overwrites_a_newer_one_or_a_deletion(
    storage: Storage
) -> None:
    new = attendance(1, "ann@example.org", updated="2024-05-03T00:00:00Z", join_organisation=False)
    old = attendance(1, "ann@example.org", updated="2024-05-02T00:00:00Z")
    seen_new = AttendeeSeen(1, "picnic", new.fingerprint(), None, "2024-05-03T00:00:00+00:00")
    seen_old = AttendeeSeen(1, "picnic", old.fingerprint(), None, "2024-05-02T00:00:00+00:00")
    assert await storage.commit_poll(None, activities=[new], attendees=[seen_new]) == 1
    assert await storage.commit_poll(None, activities=[old], attendees=[seen_old]) == 0
    assert (await storage.attendees_seen("picnic"))[1] == seen_new
    gone = AttendeeSeen(1, "picnic", new.fingerprint(), "2024-05-04T00:00:00+00:00",
                        "2024-05-04T00:00:00+00:00")
    await storage.commit_poll(None, attendees=[gone], deleted_sources=["attendee:1"])
    assert (await storage.counts())["cancelled"] == 1
    (cancelled,) = [r for r in await storage.items() if r["status"] == "cancelled"]
    assert cancelled["note"] == "RSVP withdrawn or deleted on ControlShift before it was synced"
    await storage.commit_poll(None, activities=[new], attendees=[seen_new])  # a stale live copy
    assert (await storage.attendees_seen("picnic"))[1].deleted_at is not None
    assert (await storage.counts())["cancelled"] == 1  # and its item is not brought back


@pytest.mark.anyio
async def test_status_counts_events_and_attendees(storage: Storage) -> None:
    status = await storage.status()
    assert [status[k] for k in ("events_seen", "events_mirrored", "attendees_seen",
                                "attendees_deleted")] == [0, 0, 0, 0]
    a = attendance(1, "ann@example.org")
    await storage.commit_poll(None, activities=[a], event=EventState("picnic", content="c"),
                              attendees=[AttendeeSeen(1, "picnic", a.fingerprint(), None),
                                         AttendeeSeen(2, "picnic", "x", "2024-05-03T00:00:00Z")])
    await storage.set_event_uuid("picnic", "ev-1")
    status = await storage.status()
    assert [status[k] for k in ("events_seen", "events_mirrored", "attendees_seen",
                                "attendees_deleted")] == [1, 1, 2, 1]


@pytest.mark.anyio
async def test_an_rsvp_given_again_unchanged_after_it_was_withdrawn_while_queued_comes_back(
    storage: Storage
) -> None:
    """Else the second RSVP would be taken for the first, whose item the decline cancelled."""
    rsvp = attendance(1, "ann@example.org")
    assert await storage.enqueue([rsvp, sig(2, "bob@example.org")]) == 2
    await storage.commit_poll(None, deleted_sources=["attendee:1", "signature:2"])
    assert (await storage.counts())["cancelled"] == 2
    assert await storage.enqueue([rsvp]) == 1
    assert [i.activity.source_key for i in await storage.lease(10, 60)] == ["attendee:1"]
    assert await storage.enqueue([sig(2, "bob@example.org")]) == 0  # a deletion is for good


@pytest.mark.anyio
async def test_one_persons_signature_and_rsvp_are_applied_in_the_order_they_happened(
    storage: Storage
) -> None:
    rsvp = attendance(1, "ann@example.org", updated="2024-01-01T12:00:00Z")
    signature = sig(2, "ann@example.org", "2024-01-02T00:00:00Z")
    await storage.enqueue([signature, rsvp])  # the later one first
    (first,) = await storage.lease(10, 60)
    assert first.activity.source_key == "attendee:1"
    assert await storage.lease(10, 60) == []  # one in flight per person, events or petitions
    await storage.finish(first.id, "done")
    assert [i.activity.source_key for i in await storage.lease(10, 60)] == ["signature:2"]


@pytest.mark.anyio
async def test_a_host_who_rsvped_before_launch_is_not_stuck_behind_their_own_rsvp(
    storage: Storage
) -> None:
    """The RSVP is older than the hosting (dated at launch): it waits for the event, and the
    hosting, which creates it, must not wait for the RSVP."""
    own = attendance(1, "hana@example.org", updated="2024-04-01T00:00:00Z")
    await storage.enqueue([own, host("picnic", "hana@example.org")])
    (first,) = await storage.lease(10, 60)
    assert first.activity.source_key == "event:picnic:host"
    await storage.finish(first.id, "done")
    assert [i.activity.source_key for i in await storage.lease(10, 60)] == ["attendee:1"]


@pytest.mark.anyio
async def test_a_change_to_an_unmirrored_event_waits_for_every_item_that_may_mirror_it(
    storage: Storage
) -> None:
    from csand.model import event_change_activity, event_ref
    from tests.storage import event_record

    await storage.enqueue([host("picnic"), attendance(1, "ann@example.org")])
    (hosting,) = await storage.lease(10, 60)
    await storage.finish(hosting.id, "dead", error="host email invalid")  # no mirror made
    change = event_change_activity(event_ref(event_record("picnic"), ORG), None)
    await storage.enqueue([change])
    (rsvp,) = await storage.lease(10, 60)  # the RSVP mirrors the event; the change waits
    assert rsvp.activity.source_key == "attendee:1"
    await storage.set_event_uuid("picnic", "ev-1")
    assert [i.activity.kind for i in await storage.lease(10, 60)] == ["event_changed"]


@pytest.mark.anyio
async def test_an_event_flagged_inappropriate_cancels_what_is_queued_of_it(storage: Storage
                                                                        ) -> None:
    await storage.enqueue([host("picnic"), attendance(1, "ann@example.org"),
                           attendance(2, "bob@example.org", slug="other")])
    await storage.commit_poll(None, event=EventState("picnic", inappropriate=True))
    rows = {r["source_key"]: r for r in await storage.items()}
    assert rows["event:picnic:host"]["status"] == rows["attendee:1"]["status"] == "cancelled"
    assert rows["attendee:1"]["note"] == "event moderated as inappropriate on ControlShift"
    assert rows["attendee:2"]["status"] == "pending"


# ---------------------------------------------------------------- sync.history_start


@pytest.mark.anyio
async def test_activities_before_history_start_are_recorded_not_queued(
    storage: Storage, clock: ManualClock
) -> None:
    storage.history_start = datetime(2024, 3, 1, tzinfo=UTC)
    old = sig(1, "ann@example.org", "2024-01-02T00:00:00Z")
    new = sig(2, "bob@example.org", "2024-03-02T00:00:00Z")
    unsub = global_unsubscribe_activity(7, "cy@example.org", datetime(2020, 1, 1, tzinfo=UTC))
    assert await storage.commit_poll(None, activities=[old, new, unsub]) == 2
    rows = {r["source_key"]: r for r in await storage.items()}
    assert rows["signature:1"]["status"] == "cancelled"
    assert rows["signature:1"]["note"].startswith("before sync.history_start")
    # An org-wide unsubscribe is applied whatever its age.
    assert {rows["signature:2"]["status"], rows["unsubscribe:7"]["status"]} == {"pending"}
    leased = await storage.lease(10, 60)
    assert sorted(i.activity.source_key for i in leased) == ["signature:2", "unsubscribe:7"]
    status = await storage.status()
    assert status["history_skipped"] == 1

    # Seen again (the next sweep): still recorded once, not counted twice, not queued.
    assert await storage.commit_poll(None, activities=[old]) == 0
    assert (await storage.status())["history_skipped"] == 1
    # A newer version of the old signature (a late edit) is history made now: it syncs.
    edited = sig(1, "ann@example.org", "2024-01-02T00:00:00Z", first_name="Ann-Marie",
                 updated_at="2024-04-01T00:00:00Z")
    assert await storage.commit_poll(None, activities=[edited]) == 1


@pytest.mark.anyio
async def test_backfill_since_replays_what_history_start_held_back(
    storage: Storage, clock: ManualClock
) -> None:
    storage.history_start = datetime(2024, 3, 1, tzinfo=UTC)
    await storage.commit_poll(None, activities=[sig(1, "ann@example.org"),
                                                sig(2, "bob@example.org", "2023-06-01T00:00:00Z")])
    assert await storage.lease(10, 60) == []
    result = await storage.requeue_since("2024-01-01T00:00:00+00:00")
    assert result.queued == 1
    (item,) = await storage.lease(10, 60)
    assert item.activity.source_key == "signature:1"

# ---------------------------------------------------------------- csand audit


async def _finish_all(storage: Storage) -> None:
    while items := await storage.lease(10, 60):
        for item in items:
            await storage.finish(item.id, "done", token=item.token, note="signer synced "
                                 "(unsubscribed)")


@pytest.mark.anyio
async def test_audit_sample_gives_the_latest_synced_version_of_each_record(
    storage: Storage
) -> None:
    await storage.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org"),
                           sig(3, "cy@example.org", pid=2)])
    await _finish_all(storage)
    await storage.enqueue([sig(2, "bob@example.org", first_name="Bea")])  # pending: not synced
    await storage.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z")],
                              deleted_sources=["signature:1"])
    sample = {r["source_key"]: r for r in await storage.audit_sample(None)}
    assert sorted(sample) == ["signature:2", "signature:3"]
    assert sample["signature:2"]["payload"]["first_name"] == "Ann"  # the synced version
    assert sample["signature:3"]["payload"]["email"] == "cy@example.org"
    assert sample["signature:3"]["note"] == "signer synced (unsubscribed)"
    assert [r["source_key"] for r in await storage.audit_sample(None, petition_id=2)] == [
        "signature:3"]
    assert len(await storage.audit_sample(0)) == 0
    await _finish_all(storage)
    assert [r["payload"]["first_name"] for r in await storage.audit_sample(None, petition_id=1)
            ] == ["Bea"]
    assert {r["source_key"] for r in await storage.audit_sample(5)} == {"signature:2",
                                                                         "signature:3"}
    assert [r["status"] for r in await storage.person_items("bob@example.org")] == ["done",
                                                                                     "done"]


@pytest.mark.anyio
async def test_requeue_items_queues_a_repair_once_and_never_a_deleted_record(
    storage: Storage, clock: ManualClock
) -> None:
    await storage.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    await _finish_all(storage)
    ids = {r["source_key"]: r["id"] for r in await storage.items()}
    await storage.commit_poll(None, [SignatureSeen(2, 1, "deleted", "2024-02-01T00:00:00Z")],
                              deleted_sources=["signature:2"])
    result = await storage.requeue_items([ids["signature:1"], ids["signature:2"]])
    assert (result.queued, result.skipped_deleted) == (1, 1)
    clock.t += 1
    again = await storage.requeue_items([ids["signature:1"]])  # the first repair is pending
    assert again.queued == 0
    (item,) = await storage.lease(10, 60)
    assert item.activity == sig(1, "ann@example.org")
    await storage.finish(item.id, "done", token=item.token)
    clock.t += 1
    assert (await storage.requeue_items([ids["signature:1"]])).queued == 1


# ---------------------------------------------------------------- bulk-data files


async def _announce(storage: Storage, n: int, *, table: str = "unsubscribes",
                    kind: str = "incremental", jid: str | None = None,
                    expires_at: float | None = None) -> bool:
    url = f"https://bucket.example/org/{kind}/{table}_{n}.csv.bz2?X-Amz-Signature=s{n}"
    return await storage.record_bulk_file(url=url, jid=jid, table=table, kind=kind,
                                          compression="bzip2", body=f'{{"n": {n}}}',
                                          expires_at=expires_at)


@pytest.mark.anyio
async def test_bulk_files_are_recorded_once_by_url_or_jid(storage: Storage,
                                                          clock: ManualClock) -> None:
    assert await _announce(storage, 1, jid="j-1")
    assert await _announce(storage, 1, jid="j-1") is False  # a redelivery
    assert await _announce(storage, 1, jid="j-other") is False  # same file, other endpoint
    assert await _announce(storage, 2, jid="j-1") is False  # same webhook
    assert await _announce(storage, 3, expires_at=clock() + 60)
    first, second = await storage.bulk_files_due(limit=5)
    assert (first.table, first.kind, first.body, first.attempts, first.rows_done) == (
        "unsubscribes", "incremental", '{"n": 1}', 0, 0)
    assert first.url.endswith("unsubscribes_1.csv.bz2?X-Amz-Signature=s1")
    assert first.announced_at == clock()
    assert first.expires_at == clock() + 6 * 3600  # the URL did not say: 6 hours
    assert second.expires_at == clock() + 60
    status = await storage.status()
    assert status["bulk"]["files"]["processing"] == 2 and status["bulk"]["waiting"] == 2


@pytest.mark.anyio
async def test_a_claimed_bulk_file_is_handed_out_once_until_its_claim_runs_out(
    storage: Storage, clock: ManualClock
) -> None:
    await _announce(storage, 1)
    await _announce(storage, 2)
    (first,) = await storage.bulk_files_due()
    (second,) = await storage.bulk_files_due()
    assert first.id < second.id
    assert await storage.bulk_files_due() == []
    # A committed batch records the rows done and extends the claim.
    clock.t += BULK_CLAIM_SECONDS - 1
    await storage.commit_poll(None, activities=[global_unsubscribe_activity(
        1, "ann@example.org", datetime(2024, 3, 1, tzinfo=UTC))], bulk_progress=(first.id, 500))
    clock.t += 2
    (taken_over,) = await storage.bulk_files_due(limit=5)  # the second's claim ran out
    assert taken_over.id == second.id
    clock.t += BULK_CLAIM_SECONDS
    again, _ = await storage.bulk_files_due(limit=5)  # its holder died: resumed where it was
    assert (again.id, again.rows_done) == (first.id, 500)


@pytest.mark.anyio
async def test_bulk_file_retry_finish_and_release(storage: Storage, clock: ManualClock) -> None:
    for n in range(1, 5):
        await _announce(storage, n)
    one, two, three, four = await storage.bulk_files_due(limit=5)
    await storage.bulk_file_retry(one.id, "HTTP 503", clock() + 30)
    await storage.bulk_file_finished(two.id, "done", rows_done=1200)
    await storage.bulk_file_finished(three.id, "expired", error="the URL expired")
    with pytest.raises(ValueError):
        await storage.bulk_file_finished(four.id, "pending")
    assert await storage.bulk_files_due() == []
    assert await storage.release_bulk_files() == 1  # four: this instance's, due again now
    (four_again,) = await storage.bulk_files_due()
    assert four_again.id == four.id
    clock.t += 30
    (retried,) = await storage.bulk_files_due()
    assert (retried.id, retried.attempts) == (one.id, 1)
    await storage.bulk_file_retry(two.id, "late", clock())  # finished: stays finished
    await storage.bulk_file_finished(retried.id, "failed", error="ExportGone: 404")
    assert await storage.bulk_files_due() == []
    bulk = (await storage.status())["bulk"]
    assert bulk["files"] == {"pending": 0, "processing": 1, "done": 1, "skipped": 0,
                             "expired": 1, "failed": 1}
    assert (bulk["expired"], bulk["failed"]) == (1, 1)
    assert bulk["newest_expired"]["table"] == "unsubscribes"
    assert bulk["newest_expired"]["file"] == "unsubscribes_3.csv.bz2"  # no signature
    assert bulk["last_full_unsubscribes"] is None  # only incremental files


@pytest.mark.anyio
async def test_bulk_status_names_the_last_full_unsubscribes_reconciled(
    storage: Storage, clock: ManualClock
) -> None:
    bulk = await storage.bulk_status()
    assert bulk["first_seen_at"] is None and bulk["last_full_unsubscribes"] is None
    await _announce(storage, 1, kind="full")
    await _announce(storage, 2, kind="full", table="signatures")
    await _announce(storage, 3, kind="full")
    first, signatures, second = await storage.bulk_files_due(limit=5)
    clock.t += 10
    await storage.bulk_file_finished(first.id, "done", rows_done=100_000)
    await storage.bulk_file_finished(signatures.id, "skipped")
    clock.t += 10
    await storage.bulk_file_finished(second.id, "expired")  # not a reconciliation
    bulk = await storage.bulk_status()
    assert bulk["last_full_unsubscribes"] == {
        "reconciled_at": datetime.fromtimestamp(clock() - 10, UTC).isoformat(),
        "status": "done", "rows": 100_000,
        "announced_at": datetime.fromtimestamp(clock() - 20, UTC).isoformat()}
    assert bulk["first_seen_at"] == datetime.fromtimestamp(clock() - 20, UTC).isoformat()
    assert bulk["files"]["skipped"] == 1


@pytest.mark.anyio
async def test_an_org_wide_unsubscribe_is_one_item_whichever_source_brought_it_first(
    storage: Storage,
) -> None:
    at = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
    webhook = global_unsubscribe_activity(5, "Ann@Example.org", at)
    # The export renders the same unsubscribe's time without its milliseconds.
    export = global_unsubscribe_activity(5, "ann@example.org", at.replace(microsecond=0))
    webhook = dataclasses.replace(webhook, fields_at=at.replace(microsecond=123_000))
    assert webhook.dedupe_key != export.dedupe_key
    assert await storage.enqueue([webhook]) == 1
    assert await storage.enqueue([export]) == 0
    assert await storage.commit_poll(None, activities=[
        global_unsubscribe_activity(6, "bob@example.org", at),
        global_unsubscribe_activity(6, "bob@example.org", at.replace(second=1)),
        export]) == 1  # one per unsubscribe, also within one commit
    items = await storage.items()
    assert sorted(i["source_key"] for i in items) == ["unsubscribe:5", "unsubscribe:6"]
    # A malformed record's dead letter under the same key does not hide a good copy of it.
    await storage.commit_poll(None, dead_letters=[DeadLetter(
        source_key="unsubscribe:7", record='{"id": 7}', reason="email is missing",
        kind="unsubscribe")])
    assert await storage.enqueue([global_unsubscribe_activity(7, "cy@example.org", at)]) == 1


# ---------------------------------------------------------------- bulk data as a source


@pytest.mark.anyio
async def test_bulk_records_upsert_by_id_found_by_ref_and_forgotten_after_a_full_file(
        storage: Storage) -> None:
    await storage.commit_poll(None, bulk=BulkChanges(records=(
        ("petitions", 1, None, '{"id": "1", "title": "A"}'),
        ("categorized_petitions", 10, 1, '{"id": "10", "category_id": "5"}'),
        ("categorized_petitions", 11, 1, '{"id": "11", "category_id": "6"}'))))
    await storage.commit_poll(None, bulk=BulkChanges(records=(
        ("petitions", 1, None, '{"id": "1", "title": "B"}'),)))
    assert await storage.bulk_records("petitions", [1, 2]) == {1: '{"id": "1", "title": "B"}'}
    assert await storage.bulk_records("users", [1]) == {}
    assert await storage.bulk_records_by_ref("categorized_petitions", [1, 3]) == {
        1: ['{"id": "10", "category_id": "5"}', '{"id": "11", "category_id": "6"}']}
    # A full file (generation 7) holds link 11 only: link 10 was deleted on ControlShift. Link
    # 12 came with an incremental file announced after it (generation 9): it stays.
    await storage.commit_poll(None, bulk=BulkChanges(
        records=(("categorized_petitions", 12, 1, '{"id": "12", "category_id": "7"}'),),
        generation=9))
    await storage.commit_poll(None, bulk=BulkChanges(
        records=(("categorized_petitions", 11, 1, '{"id": "11", "category_id": "6"}'),),
        generation=7))
    assert await storage.bulk_forget("categorized_petitions", 7) == 1
    assert await storage.bulk_records_by_ref("categorized_petitions", [1]) == {
        1: ['{"id": "11", "category_id": "6"}', '{"id": "12", "category_id": "7"}']}
    assert await storage.bulk_records("petitions", [1])  # other tables untouched


@pytest.mark.anyio
async def test_bulk_parked_rows_wait_in_order_until_resolved_in_the_same_commit(
        storage: Storage) -> None:
    await storage.commit_poll(None, bulk=BulkChanges(park=(
        ("signature", 5, 2, '{"id": 5}'), ("signature", 3, 2, '{"id": 3}'),
        ("creator", 2, 2, None))))
    await storage.commit_poll(None, bulk=BulkChanges(park=(("signature", 5, 2, '{"id": 55}'),)))
    assert await storage.bulk_parked() == [
        Parked("creator", 2, 2, None), Parked("signature", 3, 2, '{"id": 3}'),
        Parked("signature", 5, 2, '{"id": 55}')]
    assert await storage.bulk_parked(after=("signature", 3), limit=5) == [
        Parked("signature", 5, 2, '{"id": 55}')]
    added = await storage.commit_poll(
        None, [seen_row(3, 2)], [sig(3, "ann@example.org", pid=2)],
        bulk=BulkChanges(unpark=(("signature", 3), ("creator", 2))))
    assert added == 1
    assert await storage.bulk_parked() == [Parked("signature", 5, 2, '{"id": 55}')]
    assert await storage.bulk_waiting("signature", [3, 5, 7]) == {5}
    assert await storage.bulk_waiting("creator", [2]) == set()


@pytest.mark.anyio
async def test_bulk_vanished_are_live_signatures_a_full_file_did_not_hold(
        storage: Storage) -> None:
    rows = [dataclasses.replace(seen_row(n, 1), updated_at=f"2024-03-0{n}T00:00:00+00:00")
            for n in range(1, 6)]
    rows[1] = dataclasses.replace(rows[1], fingerprint="deleted",
                                  deleted_at="2024-03-02T01:00:00+00:00")
    await storage.commit_poll(None, rows)
    assert set(await storage.signatures_seen_many([1, 2, 9])) == {1, 2}
    assert (await storage.signatures_seen_many([1]))[1] == rows[0]
    # The full file (generation 4), exported on 4 March, held signature 3 only.
    await storage.commit_poll(None, bulk=BulkChanges(generation=4, seen_signatures=(3,)))
    before = "2024-03-04T00:00:00+00:00"
    vanished = await storage.bulk_vanished(4, before)
    # 2 is deleted already, 3 was held, 4 and 5 were recorded after the export was taken.
    assert [s.cs_id for s in vanished] == [1]
    assert await storage.bulk_vanished(4, before, after=1) == []
    assert [s.cs_id for s in await storage.bulk_vanished(5, before)] == [1, 3]
    assert [s.cs_id for s in await storage.bulk_vanished(5, before, limit=1)] == [1]
