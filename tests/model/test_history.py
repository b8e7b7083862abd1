"""Model-based test: random histories of ControlShift, Action Network and csand, checked on AN's
whole history of changes (not only on its end state).

What the state machine generates, in a small world (three people plus one unusable address, two
petitions, so that people, petitions and records collide often):

* ControlShift: a petition is launched (its creator opted in or not); a person signs a petition
  with ``join_organisation`` true / null / false; a late confirmation (``join_organisation``
  becomes true, ``confirmed_at`` = now); edits (a name change, a single-petition unsubscribe);
  a deletion ("This wasn't me"); an org-wide unsubscribe; a category added to a petition (new
  tags: every signer and the creator are seen again). Every change is a *version*; versions go
  into a delivery pool, and a separate rule delivers any pooled version (out of order, and the
  same version more than once) the way the poller and the webhook processor do:
  ``see_signature`` + ``store.commit_poll``.
* The person acting in AN: unsubscribing there (through the API, between csand's steps or in the
  middle of an item's plan), and being erased there (``sim.delete_person``, between steps).
* AN faults on a chosen request of the next item applied: 5xx before the write, 5xx after the
  write was committed, ``200 {}``, a dropped connection before or after the write, 429s (once, or
  enough to exhaust the client's retries), a rejected API key.
* csand's work: lease an item (it stays in flight, held by a "worker", while other things
  happen), apply a held item (``Dispatcher._apply_and_record``), apply two held items at the same
  time, work through everything ready, advance the clock (retries become due; leases expire, so
  the same item can be leased twice); restarts (a new Storage on the same file,
  ``release_all_in_flight``, a new Dispatcher); a kill -9 or a SIGTERM in the middle of an item,
  between AN's answer and csand's commit.

What it checks, after every step, on AN's history (``sim.history``, kept across erasures) and on
a log of every AN request attributed to the item (and lease) whose step sent it:

* Never subscribe without consent: every change of a person's status to ``subscribed`` (a new
  person created subscribed, or unsubscribed → subscribed) was caused by a request of an item
  whose record is opted in, whose deletion csand had not committed before that item was leased,
  whose opt-in time (``confirmed_at``, else ``created_at``) is later than every org-wide
  unsubscribe of the person committed to csand before the request, and later than every opt-in
  whose ``subscribed`` AN had already acknowledged to csand for that person (an opt-in counts
  once; a ``subscribed`` AN committed but never acknowledged may be sent again).
* An org-wide unsubscribe older than an acknowledged opt-in never unsubscribes the person; a
  signature or a petition creation never turns a subscribed person unsubscribed; an org-wide
  unsubscribe never creates a person.
* No AN write touching a person is made for a deleted signature by an attempt leased after csand
  committed the deletion.

And at the end, after draining (faults off, every pooled version delivered, all work done and the
clock moved past every retry):

* Nothing pending or in flight; every dead item has a reason; every live signature with a valid
  email (and every creator) is ``done`` with a signature on its mirrored petition in AN (unless
  AN erased the person after csand last wrote that signature) or ``dead``.
* One mirrored petition per CS petition, no duplicate identifier posts, one AN signature per
  person and petition; a person with no opt-in delivered, absent from AN at the start, is not
  subscribed.

Runs: the default test run has ``TestHistory`` (derandomized, 300 examples of up to 50 steps,
no shrinking: it prints the failing history as generated); ``pytest -m slow`` runs
``TestHistoryLong`` (1000 examples of up to 80 steps, shrunk). Environment knobs:
``CSAND_MODEL_EXAMPLES`` / ``CSAND_MODEL_SLOW_EXAMPLES`` (example counts), ``CSAND_MODEL_SHRINK=1``
(shrink in the default run too), ``CSAND_MODEL_RANDOM=1`` (fresh randomness instead of the fixed
derandomized sequence; ``--hypothesis-seed=N`` then works), and ``CSAND_MODEL_SKIP=name,...`` (switch
named checks off, to hunt for further counterexamples behind a known one; the names are the strings
tested against ``SKIP`` below).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from csand.actionnetwork.client import ActionNetworkClient
from csand.controlshift.versions import see_signature
from csand.model import (
    Activity,
    creator_activity,
    global_unsubscribe_activity,
    parse_time,
    petition_identifier,
    valid_email,
)
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim
from csand.storage import Item, Storage, open_store
from csand.sync.worker import Dispatcher
from tests.fakes import ManualClock

ORG = "model-org"
AN_BASE = "http://an.test/api/v2"
AN_KEY = "an-model-key"
T0 = 1_727_784_000.0
LEASE_SECONDS = 300.0
CS_T0 = datetime(2024, 3, 1, tzinfo=UTC)

EMAILS = ("ann@example.org", "bo@example.org", "cy@example.org")
BAD_EMAIL = "dee.example.org"  # no "@": csand must dead-letter it without a request
CREATORS = {1: "ann@example.org", 2: "bo@example.org"}
PETITION_IDS = (1, 2)
NAMES = ("Ann", "Annie", "Bo", "Cy")
CATEGORIES = ("Climate", "Housing")

# Fault kinds, hitting requests [at, at + count) of the attempt they are given to.
FAULT_KINDS = (
    "error",         # 5xx before the write (the sim's error_rate)
    "after_commit",  # AN stores the write, answers 500 (fail_after_commit_rate)
    "empty_200",     # AN's "200 {}" helper failure (empty_200_rate)
    "drop",          # connection dropped before AN handled it (drop_rate)
    "drop_after",    # AN handled it; the connection dropped before the answer arrived
    "429",           # rate limited (count 5 exhausts the client's own 429 retries)
    "bad_key",       # 403: the key was rejected for this request
    "kill",          # kill -9 after AN answered, before csand saw the answer
    "kill_before",   # kill -9 while the request was being sent
    "term",          # SIGTERM (cancellation) after AN answered; in-flight items released
)
_SIM_FAULTS = {"error": "error_rate", "after_commit": "fail_after_commit_rate",
               "empty_200": "empty_200_rate", "drop": "drop_rate"}

SKIP = {s.strip() for s in os.environ.get("CSAND_MODEL_SKIP", "").split(",") if s.strip()}


class Killed(BaseException):
    """kill -9: nothing after this point runs in the process."""


class Terminated(BaseException):
    """SIGTERM: the item's task is cancelled; the daemon hands back what it held."""


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int = 0
    count: int = 1


@dataclass
class Attempt:
    """One lease of one item: every AN request its apply makes is attributed to it."""

    item_id: int
    source_key: str
    kind: str
    email: str | None
    opted_in: bool
    opt_in_at: datetime | None  # CS time of the opt-in: confirmed_at, else created_at
    unsub_at: datetime | None  # CS time of an org-wide unsubscribe
    sig_id: int | None
    leased_seq: int
    version_at: datetime | None = None  # updated_at of the record version this item carries
    fault: Fault | None = None
    sent: int = 0
    instance: int = 0  # which csand instance leased it (several share a PostgreSQL database)

    def __str__(self) -> str:
        return (f"item {self.item_id} ({self.source_key}, leased at #{self.leased_seq} "
                f"by instance {self.instance})")


@dataclass
class Request:
    seq: int
    attempt: Attempt | None  # None: the test acting as the person in AN
    method: str
    path: str
    body: Any
    status: int | None = None
    acked: bool = False  # a 2xx answer with a body reached csand
    fault: str | None = None

    @property
    def status_sent(self) -> str | None:
        """The email status this request asked for, if any."""
        body = self.body if isinstance(self.body, dict) else {}
        person = body.get("person") if "person" in body else body
        emails = (person or {}).get("email_addresses") or [{}]
        return emails[0].get("status") if isinstance(emails[0], dict) else None

    @property
    def touches_person(self) -> bool:
        if self.method not in ("POST", "PUT"):
            return False
        return (self.path == "/people" or self.path.startswith("/people/")
                or self.path.endswith("/signatures") or self.path.endswith("/taggings"))

    @property
    def signs(self) -> bool:
        return self.method == "POST" and self.path.endswith("/signatures")

    def __str__(self) -> str:
        who = self.attempt or "the person, in AN"
        return (f"#{self.seq} {self.method} {self.path} status={self.status_sent!r} "
                f"-> {self.status} acked={self.acked} fault={self.fault} by {who}")


@dataclass
class Version:
    """One version of a CS record, waiting in the delivery pool."""

    kind: str  # signature | creator | unsubscribe
    label: str
    record: dict[str, Any] = field(default_factory=dict)
    petition: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] | None = None
    unsubscribe: tuple[int, str, datetime] | None = None

    def __repr__(self) -> str:
        return self.label


CURRENT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("attempt", default=None)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")



class LoggingTransport(httpx.AsyncBaseTransport):
    """Serves the AN simulator in process; logs and attributes every request; injects faults."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.inner = httpx.ASGITransport(app=world.sim.app)
        self.lock = asyncio.Lock()  # one request at a time: the sim stamps history with its seq

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async with self.lock:
            return await self._handle(request)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        world, sim = self.world, self.world.sim
        attempt = CURRENT.get()
        kind = None
        if attempt is not None:
            index = attempt.sent
            attempt.sent += 1
            f = attempt.fault
            if f is not None and f.at <= index < f.at + f.count:
                kind = f.kind
        world.seq += 1
        content = request.content
        entry = Request(world.seq, attempt, request.method,
                        request.url.path.removeprefix("/api/v2"),
                        json.loads(content) if content else None, fault=kind)
        world.log.append(entry)
        if kind == "kill_before":
            raise Killed()
        if kind == "429":
            entry.status = 429
            return httpx.Response(429, headers={"Retry-After": "1"},
                                  json={"error": "You have exceeded your rate limit"})
        if kind == "bad_key":
            sim.api_key = "revoked-key"
        if kind in _SIM_FAULTS:
            setattr(sim.faults, _SIM_FAULTS[kind], 1.0)
        try:
            response = await self.inner.handle_async_request(request)
            body = await response.aread()
        except ConnectionAbortedError as exc:  # the sim's drop, seen through ASGI
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request) from exc
        finally:
            sim.api_key = AN_KEY
            for name in _SIM_FAULTS.values():
                setattr(sim.faults, name, 0.0)
        entry.status = response.status_code
        if kind == "drop_after":
            raise httpx.ReadError("connection reset by peer", request=request)
        if kind == "kill":
            raise Killed()
        if kind == "term":
            raise Terminated()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        entry.acked = 200 <= response.status_code < 300 and bool(parsed)
        await world.run_hooks()
        return httpx.Response(response.status_code, headers=response.headers, content=body,
                              request=request)


class World:
    """csand (store + dispatcher) against the AN simulator, plus a model of ControlShift."""

    def __init__(self, directory: Path, store_url: str | None = None, instances: int = 1) -> None:
        self.path = directory / "csand.db"
        self.target: Path | str = store_url or self.path  # PostgreSQL, else a SQLite file
        self.instances = instances  # csand processes on the one store (several: PostgreSQL)
        self.stores: list[Storage] = []
        self.dispatchers: list[Dispatcher] = []
        self.clock = ManualClock(T0)
        self.seq = 0  # one counter for requests, deliveries, leases and AN-side actions
        self.mono = 0.0  # the limiter's fake monotonic clock
        self.sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None,
                                    clock=lambda: self.seq)
        self.transport = LoggingTransport(self)
        self.http = httpx.AsyncClient(transport=self.transport)
        self.raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.sim.app))
        self.log: list[Request] = []
        self.held: list[tuple[Item, Attempt]] = []  # leased, not yet applied
        self.hooks: list[list[Any]] = []  # [requests to go, email]: AN unsubscribe mid-plan
        # ControlShift, as the model knows it
        self.cs_now = CS_T0
        self.petitions: dict[int, dict[str, Any]] = {}
        self.creator_join: dict[int, bool | None] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.signed: set[tuple[str, int]] = set()
        self.pool: list[Version] = []
        self.next_sig = 1
        self.next_unsub = 1
        # what csand was told, and when (seq)
        # dedupe key → (opted in, opt-in time, updated_at of the version)
        self.registry: dict[str, tuple[bool, datetime | None, datetime | None]] = {}
        self.deleted_known: dict[int, int] = {}  # sig id → seq its deletion was committed
        self.unsub_committed: dict[str, list[tuple[datetime, int]]] = {}
        self.delivered: set[str] = set()  # labels of delivered versions
        self.opted_in_delivered: set[str] = set()  # emails with an opt-in csand was told of
        self.creator_delivered: set[int] = set()
        # AN, as set up and changed by the test
        self.pre_existing: set[str] = set()
        self.erased: dict[str, list[int]] = {}  # email → seqs of AN erasures
        self.archive: dict[str, list[list[dict[str, Any]]]] = {}
        self.restarts = 0

    @classmethod
    async def create(cls, directory: Path, store_url: str | None = None, instances: int = 1
                     ) -> World:
        world = cls(directory, store_url, instances)
        await world._start()
        return world

    @property
    def store(self) -> Storage:
        return self.stores[0]

    @property
    def dispatcher(self) -> Dispatcher:
        return self.dispatchers[0]

    async def _start(self) -> None:
        for i in range(self.instances):
            await self._start_instance(i)

    async def _start_instance(self, i: int) -> None:
        store = await open_store(self.target, clock=self.clock, instance=f"model-{i}")
        await store.release_all_in_flight()
        limiter = TokenBucket(1e6, clock=lambda: self.mono, sleep=self._sleep)
        an = ActionNetworkClient(self.http, AN_BASE, AN_KEY, limiter)
        dispatcher = Dispatcher(store, an, clock=self.clock, rng=random.Random(0),
                                lease_seconds=LEASE_SECONDS)
        if i < len(self.stores):
            self.stores[i], self.dispatchers[i] = store, dispatcher
        else:
            self.stores.append(store)
            self.dispatchers.append(dispatcher)

    async def _sleep(self, seconds: float) -> None:
        self.mono += max(0.0, seconds)
        await asyncio.sleep(0)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        await self.http.aclose()
        await self.raw.aclose()

    # ------------------------------------------------------------ ControlShift (the model)

    def _tick(self) -> datetime:
        self.cs_now += timedelta(minutes=1)
        return self.cs_now

    def an_setup(self, statuses: tuple[str | None, ...]) -> None:
        """People already in AN before csand starts."""
        for email, status in zip(EMAILS, statuses, strict=False):
            if status is not None:
                self.sim.add_person(email, given_name="Pre", status=status)
                self.pre_existing.add(email)

    def launch(self, pid: int, creator_join: bool | None) -> None:
        if pid in self.petitions:
            return
        now = self._tick()
        self.petitions[pid] = {
            "id": pid, "slug": f"petition-{pid}", "title": f"Petition {pid}",
            "url": f"https://cs.example.org/petitions/petition-{pid}", "launched": True,
            "created_at": _iso(now), "updated_at": _iso(now),
            "creator": {"first_name": "Cleo", "last_name": "Ng", "email": CREATORS[pid]},
            "categories": [],
        }
        self.creator_join[pid] = creator_join
        self._pool_creator(pid)

    def _pool_creator(self, pid: int) -> None:
        petition = json.loads(json.dumps(self.petitions[pid]))
        extra: dict[str, Any] = {"for_email": CREATORS[pid]}
        if isinstance(self.creator_join[pid], bool):
            extra["join_organisation"] = self.creator_join[pid]
        cats = ",".join(c["name"] for c in petition["categories"])
        self.pool.append(Version("creator", f"creator of petition {pid} [{cats}]",
                                 petition=petition, extra=extra))

    def sign(self, email: str, pid: int, join: bool | None) -> int | None:
        if pid not in self.petitions or (email, pid) in self.signed:
            return None
        now = self._tick()
        sid = self.next_sig
        self.next_sig += 1
        self.signed.add((email, pid))
        self.records[sid] = {
            "id": sid, "email": email, "first_name": "Ann", "last_name": "Lee",
            "postcode": "2000", "join_organisation": join, "confirmed_at": None,
            "deleted_at": None, "unsubscribe_at": None, "created_at": _iso(now),
            "updated_at": _iso(now), "_petition": pid,
        }
        self._pool_signature(sid, "signed")
        return sid

    def _pool_signature(self, sid: int, what: str) -> None:
        record = dict(self.records[sid])
        pid = record.pop("_petition")
        petition = json.loads(json.dumps(self.petitions[pid]))
        cats = ",".join(c["name"] for c in petition["categories"])
        self.pool.append(Version("signature", f"sig {sid} v{record['updated_at'][11:16]} "
                                 f"{what} join={record['join_organisation']} [{cats}]",
                                 record=record, petition=petition))

    def _live(self, n: int, unconfirmed: bool = False) -> int | None:
        ids = [sid for sid, r in self.records.items() if not r["deleted_at"]
               and not (unconfirmed and r["join_organisation"] is True)]
        return ids[n % len(ids)] if ids else None

    def confirm(self, n: int) -> None:
        sid = self._live(n, unconfirmed=True)
        if sid is None:
            return
        now = _iso(self._tick())
        self.records[sid].update(join_organisation=True, confirmed_at=now, updated_at=now)
        self._pool_signature(sid, "confirmed")

    def rename(self, n: int, name: str) -> None:
        sid = self._live(n)
        if sid is None:
            return
        now = _iso(self._tick())
        self.records[sid].update(first_name=name, updated_at=now)
        self._pool_signature(sid, f"renamed {name}")

    def unsubscribe_one(self, n: int) -> None:
        sid = self._live(n)
        if sid is None or self.records[sid]["unsubscribe_at"]:
            return
        now = _iso(self._tick())
        self.records[sid].update(unsubscribe_at=now, updated_at=now)
        self._pool_signature(sid, "single-petition unsubscribe")

    def delete(self, n: int) -> None:
        sid = self._live(n)
        if sid is None:
            return
        now = _iso(self._tick())
        self.records[sid].update(deleted_at=now, updated_at=now)
        self._pool_signature(sid, "deleted")

    def org_unsubscribe(self, email: str) -> None:
        at = self._tick()
        uid = self.next_unsub
        self.next_unsub += 1
        self.pool.append(Version("unsubscribe", f"org-wide unsubscribe {uid} of {email} "
                                 f"at {_iso(at)[11:16]}", unsubscribe=(uid, email, at)))

    def add_category(self, pid: int) -> None:
        if pid not in self.petitions:
            return
        petition = self.petitions[pid]
        names = [c["name"] for c in petition["categories"]]
        missing = [c for c in CATEGORIES if c not in names]
        if not missing:
            return
        petition["categories"].append({"slug": missing[0].lower(), "name": missing[0]})
        self._pool_creator(pid)
        for sid, record in self.records.items():
            if record["_petition"] == pid:
                self._pool_signature(sid, f"+{missing[0]}")

    async def cs_events(self, events: list[tuple[Any, ...]]) -> None:
        """ControlShift changes, e.g. ``("sign", email, petition id, join_organisation)``, and
        deliveries of pooled versions (``("deliver", pick, stays pooled)``)."""
        for name, *args in events:
            if name == "deliver":
                await self.deliver(*args)
                continue
            if name == "sign" and args[1] not in self.petitions:
                self.launch(args[1], None)
            getattr(self, name)(*args)

    def opt_in_time(self, sid: int) -> datetime | None:
        record = self.records[sid]
        return parse_time(record["confirmed_at"] or record["created_at"])

    # ------------------------------------------------------------ delivery (poller / webhooks)

    async def deliver(self, n: int, keep: bool = False) -> None:
        if not self.pool:
            return
        version = self.pool[n % len(self.pool)]
        if not keep:
            self.pool.remove(version)
        await self._deliver(version)

    async def deliver_all(self) -> None:
        while self.pool:
            await self._deliver(self.pool.pop(0))

    async def _deliver(self, v: Version) -> None:
        activities: list[Activity] = []
        if v.kind == "signature":
            previous = await self.store.signature_seen(int(v.record["id"]))
            seen = see_signature(v.record, v.petition, ORG, previous)
            if seen.activity is not None:
                activities.append(seen.activity)
            await self.store.commit_poll(None, [seen.row] if seen.row else [], activities,
                                         [seen.cancel] if seen.cancel else [])
            sid = int(v.record["id"])
            opted = v.record["join_organisation"] is True
            for a in activities:
                self.registry.setdefault(a.dedupe_key, (opted, self.opt_in_time(sid),
                                                        parse_time(v.record["updated_at"])))
            if v.record["deleted_at"]:
                self.deleted_known.setdefault(sid, self.seq + 1)
            elif opted:
                self.opted_in_delivered.add(v.record["email"])
        elif v.kind == "creator":
            activity = creator_activity(v.petition, ORG, v.extra)
            opted = (v.extra or {}).get("join_organisation") is True
            created = parse_time(v.petition["created_at"])
            self.registry.setdefault(activity.dedupe_key, (opted, created, created))
            await self.store.commit_poll(None, (), [activity])
            self.creator_delivered.add(int(v.petition["id"]))
            if opted:
                self.opted_in_delivered.add(CREATORS[int(v.petition["id"])])
        else:
            assert v.unsubscribe is not None
            uid, email, at = v.unsubscribe
            await self.store.commit_poll(None, (), [global_unsubscribe_activity(uid, email, at)])
            if v.label not in self.delivered:
                self.unsub_committed.setdefault(email, []).append((at, self.seq + 1))
        self.seq += 1
        self.delivered.add(v.label)

    # ------------------------------------------------------------ the person, in AN

    async def an_unsubscribe(self, email: str) -> None:
        person = self.sim.person(email)
        if person is None:
            return
        self.seq += 1
        entry = Request(self.seq, None, "PUT", f"/people/{person['uuid']}",
                        {"email_addresses": [{"address": email, "status": "unsubscribed"}]})
        self.log.append(entry)
        response = await self.raw.put(f"{AN_BASE}/people/{person['uuid']}",
                                      headers={"OSDI-API-Token": AN_KEY}, json=entry.body)
        entry.status = response.status_code
        assert response.status_code == 200, response.text

    async def an_event(self, event: tuple[Any, ...]) -> None:
        name, *args = event
        if name == "unsubscribe":
            await self.an_unsubscribe(*args)
        elif name == "unsubscribe_mid_plan":
            self.an_unsubscribe_after(*args)
        else:
            self.an_erase(*args)

    def an_unsubscribe_after(self, email: str, requests: int) -> None:
        """The person clicks "unsubscribe" in AN while csand is in the middle of a plan."""
        self.hooks.append([requests, email])

    async def run_hooks(self) -> None:
        due = []
        for hook in self.hooks:
            hook[0] -= 1
            if hook[0] <= 0:
                due.append(hook)
        for hook in due:
            self.hooks.remove(hook)
            await self.an_unsubscribe(hook[1])

    def an_erase(self, email: str) -> None:
        if self.sim.person(email) is None:
            return
        self.archive.setdefault(email, []).append(self.sim.history(email))
        self.seq += 1
        self.erased.setdefault(email, []).append(self.seq)
        self.sim.delete_person(email)

    # ------------------------------------------------------------ csand's work

    def _attempt(self, item: Item) -> Attempt:
        a = item.activity
        kind = str(a.kind)
        sig_id = int(a.source_key.split(":")[1]) if kind == "signature" else None
        opted, at, version_at = self.registry.get(a.dedupe_key, (None, None, None))
        if opted is None:  # a version csand built itself: judge it from the CS record
            opted = a.opted_in
            if sig_id is not None:
                at = self.opt_in_time(sig_id)
            elif a.petition is not None:
                at = parse_time(self.petitions[a.petition.cs_id]["created_at"])
        return Attempt(item.id, a.source_key, kind, a.email, bool(opted) and kind != "global_unsubscribe",
                       at, a.occurred_at if kind == "global_unsubscribe" else None, sig_id,
                       self.seq, version_at or a.occurred_at)

    async def lease(self, instance: int = 0) -> bool:
        self.seq += 1
        items = await self.stores[instance].lease(1, LEASE_SECONDS)
        for item in items:
            attempt = self._attempt(item)
            attempt.instance = instance
            self.held.append((item, attempt))
            self.dispatchers[instance].in_flight[item.id] = item  # as Dispatcher.run does
        return bool(items)

    async def apply(self, n: int = 0, fault: Fault | None = None) -> None:
        if not self.held:
            return
        item, attempt = self.held.pop(n % len(self.held))
        attempt.fault = fault
        try:
            await self._apply(item, attempt)
        except Killed:
            await self.restart(attempt.instance)
        except Terminated:
            await self.dispatchers[attempt.instance].release_in_flight()
            await self.restart(attempt.instance)

    async def _apply(self, item: Item, attempt: Attempt) -> None:
        token = CURRENT.set(attempt)
        try:
            await self.dispatchers[attempt.instance]._apply_and_record(item)
        finally:
            CURRENT.reset(token)

    async def apply_together(self, n: int, m: int) -> None:
        """Two workers at once (after a lease expired, possibly the same item twice)."""
        if len(self.held) < 2:
            return
        first = self.held.pop(n % len(self.held))
        second = self.held.pop(m % len(self.held))
        await asyncio.gather(self._apply(*first), self._apply(*second))

    async def work(self, limit: int = 20, instance: int = 0) -> None:
        for _ in range(limit):
            if not await self.lease(instance):
                return
            await self.apply(len(self.held) - 1)

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds

    async def restart(self, instance: int = 0) -> None:
        """The process ends (whatever it held stays in flight) and a new one starts."""
        self.held = [h for h in self.held if h[1].instance != instance]
        self.restarts += 1
        await self.stores[instance].close()
        await self._start_instance(instance)

    async def drain(self) -> None:
        self.hooks.clear()
        while self.held:
            await self.apply(0)
        await self.deliver_all()
        for _ in range(500):
            if await self.lease():
                await self.apply(len(self.held) - 1)
                continue
            counts = await self.store.counts()
            if counts["pending"] == 0 and counts["in_flight"] == 0:
                return
            self.advance(1000.0)
        raise AssertionError(f"the outbox never drained: {await self.store.counts()}")

    # ------------------------------------------------------------ checks

    def acked_opt_ins(self, email: str, before: int) -> list[tuple[datetime | None, Request]]:
        """Opt-ins whose "subscribed" AN acknowledged to csand before request ``before``."""
        return [(r.attempt.opt_in_at, r) for r in self.log
                if r.seq < before and r.acked and r.attempt is not None
                and r.attempt.opted_in and r.attempt.email == email
                and r.status_sent == "subscribed"]

    def segments(self, email: str) -> list[list[dict[str, Any]]]:
        return [*self.archive.get(email, []), self.sim.history(email)]

    def check_history(self) -> None:
        by_seq = {r.seq: r for r in self.log}
        for email in EMAILS:
            for segment in self.segments(email):
                before: str | None = None
                for snap in segment:
                    if snap["action"] == "setup":
                        before = snap["status"]
                        continue
                    after = snap["status"]
                    request = by_seq.get(snap["at"])
                    assert request is not None, f"AN changed {email} without a logged request"
                    if before is None and request.attempt is not None:
                        _check_creation(request)
                    if before != "subscribed" and after == "subscribed":
                        self._check_subscribe(email, request, before)
                    if before == "subscribed" and after == "unsubscribed" and request.attempt:
                        self._check_unsubscribe(email, request)
                    before = after
        _check("no_write_after_deletion", self._writes_after_deletion)

    def _check_subscribe(self, email: str, r: Request, before: str | None) -> None:
        a = r.attempt
        what = f"{email} went {before or 'absent'} -> subscribed by {r}"
        if a is None:
            raise AssertionError(what)
        if "opt_in" not in SKIP:
            assert a.opted_in, f"NO OPT-IN: {what}"
        if a.sig_id is not None and "deleted" not in SKIP:
            known = self.deleted_known.get(a.sig_id)
            assert known is None or known > a.leased_seq, (
                f"DELETED RECORD SUBSCRIBED: {what}; deletion committed at #{known}")
        for at, committed in self.unsub_committed.get(email, []):
            if committed > r.seq or (a.opt_in_at and a.opt_in_at > at):
                continue
            detail = (f"{what}; opt-in at {a.opt_in_at} (this version of the record at "
                      f"{a.version_at}), org-wide unsubscribe at {at} committed at #{committed}")
            if a.version_at and a.version_at > at:
                if "opt_in_dated_by_update" not in SKIP:
                    raise AssertionError(
                        f"OPT-IN DATED BY ITS RECORD'S LAST UPDATE, NOT BY WHEN IT HAPPENED: {detail}")
            else:
                if "unsubscribe_newer" not in SKIP:
                    raise AssertionError(
                        f"OPT-IN OLDER THAN A KNOWN ORG-WIDE UNSUBSCRIBE: {detail}")
        for at, ack in self.acked_opt_ins(email, r.seq):
            if a.opt_in_at and at and a.opt_in_at > at:
                continue
            detail = (f"{what}; opt-in at {a.opt_in_at}, but AN had already acknowledged an "
                      f"opt-in at {at}: {ack}")
            assert ack.attempt is not None
            if ack.attempt.source_key != a.source_key:
                if "older_opt_in" not in SKIP:
                    raise AssertionError(
                        f"OLDER OPT-IN RE-SUBSCRIBED AFTER A NEWER ONE WAS APPLIED: {detail}")
            elif ack.attempt.item_id == a.item_id and a.leased_seq < ack.seq:
                if "double_lease" not in SKIP:
                    raise AssertionError(
                        f"ONE ITEM LEASED TWICE, BOTH LEASES SENT ITS OPT-IN: {detail}")
            elif ack.attempt.item_id == a.item_id and ack.attempt is not a:
                if "replayed_opt_in" not in SKIP:
                    raise AssertionError(
                        f"OPT-IN OF AN ITEM SENT AGAIN BY A LATER ATTEMPT: {detail}")
            else:
                if "counts_once" not in SKIP:
                    raise AssertionError(f"OPT-IN USED TWICE: {detail}")

    def _check_unsubscribe(self, email: str, r: Request) -> None:
        a = r.attempt
        assert a is not None
        what = f"{email} went subscribed -> unsubscribed by {r}"
        if a.kind != "global_unsubscribe":
            if "kept_subscribed" not in SKIP:
                raise AssertionError(f"A SIGNATURE UNSUBSCRIBED A SUBSCRIBER: {what}")
            return
        if "older_unsubscribe" not in SKIP:
            for at, ack in self.acked_opt_ins(email, r.seq):
                assert a.unsub_at and at and a.unsub_at > at, (
                    f"OLDER UNSUBSCRIBE OVERRODE AN APPLIED OPT-IN: {what}; unsubscribe at "
                    f"{a.unsub_at}, opt-in at {at} acknowledged by {ack}")

    def _writes_after_deletion(self) -> None:
        for r in self.log:
            a = r.attempt
            if a is None or a.sig_id is None or not r.touches_person:
                continue
            known = self.deleted_known.get(a.sig_id)
            assert known is None or known > a.leased_seq, (
                f"WRITE FOR A DELETED SIGNATURE: {r}; deletion committed at #{known}")


    def mirrored(self, pid: int) -> str | None:
        identifier = petition_identifier(ORG, pid)
        found = [p["uuid"] for p in self.sim.petitions() if identifier in p["identifiers"]]
        assert len(found) <= 1, f"petition {pid} mirrored {len(found)} times"
        return found[0] if found else None

    async def check_end(self) -> None:
        counts = await self.store.counts()
        assert counts["pending"] == 0 and counts["in_flight"] == 0, counts
        rows = await self.store.items()
        for row in rows:
            if row["status"] == "dead":
                assert (row["last_error"] or "").strip(), f"dead without a reason: {dict(row)}"
        # no duplicates in AN
        identifiers = [i for p in self.sim.petitions() for i in p["identifiers"]]
        assert len(identifiers) == len(set(identifiers)), identifiers
        assert self.sim.stats()["duplicate_identifier_posts"] == 0
        pairs = [(s["petition_uuid"], s["person_uuid"]) for s in self.sim.signatures()]
        assert len(pairs) == len(set(pairs)), pairs
        # nothing lost
        expected = [(f"signature:{sid}", r["email"], r["_petition"])
                    for sid, r in self.records.items()
                    if not r["deleted_at"] and valid_email(r["email"])]
        expected += [(f"petition:{pid}:creator", CREATORS[pid], pid)
                     for pid in self.creator_delivered]
        for source, email, pid in expected:
            mine = [r for r in rows if r["source_key"] == source]
            assert mine, f"LOST: {source} was delivered but never queued"
            last = mine[-1]
            assert last["status"] in ("done", "dead"), f"LOST: {source}: {dict(last)}"
            if last["status"] == "dead":
                continue
            person = self.sim.person(email)
            petition = self.mirrored(pid)
            signed = person is not None and petition is not None and (
                (petition, person["uuid"]) in pairs)
            if not signed:
                writes = [r.seq for r in self.log
                          if r.attempt and r.attempt.source_key == source and r.signs and r.acked]
                last_write = max(writes, default=-1)
                erased_since = any(seq > last_write for seq in self.erased.get(email, []))
                assert erased_since, (f"LOST: {source} is done but {email} has no signature on "
                                      f"petition {pid} in AN")
        for row in rows:
            if row["source_key"].startswith("signature:"):
                record = self.records[int(row["source_key"].split(":")[1])]
                if not valid_email(record["email"]):
                    assert row["status"] in ("dead", "cancelled"), dict(row)
        # never subscribed without any opt-in
        for email in EMAILS:
            person = self.sim.person(email)
            if (person and email not in self.opted_in_delivered
                    and email not in self.pre_existing and "opt_in" not in SKIP):
                assert person["status"] != "subscribed", (
                    f"NO OPT-IN: {email} is subscribed at the end")

    def trail(self) -> str:
        return "\n".join(str(r) for r in self.log)


def _check(name: str, fn: Any) -> None:
    if name not in SKIP:
        fn()


def _fail(message: str) -> None:
    raise AssertionError(message)


def _check_creation(r: Request) -> None:
    assert r.attempt is not None
    if "unsubscribe_creates" not in SKIP:
        assert r.attempt.kind != "global_unsubscribe", (
            f"AN ORG-WIDE UNSUBSCRIBE CREATED A PERSON: {r}")


# ---------------------------------------------------------------- the state machine

FAULTS = st.one_of(
    st.none(),
    st.builds(Fault, kind=st.sampled_from(FAULT_KINDS), at=st.integers(0, 4),
              count=st.sampled_from([1, 1, 5, 99])),
)
ANY_EMAIL = st.sampled_from([*EMAILS, BAD_EMAIL])
PERSON = st.sampled_from(EMAILS)
PETITION = st.sampled_from(PETITION_IDS)
JOIN = st.sampled_from([True, True, None, False])
PICK = st.integers(0, 7)
SIGN = st.tuples(st.just("sign"), ANY_EMAIL, PETITION, JOIN)
DELIVER = st.tuples(st.just("deliver"), PICK, st.booleans())
CS_EVENTS = st.one_of(
    SIGN,
    SIGN,  # twice: signing is what most histories are made of
    st.tuples(st.just("launch"), PETITION, JOIN),
    st.tuples(st.just("confirm"), PICK),
    st.tuples(st.just("rename"), PICK, st.sampled_from(NAMES)),
    st.tuples(st.just("unsubscribe_one"), PICK),
    st.tuples(st.just("delete"), PICK),
    st.tuples(st.just("org_unsubscribe"), PERSON),
    st.tuples(st.just("add_category"), PETITION),
    DELIVER,  # the poller or a webhook hands a pooled version to csand
    DELIVER,
)
AN_EVENTS = st.one_of(
    st.tuples(st.just("unsubscribe"), PERSON),
    st.tuples(st.just("unsubscribe_mid_plan"), PERSON, st.integers(1, 3)),
    st.tuples(st.just("erase"), PERSON),
)


class HistoryMachine(RuleBasedStateMachine):
    # Set for the PostgreSQL runs: a fresh database per history.
    new_database: Callable[[], str] | None = None
    instances = 1

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        url = type(self).new_database() if type(self).new_database is not None else None
        self.world = self.loop.run_until_complete(
            World.create(Path(self.tmp.name), url, type(self).instances))
        self.failed = False

    def run(self, coro: Any) -> Any:
        try:
            return self.loop.run_until_complete(coro)
        except BaseException:
            self.failed = True
            raise

    # ---- AN before csand starts
    @initialize(statuses=st.tuples(*[st.sampled_from([None, None, "subscribed", "unsubscribed"])]
                                   * len(EMAILS)))
    def an_people(self, statuses: tuple[str | None, ...]) -> None:
        self.world.an_setup(statuses)

    @initialize(signs=st.lists(SIGN, min_size=1, max_size=4),
                events=st.lists(CS_EVENTS, max_size=4))
    def cs_first(self, signs: list[tuple[Any, ...]], events: list[tuple[Any, ...]]) -> None:
        """What happened on ControlShift before csand started (every example has some)."""
        self.run(self.world.cs_events([*signs, *events]))

    # ---- ControlShift (one rule, so that swarm testing never switches off signing alone)
    @rule(events=st.lists(CS_EVENTS, min_size=1, max_size=3))
    def cs(self, events: list[tuple[Any, ...]]) -> None:
        self.run(self.world.cs_events(events))

    @precondition(lambda self: bool(self.world.pool))
    @rule(picks=st.lists(st.tuples(PICK, st.booleans()), min_size=1, max_size=3))
    def deliver(self, picks: list[tuple[int, bool]]) -> None:
        """Deliver pooled versions (the pick, and whether it stays pooled to come again)."""
        for n, keep in picks:
            self.run(self.world.deliver(n, keep))

    # ---- the person, in AN
    @rule(event=AN_EVENTS)
    def an(self, event: tuple[Any, ...]) -> None:
        self.run(self.world.an_event(event))

    # ---- csand
    @rule()
    def lease(self) -> None:
        self.run(self.world.lease())

    @precondition(lambda self: bool(self.world.held))
    @rule(n=PICK, fault=FAULTS)
    def apply(self, n: int, fault: Fault | None) -> None:
        self.run(self.world.apply(n, fault))

    @precondition(lambda self: len(self.world.held) >= 2)
    @rule(n=PICK, m=PICK)
    def apply_together(self, n: int, m: int) -> None:
        self.run(self.world.apply_together(n, m))

    @rule()
    def work(self) -> None:
        self.run(self.world.work())

    @rule(seconds=st.sampled_from([5.0, 60.0, LEASE_SECONDS + 1, 1000.0]))
    def advance(self, seconds: float) -> None:
        self.world.advance(seconds)

    @rule()
    def restart(self) -> None:
        self.run(self.world.restart())

    @invariant()
    def consent(self) -> None:
        try:
            self.world.check_history()
        except BaseException:
            self.failed = True
            raise

    def teardown(self) -> None:
        try:
            if not self.failed:
                self.loop.run_until_complete(self.world.drain())
                self.world.check_history()
                self.loop.run_until_complete(self.world.check_end())
        finally:
            try:
                self.loop.run_until_complete(self.world.close())
            finally:
                self.loop.close()
                self.tmp.cleanup()


_RANDOM = os.environ.get("CSAND_MODEL_RANDOM") == "1"


_SHRINK = os.environ.get("CSAND_MODEL_SHRINK") == "1"


def _settings(examples: int, steps: int, shrink: bool) -> settings:
    # Shrinking a long history can take minutes (each replay runs csand for real), so the
    # default run reports the failing history as generated; CSAND_MODEL_SHRINK=1 shrinks it.
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=not _RANDOM,
        database=None,
        print_blob=False,
        phases=[*phases, Phase.shrink] if shrink or _SHRINK else phases,
        suppress_health_check=list(HealthCheck),
    )


class TestHistory(HistoryMachine.TestCase):
    settings = _settings(examples=int(os.environ.get("CSAND_MODEL_EXAMPLES", "300")), steps=50,
                         shrink=False)


class PostgresHistoryMachine(HistoryMachine):
    """The same histories with the PostgreSQL backend: the rules hold whichever store."""

    def __init__(self) -> None:
        assert type(self).new_database is not None, "no PostgreSQL database to run on"
        super().__init__()
        assert isinstance(self.world.target, str)


class _FreshDatabases:
    """Gives each history of a PostgreSQL machine a database of its own."""

    @pytest.fixture(autouse=True)
    def _databases(self, pg_new_database: Callable[[], str]) -> Iterator[None]:
        PostgresHistoryMachine.new_database = staticmethod(pg_new_database)  # type: ignore[assignment]
        yield
        PostgresHistoryMachine.new_database = None


class TestHistoryPostgres(_FreshDatabases, PostgresHistoryMachine.TestCase):
    settings = _settings(examples=int(os.environ.get("CSAND_MODEL_PG_EXAMPLES", "40")), steps=50,
                         shrink=False)


class ClusterHistoryMachine(PostgresHistoryMachine):
    """Two csand instances on one PostgreSQL database, each leasing, applying, dying and
    restarting on its own, interleaved with everything else."""

    instances = 2

    @rule()
    def lease_on_b(self) -> None:
        self.run(self.world.lease(1))

    @rule()
    def work_on_b(self) -> None:
        self.run(self.world.work(instance=1))

    @rule()
    def restart_b(self) -> None:
        self.run(self.world.restart(1))


class TestClusterHistory(_FreshDatabases, ClusterHistoryMachine.TestCase):
    settings = _settings(examples=int(os.environ.get("CSAND_MODEL_PG_EXAMPLES", "40")), steps=50,
                         shrink=False)


@pytest.mark.slow
class TestHistoryLong(HistoryMachine.TestCase):
    settings = _settings(examples=int(os.environ.get("CSAND_MODEL_SLOW_EXAMPLES", "1000")),
                         steps=80, shrink=True)
