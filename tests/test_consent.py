"""Consent and no-loss under interleavings: each test is one sequence that once broke a promise.

The workers run against the Action Network simulator in process; a transport hook lets a test
act at an exact moment of a plan (while a request is in flight), so each sequence is
deterministic: a deletion committed mid-plan, a failure after the opt-in was acknowledged, a
shutdown between two requests, a clock jump that hands an item out twice.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.actionnetwork.client import ActionNetworkClient
from csand.model import (
    CREATOR_TAG,
    SIGNER_TAG,
    SignatureSeen,
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
from tests.test_worker import AN_BASE, AN_KEY, ORG, drain, petition

Hook = Callable[[httpx.Request], Awaitable[httpx.Response | None]]


class HookedTransport(httpx.AsyncBaseTransport):
    """The simulator's ASGI transport, with a hook that runs as each request arrives: it may
    act meanwhile (commit a deletion, jump the clock) and answer instead of the simulator."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.hooks: list[Hook] = []
        self.log: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.log.append(f"{request.method} {request.url.path.removeprefix('/api/v2')}")
        for hook in list(self.hooks):
            answer = await hook(request)
            if answer is not None:
                return answer
        return await self.inner.handle_async_request(request)

    def writes(self) -> list[str]:
        return [r for r in self.log if not r.startswith("GET")]


@dataclass
class World:
    sim: ActionNetworkSim
    store: Storage
    an: ActionNetworkClient
    http: httpx.AsyncClient
    transport: HookedTransport
    clock: ManualClock
    db_path: Path
    dispatchers: list[Dispatcher] = field(default_factory=list)

    def dispatcher(self, **kw: Any) -> Dispatcher:
        kw.setdefault("clock", self.clock)
        kw.setdefault("rng", random.Random(1))
        d = Dispatcher(self.store, self.an, **kw)
        self.dispatchers.append(d)
        return d

    def rows(self) -> list[dict[str, Any]]:
        import sqlite3

        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")]
        finally:
            conn.close()

    async def mirrored(self, pid: int = 1) -> str:
        response = await self.http.post(
            f"{AN_BASE}/petitions", headers={"OSDI-API-Token": AN_KEY},
            json={"title": "Existing", "origin_system": "Controlshift Petition",
                  "identifiers": [f"controlshift-{ORG}:petition-{pid}"]})
        uuid = response.json()["identifiers"][0].split(":", 1)[1]
        await self.store.set_petition_uuid(pid, f"petition-{pid}", uuid)
        return uuid

    async def unsubscribe_in_an(self, email: str) -> None:
        """The person follows the unsubscribe link of an AN email."""
        uuid = self.sim.person(email)["uuid"]
        response = await self.http.put(
            f"{AN_BASE}/people/{uuid}", headers={"OSDI-API-Token": AN_KEY},
            json={"email_addresses": [{"address": email, "status": "unsubscribed"}]})
        response.raise_for_status()

    async def delete_signature(self, sid: int, pid: int = 1) -> None:
        """ControlShift says signature ``sid`` was deleted, as the poller or a webhook does."""
        row = SignatureSeen(sid, pid, "deleted", "2024-02-01T00:00:00+00:00",
                            "2024-02-01T00:00:00+00:00")
        await self.store.commit_poll(None, [row], (), [f"signature:{sid}"])

    def subscriptions(self, email: str) -> int:
        """How many times AN's history shows the person becoming subscribed."""
        count, before = 0, None
        for snapshot in self.sim.history(email):
            if snapshot["status"] == "subscribed" and before != "subscribed":
                count += 1
            before = snapshot["status"]
        return count


@asynccontextmanager
async def make_world(tmp_path: Path) -> AsyncIterator[World]:
    sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)
    clock = ManualClock()
    db_path = tmp_path / "csand.db"
    store = await open_store(db_path, clock=clock)
    transport = HookedTransport(httpx.ASGITransport(app=sim.app))
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            an = ActionNetworkClient(http, AN_BASE, AN_KEY, TokenBucket(1e6))
            world = World(sim, store, an, http, transport, clock, db_path)
            await store.save_tags([(t, sim.add_tag(t)) for t in (SIGNER_TAG, CREATOR_TAG)])
            yield world
    finally:
        await store.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with make_world(tmp_path) as w:
        yield w


def sig(sid: int, email: str, opted_in: bool | None, **extra: Any):
    record = {"id": sid, "email": email, "first_name": "Ann", "last_name": "Lee",
              "join_organisation": opted_in, "created_at": "2024-01-02T00:00:00Z"}
    record.update(extra)
    return signature_activity(record, petition(1), ORG)


def once(route: str, action: Callable[[], Awaitable[httpx.Response | None]]) -> Hook:
    """A hook that acts on the first request to ``route`` ("METHOD /path-prefix")."""
    fired = False

    async def hook(request: httpx.Request) -> httpx.Response | None:
        nonlocal fired
        method, _, prefix = route.partition(" ")
        path = request.url.path.removeprefix("/api/v2")
        if fired or request.method != method or not path.startswith(prefix):
            return None
        fired = True
        return await action()

    return hook


def answer(status: int) -> Callable[[], Awaitable[httpx.Response]]:
    async def respond() -> httpx.Response:
        return httpx.Response(status, json={"error": "injected"})

    return respond


async def retry_due(world: World) -> None:
    """Move the clock to the moment every waiting retry is due."""
    world.clock.t = max([world.clock.t, *(r["next_attempt_at"] for r in world.rows())])


# ------------------------------------------------------------ 1. deletions while in flight


@pytest.mark.anyio
async def test_a_signature_deleted_while_in_flight_is_not_retried_after_a_failure(
        world: World) -> None:
    """Deleted ("this wasn't me") while its first attempt ran into an AN outage: the retry
    must not sync it, opt-in included."""
    await world.mirrored()
    await world.store.enqueue([sig(1, "ann@example.org", opted_in=True)])

    async def delete_then_fail() -> httpx.Response:
        await world.delete_signature(1)
        return httpx.Response(503, json={"error": "Service Unavailable"})

    world.transport.hooks.append(once("POST /petitions/", delete_then_fail))
    await drain(world.dispatcher(), 1)
    await retry_due(world)

    assert await world.store.lease(10, 60) == []  # nothing left to retry
    (row,) = world.rows()
    assert row["status"] == "cancelled"
    assert "deleted on ControlShift" in row["note"]
    assert world.sim.person("ann@example.org") is None
    assert world.sim.signatures() == []


@pytest.mark.anyio
async def test_a_deletion_mid_plan_stops_the_next_request(world: World) -> None:
    """A not-opted-in signer: the lookup is in flight when the deletion lands. Nothing may be
    written for the record after that moment."""
    await world.mirrored()
    await world.store.enqueue([sig(1, "bo@example.org", opted_in=None)])

    async def delete_during_lookup() -> None:
        await world.delete_signature(1)
        return None

    world.transport.hooks.append(once("GET /people", delete_during_lookup))
    dispatcher = world.dispatcher()
    await drain(dispatcher, 1)

    (row,) = world.rows()
    assert row["status"] == "cancelled"
    assert world.transport.writes() == ["POST /petitions"]  # only the test's own mirroring
    assert world.sim.person("bo@example.org") is None
    assert dispatcher.stats.cancelled == 1


@pytest.mark.anyio
async def test_dead_retry_skips_a_record_deleted_since_it_died(world: World) -> None:
    await world.mirrored()
    await world.store.enqueue([sig(1, "cy@example.org", opted_in=True, postcode="9" * 80),
                               sig(2, "dee@example.org", opted_in=True, postcode="9" * 80)])
    await drain(world.dispatcher(), 2)
    assert [r["status"] for r in world.rows()] == ["dead", "dead"]
    await world.delete_signature(1)

    result = await world.store.requeue_dead()

    assert (result.queued, result.skipped_deleted) == (1, 1)
    assert [r["status"] for r in world.rows()] == ["dead", "pending"]


@pytest.mark.anyio
async def test_a_resync_skips_a_record_deleted_after_it_synced(world: World) -> None:
    await world.mirrored()
    await world.store.enqueue([sig(1, "cy@example.org", opted_in=True),
                               sig(2, "dee@example.org", opted_in=True)])
    await drain(world.dispatcher(), 2)
    await world.delete_signature(1)

    result = await world.store.requeue_since("2000-01-01T00:00:00+00:00")

    assert (result.queued, result.skipped_deleted) == (1, 1)
    assert [(r["source_key"], r["status"]) for r in world.rows()] == [
        ("signature:1", "done"), ("signature:2", "done"), ("signature:2", "pending")]


# ------------------------------------------------------------ 2. an opt-in is sent once


def opted_in_creator():
    """A creator whose opt-in a ``petition.launched`` webhook carried."""
    extra = {"for_email": "creator1@example.org", "join_organisation": True}
    return creator_activity(petition(1), ORG, extra)


@pytest.mark.anyio
@pytest.mark.parametrize("failing", ["POST /petitions", "POST /petitions/"])
async def test_an_acknowledged_opt_in_is_not_sent_again_after_a_later_step_failed(
        world: World, failing: str) -> None:
    """The creator is written subscribed; then the petition creation (or the signature) fails;
    the creator unsubscribes through an AN email; the retry must not subscribe them again."""
    await world.store.enqueue([opted_in_creator()])
    world.transport.hooks.append(once(failing, answer(500)))
    await drain(world.dispatcher(), 1)
    (row,) = world.rows()
    assert row["status"] == "pending"
    assert world.sim.person("creator1@example.org")["status"] == "subscribed"

    await world.unsubscribe_in_an("creator1@example.org")
    await retry_due(world)
    await drain(world.dispatcher(), 1)

    (row,) = world.rows()
    assert row["status"] == "done"
    assert world.sim.person("creator1@example.org")["status"] == "unsubscribed"
    assert world.subscriptions("creator1@example.org") == 1
    assert len(world.sim.signatures()) == 1
    assert world.transport.writes().count("POST /people") == 1  # continued, not replayed


@pytest.mark.anyio
async def test_shutdown_mid_plan_hands_the_item_back_where_it_stopped(world: World) -> None:
    """SIGTERM between the opt-in and the petition creation: the item goes back without an
    attempt used, and the next process continues the plan."""
    await world.store.enqueue([opted_in_creator()])
    dispatcher = world.dispatcher()

    async def stop_after_signup(request: httpx.Request) -> httpx.Response | None:
        if request.method == "POST" and request.url.path.endswith("/people"):
            response = await world.transport.inner.handle_async_request(request)
            dispatcher.stop_intake()  # SIGTERM arrives while AN answers
            return response
        return None

    world.transport.hooks.append(stop_after_signup)
    await drain(dispatcher, 1)
    await dispatcher.release_in_flight()
    (row,) = world.rows()
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert world.transport.writes() == ["POST /people"]

    world.transport.hooks.clear()
    await world.unsubscribe_in_an("creator1@example.org")
    await drain(world.dispatcher(), 1)

    assert world.sim.person("creator1@example.org")["status"] == "unsubscribed"
    assert world.subscriptions("creator1@example.org") == 1
    assert [r["status"] for r in world.rows()] == ["done"]
    assert world.sim.petitions()[0]["creator_uuid"] == world.sim.person(
        "creator1@example.org")["uuid"]


# ------------------------------------------------------------ 3./4. the consent timeline


@pytest.mark.anyio
async def test_an_edit_does_not_make_an_old_opt_in_newer_than_an_org_wide_unsubscribe(
        world: World) -> None:
    """Opted in on 2 January, unsubscribed from everything on 1 March, then a single-petition
    unsubscribe on 1 June bumps the signature's updated_at. A late poll must not subscribe."""
    await world.mirrored()
    world.sim.add_person("ann@example.org", status="subscribed")
    await world.store.enqueue([global_unsubscribe_activity(
        7, "ann@example.org", parse_time("2024-03-01T00:00:00Z"))])
    await drain(world.dispatcher(), 1)
    assert world.sim.person("ann@example.org")["status"] == "unsubscribed"

    edited = sig(1, "ann@example.org", opted_in=True, updated_at="2024-06-01T00:00:00Z",
                 unsubscribe_at="2024-06-01T00:00:00Z")
    await world.store.enqueue([edited])
    await drain(world.dispatcher(), 1)

    assert world.sim.person("ann@example.org")["status"] == "unsubscribed"
    assert len(world.sim.signatures()) == 1  # the signature itself still lands


@pytest.mark.anyio
async def test_a_late_confirmation_is_an_opt_in_at_its_own_time(world: World) -> None:
    """Signed on 2 January without opting in, unsubscribed from everything on 1 March,
    confirmed with an opt-in on 1 April: the person acted last by opting in."""
    await world.mirrored()
    world.sim.add_person("ann@example.org", status="subscribed")
    await world.store.enqueue([global_unsubscribe_activity(
        7, "ann@example.org", parse_time("2024-03-01T00:00:00Z"))])
    await drain(world.dispatcher(), 1)
    confirmed = sig(1, "ann@example.org", opted_in=True, confirmed_at="2024-04-01T00:00:00Z",
                    updated_at="2024-04-01T00:00:00Z")
    await world.store.enqueue([confirmed])
    await drain(world.dispatcher(), 1)
    assert world.sim.person("ann@example.org")["status"] == "subscribed"


@pytest.mark.anyio
async def test_a_late_older_unsubscribe_does_not_override_a_newer_opt_in(world: World) -> None:
    """An org-wide unsubscribe from 10:05 is delivered (ControlShift retries for hours) after
    an opt-in from 10:10 was applied: the person acted last by opting in."""
    await world.mirrored()
    await world.store.enqueue([sig(1, "ann@example.org", opted_in=True,
                                   created_at="2024-05-01T10:10:00Z")])
    await drain(world.dispatcher(), 1)
    assert world.sim.person("ann@example.org")["status"] == "subscribed"

    await world.store.enqueue([global_unsubscribe_activity(
        7, "ann@example.org", parse_time("2024-05-01T10:05:00Z"))])
    await drain(world.dispatcher(), 1)

    assert world.sim.person("ann@example.org")["status"] == "subscribed"
    assert world.transport.writes().count("PUT /people/") == 0
    (_, unsub) = world.rows()
    assert "opted in again after this unsubscribe" in unsub["note"]


@pytest.mark.anyio
async def test_an_older_opt_in_found_late_does_not_resubscribe_after_an_an_unsubscribe(
        world: World) -> None:
    """A backfill finds a December opt-in after csand applied a January one and the person
    unsubscribed through AN: the December one says nothing new."""
    await world.mirrored(1)
    await world.mirrored(2)
    january = sig(1, "ann@example.org", opted_in=True, created_at="2024-01-10T00:00:00Z")
    await world.store.enqueue([january])
    await drain(world.dispatcher(), 1)
    await world.unsubscribe_in_an("ann@example.org")

    december = signature_activity(
        {"id": 2, "email": "ann@example.org", "join_organisation": True,
         "created_at": "2023-12-10T00:00:00Z"}, petition(2), ORG)
    await world.store.enqueue([december])
    await drain(world.dispatcher(), 1)

    assert world.sim.person("ann@example.org")["status"] == "unsubscribed"
    assert len(world.sim.signatures()) == 2


# ------------------------------------------------------------ 10. a lease survives clock jumps


@pytest.mark.anyio
async def test_a_clock_jump_hands_an_item_out_again_and_the_first_worker_writes_nothing_more(
        world: World) -> None:
    """An NTP step (or a VM resume) longer than lease_seconds while a lookup is in flight: the
    item is leased again; the first worker must not go on to write."""
    await world.mirrored()
    await world.store.enqueue([sig(1, "bo@example.org", opted_in=None)])
    first = world.dispatcher(lease_seconds=60)
    (item,) = await world.store.lease(1, 60)
    first.in_flight[item.token] = item
    second: list[Any] = []

    async def jump_and_release(request: httpx.Request) -> httpx.Response | None:
        if request.method == "GET" and "/people" in request.url.path and not second:
            world.clock.t += 3600  # the clock jumps an hour
            second.extend(await world.store.lease(1, 60))
        return None

    world.transport.hooks.append(jump_and_release)
    await first._apply_and_record(item)

    assert [i.id for i in second] == [item.id]
    assert second[0].token != item.token
    assert world.sim.person("bo@example.org") is None  # the first worker stopped
    assert first.stats.lost == 1 and first.stats.done == 0
    (row,) = world.rows()
    assert (row["status"], row["lease_token"]) == ("in_flight", second[0].token)

    world.transport.hooks.clear()
    other = world.dispatcher(lease_seconds=60)
    other.in_flight[second[0].token] = second[0]
    await other._apply_and_record(second[0])
    (row,) = world.rows()
    assert row["status"] == "done"
    assert world.sim.person("bo@example.org")["status"] == "unsubscribed"
    assert len(world.sim.signatures()) == 1


@pytest.mark.anyio
async def test_a_worker_that_lost_its_lease_records_no_outcome(world: World) -> None:
    await world.store.enqueue([sig(1, "bo@example.org", opted_in=None)])
    (item,) = await world.store.lease(1, 60)
    world.clock.t += 3600
    (again,) = await world.store.lease(1, 60)
    assert await world.store.finish(item.id, "done", token=item.token) is False
    assert await world.store.guard(item.id, item.token) == "lost"
    assert await world.store.guard(again.id, again.token) is None
    assert await world.store.finish(again.id, "done", token=again.token) is True
    assert [r["status"] for r in world.rows()] == ["done"]


@pytest.mark.anyio
async def test_an_opt_in_waiting_in_the_queue_does_not_subscribe_after_a_newer_unsubscribe_is_known(
        world: World) -> None:
    """Found by the model-based test: a creator opted in at 00:01 and unsubscribed from
    everything at 00:02; csand learns both before either runs. The opt-in goes first (per-person
    order), but csand already knows it was superseded: the person must not be subscribed, not
    even for a moment."""
    creator = creator_activity({**petition(1), "created_at": "2024-03-01T00:01:00Z"}, ORG,
                               {"for_email": "creator1@example.org", "join_organisation": True})
    unsubscribe = global_unsubscribe_activity(7, "creator1@example.org",
                                              parse_time("2024-03-01T00:02:00Z"))
    await world.store.enqueue([creator, unsubscribe])
    await drain(world.dispatcher(), 2)

    assert world.subscriptions("creator1@example.org") == 0
    assert world.sim.person("creator1@example.org")["status"] == "unsubscribed"


@pytest.mark.anyio
async def test_an_org_wide_unsubscribe_committed_mid_plan_is_seen_before_the_opt_in_is_sent(
        world: World) -> None:
    """The opt-in's plan first mirrors the petition; while that lookup is in flight a webhook
    commits an org-wide unsubscribe newer than the opt-in. The opt-in must not be sent."""
    await world.store.enqueue([sig(1, "ann@example.org", opted_in=True)])  # 2 January

    async def unsubscribe_meanwhile() -> None:
        await world.store.enqueue([global_unsubscribe_activity(
            7, "ann@example.org", parse_time("2024-03-01T00:00:00Z"))])
        return None

    world.transport.hooks.append(once("GET /petitions", unsubscribe_meanwhile))
    await drain(world.dispatcher(), 2)

    assert world.subscriptions("ann@example.org") == 0
    assert world.sim.person("ann@example.org")["status"] == "unsubscribed"
    assert len(world.sim.signatures()) == 1
    assert [r["status"] for r in world.rows()] == ["done", "done"]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["restart", "expired lease"])
async def test_an_in_flight_item_deleted_meanwhile_never_blocks_its_person_after_a_crash(
        world: World, how: str) -> None:
    """Found by the model-based test: the process dies while an item is in flight, its record
    is deleted meanwhile, and the item came back as pending with its deletion mark: never
    leased, it blocked every later item of that person for good."""
    await world.mirrored()
    await world.store.enqueue([sig(1, "ann@example.org", opted_in=True)])
    (item,) = await world.store.lease(1, 60)
    await world.delete_signature(1)
    later = sig(2, "ann@example.org", opted_in=None, created_at="2024-01-03T00:00:00Z")
    await world.store.enqueue([later])
    if how == "restart":
        await world.store.release_all_in_flight()
    else:
        world.clock.t += 3600
    (leased,) = await world.store.lease(10, 60)
    assert leased.activity.source_key == "signature:2"
    first = world.rows()[0]
    assert (first["status"], first["lease_token"]) == ("cancelled", None)
    assert "deleted on ControlShift" in first["note"]
