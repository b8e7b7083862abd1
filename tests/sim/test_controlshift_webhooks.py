"""Webhooks pushed by the ControlShift simulator, received over real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from csand.sim.controlshift import (
    WEBHOOK_MAX_RETRIES,
    WEBHOOK_SIGNATURE_HEADER,
    ControlShiftSim,
    webhook_signature,
)
from csand.sim.server import ServedApp

KEY = {"Authorization": "Bearer cs-test-key"}
T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
SECRET = "whsec-test-0123456789"

SIGNATURE_KEYS = {
    "id",
    "email",
    "first_name",
    "last_name",
    "postcode",
    "phone_number",
    "country",
    "join_organisation",
    "email_opt_in_type",
    "confirmed_at",
    "deleted_at",
    "unsubscribe_at",
    "created_at",
    "updated_at",
    "locale",
    "member",
    "petition",
}


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded


class Receiver:
    """A webhook receiver: records every POST and answers ``script`` statuses, then ``status``.

    While ``gate`` is set to an unset Event, requests wait (up to 5 s) until it is set.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.script: list[int] = []
        self.status = 200
        self.gate: threading.Event | None = None
        self.arrived = threading.Event()
        self.app = Starlette(routes=[Route("/{name}", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        self.arrived.set()
        gate = self.gate
        if gate is not None:
            await anyio.to_thread.run_sync(gate.wait, 5)
        with self.lock:
            status = self.script.pop(0) if self.script else self.status
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.calls.append(Call(request.url.path, headers, body, status))
        return JSONResponse({"ok": 200 <= status < 300}, status)

    def received(self, path: str | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if path is None or c.path == path]

    def events(self, path: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the accepted deliveries, in arrival order."""
        return [c.json for c in self.received(path) if 200 <= c.status < 300]


@pytest.fixture
def sim() -> Iterator[ControlShiftSim]:
    s = ControlShiftSim(now=lambda: T0, webhook_retry_delays=(0.01,))
    yield s
    s.close()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    r = Receiver()
    with ServedApp(r.app) as served:
        try:
            yield r, served.url
        finally:
            if r.gate is not None:
                r.gate.set()


def creator(**extra: Any) -> dict[str, Any]:
    return {"first_name": "Cleo", "last_name": "Ng", "email": "cleo@example.org", **extra}


def idle(sim: ControlShiftSim) -> None:
    assert sim.wait_webhooks_idle(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_body_and_signature_header(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    endpoint = sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    assert endpoint == {
        "id": endpoint["id"],
        "url": f"{url}/hook",
        "created_at": "2024-10-01T12:00:00.000000Z",
        "updated_at": "2024-10-01T12:00:00.000000Z",
        "disabled_at": None,
        "last_failure": None,
    }
    p = sim.add_petition(title="Clean Air", creator=creator())
    sim.add_signature(p["slug"], email="ann@example.org", join_organisation=True)
    idle(sim)

    calls = rec.received()
    assert [c.json["type"] for c in calls] == ["petition.launched", "signature.created"]
    jids = set()
    for call in calls:
        assert call.headers["content-type"] == "application/json"
        digest = hmac.new(SECRET.encode(), call.body, hashlib.sha256).hexdigest()
        header = call.headers[WEBHOOK_SIGNATURE_HEADER]
        assert header.startswith("sha256:")
        assert hmac.compare_digest(header, f"sha256:{digest}")
        assert header == webhook_signature(call.body, SECRET)
        assert header != webhook_signature(call.body, "another-secret")
        body = call.json
        assert set(body) == {"type", "data", "jid"}
        int(body["jid"], 16)  # hex
        jids.add(body["jid"])
    assert len(jids) == 2

    deliveries = sim.webhook_deliveries()
    assert [(d["type"], d["status"], d["error"], d["attempt"]) for d in deliveries] == [
        ("petition.launched", 200, None, 1),
        ("signature.created", 200, None, 1),
    ]
    assert all(d["endpoint_id"] == endpoint["id"] for d in deliveries)
    assert [d["jid"] for d in deliveries] == [c.json["jid"] for c in calls]
    assert deliveries[0]["at"] == "2024-10-01T12:00:00.000000Z"


def test_no_endpoint_no_delivery_and_no_thread() -> None:
    sim = ControlShiftSim(now=lambda: T0)
    p = sim.add_petition(title="Quiet", creator=creator())
    sim.add_signature(p["slug"], email="a@example.org")
    assert sim.wait_webhooks_idle(timeout=0.1)
    assert sim.webhook_deliveries() == []
    assert not any(t.name == "controlshift-webhooks" for t in threading.enumerate())
    assert isinstance(sim.emit("member.deleted", {"id": 1}), str)
    sim.close()


def test_petition_payloads(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    live = sim.add_petition(
        title="Clean Air",
        categories=["Environment"],
        creator=creator(postcode="2000", join_organisation=True, phone_number="0400"),
    )
    # The REST API still shows the creator without postcode and opt-in.
    assert live["creator"] == {
        "full_name": "Cleo Ng",
        "first_name": "Cleo",
        "last_name": "Ng",
        "email": "cleo@example.org",
        "phone_number": "0400",
    }
    assert sim.petition(live["slug"])["creator"] == live["creator"]
    draft = sim.add_petition(title="Draft", launched=False, creator=creator())
    sim.update_petition(live["slug"], title="Cleaner Air")
    sim.update_petition(draft["slug"], launched=True)
    sim.update_petition(draft["slug"], creator={"postcode": "3000", "join_organisation": False})
    idle(sim)

    events = rec.events()
    assert [(e["type"], e["data"]["slug"]) for e in events] == [
        ("petition.launched", "clean-air"),
        ("petition.updated", "clean-air"),
        ("petition.launched", "draft"),
        ("petition.updated", "draft"),
    ]
    first = events[0]["data"]
    assert set(first) == {"slug", "title", "url", "created_at", "updated_at", "creator"}
    assert first["title"] == "Clean Air"
    assert first["url"] == live["url"]
    assert first["created_at"] == live["created_at"]
    assert first["creator"] == {
        "id": sim.member_id("cleo@example.org"),
        "email": "cleo@example.org",
        "first_name": "Cleo",
        "last_name": "Ng",
        "postcode": "2000",
        "join_organisation": True,
        "email_opt_in_type": first["creator"]["email_opt_in_type"],
    }
    assert first["creator"]["email_opt_in_type"]["mailable"] is True
    assert events[1]["data"]["title"] == "Cleaner Air"
    assert events[1]["data"]["updated_at"] > events[1]["data"]["created_at"]
    assert events[2]["data"]["creator"]["postcode"] is None
    last_creator = events[3]["data"]["creator"]
    assert (last_creator["postcode"], last_creator["join_organisation"]) == ("3000", False)
    assert last_creator["email_opt_in_type"]["mailable"] is False
    assert set(sim.petition(draft["slug"])["creator"]) == {
        "full_name",
        "first_name",
        "last_name",
        "email",
        "phone_number",
    }


def test_signature_payloads(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    p = sim.add_petition(title="Clean Air", creator=creator())
    draft = sim.add_petition(title="Draft", launched=False, creator=creator())
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    created = sim.add_signature(p["slug"], email="ann@example.org", first_name="Ann")
    sim.add_signature(draft["slug"], email="bob@example.org")  # unlaunched: no event
    updated = sim.update_signature(created["id"], postcode="2000")
    confirmed = sim.confirm_signature(created["id"])
    deleted = sim.delete_signature(created["id"])
    sim.delete_signature(created["id"])  # already deleted: no event
    idle(sim)

    events = rec.events()
    assert [e["type"] for e in events] == [
        "signature.created",
        "signature.updated",
        "signature.confirmed",
        "signature.deleted",
    ]
    assert [e["data"] for e in events] == [created, updated, confirmed, deleted]
    assert set(created) == SIGNATURE_KEYS
    assert created["petition"] == {"slug": p["slug"], "url": p["url"]}
    assert created["member"] == {"id": sim.member_id("ann@example.org")}
    assert created["confirmed_at"] is None and created["join_organisation"] is None
    assert confirmed["confirmed_at"] == confirmed["updated_at"]
    assert confirmed["join_organisation"] is True
    assert confirmed["email_opt_in_type"]["mailable"] is True
    assert deleted["deleted_at"] is not None
    assert deleted == sim.signatures(p["slug"])[0]

    declined = sim.confirm_signature(created["id"], join_organisation=False)
    idle(sim)
    assert declined["join_organisation"] is False
    assert declined["email_opt_in_type"]["mailable"] is False
    assert rec.events()[-1] == {
        "type": "signature.confirmed",
        "data": declined,
        "jid": rec.events()[-1]["jid"],
    }


def test_emit_any_event(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    category = {"slug": "environment", "name": "Environment"}
    jid1 = sim.emit("category.updated", category)
    jid2 = sim.emit("member.deleted", {"id": 7, "email": "gone@example.org"}, jid="abc123")
    jid3 = sim.emit("something.new", {"when": T0})
    idle(sim)
    assert jid2 == "abc123"
    assert rec.events() == [
        {"type": "category.updated", "data": category, "jid": jid1},
        {"type": "member.deleted", "data": {"id": 7, "email": "gone@example.org"}, "jid": jid2},
        {"type": "something.new", "data": {"when": "2024-10-01T12:00:00.000000Z"}, "jid": jid3},
    ]


def test_unsubscribe_events(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    org = sim.add_unsubscribe(
        "ann@example.org", organisation=True, unsubscribable_type="Organisation"
    )
    one = sim.add_unsubscribe(
        "bob@example.org", organisation=False, unsubscribable_type="Signature"
    )
    bare = sim.add_unsubscribe("cy@example.org", organisation=False)
    idle(sim)

    assert org == {
        "id": org["id"],
        "email": "ann@example.org",
        "unsubscribe_organisation": True,
        "unsubscribable_type": "Organisation",
        "created_at": org["created_at"],
    }
    assert (one["unsubscribe_organisation"], one["unsubscribable_type"]) == (False, "Signature")
    assert (bare["unsubscribe_organisation"], bare["unsubscribable_type"]) == (False, None)
    assert len({org["id"], one["id"], bare["id"]}) == 3
    events = rec.events()
    assert [e["type"] for e in events] == ["unsubscribe.created"] * 3
    assert [e["data"] for e in events] == [org, one, bare]
    assert sim.unsubscribes() == [org, one, bare]


def test_retry_resends_identical_body(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    endpoint = sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    rec.script = [500, 503]
    jid = sim.emit("member.deleted", {"id": 1})
    idle(sim)

    calls = rec.received()
    assert [c.status for c in calls] == [500, 503, 200]
    assert len({c.body for c in calls}) == 1
    assert len({c.headers[WEBHOOK_SIGNATURE_HEADER] for c in calls}) == 1
    assert calls[0].json["jid"] == jid
    assert [(d["attempt"], d["status"], d["error"]) for d in sim.webhook_deliveries()] == [
        (1, 500, "HTTP 500"),
        (2, 503, "HTTP 503"),
        (3, 200, None),
    ]
    (listed,) = sim.webhook_endpoints()
    assert listed["id"] == endpoint["id"]
    assert listed["disabled_at"] is None
    assert listed["last_failure"] == "2024-10-01T12:00:00.000000Z HTTP 503"


def test_disabled_after_nine_failed_retries_then_reenabled(
    sim: ControlShiftSim, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.status = 500
    endpoint = sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    lost = sim.emit("member.deleted", {"id": 1})
    idle(sim)

    calls = rec.received()
    assert len(calls) == 1 + WEBHOOK_MAX_RETRIES == 10
    assert {c.json["jid"] for c in calls} == {lost}
    assert [d["attempt"] for d in sim.webhook_deliveries()] == list(range(1, 11))
    (listed,) = sim.webhook_endpoints()
    assert listed["disabled_at"] == "2024-10-01T12:00:00.000000Z"
    assert listed["last_failure"] == "2024-10-01T12:00:00.000000Z HTTP 500"

    # While disabled, events queue but nothing is sent.
    rec.status = 200
    queued = [sim.emit("category.created", {"slug": f"c{i}"}) for i in range(3)]
    assert sim.wait_webhooks_idle(timeout=1)
    time.sleep(0.05)
    assert len(rec.received()) == 10

    sim.enable_webhook_endpoint(endpoint["id"])
    idle(sim)
    (listed,) = sim.webhook_endpoints()
    assert listed["disabled_at"] is None
    assert listed["last_failure"] is not None  # kept as history
    # The queued events arrive in order; the event that used up its retries is not resent.
    assert [e["jid"] for e in rec.events()] == queued


def test_transport_errors_count_as_failures(sim: ControlShiftSim) -> None:
    endpoint = sim.add_webhook_endpoint(f"http://127.0.0.1:{free_port()}/hook", SECRET)
    sim.emit("member.deleted", {"id": 1})
    idle(sim)
    deliveries = sim.webhook_deliveries()
    assert len(deliveries) == 10
    assert all(d["status"] is None and d["error"] for d in deliveries)
    (listed,) = sim.webhook_endpoints()
    assert listed["id"] == endpoint["id"]
    assert listed["disabled_at"] is not None
    assert "Connect" in listed["last_failure"]


def test_webhook_endpoints_route(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    good = sim.add_webhook_endpoint(f"{url}/good", "s1")
    bad = sim.add_webhook_endpoint(f"{url}/bad", "s2")
    sim.emit("member.deleted", {"id": 1})
    with ServedApp(sim.app) as served, httpx.Client(base_url=served.url, timeout=5) as client:
        idle(sim)
        listed = client.get("/api/v1/webhook_endpoints", headers=KEY)
        assert listed.status_code == 200
        assert listed.json() == [good, bad]
        assert client.get("/api/v1/webhook_endpoints").status_code == 401

        sim.requests_per_minute = 1
        client.get("/api/v1/organisation", headers=KEY)
        assert client.get("/api/v1/webhook_endpoints", headers=KEY).status_code == 429
        sim.requests_per_minute = None

        rec.status = 500
        sim.emit("member.deleted", {"id": 2})
        idle(sim)
        body = client.get("/api/v1/webhook_endpoints", headers=KEY).json()
        assert [e["id"] for e in body] == [good["id"], bad["id"]]
        assert all(e["disabled_at"] == "2024-10-01T12:00:00.000000Z" for e in body)
        assert all(e["last_failure"].endswith("HTTP 500") for e in body)
        assert set(body[0]) == {
            "id",
            "url",
            "created_at",
            "updated_at",
            "disabled_at",
            "last_failure",
        }
        assert sim.stats()["by_route"]["GET /api/v1/webhook_endpoints"] == 4


def test_order_per_endpoint_and_independent_endpoints(
    sim: ControlShiftSim, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    sim.add_webhook_endpoint(f"{url}/a", "sa")
    sim.add_webhook_endpoint(f"http://127.0.0.1:{free_port()}/down", "sb")
    rec.script = [500, 200, 500, 500]
    p = sim.add_petition(title="Order", creator=creator())
    sigs = [sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(5)]
    sim.update_signature(sigs[0]["id"], postcode="2000")
    idle(sim)

    a_id = sim.webhook_endpoints()[0]["id"]
    deliveries = sim.webhook_deliveries()
    emitted = [d["jid"] for d in deliveries if d["endpoint_id"] == a_id and d["attempt"] == 1]
    got = rec.received("/a")
    # Every attempt is for the oldest undelivered event: the arrival order never goes back.
    positions = [emitted.index(c.json["jid"]) for c in got]
    assert positions == sorted(positions)
    events = rec.events("/a")
    assert [e["type"] for e in events] == ["petition.launched"] + ["signature.created"] * 5 + [
        "signature.updated"
    ]
    assert [e["data"]["id"] for e in events[1:6]] == [s["id"] for s in sigs]
    assert len(got) == 7 + 3
    # The unreachable endpoint was disabled without holding up the other one.
    down = sim.webhook_endpoints()[1]
    assert down["disabled_at"] is not None


def test_duplicate_knob(sim: ControlShiftSim, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    sim.webhook_duplicate_rate = 1.0
    jids = [sim.emit("member.deleted", {"id": i}) for i in range(3)]
    idle(sim)
    calls = rec.received()
    assert [c.json["jid"] for c in calls] == [j for j in jids for _ in range(2)]
    assert calls[0].body == calls[1].body
    assert calls[0].headers[WEBHOOK_SIGNATURE_HEADER] == calls[1].headers[WEBHOOK_SIGNATURE_HEADER]

    sim.webhook_duplicate_rate = 0.0
    again = sim.emit("member.deleted", {"id": 9})
    idle(sim)
    assert [c.json["jid"] for c in rec.received()[6:]] == [again]


def test_mutators_do_not_wait_for_http(
    sim: ControlShiftSim, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.gate = threading.Event()
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    p = sim.add_petition(title="Slow receiver", creator=creator())
    assert rec.arrived.wait(5)  # the first delivery is now in flight, held by the receiver

    started = time.monotonic()
    for i in range(20):
        sim.add_signature(p["slug"], email=f"s{i}@example.org")
    sim.stats()
    assert time.monotonic() - started < 0.5
    assert not sim.wait_webhooks_idle(timeout=0.05)

    rec.gate.set()
    idle(sim)
    assert len(rec.events()) == 21


def test_close_stops_the_sender(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    sim = ControlShiftSim(now=lambda: T0, webhook_retry_delays=(0.01,))
    sim.add_webhook_endpoint(f"{url}/hook", SECRET)
    sim.emit("member.deleted", {"id": 1})
    idle(sim)
    sim.close()
    sim.close()
    assert not any(t.name == "controlshift-webhooks" for t in threading.enumerate())
    sim.emit("member.deleted", {"id": 2})
    assert not sim.wait_webhooks_idle(timeout=0.05)  # queued, nobody sending
    sim.add_webhook_endpoint(f"{url}/other", SECRET)  # starts a new sender
    idle(sim)
    assert [c.json["data"]["id"] for c in rec.received("/hook")] == [1, 2]
    sim.close()


def test_default_retry_delays_follow_the_spec() -> None:
    sim = ControlShiftSim()
    assert sim.webhook_retry_delays[:3] == (15, 30, 90)
    assert len(sim.webhook_retry_delays) == WEBHOOK_MAX_RETRIES
    assert sim.webhook_duplicate_rate == 0.0
