"""The workers (csand.sync.worker) against the Action Network simulator, in process."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from csand.actionnetwork.client import ActionNetworkClient
from csand.model import (
    CREATOR_TAG,
    SIGNER_TAG,
    Activity,
    creator_activity,
    global_unsubscribe_activity,
    parse_time,
    signature_activity,
)
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim
from csand.storage import Storage, open_store
from csand.sync.worker import Dispatcher
from tests.fakes import ManualClock

ORG = "test-org"
AN_BASE = "http://an.test/api/v2"
AN_KEY = "an-test-key"
T0 = 1_727_784_000.0



def petition(pid: int = 1, categories: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "id": pid,
        "slug": f"petition-{pid}",
        "title": f"Petition {pid}",
        "url": f"https://cs.example.org/petitions/petition-{pid}",
        "launched": True,
        "created_at": "2024-01-01T00:00:00Z",
        "creator": {"first_name": "Cleo", "last_name": "Ng", "email": f"creator{pid}@example.org"},
        "categories": [{"slug": c.lower(), "name": c} for c in categories],
    }


def sig(sid: int, email: str, opted_in: bool | None = True, pid: int = 1,
        categories: tuple[str, ...] = (), **extra: Any) -> Activity:
    record = {
        "id": sid, "email": email, "first_name": "Ann", "last_name": "Lee", "postcode": "2000",
        "join_organisation": opted_in, "created_at": f"2024-01-02T00:00:{sid % 60:02d}Z",
    }
    record.update(extra)
    return signature_activity(record, petition(pid, categories), ORG)


@dataclass
class Env:
    sim: ActionNetworkSim
    store: Storage
    an: ActionNetworkClient
    http: httpx.AsyncClient
    clock: ManualClock
    db_path: Path

    def dispatcher(self, **kw: Any) -> Dispatcher:
        kw.setdefault("clock", self.clock)
        kw.setdefault("rng", random.Random(1))
        return Dispatcher(self.store, self.an, **kw)

    def outbox(self) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute("SELECT * FROM outbox ORDER BY id").fetchall())
        finally:
            conn.close()

    def routes(self) -> dict[str, int]:
        return self.sim.stats()["by_route"]

    async def known_tags(self, *names: str) -> None:
        """Tags that exist in AN and that csand already knows about."""
        await self.store.save_tags([(name, self.sim.add_tag(name)) for name in names])

    async def mirrored(self, pid: int = 1) -> str:
        """An AN petition csand already created and recorded for CS petition ``pid``."""
        uuid = await self.create_an_petition(f"controlshift-{ORG}:petition-{pid}")
        await self.store.set_petition_uuid(pid, f"petition-{pid}", uuid)
        return uuid

    async def create_an_petition(self, identifier: str) -> str:
        response = await self.http.post(
            f"{AN_BASE}/petitions", headers={"OSDI-API-Token": AN_KEY},
            json={"title": "Existing", "origin_system": "Controlshift Petition",
                  "identifiers": [identifier]})
        response.raise_for_status()
        return response.json()["identifiers"][0].split(":", 1)[1]


@asynccontextmanager
async def make_env(tmp_path: Path, api_key: str = AN_KEY) -> AsyncIterator[Env]:
    sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)
    clock = ManualClock(T0)
    db_path = tmp_path / "csand.db"
    store = await open_store(db_path, clock=clock)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            an = ActionNetworkClient(http, AN_BASE, api_key, TokenBucket(1e6))
            yield Env(sim, store, an, http, clock, db_path)
    finally:
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


async def drain(dispatcher: Dispatcher, finishes: int) -> None:
    """Run the dispatcher until ``finishes`` outcomes are recorded, then shut it down."""
    store = dispatcher.store
    recorded = 0
    enough = anyio.Event()
    finish = store.finish

    async def counting_finish(*args: Any, **kwargs: Any) -> bool:
        nonlocal recorded
        held = await finish(*args, **kwargs)
        recorded += 1
        if recorded >= finishes:
            enough.set()
        return held

    store.finish = counting_finish  # type: ignore[method-assign]
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                await enough.wait()
                dispatcher.stop_intake()
    finally:
        store.finish = finish  # type: ignore[method-assign]


# ---------------------------------------------------------------- the cheap path


@pytest.mark.anyio
async def test_opted_in_signature_on_mirrored_petition_costs_one_request(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    pet_uuid = await env.mirrored()
    await env.store.enqueue([sig(1, "ann@example.org", opted_in=True)])
    env.sim.reset_stats()
    dispatcher = env.dispatcher()

    await drain(dispatcher, 1)

    assert env.sim.stats()["requests"] == 1
    assert env.routes() == {"POST /petitions/{uuid}/signatures": 1}
    person = env.sim.person("ann@example.org")
    assert person is not None
    assert person["status"] == "subscribed"
    assert person["tags"] == {SIGNER_TAG}
    assert (person["given_name"], person["family_name"], person["postal_code"]) == ("Ann", "Lee", "2000")
    assert [(s["petition_uuid"], s["person_uuid"]) for s in env.sim.signatures()] == [(pet_uuid, person["uuid"])]
    assert [r["status"] for r in env.outbox()] == ["done"]
    assert dispatcher.stats.done == 1
    known = await env.store.person("ann@example.org")
    # AN's state is looked up afresh each time; csand keeps its own history (uuid, field times).
    assert (known.exists, known.uuid, known.subscribed) == (None, person["uuid"], None)


# ---------------------------------------------------------------- the mirrored petition


@pytest.mark.anyio
async def test_petition_created_once_with_four_concurrent_workers(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.store.enqueue([sig(i, f"s{i}@example.org") for i in range(1, 21)])

    await drain(env.dispatcher(workers=4), 20)

    petitions = env.sim.petitions()
    assert len(petitions) == 1
    assert env.routes()["POST /petitions"] == 1
    assert env.sim.stats()["duplicate_identifier_posts"] == 0
    assert f"controlshift-{ORG}:petition-1" in petitions[0]["identifiers"]
    assert petitions[0]["origin_system"] == "Controlshift Petition"
    assert len(env.sim.signatures()) == 20
    assert {s["petition_uuid"] for s in env.sim.signatures()} == {petitions[0]["uuid"]}
    assert await env.store.petition_uuid(1) == petitions[0]["uuid"]
    assert [r["status"] for r in env.outbox()] == ["done"] * 20


@pytest.mark.anyio
async def test_existing_petition_found_by_identifier_is_not_created_again(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    existing = await env.create_an_petition(f"controlshift-{ORG}:petition-1")
    await env.store.enqueue([sig(1, "ann@example.org")])
    env.sim.reset_stats()

    await drain(env.dispatcher(), 1)

    assert "POST /petitions" not in env.routes()
    assert env.routes()["GET /petitions"] == 1
    assert await env.store.petition_uuid(1) == existing
    assert [s["petition_uuid"] for s in env.sim.signatures()] == [existing]


@pytest.mark.anyio
async def test_creator_first_then_petition_linked_to_creator(env: Env) -> None:
    await env.store.enqueue([sig(1, "ann@example.org"), creator_activity(petition(1), ORG)])

    await drain(env.dispatcher(), 2)

    creator = env.sim.person("creator1@example.org")
    assert creator is not None
    (mirrored,) = env.sim.petitions()
    assert mirrored["creator_uuid"] == creator["uuid"]
    assert mirrored["title"] == "Petition 1"
    assert "https://cs.example.org/petitions/petition-1" in mirrored["description"]
    assert creator["tags"] == {CREATOR_TAG}
    assert creator["status"] == "unsubscribed"  # REST creators carry no opt-in
    assert len(env.sim.signatures()) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("opted_in", [True, None])
async def test_writes_that_failed_after_commit_are_not_duplicated(env: Env, opted_in: bool | None) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.store.enqueue([sig(1, "ann@example.org", opted_in=opted_in)])
    env.sim.faults.fail_after_commit_rate = 1.0  # AN stores every write, then answers 500

    await drain(env.dispatcher(), 1)
    (row,) = env.outbox()
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert len(env.sim.petitions()) == 1  # created in AN, unknown to csand

    env.sim.faults.fail_after_commit_rate = 0.0
    env.clock.t = row["next_attempt_at"]
    await drain(env.dispatcher(), 1)

    assert [r["status"] for r in env.outbox()] == ["done"]
    assert len(env.sim.petitions()) == 1
    assert env.sim.stats()["duplicate_identifier_posts"] == 0
    assert len(env.sim.signatures()) == 1
    expected = "subscribed" if opted_in else "unsubscribed"
    assert {h["status"] for h in env.sim.history("ann@example.org")} == {expected}


# ---------------------------------------------------------------- tags


@pytest.mark.anyio
async def test_tags_created_before_use(env: Env) -> None:
    await env.mirrored()
    env.sim.add_tag(SIGNER_TAG)  # exists in AN but csand has not seen it yet
    await env.store.enqueue([sig(1, "ann@example.org", categories=("Avoiding Taxes",))])

    await drain(env.dispatcher(), 1)

    person = env.sim.person("ann@example.org")
    assert person is not None
    assert person["tags"] == {SIGNER_TAG, "controlshift:Avoiding Taxes"}
    assert env.routes()["GET /tags"] >= 1
    assert env.routes()["POST /tags"] == 1  # only the missing one
    assert set(await env.store.tags()) == {SIGNER_TAG, "controlshift:avoiding taxes"}


# ---------------------------------------------------------------- subscription rules


@pytest.mark.anyio
async def test_not_opted_in_new_person_is_never_subscribed(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.mirrored()
    await env.store.enqueue([sig(1, "Ann@Example.org ", opted_in=None)])

    await drain(env.dispatcher(), 1)

    person = env.sim.person("ann@example.org")
    assert person is not None and person["status"] == "unsubscribed"
    history = env.sim.history("ann@example.org")
    assert history
    assert all(h["status"] != "subscribed" for h in history)
    assert person["tags"] == {SIGNER_TAG}
    assert len(env.sim.signatures()) == 1
    assert env.routes()["GET /people"] >= 1  # looked up before anything was posted
    assert [r["status"] for r in env.outbox()] == ["done"]


@pytest.mark.anyio
async def test_not_opted_in_keeps_an_existing_subscription(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.mirrored()
    env.sim.add_person("ann@example.org", status="subscribed")
    await env.store.enqueue([sig(1, "ann@example.org", opted_in=False)])

    await drain(env.dispatcher(), 1)

    person = env.sim.person("ann@example.org")
    assert person is not None and person["status"] == "subscribed"
    assert len(env.sim.signatures()) == 1


@pytest.mark.anyio
async def test_opt_in_subscribes_an_existing_unsubscribed_person(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.mirrored()
    env.sim.add_person("ann@example.org", status="unsubscribed")
    await env.store.enqueue([sig(1, "ann@example.org", opted_in=True)])

    await drain(env.dispatcher(), 1)

    person = env.sim.person("ann@example.org")
    assert person is not None and person["status"] == "subscribed"


@pytest.mark.anyio
async def test_older_activity_found_later_never_overwrites_newer_fields(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.mirrored(1)
    await env.mirrored(2)
    newer = sig(2, "ann@example.org", pid=2, first_name="Annie", last_name="Lee-Smith",
                postcode=None, created_at="2024-03-01T00:00:00Z")
    older = sig(1, "ann@example.org", pid=1, first_name="Ann", last_name="Lee",
                postcode="2000", created_at="2024-01-01T00:00:00Z")
    await env.store.enqueue([newer])
    await drain(env.dispatcher(), 1)
    await env.store.enqueue([older])  # e.g. its petition was walked in a later cycle
    await drain(env.dispatcher(), 1)

    person = env.sim.person("ann@example.org")
    assert person is not None
    assert (person["given_name"], person["family_name"]) == ("Annie", "Lee-Smith")
    assert person["postal_code"] == "2000"  # no newer activity gave one
    assert len(env.sim.signatures()) == 2


# ---------------------------------------------------------------- failures


@pytest.mark.anyio
async def test_empty_200_puts_the_item_back_with_a_counted_attempt(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.mirrored()
    await env.store.enqueue([sig(1, "ann@example.org")])
    env.sim.faults.empty_200_rate = 1.0
    dispatcher = env.dispatcher()

    await drain(dispatcher, 1)

    (row,) = env.outbox()
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert row["next_attempt_at"] > env.clock()
    assert "empty body" in row["last_error"]
    assert dispatcher.stats.retried == 1
    assert await env.store.lease(10, 60) == []  # not before its time


@pytest.mark.anyio
async def test_400_is_dead_with_an_error_message(env: Env) -> None:
    await env.known_tags(SIGNER_TAG)
    await env.mirrored()
    await env.store.enqueue([sig(1, "ann@example.org", postcode="9" * 80)])
    dispatcher = env.dispatcher()

    await drain(dispatcher, 1)

    (row,) = env.outbox()
    assert row["status"] == "dead"
    assert "postal_code is too long (maximum is 64 characters)" in row["last_error"]
    assert "400" in row["last_error"]
    (dead,) = await env.store.dead_items()
    assert dead["last_error"] == row["last_error"]
    assert dispatcher.stats.dead == 1


@pytest.mark.anyio
async def test_invalid_email_is_dead_without_a_request(env: Env) -> None:
    await env.store.enqueue([sig(1, "not an email")])
    await drain(env.dispatcher(), 1)
    (row,) = env.outbox()
    assert row["status"] == "dead"
    assert "invalid email address" in row["last_error"]
    assert env.sim.stats()["requests"] == 0


@pytest.mark.anyio
async def test_403_pauses_workers_without_using_an_attempt(tmp_path: Path) -> None:
    async with make_env(tmp_path, api_key="wrong-key") as env:
        await env.known_tags(SIGNER_TAG)
        await env.mirrored()
        await env.store.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
        dispatcher = env.dispatcher(workers=1)

        await drain(dispatcher, 1)

        assert dispatcher.auth_paused is not None
        assert "403" in dispatcher.auth_paused
        rows = env.outbox()
        assert [r["status"] for r in rows] == ["pending", "pending"]
        assert [r["attempts"] for r in rows] == [0, 0]
        assert "403" in rows[0]["last_error"]
        assert rows[1]["last_error"] is None  # nothing else was tried while paused
        assert (await env.store.status())["an_paused"] == dispatcher.auth_paused
        assert env.sim.stats()["forbidden"] == 1


@pytest.mark.anyio
async def test_workers_resume_once_the_key_is_accepted_again(tmp_path: Path) -> None:
    async with make_env(tmp_path, api_key="rotated-key") as env:
        await env.known_tags(SIGNER_TAG)
        await env.mirrored()
        await env.store.enqueue([sig(1, "ann@example.org")])
        dispatcher = env.dispatcher(workers=1, auth_recheck_interval=0.01)
        finish = env.store.finish

        async def finish_then_fix_key(*args: Any, **kwargs: Any) -> bool:
            held = await finish(*args, **kwargs)
            env.sim.api_key = "rotated-key"  # the operator fixed AN's side
            return held

        env.store.finish = finish_then_fix_key  # type: ignore[method-assign]
        await drain(dispatcher, 2)

        assert dispatcher.auth_paused is None
        assert (await env.store.status())["an_paused"] is None
        assert [r["status"] for r in env.outbox()] == ["done"]
        assert env.routes()["GET /"] >= 1


# ---------------------------------------------------------------- shutdown


@pytest.mark.anyio
async def test_stop_intake_returns(env: Env) -> None:
    dispatcher = env.dispatcher()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            dispatcher.stop_intake()
    assert dispatcher.in_flight == {}


@pytest.mark.anyio
async def test_release_in_flight_hands_items_back(env: Env) -> None:
    await env.store.enqueue([sig(1, "ann@example.org")])
    dispatcher = env.dispatcher()
    (item,) = await env.store.lease(1, 60)
    dispatcher.in_flight[item.token] = item
    await dispatcher.release_in_flight()
    (row,) = env.outbox()
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert dispatcher.in_flight == {}


# ---------------------------------------------------------------- an opt-in counts once


@pytest.mark.anyio
async def test_a_resynced_opt_in_does_not_resubscribe_someone_who_unsubscribed(env: Env) -> None:
    """Ann opted in, then unsubscribed through AN; a category added later re-syncs her record."""
    await env.mirrored()
    await env.store.enqueue([sig(1, "ann@example.org", opted_in=True)])
    await drain(env.dispatcher(), 1)
    assert env.sim.person("ann@example.org")["status"] == "subscribed"
    uuid = env.sim.person("ann@example.org")["uuid"]
    response = await env.http.put(  # the footer's unsubscribe link, on AN's side
        f"{AN_BASE}/people/{uuid}", headers={"OSDI-API-Token": AN_KEY},
        json={"email_addresses": [{"address": "ann@example.org", "status": "unsubscribed"}]})
    response.raise_for_status()
    await env.store.enqueue([sig(1, "ann@example.org", opted_in=True, categories=("Climate",))])
    await drain(env.dispatcher(), 1)
    person = env.sim.person("ann@example.org")
    assert person["status"] == "unsubscribed"  # the old opt-in was not applied again
    assert "controlshift:Climate" in person["tags"]  # but the new tag landed


@pytest.mark.anyio
async def test_an_older_opt_in_found_after_an_org_wide_unsubscribe_does_not_subscribe(
        env: Env) -> None:
    await env.mirrored()
    env.sim.add_person("bo@example.org", status="subscribed")
    unsubscribe = global_unsubscribe_activity(7, "bo@example.org",
                                              parse_time("2024-06-01T00:00:00Z"))
    await env.store.enqueue([unsubscribe])
    await drain(env.dispatcher(), 1)
    assert env.sim.person("bo@example.org")["status"] == "unsubscribed"
    # A backfill now finds an opt-in from January, older than the unsubscribe.
    await env.store.enqueue([sig(2, "bo@example.org", opted_in=True)])
    await drain(env.dispatcher(), 1)
    person = env.sim.person("bo@example.org")
    assert person["status"] == "unsubscribed"
    assert len([s for s in env.sim.signatures() if s["person_uuid"] == person["uuid"]]) == 1


@pytest.mark.anyio
async def test_a_person_deleted_from_an_is_not_recreated_subscribed(env: Env) -> None:
    """csand synced Cy (not opted in); AN then erased Cy; Cy signs again without opting in."""
    await env.mirrored()
    await env.store.enqueue([sig(3, "cy@example.org", opted_in=False)])
    await drain(env.dispatcher(), 1)
    assert env.sim.person("cy@example.org")["status"] == "unsubscribed"
    env.sim.delete_person("cy@example.org")
    await env.store.enqueue([sig(4, "cy@example.org", opted_in=False)])
    await drain(env.dispatcher(), 1)
    assert env.sim.person("cy@example.org")["status"] == "unsubscribed"


@pytest.mark.anyio
async def test_a_mirrored_petition_deleted_from_an_is_mirrored_again(env: Env) -> None:
    await env.store.set_petition_uuid(1, "petition-1", "00000000-0000-4000-8000-000000000000")
    await env.store.enqueue([sig(5, "dee@example.org", opted_in=True),
                             sig(6, "eve@example.org", opted_in=False)])
    await drain(env.dispatcher(), 2)
    assert [r["status"] for r in env.outbox()] == ["done", "done"]
    (petition,) = env.sim.petitions()
    assert petition["identifiers"][-1] == f"controlshift-{ORG}:petition-1"
    assert {s["petition_uuid"] for s in env.sim.signatures()} == {petition["uuid"]}
    assert len(env.sim.signatures()) == 2
    assert await env.store.petition_uuid(1) == petition["uuid"]
