"""The poller (csand.controlshift.poller) against the ControlShift simulator, in process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from csand.controlshift import client as client_module
from csand.controlshift.client import ControlShiftClient, CSError
from csand.controlshift.poller import Poller, edge_order
from csand.model import dead_letter
from csand.ratelimit import TokenBucket
from csand.sim.controlshift import ControlShiftSim
from csand.storage import Storage, open_store
from tests.fakes import ManualClock

SIGNATURES_ROUTE = "GET /api/v1/petitions/{slug}/signatures"
PETITIONS_ROUTE = "GET /api/v1/petitions"
T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)



@dataclass
class Env:
    sim: ControlShiftSim
    store: Storage
    poller: Poller
    clock: ManualClock
    db_path: Path

    def outbox(self, where: str = "1") -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            found = conn.execute(f"SELECT * FROM outbox WHERE {where} ORDER BY id").fetchall()
        finally:
            conn.close()
        return [dict(r) | {"payload": json.loads(r["payload"])} for r in found]

    def routes(self) -> dict[str, int]:
        return self.sim.stats()["by_route"]


def creator(n: int = 0) -> dict[str, Any]:
    return {"first_name": "Cleo", "last_name": f"Ng{n}", "email": f"creator{n}@example.org"}


@asynccontextmanager
async def make_env(tmp_path: Path, **sim_kw: Any) -> AsyncIterator[Env]:
    sim_kw.setdefault("page_size", 5)
    stamps = iter(T0 + timedelta(seconds=i) for i in range(100_000))
    sim = ControlShiftSim(requests_per_minute=None, now=lambda: next(stamps), **sim_kw)
    clock = ManualClock(1_727_784_000.0)
    db_path = tmp_path / "csand.db"
    store = await open_store(db_path, clock=clock)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            cs = ControlShiftClient(http, "http://cs.test", api_key="cs-test-key",
                                    limiter=TokenBucket(1e6))
            yield Env(sim, store, Poller(cs, store, clock=clock), clock, db_path)
    finally:
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


def test_edge_order() -> None:
    assert edge_order(1) == [1]
    assert edge_order(4) == [1, 4, 2, 3]
    assert edge_order(5) == [1, 5, 2, 4, 3]


@pytest.mark.anyio
async def test_backfill_enqueues_launched_petitions_only(env: Env) -> None:
    sim = env.sim
    one = sim.add_petition(title="One", creator=creator(1), categories=["Avoiding Taxes"])
    two = sim.add_petition(title="Two", creator=creator(2))
    draft = sim.add_petition(title="Draft", creator=creator(3), launched=False)
    for i in range(7):
        sim.add_signature(one["slug"], email=f"s{i}@example.org", join_organisation=i % 2 == 0)
    sim.add_signature(two["slug"], email="t@example.org")
    sim.add_signature(draft["slug"], email="d@example.org")

    report = await env.poller.cycle()
    assert report.petitions == 2 and report.enqueued == 10 and report.malformed == 0

    items = env.outbox()
    sources = sorted(i["source_key"] for i in items)
    expected_sigs = [f"signature:{s['id']}" for s in sim.signatures(one["slug"]) + sim.signatures(two["slug"])]
    assert sources == sorted([f"petition:{one['id']}:creator", f"petition:{two['id']}:creator", *expected_sigs])
    assert not any(i["petition_id"] == draft["id"] for i in items)
    assert env.routes()["GET /api/v1/organisation"] == 1

    first = next(i for i in items if i["source_key"] == f"petition:{one['id']}:creator")
    assert first["kind"] == "petition_created"
    assert first["payload"]["email"] == "creator1@example.org"
    assert first["payload"]["petition"]["identifier"] == f"controlshift-demo-org:petition-{one['id']}"
    assert set(first["payload"]["tags"]) == {"controlshift-petition-creator", "controlshift:Avoiding Taxes"}
    signer = next(i for i in items if i["payload"]["email"] == "s0@example.org")
    assert signer["payload"]["opted_in"] is True
    assert set(signer["payload"]["tags"]) == {"controlshift-petition-signer", "controlshift:Avoiding Taxes"}

    status = await env.store.status()
    assert status["backfill_done"] is True
    assert status["petitions_seen"] == 2 and status["signatures_seen"] == 8


@pytest.mark.anyio
async def test_unchanged_cycle_only_lists_petitions(env: Env) -> None:
    for n in range(3):
        p = env.sim.add_petition(title=f"P{n}", creator=creator(n))
        for i in range(6):
            env.sim.add_signature(p["slug"], email=f"s{n}-{i}@example.org")
    await env.poller.cycle()
    before = len(env.outbox())
    env.sim.reset_stats()

    report = await env.poller.cycle()
    assert report.enqueued == 0 and report.walked == 0 and report.pages == 0
    assert env.routes() == {PETITIONS_ROUTE: 1}
    assert len(env.outbox()) == before


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_new_signature_found_with_few_page_requests(tmp_path: Path, order: str) -> None:
    async with make_env(tmp_path, signature_order=order) as env:
        p = env.sim.add_petition(title="Big", creator=creator())
        for i in range(60):
            env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
        await env.poller.cycle()
        assert len(env.outbox("kind = 'signature'")) == 60
        env.sim.reset_stats()

        new = env.sim.add_signature(p["slug"], email="late@example.org", join_organisation=True)
        report = await env.poller.cycle()
        assert report.enqueued == 1
        assert env.routes()[SIGNATURES_ROUTE] <= 3
        (item,) = env.outbox(f"source_key = 'signature:{new['id']}'")
        assert item["payload"]["email"] == "late@example.org"
        assert item["status"] == "pending"


@pytest.mark.anyio
async def test_late_opt_in_found_only_by_a_full_cycle(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org", join_organisation=None)
            for i in range(12)]
    await env.poller.cycle()
    env.sim.update_signature(sigs[4]["id"], join_organisation=True)
    env.sim.reset_stats()

    assert (await env.poller.cycle()).enqueued == 0
    assert SIGNATURES_ROUTE not in env.routes()

    report = await env.poller.cycle(full=True)
    assert report.enqueued == 1
    versions = env.outbox(f"source_key = 'signature:{sigs[4]['id']}'")
    assert [v["payload"]["opted_in"] for v in versions] == [False, True]


@pytest.mark.anyio
@pytest.mark.parametrize("deleted_visible", [
    True,
    False,
])
async def test_deleted_signature_cancels_its_pending_item(tmp_path: Path, deleted_visible: bool) -> None:
    async with make_env(tmp_path, deleted_visible=deleted_visible) as env:
        p = env.sim.add_petition(title="P", creator=creator())
        sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(8)]
        await env.poller.cycle()
        env.sim.delete_signature(sigs[3]["id"])

        report = await env.poller.cycle()  # the count shrank: an incremental cycle finds it
        assert report.enqueued == 0
        (item,) = env.outbox(f"source_key = 'signature:{sigs[3]['id']}'")
        assert item["status"] == "cancelled"
        assert (await env.store.signatures_seen(p["id"]))[sigs[3]["id"]].deleted_at
        status = await env.store.status()
        assert status["cancelled"] == 1 and status["signatures_deleted"] == 1
        assert status["pending"] == 8  # creator + the 7 others


@pytest.mark.anyio
async def test_new_signature_after_an_invisible_deletion_is_found_incrementally(tmp_path: Path) -> None:
    async with make_env(tmp_path, deleted_visible=False, signature_order="asc") as env:
        p = env.sim.add_petition(title="P", creator=creator())
        sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(20)]
        await env.poller.cycle()
        env.sim.delete_signature(sigs[0]["id"])
        await env.poller.cycle()
        new = env.sim.add_signature(p["slug"], email="new@example.org")
        await env.poller.cycle()
        assert env.outbox(f"source_key = 'signature:{new['id']}'")


@pytest.mark.anyio
async def test_signature_deleted_before_first_seen_is_recorded_not_enqueued(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    gone = env.sim.add_signature(p["slug"], email="gone@example.org")
    env.sim.add_signature(p["slug"], email="kept@example.org")
    env.sim.delete_signature(gone["id"])
    await env.poller.cycle()
    assert not env.outbox(f"source_key = 'signature:{gone['id']}'")
    assert (await env.store.signatures_seen(p["id"]))[gone["id"]].deleted_at
    assert len(env.outbox("kind = 'signature'")) == 1


@pytest.mark.anyio
async def test_single_petition_unsubscribe_changes_nothing(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org", join_organisation=True)
            for i in range(3)]
    await env.poller.cycle()
    env.sim.update_signature(sigs[1]["id"], unsubscribe_at=(T0 + timedelta(days=2)).isoformat())
    before = len(env.outbox())
    assert (await env.poller.cycle()).enqueued == 0
    assert (await env.poller.cycle(full=True)).enqueued == 0
    assert len(env.outbox()) == before


@pytest.mark.anyio
async def test_malformed_signature_is_logged_and_kept_as_a_dead_letter(
    env: Env, monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    for i in range(3):
        env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
    real = env.poller.cs.signatures_page

    async def with_garbage(slug: str, page: int) -> tuple[list[Any], dict[str, Any]]:
        items, meta = await real(slug, page)
        return [{"email": "noid@example.org", "created_at": "2024-10-01T00:00:00Z"},
                {"id": "not-a-number", "email": "x@example.org"}, "garbage", *items], meta

    monkeypatch.setattr(env.poller.cs, "signatures_page", with_garbage)
    with capture_logs() as logs:
        report = await env.poller.cycle()
    assert report.malformed == 3
    assert report.enqueued == 4  # creator + the 3 good signatures
    assert sorted(i["payload"]["email"] for i in env.outbox("kind = 'signature'")) == [
        "s0@example.org", "s1@example.org", "s2@example.org"]
    malformed = [e for e in logs if e["event"] == "cs.malformed_signature"]
    assert len(malformed) == 3
    assert all(e["log_level"] == "error" and e["petition"] == p["slug"] for e in malformed)
    assert sorted((d["source_key"], d["last_error"]) for d in env.outbox("status = 'dead'")) == [
        ("signature:'not-a-number'", "malformed ControlShift signature 'not-a-number': id is "
         "not an integer (str)"),
        ("signature:(no id)", "malformed ControlShift signature (no id): id is missing"),
        ("signature:(no id)", "malformed ControlShift signature (no id): not an object (str)"),
    ]


@pytest.mark.anyio
async def test_category_change_walks_everything_and_retags(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator=creator(), categories=["Water"])
    for i in range(12):
        env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
    await env.poller.cycle()
    env.sim.reset_stats()
    env.sim.update_petition(p["slug"], categories=["Water", "Avoiding Taxes"])

    report = await env.poller.cycle()
    assert env.routes()[SIGNATURES_ROUTE] == 3  # every page of 12 signatures at 5 a page
    assert report.enqueued == 13  # a new version for the creator and every signer
    newest = {}
    for item in env.outbox():
        newest[item["source_key"]] = item
    assert len(newest) == 13
    assert all("controlshift:Avoiding Taxes" in i["payload"]["tags"] for i in newest.values())
    assert all("controlshift:Water" in i["payload"]["tags"] for i in newest.values())


@pytest.mark.anyio
async def test_retitle_walks_but_enqueues_nothing(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    for i in range(4):
        env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
    await env.poller.cycle()
    env.sim.update_petition(p["slug"], title="A better title")
    report = await env.poller.cycle()
    assert report.walked == 1 and report.enqueued == 0


@pytest.mark.anyio
async def test_meta_after_cycles(env: Env) -> None:
    env.sim.add_petition(title="P", creator=creator())
    assert (await env.store.status())["last_poll_at"] is None
    first = env.clock()
    await env.poller.cycle()
    assert await env.store.get_meta("backfill_done") == "1"
    assert float(await env.store.get_meta("last_poll_at")) == first
    assert float(await env.store.get_meta("last_reconcile_at")) == first
    assert await env.store.get_meta("org_slug") == "demo-org"

    env.clock.t += 30
    await env.poller.cycle()
    assert float(await env.store.get_meta("last_poll_at")) == first + 30
    assert float(await env.store.get_meta("last_reconcile_at")) == first

    env.clock.t += 30
    await env.poller.cycle(full=True)
    assert float(await env.store.get_meta("last_reconcile_at")) == first + 60
    status = await env.store.status()
    assert datetime.fromisoformat(status["last_poll_at"]).timestamp() == first + 60
    assert env.routes()["GET /api/v1/organisation"] == 1
    assert env.poller.cycles == 3


@pytest.mark.anyio
async def test_big_petition_committed_in_chunks_and_resumed_after_a_failure(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = env.sim.add_petition(title="Huge", creator=creator())
    for i in range(110):  # 22 pages at 5 a page: more than one commit chunk
        env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
    real = env.poller.cs.signatures_page
    fetched: list[int] = []

    async def failing_late(slug: str, page: int) -> tuple[list[Any], dict[str, Any]]:
        if len(fetched) == 21:  # the last page of the walk fails
            raise CSError("ControlShift answered 503")
        fetched.append(page)
        return await real(slug, page)

    monkeypatch.setattr(env.poller.cs, "signatures_page", failing_late)
    with pytest.raises(CSError):
        await env.poller.cycle()
    # What was seen before the failure is kept, and it was enqueued with it.
    seen = await env.store.signatures_seen(p["id"])
    assert len(env.outbox("kind = 'signature'")) == len(seen) >= 100
    assert await env.store.get_meta("backfill_done") is None

    monkeypatch.undo()
    await env.poller.cycle()
    signatures = env.outbox("kind = 'signature'")
    assert len(signatures) == 110
    assert len({s["source_key"] for s in signatures}) == 110
    assert len(env.outbox("kind = 'petition_created'")) == 1
    assert len(await env.store.signatures_seen(p["id"])) == 110


@pytest.mark.anyio
async def test_malformed_petition_is_logged_and_skipped(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    env.sim.add_signature(p["slug"], email="s@example.org")
    real = env.poller.cs.pages
    garbage = [{"slug": "no-id", "launched": True}, "garbage",
               {"id": "7", "slug": "string-id", "launched": True},
               {"id": True, "slug": "bool-id", "launched": True},
               {"id": 98, "launched": True},
               {"id": 99, "slug": "bad-title", "title": {"en": "T"}, "launched": True}]

    async def with_garbage(path: str, key: str, start: int = 1) -> Any:
        async for items, meta in real(path, key, start):
            yield ([*garbage, *items] if key == "petitions" else items), meta

    monkeypatch.setattr(env.poller.cs, "pages", with_garbage)
    with capture_logs() as logs:
        report = await env.poller.cycle()
    assert report.malformed == 6 and report.petitions == 2 and report.enqueued == 2
    assert sum(e["event"] == "cs.malformed_petition" for e in logs) == 6
    assert {i["petition_id"] for i in env.outbox()} == {p["id"]}


@pytest.mark.anyio
async def test_petition_launched_later_is_walked_whole(env: Env) -> None:
    p = env.sim.add_petition(title="Draft", creator=creator(), launched=False)
    for i in range(7):
        env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
    assert (await env.poller.cycle()).enqueued == 0
    env.sim.update_petition(p["slug"], launched=True)
    report = await env.poller.cycle()
    assert report.enqueued == 8
    assert len(env.outbox("kind = 'signature'")) == 7


# ---- malformed records: a dead letter each, and everything around them syncs ----


def dead_letters(env: Env) -> list[dict[str, Any]]:
    return env.outbox("status = 'dead'")


def corrupting(env: Env, monkeypatch: pytest.MonkeyPatch, sig_id: int,
               changes: dict[str, Any]) -> None:
    """Serve signature ``sig_id`` with ``changes`` applied, as a broken ControlShift would."""
    real = env.poller.cs.signatures_page

    async def corrupted(slug: str, page: int) -> tuple[list[Any], dict[str, Any]]:
        items, meta = await real(slug, page)
        return [({**i, **changes} if i.get("id") == sig_id else i) for i in items], meta

    monkeypatch.setattr(env.poller.cs, "signatures_page", corrupted)


@pytest.mark.anyio
@pytest.mark.parametrize(("changes", "reason"), [
    ({"email": 42}, "email is not a string (int)"),
    ({"email": ["a@example.org"]}, "email is not a string (list)"),
    ({"email": {"address": "a@example.org"}}, "email is not a string (dict)"),
    ({"first_name": {"given": "Ann"}}, "first_name is not a string (dict)"),
    ({"last_name": 7}, "last_name is not a string (int)"),
    ({"postcode": 2000}, "postcode is not a string (int)"),
    ({"created_at": 1727784000}, "created_at is not a timestamp (int)"),
    ({"updated_at": "yesterday"}, "updated_at is not a timestamp"),
    ({"join_organisation": "yes"}, "join_organisation is not true, false or null (str)"),
    ({"join_organisation": 1}, "join_organisation is not true, false or null (int)"),
    ({"deleted_at": 5}, "deleted_at is not a string (int)"),
])
async def test_malformed_signature_is_a_dead_letter_and_the_rest_syncs(
    env: Env, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], reason: str,
) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(12)]
    bad = sigs[6]
    corrupting(env, monkeypatch, bad["id"], changes)

    with capture_logs() as logs:
        report = await env.poller.cycle()
    assert report.malformed == 1
    (dead,) = dead_letters(env)
    assert dead["source_key"] == f"signature:{bad['id']}"
    assert dead["last_error"].startswith(f"malformed ControlShift signature {bad['id']}: {reason}")
    assert dead["petition_id"] == p["id"]
    assert dead["payload"]["malformed"]  # what CS sent, for the operator
    pending = env.outbox("status = 'pending'")
    assert sorted(i["source_key"] for i in pending) == sorted(
        [f"petition:{p['id']}:creator"]
        + [f"signature:{s['id']}" for s in sigs if s["id"] != bad["id"]])
    assert any(e["event"] == "cs.malformed_signature" and e["log_level"] == "error"
               for e in logs)

    # Seen again every sweep, it stays one dead letter.
    await env.poller.cycle(full=True)
    await env.poller.cycle(full=True)
    assert len(dead_letters(env)) == 1
    assert len(env.outbox()) == 13

    # ControlShift corrects it: the next sweep syncs it normally.
    monkeypatch.undo()
    report = await env.poller.cycle(full=True)
    assert report.malformed == 0 and report.enqueued == 1
    (fixed,) = env.outbox(f"source_key = 'signature:{bad['id']}' AND status = 'pending'")
    assert fixed["payload"]["email"] == bad["email"]


@pytest.mark.anyio
async def test_signature_with_a_non_string_email_from_the_simulator(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    good = env.sim.add_signature(p["slug"], email="good@example.org")
    bad = env.sim.add_signature(p["slug"], email=12345)  # type: ignore[arg-type]
    report = await env.poller.cycle()
    assert report.malformed == 1
    (dead,) = dead_letters(env)
    assert dead["last_error"] == (
        f"malformed ControlShift signature {bad['id']}: email is not a string (int)")
    assert {i["source_key"] for i in env.outbox("status = 'pending'")} == {
        f"petition:{p['id']}:creator", f"signature:{good['id']}"}
    # The walk counted it: the next incremental cycle has nothing left to look for.
    env.sim.reset_stats()
    assert (await env.poller.cycle()).walked == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("changes", "source", "reason"), [
    ({"id": "42"}, "signature:'42'", "id is not an integer (str)"),
    ({"id": True}, "signature:True", "id is not an integer (bool)"),
    ({"id": 4.0}, "signature:4.0", "id is not an integer (float)"),
])
async def test_signature_with_a_bad_id_is_a_dead_letter(
    env: Env, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], source: str, reason: str,
) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(3)]
    corrupting(env, monkeypatch, sigs[1]["id"], changes)
    report = await env.poller.cycle()
    assert report.malformed == 1
    (dead,) = dead_letters(env)
    assert dead["source_key"] == source
    assert reason in dead["last_error"]
    assert len(env.outbox("status = 'pending'")) == 3  # the creator and the two others
    await env.poller.cycle(full=True)
    assert len(dead_letters(env)) == 1


@pytest.mark.anyio
async def test_malformed_creator_is_a_dead_letter_and_the_signers_sync(env: Env) -> None:
    p = env.sim.add_petition(title="P", creator={"first_name": {"x": 1}, "email": "c@example.org"})
    sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(3)]
    report = await env.poller.cycle()
    assert report.malformed == 1
    (dead,) = dead_letters(env)
    assert dead["source_key"] == f"petition:{p['id']}:creator"
    assert dead["last_error"] == (
        f"malformed ControlShift petition {p['id']} creator: creator.first_name is not a "
        "string (dict)")
    assert sorted(i["source_key"] for i in env.outbox("status = 'pending'")) == sorted(
        f"signature:{s['id']}" for s in sigs)
    more = env.sim.add_signature(p["slug"], email="more@example.org")  # the petition changes
    assert (await env.poller.cycle(full=True)).enqueued == 1
    assert len(dead_letters(env)) == 1 and env.outbox(f"source_key = 'signature:{more['id']}'")


@pytest.mark.anyio
async def test_malformed_dead_letters_are_shown_but_never_requeued(
    env: Env, monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = env.sim.add_petition(title="P", creator=creator())
    sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(3)]
    corrupting(env, monkeypatch, sigs[0]["id"], {"email": 42})
    await env.poller.cycle()
    (dead,) = dead_letters(env)
    listed = await env.store.dead_items()
    assert [d["id"] for d in listed] == [dead["id"]] and listed[0]["kind"] == "malformed"
    shown = await env.store.dead_item(dead["id"])
    assert shown is not None and shown["activity"]["malformed"]
    # Its payload is no activity: putting it back in the queue would crash the workers.
    assert (await env.store.requeue_dead([dead["id"]])).queued == 0
    skipped = await env.store.requeue_dead()
    assert (skipped.queued, skipped.skipped_malformed) == (0, 1)
    while leased := await env.store.lease(100, 60):  # the creator and the two good signatures
        for item in leased:
            await env.store.finish(item.id, "done")
    assert (await env.store.requeue_since("2000-01-01")).queued == 3  # not the dead letter
    assert len(dead_letters(env)) == 1
    drained = []
    while leased := await env.store.lease(100, 60):
        drained += [item.activity.source_key for item in leased]
        for item in leased:
            await env.store.finish(item.id, "done")
    assert len(drained) == 3 and f"signature:{sigs[0]['id']}" not in drained
    assert await env.store.drop_dead([dead["id"]]) == 1


def test_dead_retry_says_why_a_malformed_record_is_not_queued(tmp_path: Path) -> None:
    db = tmp_path / "csand.db"
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[controlshift]\nurl = "https://cs.example"\n[store]\npath = "{db}"\n')

    async def seed() -> None:
        store = await open_store(db)
        try:
            await store.commit_poll(None, dead_letters=[dead_letter(
                "signature", {"id": 42, "email": 42}, ValueError("email"), petition_id=1)])
        finally:
            await store.close()

    anyio.run(seed, backend="asyncio")
    def csand(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "csand", *args, "--config", str(config_file)],
                              capture_output=True, text=True, timeout=60)

    listed = csand("dead", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (item,) = json.loads(listed.stdout)
    assert item["source_key"] == "signature:42" and item["kind"] == "malformed"
    shown = csand("dead", "show", str(item["id"]))
    assert shown.returncode == 0 and '"malformed"' in shown.stdout
    retried = csand("dead", "retry", str(item["id"]))
    assert retried.returncode == 1
    assert "0 item(s) queued again" in retried.stdout
    assert "1 malformed ControlShift record(s) not queued" in retried.stdout
    dropped = csand("dead", "drop", "--all")
    assert dropped.returncode == 0 and "1 item(s) dropped" in dropped.stdout


# ---- pagination ControlShift's docs do not show ----


def broken_signature_meta(slug: str, make: Any) -> Any:
    """A ``meta_override`` breaking only ``slug``'s signature pages: ``make(page, meta)``."""
    def override(path: str, page: int, meta: dict[str, Any]) -> Any:
        return make(page, meta) if path == f"/api/v1/petitions/{slug}/signatures" else meta
    return override


async def two_petitions(env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    bad = env.sim.add_petition(title="Bad", creator=creator(1))
    good = env.sim.add_petition(title="Good", creator=creator(2))
    for i in range(12):
        env.sim.add_signature(bad["slug"], email=f"b{i}@example.org")
        env.sim.add_signature(good["slug"], email=f"g{i}@example.org")
    return bad, good


@pytest.mark.anyio
@pytest.mark.parametrize("make", [
    lambda page, meta: meta | {"next_page": str(meta["next_page"])},
    lambda page, meta: meta | {"next_page": "abc"},
    lambda page, meta: meta | {"next_page": page + 0.5},
    lambda page, meta: meta | {"next_page": {"page": page + 1}},
    lambda page, meta: meta | {"total_pages": "3"},
    lambda page, meta: meta | {"total_pages": -3},
    lambda page, meta: meta | {"next_page": 0},
    lambda page, meta: meta | {"next_page": -1},
    lambda page, meta: "not a meta",
], ids=["digit-string", "abc", "float", "dict", "total-string", "total-negative", "zero",
        "negative", "string-meta"])
async def test_bad_signature_pagination_skips_that_petition_only(env: Env, make: Any) -> None:
    bad, good = await two_petitions(env)
    env.sim.meta_override = broken_signature_meta(bad["slug"], make)
    with capture_logs() as logs:
        report = await env.poller.cycle()
    assert report.petitions == 2
    # The good petition synced whole; of the bad one, what its first page showed.
    assert len(env.outbox(f"petition_id = {good['id']}")) == 13
    bad_items = env.outbox(f"petition_id = {bad['id']} AND kind = 'signature'")
    assert [i["payload"]["email"] for i in bad_items] == [f"b{i}@example.org" for i in range(5)]
    errors = [e for e in logs if e["event"] == "cs.bad_pagination"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error"
    assert errors[0]["petition"] == bad["slug"] and "meta" in errors[0]["error"]
    # Fixed on ControlShift: the next cycle walks it again and finds the rest.
    env.sim.meta_override = None
    await env.poller.cycle()
    assert len(env.outbox(f"petition_id = {bad['id']}")) == 13


@pytest.mark.anyio
async def test_signature_pages_beyond_total_pages_are_not_walked(env: Env) -> None:
    bad, good = await two_petitions(env)
    asked: list[int] = []

    def ever_growing(page: int, meta: dict[str, Any]) -> dict[str, Any]:
        asked.append(page)
        return meta | {"next_page": page + 1 if page < 1000 else None}

    env.sim.meta_override = broken_signature_meta(bad["slug"], ever_growing)
    with capture_logs() as logs:
        await env.poller.cycle()
    assert max(asked) <= 3 and len(asked) <= 3  # 12 signatures at 5 a page: 3 pages
    assert any(e["event"] == "cs.bad_pagination" and bad["slug"] in e["path"] for e in logs)
    assert len(env.outbox(f"petition_id = {good['id']}")) == 13
    assert len(env.outbox(f"petition_id = {bad['id']}")) == 13  # every real page was read


@pytest.mark.anyio
async def test_a_signature_walk_that_never_ends_is_bounded(
    env: Env, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "MAX_PAGES", 40)
    bad, good = await two_petitions(env)
    asked: list[int] = []

    def ever_growing(page: int, meta: dict[str, Any]) -> dict[str, Any]:
        asked.append(page)
        more = page < 1000  # the guard of this test, not of the poller
        return {"current_page": page, "total_pages": page + 1 if more else page,
                "next_page": page + 1 if more else None}

    env.sim.meta_override = broken_signature_meta(bad["slug"], ever_growing)
    with capture_logs() as logs:
        report = await env.poller.cycle()
    assert len(asked) <= 40
    assert report.petitions == 2
    assert len(env.outbox(f"petition_id = {good['id']}")) == 13  # in the same cycle
    assert len(env.outbox(f"petition_id = {bad['id']} AND kind = 'signature'")) == 12
    assert any(e["event"] == "cs.bad_pagination" and "40" in e["error"] for e in logs)


@pytest.mark.anyio
@pytest.mark.parametrize("next_page", ["2", "abc", 2.5, {"page": 2}, -1, 0])
async def test_bad_petition_list_pagination_fails_the_cycle_not_the_daemon(
    env: Env, next_page: Any,
) -> None:
    for n in range(12):
        env.sim.add_petition(title=f"P{n}", creator=creator(n))

    def override(path: str, page: int, meta: dict[str, Any]) -> Any:
        return meta | {"next_page": next_page} if path == "/api/v1/petitions" else meta

    env.sim.meta_override = override
    with capture_logs() as logs:
        assert await env.poller._guarded_cycle(full=False) is None
    failed = [e for e in logs if e["event"] == "poll.failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    assert "meta.next_page" in failed[0]["error"]
    assert (await env.store.status())["last_poll_result"].startswith("failed:")
    env.sim.meta_override = None
    assert await env.poller._guarded_cycle(full=False) is not None
    assert len(env.outbox()) == 12


# ---- deletions must not hide new signatures from the incremental walk ----


@pytest.mark.anyio
@pytest.mark.parametrize("deleted_visible", [True, False])
@pytest.mark.parametrize(("order", "page_size"), [("asc", 5), ("desc", 5), ("asc", 1), ("desc", 1)])
async def test_a_deletion_does_not_hide_new_signatures_from_the_incremental_cycle(
    tmp_path: Path, order: str, page_size: int, deleted_visible: bool,
) -> None:
    async with make_env(tmp_path, signature_order=order, page_size=page_size,
                        deleted_visible=deleted_visible) as env:
        p = env.sim.add_petition(title="P", creator=creator())
        # Sized so that afterwards the two new signatures sit on different pages wherever a
        # split is possible: the list then holds 1 more than a whole number of pages.
        listed_after = 4 * page_size + 1 if page_size > 1 else 9
        initial = listed_after - 2 + (0 if deleted_visible else 1)
        sigs = [env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
                for i in range(initial)]
        await env.poller.cycle()
        env.sim.delete_signature(sigs[initial // 2]["id"])
        new = [env.sim.add_signature(p["slug"], email=f"new{i}@example.org") for i in range(2)]
        assert env.sim.petition(p["slug"])["public_signature_count"] == initial + 1

        report = await env.poller.cycle()  # incremental: the count grew by one
        assert not report.malformed
        for signature in new:
            assert env.outbox(f"source_key = 'signature:{signature['id']}'"), signature["email"]


async def pages_for_one_new_signature(tmp_path: Path, order: str, existing: int) -> int:
    async with make_env(tmp_path, signature_order=order, page_size=5) as env:
        p = env.sim.add_petition(title="P", creator=creator())
        for i in range(existing):
            env.sim.add_signature(p["slug"], email=f"s{i}@example.org")
        await env.poller.cycle()
        env.sim.reset_stats()
        new = env.sim.add_signature(p["slug"], email="new@example.org")
        assert (await env.poller.cycle()).enqueued == 1
        assert env.outbox(f"source_key = 'signature:{new['id']}'")
        return env.routes()[SIGNATURES_ROUTE]


@pytest.mark.anyio
@pytest.mark.parametrize(("order", "existing", "most"), [
    ("asc", 49, 2),  # 10 pages; the new signature shares the last page
    ("asc", 45, 3),  # 10 pages; the new signature alone on the last page
    ("desc", 49, 2),
    ("desc", 45, 2),
])
async def test_one_new_signature_on_a_ten_page_petition_costs_about_two_pages(
    tmp_path: Path, order: str, existing: int, most: int,
) -> None:
    assert await pages_for_one_new_signature(tmp_path, order, existing) <= most
