"""Bulk data as the source of signatures, petitions and creators (csand.controlshift.bulksource)
against the ControlShift and storage simulators, in process on a fake clock: the activities are
those polling builds, a signature ahead of its petition waits, the nightly diff finds late
opt-ins, deletions and vanished signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.controlshift.bulksource import BulkSource
from csand.controlshift.ingest import BulkIngest, TableHandlers
from csand.model import SignatureSeen, creator_activity, signature_activity
from csand.sim.controlshift import ControlShiftSim
from csand.sim.exports import BulkExports, StorageSim
from csand.storage import open_store
from tests.test_ingest import FILES, NO_WAIT, Clock, World, _no_sleep

ORG = "demo-org"


async def _org() -> str:
    return ORG


async def _org_url() -> str:
    return f"https://{ORG}.example.org"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    sim = ControlShiftSim(now=clock.now, org_slug=ORG)
    storage = StorageSim(now=clock.now, base_url="http://storage.test")
    store = await open_store(tmp_path / "csand.db", clock=clock)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=storage.app))
    handlers = TableHandlers()
    BulkSource(store, _org, _org_url, clock=clock).register(handlers)
    ingest = BulkIngest(store, http, handlers, clock=clock, batch_rows=4,
                        download_policy=NO_WAIT, policy=FILES, sleep=_no_sleep)
    try:
        yield World(clock, sim, storage, BulkExports(sim, storage), store, http, ingest)
    finally:
        await http.aclose()
        await store.close()
        sim.close()


def populate(sim: ControlShiftSim, petitions: int = 3, signers: int = 5) -> None:
    for p in range(petitions):
        sim.add_petition(title=f"Petition {p}", slug=f"p{p}",
                         categories=["Parks", "Local"][: p % 3],
                         creator={"first_name": "C", "last_name": f"{p}",
                                  "email": f"creator{p}@x.org", "postcode": "N1",
                                  "join_organisation": p % 2 == 0})
        for s in range(signers):
            sim.add_signature(f"p{p}", email=f"s{p}-{s}@x.org", first_name="S",
                              join_organisation=s % 2 == 0,
                              additional_fields={"why": "because"} if s == 1 else None)


def expected(sim: ControlShiftSim) -> set[str]:
    """The dedupe keys polling builds (creators with what the petition.* webhook adds)."""
    petitions = {p["slug"]: p for p in sim.petitions()}
    keys = set()
    for p in petitions.values():
        creator = p["creator"]
        raw = sim._petitions[p["slug"]]["creator"]
        extra = {"for_email": creator["email"].lower(), "postcode": raw["postcode"],
                 "join_organisation": raw["join_organisation"]}
        if p["launched"]:
            keys.add(creator_activity(p, ORG, extra).dedupe_key)
    for s in sim.signatures():
        petition = petitions[s["petition"]["slug"]]
        if not s["deleted_at"] and petition["launched"]:
            keys.add(signature_activity(s, {**petition, "id": petition["id"]}, ORG).dedupe_key)
    return keys


async def keys(w: World, status: str | None = None) -> set[str]:
    return {i["dedupe_key"] for i in await w.store.items()
            if status is None or i["status"] == status}


async def sync_incremental(w: World) -> None:
    await w.announce_all(w.exports.export_incremental())
    await w.ingest.run_due()


@pytest.mark.anyio
async def test_incremental_files_build_the_activities_polling_builds(world: World) -> None:
    w = world
    populate(w.sim)
    w.sim.add_petition(title="Draft", slug="draft", launched=False,
                       creator={"first_name": "D", "last_name": "D", "email": "d@x.org"})
    w.sim.add_signature("draft", email="early@x.org")
    await sync_incremental(w)
    assert await keys(w) == expected(w.sim)
    assert len(await keys(w)) == 3 + 15
    # The signature of the unlaunched petition waits (it syncs once the petition launches).
    assert [(p.kind, p.petition_id) for p in await w.store.bulk_parked()] == [
        ("signature", w.sim.petition("draft")["id"])]

    # Another minute: new signatures on known petitions, nothing new for the others.
    w.clock.t += 60
    w.sim.add_signature("p1", email="late@x.org", join_organisation=True)
    before = len(await keys(w))
    await sync_incremental(w)
    assert await keys(w) == expected(w.sim)
    assert len(await keys(w)) == before + 1


@pytest.mark.anyio
async def test_a_signature_ahead_of_its_petition_waits_then_syncs(world: World) -> None:
    w = world
    populate(w.sim, petitions=1, signers=2)
    files = w.exports.export_incremental()
    by_table = {f.table: f for f in files}
    assert await w.announce(by_table["signatures"])
    await w.ingest.run_due()
    assert await w.store.items() == []
    assert len(await w.store.bulk_parked()) == 2
    # The petition arrives without its creator's users row: still waiting.
    assert await w.announce(by_table["petitions"])
    await w.ingest.run_due()
    assert await w.store.items() == []
    await w.announce_all([f for t, f in by_table.items() if t not in ("signatures", "petitions")])
    await w.ingest.run_due()
    assert await keys(w) == expected(w.sim)
    assert await w.store.bulk_parked() == []


@pytest.mark.anyio
async def test_the_same_signature_from_webhook_poll_and_export_is_one_item(world: World) -> None:
    w = world
    populate(w.sim, petitions=1, signers=1)
    rest = w.sim.signatures()[0]
    petition = w.sim.petitions()[0]
    activity = signature_activity(rest, petition, ORG)
    # A poll (or a webhook) saw it first.
    seen = SignatureSeen(rest["id"], petition["id"], activity.fingerprint(), None,
                         activity.occurred_at.isoformat() if activity.occurred_at else None)
    await w.store.commit_poll(None, [seen], [activity])
    await sync_incremental(w)
    assert [i["source_key"] for i in await w.store.items()].count(f"signature:{rest['id']}") == 1


@pytest.mark.anyio
async def test_the_nightly_diff_finds_opt_ins_deletions_category_changes_and_vanished(
        world: World) -> None:
    w = world
    populate(w.sim, petitions=2, signers=4)
    await sync_incremental(w)
    synced = await keys(w)
    sigs = w.sim.signatures()
    late, gone = sigs[1]["id"], sigs[2]["id"]  # not opted in; opted in
    # Recorded by csand (as from an earlier poll), then removed from ControlShift entirely.
    vanished = SignatureSeen(999_999, w.sim.petition("p0")["id"],
                             "fp", None, "2024-10-01T11:00:00+00:00")
    await w.store.commit_poll(None, [vanished])
    w.clock.t += 3600
    w.sim.update_signature(late, join_organisation=True, confirmed_at=w.clock.now())
    w.sim.delete_signature(gone)
    w.sim.update_petition("p1", categories=["Parks", "Rivers"])  # every signer: a new tag
    w.clock.t += 3600
    # The joined tables' files first: a category change reaches the signers with the diff of
    # the first signatures file processed after the category links (else the next night's).
    files = w.exports.export_full_all()
    await w.announce_all(sorted(files, key=lambda f: f.table == "signatures"))
    await w.ingest.run_due()
    now = await keys(w)
    assert expected(w.sim) <= now
    new = now - synced
    sources = {k.split("@")[0] for k in new}
    p1 = w.sim.petition("p1")["id"]
    p1_signers = {f"signature:{s['id']}" for s in w.sim.signatures("p1") if not s["deleted_at"]}
    assert sources == {f"signature:{late}", f"petition:{p1}:creator"} | p1_signers
    assert (await w.store.signature_seen(gone)).deleted_at  # type: ignore[union-attr]
    assert (await w.store.signature_seen(999_999)).deleted_at  # type: ignore[union-attr]
    # The same nightly file again adds nothing and finds nothing more.
    w.clock.t += 60
    await w.announce_all(w.exports.export_full_all())
    await w.ingest.run_due()
    assert await keys(w) == now


@pytest.mark.anyio
async def test_a_vanished_signature_still_pending_is_cancelled(world: World) -> None:
    w = world
    populate(w.sim, petitions=1, signers=1)
    await sync_incremental(w)
    ghost = signature_activity({"id": 424242, "email": "ghost@x.org",
                                "created_at": "2024-10-01T11:00:00Z",
                                "updated_at": "2024-10-01T11:00:00Z"},
                               w.sim.petitions()[0], ORG)
    await w.store.commit_poll(None, [SignatureSeen(424242, w.sim.petitions()[0]["id"],
                                                   ghost.fingerprint(), None,
                                                   "2024-10-01T11:00:00+00:00")], [ghost])
    w.clock.t += 600
    await w.announce(w.exports.export_full("signatures"))
    await w.ingest.run_due()
    (item,) = [i for i in await w.store.items() if i["source_key"] == "signature:424242"]
    assert item["status"] == "cancelled"


@pytest.mark.anyio
async def test_signatures_after_the_export_was_taken_are_not_vanished(world: World) -> None:
    w = world
    populate(w.sim, petitions=1, signers=2)
    await sync_incremental(w)
    full = w.exports.export_full("signatures")
    w.clock.t += timedelta(minutes=5).total_seconds()
    w.sim.add_signature("p0", email="after@x.org")
    await sync_incremental(w)  # recorded before the (older) full file is processed
    await w.announce(full)
    await w.ingest.run_due()
    after = [s for s in w.sim.signatures() if s["email"] == "after@x.org"][0]
    assert not (await w.store.signature_seen(after["id"])).deleted_at  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_no_signature_is_enqueued_before_its_petitions_creator(world: World) -> None:
    """A petition's files and its signatures in one drain (the petition's row first): the
    signatures wait for the creator, whose item must come first (the AN petition is created by
    the first of them, and only creation sets its creator link)."""
    w = world
    populate(w.sim, petitions=1, signers=3)
    files = w.exports.export_incremental()
    await w.announce_all(sorted(files, key=lambda f: f.table == "signatures"))
    await w.ingest.run_due()
    items = sorted(await w.store.items(), key=lambda i: i["id"])
    assert items[0]["source_key"].endswith(":creator")
    assert len(items) == 4 and await w.store.bulk_parked() == []



@pytest.mark.anyio
async def test_an_unreadable_row_is_a_dead_letter_keyed_by_its_signature(world: World) -> None:
    w = world
    populate(w.sim, petitions=1, signers=1)
    await sync_incremental(w)
    source = BulkSource(w.store, _org, _org_url)
    batch = await source.new_signatures(
        [{"id": "77", "petition_id": "1", "email": "x@x.org", "join_organisation": "maybe"}],
        None)  # type: ignore[arg-type]
    (letter,) = batch.dead_letters
    assert letter.source_key == "signature:77" and "join_organisation" in letter.reason


@pytest.mark.anyio
async def test_an_unreadable_row_of_the_nightly_file_has_not_vanished(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row csand cannot read is a dead letter, but its signature is still in ControlShift: it
    must not be recorded deleted (deleted stays deleted: its correction would never sync)."""
    w = world
    populate(w.sim, petitions=1, signers=2)
    await sync_incremental(w)
    target = w.sim.signatures()[0]["id"]
    original = BulkExports._signature

    def unreadable(self: BulkExports, s: Any, pids: Any) -> dict[str, Any]:
        row = original(self, s, pids)
        if row["id"] == target:
            row["join_organisation"] = "maybe"
        return row

    monkeypatch.setattr(BulkExports, "_signature", unreadable)
    w.clock.t += 600
    await w.announce(w.exports.export_full("signatures"))
    await w.ingest.run_due()
    seen = await w.store.signature_seen(target)
    assert seen is not None and not seen.deleted_at
    assert any(i["source_key"] == f"signature:{target}" and i["status"] == "dead"
               for i in await w.store.items())


@pytest.mark.anyio
async def test_two_nightly_files_interleaved_do_not_vanish_each_others_rows(world: World) -> None:
    """File A is read half-way, then waits for a retry; a later file B is read whole meanwhile
    (or by another instance). A's end must not take the rows B marked for vanished ones."""
    from csand.controlshift.bulk import ExportFile
    from csand.storage.bulk import BulkFile

    w = world
    populate(w.sim, petitions=1, signers=4)
    await sync_incremental(w)
    rows = w.exports.rows("signatures")
    w.clock.t += 600
    now = w.clock.now().timestamp()
    source = BulkSource(w.store, _org, _org_url, clock=w.clock)
    body = ExportFile(table="signatures", kind="full", url="https://s3.test/signatures.csv",
                      compression=None,
                      exported_at=w.clock.now()).to_json()
    a = BulkFile(101, "signatures", "full", "u", body, now, now + 1e6, 0, 0)
    b = BulkFile(102, "signatures", "full", "u2", body, now, now + 1e6, 0, 0)

    async def commit(part: list[Any], file: BulkFile) -> None:
        batch = await source.all_signatures(part, file)
        await w.store.commit_poll(None, activities=batch.activities,
                                  dead_letters=batch.dead_letters, **dict(batch.commit))

    await commit(rows[:2], a)
    await commit(rows, b)
    assert await source.vanished(b) == 0
    await commit(rows[2:], a)
    assert await source.vanished(a) == 0


@pytest.mark.anyio
async def test_a_nightly_file_whose_time_is_unknown_takes_nothing_for_vanished(
    world: World,
) -> None:
    """Without a stamp in the file's name the snapshot's time is unknown: the URL's signing
    time or the announcement is later, and would take signatures made meanwhile for vanished."""
    from csand.storage.bulk import BulkFile

    w = world
    populate(w.sim, petitions=1, signers=4)
    await sync_incremental(w)
    rows = w.exports.rows("signatures")
    w.clock.t += 600
    now = w.clock.now().timestamp()
    source = BulkSource(w.store, _org, _org_url, clock=w.clock)
    unstamped = BulkFile(103, "signatures", "full", "u", "{}", now, now + 1e6, 0, 0)
    batch = await source.all_signatures(rows[:1], unstamped)  # the others are not in it
    await w.store.commit_poll(None, activities=batch.activities,
                              dead_letters=batch.dead_letters, **dict(batch.commit))
    assert await source.vanished(unstamped) == 0
    assert not any(s.deleted_at for s in (await w.store.signatures_seen(
        w.sim.petitions()[0]["id"])).values())
