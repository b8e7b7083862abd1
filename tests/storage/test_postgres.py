"""The PostgreSQL backend (csand.storage.postgres): what only a store shared by several csand
instances must prove. Two stores opened on one database with different ``instance`` names act as
two instances; the rules every backend shares are in tests/storage/test_conformance.py.

Every test runs on a real (throwaway) PostgreSQL server and a ManualClock shared by the instances,
so leases, leadership terms and request slots are deterministic; concurrency comes from anyio task
groups (several tasks per instance, each with pooled connections of its own), never from sleeps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest

from csand.model import SignatureSeen, global_unsubscribe_activity, parse_time
from csand.storage import (
    EVENT_CLAIM_SECONDS,
    NotLeader,
    SchemaTooNew,
    Storage,
    StoreError,
    open_store,
)
from csand.storage.postgres import MIGRATIONS
from tests.fakes import ManualClock
from tests.storage import petition_state, seen_row, sig

pytestmark = pytest.mark.anyio

LEASE = 60.0
TTL = 15.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def pair(pg_url: str, clock: ManualClock) -> AsyncIterator[tuple[Storage, Storage]]:
    """Two csand instances, "a" and "b", sharing one fresh database and one clock."""
    a = await open_store(pg_url, clock=clock, instance="a")
    try:
        b = await open_store(pg_url, clock=clock, instance="b")
        try:
            yield a, b
        finally:
            await b.close()
    finally:
        await a.close()


# ---------------------------------------------------------------- leases


async def test_concurrent_leases_from_two_instances_keep_every_outbox_rule(
    pair: tuple[Storage, Storage],
) -> None:
    """2 instances x 4 workers lease 5 at a time over a backlog of 200 items of 30 people."""
    a, b = pair
    people, total = 30, 200
    backlog = []
    for n in range(total):
        person, k = n % people, n // people  # k: the person's k-th item, enqueued in id order
        day = 1 + (k * 3) % 7  # ... but not in occurred_at order: 1, 4, 7, 3, 6, 2, 5
        backlog.append(sig(n + 1, f"p{person}@example.org", f"2024-01-{day:02d}T00:00:00Z"))
    # Each instance enqueues half of it, at once.
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.enqueue, backlog[::2])
        tg.start_soon(b.enqueue, backlog[1::2])
    assert (await a.counts())["pending"] == total
    occurred = {r["id"]: (r["person_key"], r["occurred_at"]) for r in await a.items()}

    leased: dict[int, str] = {}  # item id → the instance that leased it
    held: dict[str, int] = {}  # person → item leased and not yet being finished
    finish_order: dict[str, list[str]] = defaultdict(list)  # person → occurred_at, as finished
    finished: set[int] = set()
    progress = [anyio.Event()]  # set (and replaced) whenever an item is finished

    async def worker(store: Storage) -> None:
        while len(finished) < total:
            woken = progress[0]  # taken before leasing: a finish after it wakes us up
            items = await store.lease(5, LEASE)
            if not items:
                await woken.wait()
                continue
            assert len(items) <= 5
            for item in items:
                assert item.id not in leased, f"item {item.id} leased twice"
                leased[item.id] = store.instance
                person = item.activity.person_key
                assert person not in held, (
                    f"{store.instance} leased item {item.id} of {person} while item "
                    f"{held.get(person)} of that person was in flight")
                held[person] = item.id
            for item in items:
                await anyio.lowlevel.checkpoint()  # let the other workers lease in between
                person = item.activity.person_key
                # Forgotten before finishing: the next item of this person may be leased as soon
                # as this finish commits, possibly before this task runs again.
                del held[person]
                finish_order[person].append(occurred[item.id][1])
                assert await store.finish(item.id, "done", token=item.token)
                finished.add(item.id)
                woken, progress[0] = progress[0], anyio.Event()
                woken.set()

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for store in (a, b):
                for _ in range(4):
                    tg.start_soon(worker, store)

    assert sorted(leased) == sorted(occurred)  # every item leased, exactly once
    assert {"a", "b"} == set(leased.values())  # both instances took part
    expected: dict[str, list[str]] = defaultdict(list)
    for person, when in occurred.values():
        expected[person].append(when)
    assert len(expected) == people
    for person, times in expected.items():
        assert finish_order[person] == sorted(times), person
    counts = await b.counts()
    assert counts["done"] == total
    assert sum(counts.values()) == total


async def test_release_all_in_flight_releases_only_this_instances_leases(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    await a.enqueue([sig(n, f"p{n}@example.org") for n in range(1, 7)])
    held_by_a = await a.lease(3, LEASE)
    held_by_b = await b.lease(3, LEASE)
    assert len(held_by_a) == len(held_by_b) == 3
    assert {i.id for i in held_by_a}.isdisjoint({i.id for i in held_by_b})

    assert await b.release_all_in_flight() == 3  # b restarted: its own leases go back
    statuses = await a.items()
    by_id = {r["id"]: r["status"] for r in statuses}
    assert {by_id[i.id] for i in held_by_a} == {"in_flight"}
    assert {by_id[i.id] for i in held_by_b} == {"pending"}
    for item in held_by_a:
        assert await a.guard(item.id, item.token) is None  # a's leases are still a's
    for item in held_by_b:
        assert await b.guard(item.id, item.token) == "lost"

    again = await b.lease(10, LEASE)  # a's leases have not expired: b gets only its own back
    assert sorted(i.id for i in again) == sorted(i.id for i in held_by_b)
    for item in again:
        assert await b.finish(item.id, "done", token=item.token)
    assert await b.lease(10, LEASE) == []


async def test_a_crashed_instances_lease_is_reclaimed_by_another_once_it_expires(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    await a.enqueue([sig(1, "ann@example.org"), sig(2, "ann@example.org",
                                                     "2024-01-03T00:00:00Z")])
    (crashed,) = await a.lease(5, LEASE)  # a dies holding it: it never finishes
    assert await b.lease(5, LEASE) == []  # ann's next item waits behind it, on every instance
    clock.t += LEASE - 1
    assert await b.lease(5, LEASE) == []
    clock.t += 2  # the lease ran out
    (reclaimed,) = await b.lease(5, LEASE)
    assert reclaimed.id == crashed.id and reclaimed.token != crashed.token
    assert await a.guard(crashed.id, crashed.token) == "lost"
    assert await a.finish(crashed.id, "done", token=crashed.token) is False  # a woke up late
    assert await b.guard(reclaimed.id, reclaimed.token) is None
    assert await b.finish(reclaimed.id, "done", token=reclaimed.token)
    (second,) = await a.lease(5, LEASE)
    assert second.activity == sig(2, "ann@example.org", "2024-01-03T00:00:00Z")


# ---------------------------------------------------------------- leadership


async def test_exactly_one_instance_leads_and_the_other_takes_over_after_the_ttl(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    stores = {"a": a, "b": b}
    leader: tuple[str, int] | None = None
    for _ in range(12):  # both ask at once, three times each, every 5 s (within the TTL)
        answers: list[tuple[str, int | None]] = []

        async def ask(store: Storage, answers: list[tuple[str, int | None]] = answers) -> None:
            answers.append((store.instance, await store.lead(TTL)))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(ask, a)
                tg.start_soon(ask, b)
        holders = {(name, term) for name, term in answers if term is not None}
        assert len(holders) == 1, answers  # exactly one leads, and all its calls agree
        (now_leading,) = holders
        assert {name for name, term in answers if term is None} == (
            {"a", "b"} - {now_leading[0]})
        assert leader is None or now_leading == leader  # renewing keeps leadership and term
        leader = now_leading
        view = await a.cluster()
        assert (view["leader"], view["term"]) == leader
        clock.t += 5
    assert leader is not None
    name, term = leader
    old, other = stores[name], stores["b" if name == "a" else "a"]

    # The leader stops renewing (it hangs); the other takes over only once the TTL has passed.
    clock.t -= 5  # back to the leader's last renewal
    for _ in range(3):
        clock.t += 5
        assert await other.lead(TTL) is None  # until == now still counts as leading
    clock.t += 0.5
    assert await other.lead(TTL) == term + 1
    assert await old.lead(TTL) is None  # the old leader is deposed
    assert await old.lead(TTL) is None
    view = await a.cluster()
    assert (view["leader"], view["term"]) == (other.instance, term + 1)

    # The deposed leader's poll, read before it hung, is refused and writes nothing.
    with pytest.raises(NotLeader):
        await old.commit_poll(petition_state(5), [seen_row(5, 5)],
                              [sig(5, "ann@example.org", pid=5)], fence=(old.instance, term))
    assert await other.petition_state(5) is None
    assert await other.signature_seen(5) is None
    assert await other.items() == []
    assert await other.commit_poll(petition_state(5), [seen_row(5, 5)],
                                   [sig(5, "ann@example.org", pid=5)],
                                   fence=(other.instance, term + 1)) == 1

    # A clean shutdown hands leadership over at once, with a new term.
    await other.resign()
    assert await old.lead(TTL) == term + 2
    assert await other.lead(TTL) is None
    with pytest.raises(NotLeader):
        await other.commit_poll(None, [], [sig(6, "bob@example.org")],
                                fence=(other.instance, term + 1))
    assert [r["source_key"] for r in await a.items()] == ["signature:5"]


async def test_a_deposed_leaders_commit_racing_the_takeover_is_refused(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    """The expired leader commits while the other instance takes over: whichever order the
    database puts them in, nothing is written under a term that had already ended."""
    a, b = pair
    term = await a.lead(TTL)
    assert term is not None
    for n in range(1, 11):
        clock.t += TTL + 1  # a's lease ran out; b is about to take over
        outcome: dict[str, Any] = {}

        async def deposed(n: int = n, fence: tuple[str, int] = ("a", term),
                          outcome: dict[str, Any] = outcome) -> None:
            try:
                await a.commit_poll(petition_state(n), [seen_row(n, n)],
                                    [sig(n, f"p{n}@example.org", pid=n)], fence=fence)
            except NotLeader:
                outcome["refused"] = True

        async def takeover(outcome: dict[str, Any] = outcome) -> None:
            outcome["term"] = await b.lead(TTL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(deposed)
            tg.start_soon(takeover)
        assert outcome.get("refused")  # a's term had expired by the clock either way
        assert await b.petition_state(n) is None
        # Give leadership back to a for the next round.
        await b.resign()
        term = await a.lead(TTL)
        assert term is not None
    assert await a.items() == []


# ---------------------------------------------------------------- request slots


async def test_request_slots_of_two_instances_form_one_sequence(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    interval = 0.25
    start = clock.t
    slots: list[tuple[str, float]] = []

    async def take(store: Storage) -> None:
        wait = await store.reserve("an", interval)
        assert wait >= 0
        slots.append((store.instance, clock.t + wait))

    # 20 requests from each instance at the same moment.
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(take, a)
            tg.start_soon(take, b)
    times = sorted(t for _, t in slots)
    assert times == pytest.approx([start + k * interval for k in range(40)])
    assert {name for name, _ in slots} == {"a", "b"}

    # Interleaved, as time passes (more slowly than the backlog drains): the sequence goes on.
    slots.clear()
    for n in range(20):
        clock.t += 0.1
        await take(a if n % 2 else b)
    assert [t for _, t in slots] == pytest.approx(
        [start + (40 + k) * interval for k in range(20)])

    # Idle long enough: the next slot is now, wherever it is asked for, and spacing holds again.
    clock.t += 100
    slots.clear()
    for store in (b, a, a, b):
        await take(store)
    assert [t for _, t in slots] == pytest.approx([clock.t + k * interval for k in range(4)])

    # A pause one instance saw (a 429) delays the other instance's slots too.
    assert await a.reserve("an", interval, pause=5.0) == pytest.approx(5.0)
    assert await b.reserve("an", interval) == pytest.approx(5.0 + interval)


async def test_no_two_request_slots_are_closer_than_the_interval(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    interval = 0.5
    slots: list[float] = []

    async def take(store: Storage, times: int) -> None:
        for _ in range(times):
            slots.append(clock.t + await store.reserve("an", interval))
            await anyio.lowlevel.checkpoint()

    for step in range(5):  # bursts from both instances, separated by idle times of any length
        async with anyio.create_task_group() as tg:
            for store in (a, b, a, b):
                tg.start_soon(take, store, 3)
        clock.t += (0.3, 2.0, 10.0, 0.0, 7.7)[step]
    slots.sort()
    assert len(slots) == 60
    gaps = [later - earlier for earlier, later in zip(slots, slots[1:], strict=False)]
    assert min(gaps) >= interval - 1e-6


# ---------------------------------------------------------------- migrations


async def _schema_rows(url: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await (await conn.execute("SELECT version FROM csand_schema")).fetchall()


async def test_instances_starting_together_on_a_fresh_database_migrate_it_once(
    pg_url: str, clock: ManualClock
) -> None:
    stores: dict[str, Storage] = {}

    async def start(name: str) -> None:
        stores[name] = await open_store(pg_url, clock=clock, instance=name)

    try:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for name in "abcd":
                    tg.start_soon(start, name)
        assert sorted(stores) == list("abcd")
        for store in stores.values():
            assert await store.schema_version() == len(MIGRATIONS)
        assert await _schema_rows(pg_url) == [(len(MIGRATIONS),)]
        await stores["a"].enqueue([sig(1, "ann@example.org")])
        assert (await stores["d"].counts())["pending"] == 1  # one database, one schema
    finally:
        for store in stores.values():
            await store.close()


async def test_a_database_migrated_by_a_newer_csand_is_refused(pg_url: str,
                                                               clock: ManualClock) -> None:
    store = await open_store(pg_url, clock=clock, instance="a")
    await store.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("UPDATE csand_schema SET version = 99")
    with pytest.raises(SchemaTooNew, match="newer") as refused:
        await open_store(pg_url, clock=clock, instance="b")
    assert "99" in str(refused.value)
    assert await _schema_rows(pg_url) == [(99,)]  # left as it was


# ---------------------------------------------------------------- newer version wins


def _versions(sid: int) -> tuple[tuple[SignatureSeen, Any], tuple[SignatureSeen, Any]]:
    """An older and a newer version of signature ``sid`` (the newer one edited on CS)."""
    older = sig(sid, f"p{sid}@example.org")
    newer = sig(sid, f"p{sid}@example.org", first_name="Anne",
                updated_at="2024-03-01T00:00:00Z")
    return ((SignatureSeen(sid, 1, older.fingerprint(), None, "2024-01-02T00:00:00+00:00"), older),
            (SignatureSeen(sid, 1, newer.fingerprint(), None, "2024-03-01T00:00:00+00:00"), newer))


async def _check_newer_won(store: Storage, sids: range) -> None:
    items = await store.items()
    for sid in sids:
        (_, older), (seen_new, newer) = _versions(sid)
        assert await store.signature_seen(sid) == seen_new, sid
        ids = {r["dedupe_key"]: r["id"] for r in items if r["source_key"] == f"signature:{sid}"}
        assert newer.dedupe_key in ids, sid
        if older.dedupe_key in ids:  # committed first: fine, but never after the newer one
            assert ids[older.dedupe_key] < ids[newer.dedupe_key], sid
        assert set(ids) <= {older.dedupe_key, newer.dedupe_key}


async def test_the_newer_version_wins_whichever_instance_commits_last(
    pair: tuple[Storage, Storage],
) -> None:
    a, b = pair
    # Both orders, one after the other.
    (old_seen, older), (new_seen, newer) = _versions(1)
    await a.commit_poll(None, [new_seen], [newer])
    assert await b.commit_poll(None, [old_seen], [older]) == 0  # stale: nothing added
    (old_seen, older), (new_seen, newer) = _versions(2)
    await a.commit_poll(None, [old_seen], [older])
    assert await b.commit_poll(None, [new_seen], [newer]) == 1
    await _check_newer_won(a, range(1, 3))
    assert [r["source_key"] for r in await a.items()] == ["signature:1", "signature:2",
                                                         "signature:2"]

    # At the same time, 30 signatures, the older version on a for half and on b for the others.
    async with anyio.create_task_group() as tg:
        for sid in range(10, 40):
            (old_seen, older), (new_seen, newer) = _versions(sid)
            old_on, new_on = (a, b) if sid % 2 else (b, a)
            if sid % 3:
                tg.start_soon(old_on.commit_poll, None, [old_seen], [older])
                tg.start_soon(new_on.commit_poll, None, [new_seen], [newer])
            else:
                tg.start_soon(new_on.commit_poll, None, [new_seen], [newer])
                tg.start_soon(old_on.commit_poll, None, [old_seen], [older])
    await _check_newer_won(b, range(10, 40))


# ---------------------------------------------------------------- connecting


UNREACHABLE = [
    "postgresql://csand:s3cret@/csand?host=/nonexistent-csand-socket-dir",
    "postgresql:///csand?host=/nonexistent-csand-socket-dir&user=csand&password=s3cret",
]


@pytest.mark.parametrize("url", UNREACHABLE, ids=["userinfo", "query"])
async def test_an_unreachable_database_is_a_store_error_without_the_password(url: str) -> None:
    with pytest.raises(StoreError) as failed:
        await open_store(url, instance="a")
    message = str(failed.value)
    assert "s3cret" not in message
    assert "nonexistent-csand-socket-dir" in message  # says where it tried


async def test_an_unreachable_database_error_says_why() -> None:
    """At once, with libpq's reason, not after the pool's 30 s timeout."""
    with pytest.raises(StoreError) as failed:
        await open_store(UNREACHABLE[1], instance="a")
    assert "No such file or directory" in str(failed.value)
    assert "postgresql:///csand?" in str(failed.value)  # the URL as given, password masked


# ---------------------------------------------------------------- webhook inbox


async def test_webhook_events_are_claimed_by_one_instance_and_processed_once(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    for n in range(24):  # each received on one instance, then again (a retry) on the other
        first, second = (a, b) if n % 2 else (b, a)
        assert await first.receive_event(f"jid-{n}", "signature.created", f'{{"n":{n}}}')
        assert await second.receive_event(f"jid-{n}", "signature.created",
                                          f'{{"n":{n}}}') is False
    assert (await a.status())["webhooks_received"] == 24

    claimed: dict[int, str] = {}

    async def claim(store: Storage) -> None:
        while events := await store.events_due(limit=3):
            for event in events:
                assert event.id not in claimed, f"event {event.id} handed out twice"
                claimed[event.id] = store.instance
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for store in (a, b, a, b, a, b):
            tg.start_soon(claim, store)
    assert len(claimed) == 24
    assert await a.events_due() == [] and await b.events_due() == []

    stores = {"a": a, "b": b}
    for event_id, name in sorted(claimed.items()):  # each processed where it was claimed
        await stores[name].commit_poll(None, event_id=event_id)
    clock.t += EVENT_CLAIM_SECONDS + 1
    assert await a.events_due() == [] and await b.events_due() == []
    status = await b.status()
    assert (status["webhooks_waiting"], status["webhooks_failed"]) == (0, 0)


async def test_an_event_claimed_by_a_crashed_instance_goes_to_another_after_the_claim(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    assert await b.receive_event("jid-1", "signature.created", '{"a":1}')
    (claimed,) = await a.events_due()
    assert await b.events_due() == []
    clock.t += EVENT_CLAIM_SECONDS - 1
    assert await b.events_due() == []
    clock.t += 2  # a died before recording anything
    (again,) = await b.events_due()
    assert again.id == claimed.id
    assert await a.events_due() == []
    await b.commit_poll(None, [], [sig(1, "ann@example.org")], event_id=again.id)
    clock.t += EVENT_CLAIM_SECONDS + 1
    assert await a.events_due() == [] and await b.events_due() == []


# ---------------------------------------------------------------- the guard


async def test_the_guard_sees_what_another_instance_committed_a_moment_ago(
    pair: tuple[Storage, Storage],
) -> None:
    a, b = pair
    await a.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    first, second = await a.lease(5, LEASE)
    assert await a.guard(first.id, first.token) is None
    assert await a.guard(second.id, second.token) is None

    await b.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z")],
                        deleted_sources=["signature:1"])
    assert await a.guard(first.id, first.token) == "deleted"

    known = parse_time("2024-01-01T00:00:00Z")
    assert await a.guard(second.id, second.token, known) is None
    await b.enqueue([global_unsubscribe_activity(7, "bob@example.org",
                                                 parse_time("2024-03-01T00:00:00Z"))])
    assert await a.guard(second.id, second.token, known) == "unsubscribed"

    # The deleted record is cancelled when its holder hands it back, never retried.
    assert await a.finish(first.id, "pending", error="503", token=first.token)
    assert (await b.items())[0]["status"] == "cancelled"


# ---------------------------------------------------------------- mirrored petitions


@pytest.mark.parametrize("key, other", [(7, 8), ("event:picnic", "calendar:picnic")])
async def test_only_one_instance_at_a_time_holds_a_mirror_lock(
    pair: tuple[Storage, Storage], key: int | str, other: int | str
) -> None:
    """Two instances must not both find no AN twin of a petition, an event or a calendar and
    both create one."""
    a, b = pair
    order: list[str] = []
    a_holds, b_waiting = anyio.Event(), anyio.Event()

    async def first() -> None:
        async with a.mirror_lock(key):
            order.append("a in")
            a_holds.set()
            await b_waiting.wait()
            async with b.mirror_lock(other):  # another petition or event is not held up
                order.append("b in other")
            await anyio.sleep(0.2)  # b is blocked on 7 meanwhile
            order.append("a out")

    async def second() -> None:
        await a_holds.wait()
        b_waiting.set()
        async with b.mirror_lock(key):
            order.append("b in same")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(second)
    assert order == ["a in", "b in other", "a out", "b in same"]


async def test_leases_of_an_instance_whose_heartbeat_stopped_come_back_before_they_expire(
    pair: tuple[Storage, Storage], clock: ManualClock
) -> None:
    a, b = pair
    await a.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    await a.heartbeat({"pid": 1})
    await b.heartbeat({"pid": 2})
    (held,) = await a.lease(1, 300)
    clock.t += 25
    await b.heartbeat({"pid": 2})
    await a.heartbeat({"pid": 1})  # a is alive: its lease stays its own
    assert [i.activity.source_key for i in await b.lease(5, 300)] == ["signature:2"]
    clock.t += 31  # a went silent (killed): far from the 300 s lease's end
    await b.heartbeat({"pid": 2})
    (taken,) = await b.lease(5, 300)
    assert taken.id == held.id and taken.token != held.token
    assert await a.guard(held.id, held.token) == "lost"  # were a still running, it sends nothing
