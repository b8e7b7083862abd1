"""Webhooks: signature checks, the HTTP receiver, and the processor's mapping of events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.controlshift import webhooks
from csand.controlshift.client import ControlShiftClient, PetitionDirectory
from csand.controlshift.poller import Poller
from csand.controlshift.webhooks import WebhookProcessor
from csand.model import ActivityKind
from csand.ratelimit import TokenBucket
from csand.sim.controlshift import ControlShiftSim
from csand.storage import open_store
from csand.web import build_app

SECRET = "whsec-test-0123456789"

# ---- signature verification ----


def test_verify_accepts_only_the_right_hmac() -> None:
    body = b'{"type":"signature.created","data":{}}'
    good = webhooks.sign(body, SECRET)
    assert good.startswith("sha256:")
    assert webhooks.verify(body, good, SECRET)
    assert webhooks.verify(body, good.upper().replace("SHA256", "sha256"), SECRET)
    assert not webhooks.verify(body, None, SECRET)
    assert not webhooks.verify(body, "", SECRET)
    assert not webhooks.verify(body, good.replace("sha256:", "sha1:"), SECRET)
    assert not webhooks.verify(body, webhooks.sign(body, "other-secret"), SECRET)
    assert not webhooks.verify(body + b" ", good, SECRET)  # any change to the raw body
    assert not webhooks.verify(body, "sha256:", SECRET)


def test_parse_dedupes_by_jid_or_body() -> None:
    a = webhooks.parse(b'{"type": "x.y", "data": {}, "jid": "abc"}')
    assert a.dedupe == "jid:abc" and a.type == "x.y"
    b = webhooks.parse(b'{"type": "x.y", "data": {"k": 1}}')
    assert b.dedupe.startswith("sha256:")
    for bad in (b"not json", b"[]", b'{"data": {}}', b'{"type": "a", "data": []}'):
        with pytest.raises(ValueError):
            webhooks.parse(bad)


# ---- the HTTP receiver ----


class Inbox:
    def __init__(self, fail: bool = False) -> None:
        self.events: dict[str, tuple[str, str]] = {}
        self.fail = fail
        self.woken = 0

    async def receive(self, dedupe: str, type_: str, body: str) -> bool:
        if self.fail:
            raise RuntimeError("disk full")
        new = dedupe not in self.events
        self.events.setdefault(dedupe, (type_, body))
        return new


async def _healthy() -> list[str]:
    return []


def _client(inbox: Inbox, secret: str | None = SECRET) -> httpx.AsyncClient:
    def wake() -> None:
        inbox.woken += 1

    app = build_app(receive=inbox.receive, secret=secret, health=_healthy, on_event=wake)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://csand")


def _post(client: httpx.AsyncClient, payload: Any, secret: str = SECRET, raw: bytes | None = None,
          signature: str | None = None) -> Any:
    body = raw if raw is not None else json.dumps(payload).encode()
    header = signature if signature is not None else webhooks.sign(body, secret)
    return client.post("/webhooks/controlshift", content=body,
                       headers={webhooks.SIGNATURE_HEADER: header,
                                "content-type": "application/json"})


EVENT = {"type": "signature.created", "data": {"id": 1}, "jid": "j1"}


@pytest.mark.anyio
async def test_signed_event_is_stored_then_acknowledged_once() -> None:
    inbox = Inbox()
    async with _client(inbox) as client:
        first = await _post(client, EVENT)
        again = await _post(client, EVENT)  # ControlShift retried it
    assert first.status_code == 200 and first.json()["status"] == "accepted"
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert list(inbox.events) == ["jid:j1"] and inbox.woken == 1


@pytest.mark.anyio
async def test_forged_or_unsigned_events_get_401_and_change_nothing() -> None:
    inbox = Inbox()
    async with _client(inbox) as client:
        forged = await _post(client, EVENT, secret="guessed")
        unsigned = await client.post("/webhooks/controlshift", json=EVENT)
        tampered = await _post(client, None, raw=json.dumps(EVENT).encode() + b" ",
                               signature=webhooks.sign(json.dumps(EVENT).encode(), SECRET))
    assert [forged.status_code, unsigned.status_code, tampered.status_code] == [401, 401, 401]
    assert inbox.events == {}


@pytest.mark.anyio
async def test_oversized_malformed_unknown_and_store_failure() -> None:
    inbox = Inbox()
    async with _client(inbox) as client:
        big = b'{"type": "signature.created", "data": {"x": "' + b"a" * (webhooks.MAX_BODY_BYTES + 10) + b'"}}'
        oversized = await _post(client, None, raw=big)
        malformed = await _post(client, None, raw=b"{not json")
        unknown = await _post(client, {"type": "member.deleted", "data": {"id": 3}})
    assert oversized.status_code == 413
    assert malformed.status_code == 400
    assert unknown.status_code == 200 and unknown.json()["status"] == "ignored"
    assert inbox.events == {}
    failing = Inbox(fail=True)
    async with _client(failing) as client:
        response = await _post(client, EVENT)
    assert response.status_code == 503  # not acknowledged: ControlShift will deliver again


@pytest.mark.anyio
async def test_webhooks_disabled_without_a_secret_and_metrics_served() -> None:
    async with _client(Inbox(), secret=None) as client:
        assert (await client.post("/webhooks/controlshift", json=EVENT)).status_code == 404
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        text = (await client.get("/metrics")).text
    assert "csand_outbox_items" in text and "csand_webhooks_total" in text


# ---- the processor: events → outbox, one truth with the poller ----


class Rig:
    def __init__(self, tmp: Path, *, global_unsubscribes: bool = True) -> None:
        self.cs = ControlShiftSim(api_key="k", page_size=5)
        self.tmp = tmp
        self.global_unsubscribes = global_unsubscribes
        self.pokes = 0

    async def __aenter__(self) -> Rig:
        self.store = await open_store(self.tmp / "csand.db")
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.cs.app),
                                      base_url="http://cs")
        client = ControlShiftClient(self.http, "http://cs", api_key="k",
                                    limiter=TokenBucket(10_000))
        self.poller = Poller(client, self.store)
        self.processor = WebhookProcessor(
            self.store, PetitionDirectory(client), self.poller.org_slug, self._poke,
            global_unsubscribes=self.global_unsubscribes,
        )
        return self

    def _poke(self) -> None:
        self.pokes += 1

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.store.close()

    async def deliver(self, type_: str, data: dict[str, Any], jid: str) -> None:
        body = json.dumps({"type": type_, "data": data, "jid": jid})
        await self.store.receive_event(f"jid:{jid}", type_, body)
        for event in await self.store.events_due():
            await self.processor.process(event)

    async def items(self) -> list[tuple[str, str, dict]]:
        rows = await self.store._read("SELECT kind, status, payload FROM outbox ORDER BY id")
        return [(r["kind"], r["status"], json.loads(r["payload"])) for r in rows]


def _petition(cs: ControlShiftSim, **creator: Any) -> dict[str, Any]:
    return cs.add_petition(title="Save the Bay", categories=["Climate"], creator={
        "first_name": "Cy", "last_name": "Creator", "email": "cy@example.org", **creator})


@pytest.mark.anyio
async def test_signature_by_webhook_then_poll_is_synced_once(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        petition = _petition(rig.cs)
        sig = rig.cs.add_signature(petition["slug"], email="ann@example.org", first_name="Ann",
                                   join_organisation=True)
        await rig.deliver("signature.created", sig, "a")
        items = await rig.items()
        # first sight of the petition: its creator goes first, then the signature
        assert [k for k, _, _ in items] == ["petition_created", "signature"]
        assert items[1][2]["opted_in"] is True and "controlshift:Climate" in items[1][2]["tags"]
        assert rig.pokes >= 1
        await rig.poller.cycle()
        await rig.deliver("signature.created", sig, "a-redelivered-with-new-jid")
        assert len(await rig.items()) == 2  # poll and redelivery added nothing


@pytest.mark.anyio
async def test_late_confirmation_is_a_new_version_and_older_versions_are_ignored(
        tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        petition = _petition(rig.cs)
        old = rig.cs.add_signature(petition["slug"], email="bo@example.org", join_organisation=None)
        await rig.deliver("signature.created", old, "1")
        new = rig.cs.update_signature(old["id"], join_organisation=True)
        await rig.deliver("signature.confirmed", new, "2")
        await rig.deliver("signature.created", old, "3")  # a stale copy arriving late
        sigs = [p for k, _, p in await rig.items() if k == "signature"]
        assert [s["opted_in"] for s in sigs] == [False, True]


@pytest.mark.anyio
async def test_deleted_signature_is_cancelled_before_sync(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        petition = _petition(rig.cs)
        sig = rig.cs.add_signature(petition["slug"], email="cat@example.org", join_organisation=True)
        await rig.deliver("signature.created", sig, "1")
        deleted = rig.cs.delete_signature(sig["id"])
        await rig.deliver("signature.deleted", deleted, "2")
        statuses = {p["source_key"]: s for k, s, p in await rig.items() if k == "signature"}
        assert statuses == {f"signature:{sig['id']}": "cancelled"}
        await rig.poller.cycle(full=True)
        assert len([1 for k, _, _ in await rig.items() if k == "signature"]) == 1


@pytest.mark.parametrize(("organisation", "setting", "expected"), [
    (True, True, 1), (True, False, 0), (False, True, 0), (False, False, 0)])
@pytest.mark.anyio
async def test_unsubscribe_rules(tmp_path: Path, organisation: bool, setting: bool,
                                 expected: int) -> None:
    async with Rig(tmp_path, global_unsubscribes=setting) as rig:
        await rig.deliver("unsubscribe.created", {
            "id": 9, "email": "Dee@Example.org ", "unsubscribe_organisation": organisation,
            "unsubscribable_type": "Organisation" if organisation else "Signature",
            "created_at": "2026-11-01T10:00:00Z"}, "u")
        items = await rig.items()
        assert len(items) == expected
        if expected:
            kind, _, payload = items[0]
            assert kind == ActivityKind.GLOBAL_UNSUBSCRIBE and payload["email"] == "dee@example.org"
        processed = await rig.store._read("SELECT processed_at FROM webhook_events")
        assert processed[0]["processed_at"] is not None


@pytest.mark.anyio
async def test_petition_webhook_creator_extras_make_one_creator_activity(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        petition = _petition(rig.cs)
        await rig.deliver("petition.launched", {
            "slug": petition["slug"], "title": petition["title"], "url": petition["url"],
            "created_at": petition["created_at"], "updated_at": petition["updated_at"],
            "creator": {"id": 1, "email": "cy@example.org", "first_name": "Cy",
                        "last_name": "Creator", "postcode": "2000", "join_organisation": True}},
            "p")
        await rig.poller.cycle()  # the poll builds the same creator activity: no second item
        creators = [p for k, _, p in await rig.items() if k == "petition_created"]
        assert len(creators) == 1
        assert creators[0]["opted_in"] is True and creators[0]["postcode"] == "2000"


@pytest.mark.anyio
async def test_malformed_event_data_is_recorded_not_retried(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.deliver("petition.launched", {"no": "slug"}, "m")
        row = (await rig.store._read("SELECT processed_at, error FROM webhook_events"))[0]
        assert row["processed_at"] is not None and "malformed" in row["error"]
        assert await rig.items() == []


async def _dead(rig: Rig) -> list[dict[str, Any]]:
    rows = await rig.store._read(
        "SELECT source_key, petition_id, kind, last_error, payload FROM outbox "
        "WHERE status = 'dead' ORDER BY id")
    return [dict(r) | {"payload": json.loads(r["payload"])} for r in rows]


@pytest.mark.anyio
async def test_signature_event_without_a_petition_is_a_dead_letter(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.deliver("signature.created", {"no": "id"}, "m")
        row = (await rig.store._read("SELECT processed_at, error FROM webhook_events"))[0]
        assert row["processed_at"] is not None and row["error"] is None
        (dead,) = await _dead(rig)
        assert dead["last_error"] == (
            "malformed ControlShift signature (no id): petition is missing")


@pytest.mark.parametrize(("changes", "reason"), [
    ({"email": 42}, "email is not a string (int)"),
    ({"first_name": {"given": "Ann"}}, "first_name is not a string (dict)"),
    ({"join_organisation": "yes"}, "join_organisation is not true, false or null (str)"),
    ({"created_at": 1}, "created_at is not a timestamp (int)"),
])
@pytest.mark.anyio
async def test_malformed_signature_by_webhook_is_a_dead_letter_as_in_a_poll(
        tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    async with Rig(tmp_path) as rig:
        petition = _petition(rig.cs)
        sig = rig.cs.add_signature(petition["slug"], email="ann@example.org")
        await rig.deliver("signature.created", {**sig, **changes}, "bad")
        row = (await rig.store._read("SELECT processed_at, error FROM webhook_events"))[0]
        assert row["processed_at"] is not None and row["error"] is None
        (dead,) = await _dead(rig)
        assert dead["last_error"] == f"malformed ControlShift signature {sig['id']}: {reason}"
        assert dead["petition_id"] == petition["id"] and dead["kind"] == "malformed"
        # The petition was new to csand: its creator is enqueued all the same.
        assert [(k, s) for k, s, _ in await rig.items()] == [
            ("petition_created", "pending"), ("malformed", "dead")]
        await rig.deliver("signature.created", {**sig, **changes}, "bad-again")
        assert len(await _dead(rig)) == 1  # the same record: still one dead letter
        await rig.deliver("signature.created", sig, "fixed")  # corrected: synced as usual
        assert [k for k, s, _ in await rig.items() if s == "pending"] == [
            "petition_created", "signature"]


@pytest.mark.anyio
async def test_malformed_unsubscribe_and_creator_by_webhook_are_dead_letters(
        tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.deliver("unsubscribe.created", {
            "id": 9, "email": ["dee@example.org"], "unsubscribe_organisation": True,
            "created_at": "2026-11-01T10:00:00Z"}, "u")
        petition = _petition(rig.cs)
        await rig.deliver("petition.launched", {
            "slug": petition["slug"], "title": petition["title"],
            "creator": {"email": "cy@example.org", "join_organisation": "yes"}}, "p")
        processed = await rig.store._read("SELECT processed_at, error FROM webhook_events")
        assert all(r["processed_at"] is not None and r["error"] is None for r in processed)
        assert [d["last_error"] for d in await _dead(rig)] == [
            "malformed ControlShift unsubscribe 9: email is not a string (list)",
            f"malformed ControlShift petition {petition['id']} creator: "
            "creator.join_organisation is not true, false or null (str)",
        ]


@pytest.mark.anyio
async def test_a_new_creator_does_not_inherit_the_old_creators_opt_in(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        petition = _petition(rig.cs)
        await rig.deliver("petition.launched", {
            "slug": petition["slug"], "title": petition["title"],
            "creator": {"email": "Cy@Example.org", "postcode": "2000",
                        "join_organisation": True}}, "p1")
        rig.cs.update_petition(petition["slug"], creator={
            "first_name": "New", "last_name": "Owner", "email": "new.owner@example.org"})
        await rig.poller.cycle()
        creators = {p["email"]: p for k, _, p in await rig.items() if k == "petition_created"}
        assert creators["cy@example.org"]["opted_in"] is True
        assert creators["new.owner@example.org"]["opted_in"] is False
        assert creators["new.owner@example.org"]["postcode"] is None


@pytest.mark.parametrize(("kind", "organisation", "expected"), [
    ("Attendee", True, 1), ("Attendee", False, 0)])
@pytest.mark.anyio
async def test_an_attendees_unsubscribe_follows_the_same_rules(
        tmp_path: Path, kind: str, organisation: bool, expected: int) -> None:
    """An org-wide unsubscribe of type Attendee is like any other; a single-event one changes
    nothing in AN (docs/rules.md §5)."""
    async with Rig(tmp_path) as rig:
        await rig.deliver("unsubscribe.created", {
            "id": 11, "email": "att@example.org", "unsubscribe_organisation": organisation,
            "unsubscribable_type": kind, "created_at": "2026-11-01T10:00:00Z"}, "u")
        assert [k for k, _, _ in await rig.items()] == [ActivityKind.GLOBAL_UNSUBSCRIBE] * expected
