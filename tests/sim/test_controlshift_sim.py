"""The ControlShift simulator, over real HTTP."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from csand.sim.controlshift import ControlShiftSim
from csand.sim.server import ServedApp

KEY = {"Authorization": "Bearer cs-test-key"}
T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def creator(email: str = "Creator@Example.org") -> dict[str, Any]:
    return {"first_name": "Cleo", "last_name": "Ng", "email": email, "phone_number": None}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> ControlShiftSim:
    return ControlShiftSim(
        client_id="cid", client_secret="csecret", clock=clock, now=lambda: T0, page_size=3
    )


@pytest.fixture
def served(sim: ControlShiftSim) -> Iterator[ServedApp]:
    with ServedApp(sim.app) as s:
        yield s


@pytest.fixture
def client(served: ServedApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=KEY, timeout=5) as c:
        yield c


def walk(client: httpx.Client, path: str, key: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page: int | None = 1
    while page is not None:
        body = client.get(path, params={"page": page}).json()
        assert body["meta"]["current_page"] == page
        items += body[key]
        page = body["meta"]["next_page"]
    return items


def test_signature_pagination_in_both_orders(sim: ControlShiftSim, client: httpx.Client) -> None:
    p = sim.add_petition(title="Save the Library", creator=creator())
    made = [sim.add_signature(p["slug"], email=f"s{i}@example.org") for i in range(7)]
    path = f"/api/v1/petitions/{p['slug']}/signatures"

    first = client.get(path).json()
    assert first["petition"] == {"title": "Save the Library", "slug": "save-the-library"}
    assert first["meta"] == {
        "current_page": 1,
        "total_pages": 3,
        "previous_page": None,
        "next_page": 2,
    }
    assert [s["id"] for s in walk(client, path, "signatures")] == [s["id"] for s in made]
    last = client.get(path, params={"page": 3}).json()
    assert len(last["signatures"]) == 1
    assert last["meta"]["previous_page"] == 2 and last["meta"]["next_page"] is None

    sim.signature_order = "desc"
    assert [s["id"] for s in walk(client, path, "signatures")] == [s["id"] for s in made][::-1]

    beyond = client.get(path, params={"page": 9}).json()
    assert beyond["signatures"] == []
    assert beyond["meta"] == {
        "current_page": 9,
        "total_pages": 3,
        "previous_page": None,
        "next_page": None,
    }


def test_order_follows_created_at_not_insertion(sim: ControlShiftSim, client: httpx.Client) -> None:
    p = sim.add_petition(title="Backdated", creator=creator())
    late = sim.add_signature(p["slug"], email="late@example.org", created_at=T0)
    early = sim.add_signature(p["slug"], email="early@example.org", created_at=T0 - timedelta(1))
    tie = sim.add_signature(p["slug"], email="tie@example.org", created_at=T0)
    got = walk(client, f"/api/v1/petitions/{p['slug']}/signatures", "signatures")
    assert [s["id"] for s in got] == [early["id"], late["id"], tie["id"]]


def test_empty_lists_have_one_page(sim: ControlShiftSim, client: httpx.Client) -> None:
    body = client.get("/api/v1/petitions").json()
    assert body == {
        "petitions": [],
        "meta": {"current_page": 1, "total_pages": 1, "previous_page": None, "next_page": None},
    }
    p = sim.add_petition(title="Nobody signed", creator=creator())
    body = client.get(f"/api/v1/petitions/{p['slug']}/signatures").json()
    assert body["signatures"] == [] and body["meta"]["total_pages"] == 1


def test_petition_list_order_and_unlaunched(sim: ControlShiftSim, client: httpx.Client) -> None:
    slugs = [
        sim.add_petition(title=f"Petition {i}", launched=i != 2, creator=creator())["slug"]
        for i in range(5)
    ]
    got = walk(client, "/api/v1/petitions", "petitions")
    assert [p["slug"] for p in got] == slugs[::-1]  # newest first by default
    assert [p["launched"] for p in got].count(False) == 1
    sim.petition_order = "asc"
    assert [p["slug"] for p in walk(client, "/api/v1/petitions", "petitions")] == slugs


def test_petition_shape(sim: ControlShiftSim, client: httpx.Client) -> None:
    p = sim.add_petition(
        title="Stop Tax Dodging in Malmö!",
        categories=["Avoiding Taxes", "Climate"],
        creator=creator(),
    )
    assert p["slug"] == "stop-tax-dodging-in-malmo"
    assert sim.add_petition(title="Stop Tax Dodging in Malmö!", creator=creator())["slug"] == (
        "stop-tax-dodging-in-malmo-2"
    )
    got = client.get(f"/api/v1/petitions/{p['slug']}").json()["petition"]
    assert got == p
    assert got["url"] == "https://demo-org.example.org/petitions/stop-tax-dodging-in-malmo"
    assert got["categories"] == [
        {"slug": "avoiding-taxes", "name": "Avoiding Taxes"},
        {"slug": "climate", "name": "Climate"},
    ]
    assert got["creator"] == {
        "full_name": "Cleo Ng",
        "first_name": "Cleo",
        "last_name": "Ng",
        "email": "Creator@Example.org",
        "phone_number": None,
    }
    assert got["created_at"] == got["updated_at"] == "2024-10-01T12:00:00.000000Z"
    assert isinstance(got["id"], int) and got["public_signature_count"] == 0
    assert client.get("/api/v1/petitions/nope").status_code == 404


def test_signature_shape_and_members(sim: ControlShiftSim, client: httpx.Client) -> None:
    p = sim.add_petition(title="Clean Air", creator=creator("ann@example.org"))
    a = sim.add_signature(
        p["slug"], email="Ann@Example.org ", first_name="Ann", join_organisation=True
    )
    b = sim.add_signature(p["slug"], email="bob@example.org", join_organisation=None)
    assert set(a) >= {
        "id", "email", "first_name", "last_name", "postcode", "phone_number", "country",
        "join_organisation", "email_opt_in_type", "confirmed_at", "deleted_at",
        "unsubscribe_at", "created_at", "updated_at", "member", "petition",
    }  # fmt: skip
    assert a["email"] == "Ann@Example.org "
    assert a["member"]["id"] == sim.member_id("ann@example.org")  # same person as the creator
    assert b["member"]["id"] != a["member"]["id"]
    assert (
        a["email_opt_in_type"]["mailable"] is True and b["email_opt_in_type"]["mailable"] is False
    )
    assert a["updated_at"] == a["created_at"]
    assert a["created_at"] < b["created_at"]  # frozen `now`, still strictly increasing
    assert a["petition"] == {"slug": p["slug"], "url": p["url"]}

    lookup = client.get(
        f"/api/v1/petitions/{p['slug']}/signatures/lookup", params={"email": "ANN@example.org"}
    )
    assert lookup.json() == {"signature": a}
    missing = client.get(
        f"/api/v1/petitions/{p['slug']}/signatures/lookup", params={"email": "x@y.z"}
    )
    assert missing.status_code == 404
    member = client.get("/api/v1/members/lookup", params={"email": "ann+x@example.org"})
    assert member.status_code == 404
    member = client.get("/api/v1/members/lookup", params={"email": "ann@example.org"}).json()
    assert member["member"]["id"] == a["member"]["id"]
    assert set(member["member"]) == {"id", "email", "created_at", "updated_at", "external_id"}

    org = client.get("/api/v1/organisation").json()["organisation"]
    assert org["slug"] == "demo-org" and org["name"] == "Demo Organisation"
    assert (org["petitions_count"], org["signatures_count"], org["members_count"]) == (1, 2, 2)


def test_updates_and_deletions(sim: ControlShiftSim, client: httpx.Client) -> None:
    p = sim.add_petition(title="Buses", categories=["Public Transport"], creator=creator())
    s1 = sim.add_signature(p["slug"], email="a@example.org", join_organisation=None)
    s2 = sim.add_signature(p["slug"], email="b@example.org", join_organisation=True)
    after_signing = sim.petition(p["slug"])
    assert after_signing["updated_at"] == p["updated_at"]  # signing does not touch the petition
    assert after_signing["public_signature_count"] == 2

    confirmed = sim.update_signature(s1["id"], join_organisation=True)
    assert confirmed["join_organisation"] is True and confirmed["email_opt_in_type"]["mailable"]
    assert confirmed["updated_at"] > confirmed["created_at"] == s1["created_at"]
    unsub = sim.update_signature(s2["id"], unsubscribe_at=T0)
    assert unsub["unsubscribe_at"] == "2024-10-01T12:00:00.000000Z"

    deleted = sim.delete_signature(s2["id"])
    assert deleted["deleted_at"] is not None and deleted["updated_at"] == deleted["deleted_at"]
    assert deleted["updated_at"] > unsub["updated_at"]
    path = f"/api/v1/petitions/{p['slug']}/signatures"
    listed = walk(client, path, "signatures")
    assert [s["deleted_at"] is not None for s in listed] == [False, True]
    assert (
        client.get(f"/api/v1/petitions/{p['slug']}").json()["petition"]["public_signature_count"]
        == 1
    )

    sim.deleted_visible = False
    assert [s["id"] for s in walk(client, path, "signatures")] == [s1["id"]]
    lookup = client.get(f"{path}/lookup", params={"email": "b@example.org"})
    assert lookup.status_code == 404

    edited = sim.update_petition(p["slug"], title="Free Buses", categories=["Climate"])
    assert edited["updated_at"] > p["updated_at"]
    assert edited["categories"] == [{"slug": "climate", "name": "Climate"}]
    assert client.get(path).json()["petition"]["title"] == "Free Buses"


def test_api_key_auth(sim: ControlShiftSim, served: ServedApp) -> None:
    with httpx.Client(base_url=served.url) as anon:
        r = anon.get("/api/v1/petitions")
        assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
        r = anon.get("/api/v1/petitions", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert anon.get("/api/v1/petitions", headers=KEY).status_code == 200
    assert sim.stats()["unauthorized"] == 2


def test_oauth_token_flow_and_expiry(
    sim: ControlShiftSim, served: ServedApp, clock: FakeClock
) -> None:
    sim.api_key = None
    with httpx.Client(base_url=served.url) as c:
        form = {"grant_type": "client_credentials", "client_id": "cid", "client_secret": "csecret"}
        r = c.post("/oauth/token", data=form)
        assert r.status_code == 200
        token = r.json()
        assert token["token_type"] == "bearer" and token["expires_in"] == 7200
        assert token["created_at"] == int(T0.timestamp())
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        assert c.get("/api/v1/organisation", headers=auth).status_code == 200

        # JSON bodies and HTTP Basic client credentials work too.
        assert c.post("/oauth/token", json=form).status_code == 200
        basic = c.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=("cid", "csecret")
        )
        assert basic.status_code == 200

        bad = c.post("/oauth/token", data={**form, "client_secret": "nope"})
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
        grant = c.post("/oauth/token", data={**form, "grant_type": "password"})
        assert grant.status_code == 400 and grant.json()["error"] == "unsupported_grant_type"

        clock.t += 7199
        assert c.get("/api/v1/organisation", headers=auth).status_code == 200
        clock.t += 1
        assert c.get("/api/v1/organisation", headers=auth).status_code == 401
        assert c.get("/api/v1/organisation", headers=KEY).status_code == 401  # key disabled


def test_token_endpoint_limit(sim: ControlShiftSim, served: ServedApp, clock: FakeClock) -> None:
    clock.t = 600.0  # start of a window
    form = {"grant_type": "client_credentials", "client_id": "cid", "client_secret": "csecret"}
    with httpx.Client(base_url=served.url) as c:
        codes = [c.post("/oauth/token", data=form).status_code for _ in range(11)]
        assert codes == [200] * 10 + [429]
        clock.t += 45
        r = c.post("/oauth/token", data=form)
        assert r.status_code == 429 and r.headers["RateLimit-Reset"] == "15"
        clock.t += 15
        assert c.post("/oauth/token", data=form).status_code == 200
    stats = sim.stats()
    assert stats["token_requests"] == 13 and stats["rate_limited"] == 2


def test_api_rate_limit(sim: ControlShiftSim, client: httpx.Client, clock: FakeClock) -> None:
    sim.requests_per_minute = 5
    clock.t = 630.0  # 30 s into a window
    ok = client.get("/api/v1/petitions")
    assert ok.headers["RateLimit-Limit"] == "5"
    assert ok.headers["RateLimit-Remaining"] == "4"
    assert ok.headers["RateLimit-Reset"] == "30"
    for _ in range(4):
        assert client.get("/api/v1/petitions").status_code == 200
    clock.t = 650.5
    limited = client.get("/api/v1/petitions")
    assert limited.status_code == 429
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert limited.headers["RateLimit-Reset"] == "10"
    assert "error" in limited.json()
    # Unauthenticated requests count against the same window.
    anon = client.get("/api/v1/petitions", headers={"Authorization": "Bearer nope"})
    assert anon.status_code == 429
    clock.t = 660.0
    assert client.get("/api/v1/petitions").status_code == 200
    stats = sim.stats()
    assert stats["rate_limited"] == 2
    assert stats["by_route"]["GET /api/v1/petitions"] == 8


def test_faults(sim: ControlShiftSim, client: httpx.Client) -> None:
    sim.faults.drop_next = 1
    with pytest.raises(httpx.TransportError):
        client.get("/api/v1/organisation")
    assert client.get("/api/v1/organisation").status_code == 200  # the client recovers

    sim.faults.error_rate = 1.0
    statuses = {client.get("/api/v1/organisation").status_code for _ in range(8)}
    assert statuses <= {500, 502, 503} and len(statuses) > 1
    sim.faults.reset()

    sim.faults.drop_rate = 0.5
    outcomes = []
    for _ in range(40):
        try:
            outcomes.append(client.get("/api/v1/organisation").status_code)
        except httpx.TransportError:
            outcomes.append(0)
    assert 5 < outcomes.count(0) < 35 and set(outcomes) == {0, 200}
    sim.faults.reset()

    sim.faults.slow_rate, sim.faults.slow_seconds = 1.0, 0.2
    with pytest.raises(httpx.ReadTimeout):
        client.get("/api/v1/organisation", timeout=0.05)
    sim.faults.paths = ("/oauth/",)  # faults now only hit the token endpoint
    assert client.get("/api/v1/organisation", timeout=0.05).status_code == 200
    sim.faults.reset()

    faults = sim.stats()["faults"]
    assert faults["drop"] == 1 + outcomes.count(0) and faults["error"] == 8 and faults["slow"] == 1


def test_fault_draws_are_deterministic_from_seed() -> None:
    def run(seed: int) -> list[object]:
        faults = ControlShiftSim(seed=seed).faults
        faults.error_rate = faults.drop_rate = faults.slow_rate = 0.3
        return [faults.draw("/api/v1/petitions") for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    kinds = Counter(fault for _, fault, _ in run(7))
    assert kinds["drop"] > 5 and kinds["error"] > 5 and kinds[None] > 5
