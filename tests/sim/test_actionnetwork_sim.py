"""The Action Network simulator behaves as docs/actionnetwork-api.md says AN does."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.server import ServedApp

KEY = "an-test-key"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Plug:
    """One loopback server for the whole module; each test plugs its own simulator in."""

    def __init__(self) -> None:
        self.sim: ActionNetworkSim | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.sim is not None
        await self.sim.app(scope, receive, send)


Serve = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Plug]]:
    plug = Plug()
    with ServedApp(plug) as served:
        yield served.url, plug


@pytest.fixture
def serve(server: tuple[str, Plug]) -> Serve:
    url, plug = server

    @contextmanager
    def serving(sim: ActionNetworkSim, timeout: float = 5.0) -> Iterator[httpx.Client]:
        plug.sim = sim
        headers = {"OSDI-API-Token": KEY}
        try:
            with httpx.Client(base_url=f"{url}/api/v2", headers=headers, timeout=timeout) as client:
                yield client
        finally:
            plug.sim = None

    return serving


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> ActionNetworkSim:
    return ActionNetworkSim(requests_per_second=None, clock=clock)


@pytest.fixture
def an(sim: ActionNetworkSim, serve: Serve) -> Iterator[httpx.Client]:
    with serve(sim) as client:
        yield client


def person(email: str, status: str | None = None, **fields: Any) -> dict[str, Any]:
    address: dict[str, Any] = {"address": email}
    if status is not None:
        address["status"] = status
    return {"email_addresses": [address], **fields}


def lookup(sim: ActionNetworkSim, email: str) -> dict[str, Any]:
    found = sim.person(email)
    assert found is not None, email
    return found


def signup(an: httpx.Client, email: str, status: str | None = None, **extra: Any) -> httpx.Response:
    return an.post("/people", json={"person": person(email, status), **extra})


def new_petition(an: httpx.Client, identifier: str = "controlshift-org:petition-1") -> str:
    response = an.post("/petitions", json={"title": "Save the park", "identifiers": [identifier]})
    assert response.status_code == 200
    return response.json()["identifiers"][0].removeprefix("action_network:")


def sign(an: httpx.Client, petition: str, body: dict[str, Any]) -> httpx.Response:
    return an.post(f"/petitions/{petition}/signatures", json=body)


# ------------------------------------------------------------------ entry point, auth


def test_entry_point_shows_osdi_tags_only_to_a_valid_key(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    good = an.get("/")
    assert good.status_code == 200
    assert good.json()["_links"]["osdi:tags"]["href"] == f"{an.base_url}tags"
    assert str(an.base_url).startswith("http://127.0.0.1:")

    for headers in ({"OSDI-API-Token": "wrong"}, {"OSDI-API-Token": ""}):
        bad = an.get("/", headers=headers)
        assert bad.status_code == 200
        assert "osdi:tags" not in bad.json()["_links"]
    anonymous = httpx.get(f"{an.base_url}")
    assert anonymous.status_code == 200 and "osdi:tags" not in anonymous.json()["_links"]
    assert sim.stats()["requests"] == 1


def test_a_bad_key_gets_403_and_keys_can_be_revoked(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    assert an.get("/tags").status_code == 200
    sim.api_key = "rotated"
    response = an.get("/tags")
    assert response.status_code == 403
    assert response.json() == {"error": "API Key invalid or not present"}
    assert an.get("/tags", headers={"OSDI-API-Token": "rotated"}).status_code == 200
    stats = sim.stats()
    assert (stats["forbidden"], stats["requests"]) == (1, 2)


def test_unknown_routes_and_methods_answer_json_errors(an: httpx.Client) -> None:
    missing = an.get("/events")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not found"})
    assert an.delete("/people").status_code == 405
    assert "error" in an.delete("/people").json()


# ------------------------------------------------------------------ Person Signup Helper


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(None, "subscribed"), ("unsubscribed", "unsubscribed"), ("subscribed", "subscribed")],
)
def test_signup_new_person_status(
    sim: ActionNetworkSim, an: httpx.Client, sent: str | None, expected: str
) -> None:
    response = signup(an, "ann@example.org", sent)
    assert response.status_code == 200
    assert response.json()["email_addresses"][0]["status"] == expected
    stored = lookup(sim, "ann@example.org")
    assert (stored["status"], stored["created_by"]) == (expected, "api")


@pytest.mark.parametrize("before", ["subscribed", "unsubscribed"])
def test_signup_without_status_leaves_an_existing_person_alone(
    sim: ActionNetworkSim, an: httpx.Client, before: str
) -> None:
    sim.add_person("ann@example.org", status=before)
    assert signup(an, "ann@example.org").json()["email_addresses"][0]["status"] == before
    assert lookup(sim, "ann@example.org")["status"] == before


@pytest.mark.parametrize(
    ("before", "sent"),
    [("unsubscribed", "subscribed"), ("subscribed", "unsubscribed"), ("subscribed", "subscribed")],
)
def test_signup_with_status_forces_it_on_an_existing_person(
    sim: ActionNetworkSim, an: httpx.Client, before: str, sent: str
) -> None:
    sim.add_person("ann@example.org", status=before)
    assert signup(an, "ann@example.org", sent).status_code == 200
    assert lookup(sim, "ann@example.org")["status"] == sent


@pytest.mark.parametrize("status", ["bouncing", "", "Subscribed"])
def test_signup_rejects_other_statuses(
    sim: ActionNetworkSim, an: httpx.Client, status: str
) -> None:
    response = signup(an, "ann@example.org", status)
    assert response.status_code == 400 and "error" in response.json()
    assert sim.people() == []


def test_signup_matches_email_case_insensitively_after_trimming(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    uuid = sim.add_person("Ann@Example.org")
    response = signup(an, "  ann@EXAMPLE.ORG ")
    assert response.json()["identifiers"] == [f"action_network:{uuid}"]
    assert len(sim.people()) == 1


def test_signup_fields_present_overwrite_and_absent_are_kept(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    uuid = sim.add_person(
        "ann@example.org", given_name="Ann", family_name="Lee", postal_code="2000"
    )
    body = person("ann@example.org", given_name="Anne")
    an.post("/people", json={"person": body})
    assert sim.person("ann@example.org") == {
        "uuid": uuid,
        "email": "ann@example.org",
        "status": "subscribed",
        "given_name": "Anne",
        "family_name": "Lee",
        "postal_code": "2000",
        "tags": set(),
        "created_by": "setup",
    }
    body = person("ann@example.org", family_name="Li", postal_addresses=[{"postal_code": "3000"}])
    response = an.post("/people", json={"person": body})
    stored = lookup(sim, "ann@example.org")
    assert (stored["given_name"], stored["family_name"], stored["postal_code"]) == (
        "Anne",
        "Li",
        "3000",
    )
    doc = response.json()
    assert doc["given_name"] == "Anne" and doc["family_name"] == "Li"
    assert doc["postal_addresses"][0]["postal_code"] == "3000"
    assert doc["_links"]["self"]["href"] == f"{an.base_url}people/{uuid}"


def test_signup_fields_sent_empty_or_null_blank_the_value(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    sim.add_person("ann@example.org", given_name="Ann", family_name="Lee", postal_code="2000")
    body = person("ann@example.org", given_name="", family_name=None)
    body["postal_addresses"] = [{"postal_code": None}]
    an.post("/people", json={"person": body})
    stored = lookup(sim, "ann@example.org")
    assert (stored["given_name"], stored["family_name"], stored["postal_code"]) == ("", None, None)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"person": {"given_name": "Ann"}},
        {"person": person("no-at-sign.example.org")},
        {"person": person("ann@example")},
        {"person": person("ann lee@example.org")},
        {"person": person("")},
    ],
)
def test_signup_needs_a_valid_email(
    sim: ActionNetworkSim, an: httpx.Client, body: dict[str, Any]
) -> None:
    response = an.post("/people", json=body)
    assert response.status_code == 400 and response.json()["error"]
    assert sim.people() == []


@pytest.mark.parametrize(
    "fields",
    [
        {"given_name": "x" * 256},
        {"family_name": "x" * 256},
        {"postal_addresses": [{"postal_code": "9" * 65}]},
    ],
)
def test_signup_rejects_overlong_fields(
    sim: ActionNetworkSim, an: httpx.Client, fields: dict[str, Any]
) -> None:
    response = an.post("/people", json={"person": person("ann@example.org", **fields)})
    assert response.status_code == 400 and "too long" in response.json()["error"]
    assert sim.people() == []


def test_signup_limits_are_inclusive_and_long_emails_are_refused(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    fields = {"given_name": "x" * 255, "postal_addresses": [{"postal_code": "9" * 64}]}
    assert an.post("/people", json={"person": person("a@example.org", **fields)}).status_code == 200
    long_email = "a" * 243 + "@example.org"  # 255 characters
    assert signup(an, long_email).status_code == 400
    assert signup(an, long_email[1:]).status_code == 200


def test_malformed_json_is_a_400(an: httpx.Client) -> None:
    response = an.post(
        "/people", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]
    assert an.post("/tags", json=["a list"]).status_code == 400


def test_signup_ignores_unknown_tags_and_tags_once(sim: ActionNetworkSim, an: httpx.Client) -> None:
    sim.add_tag("controlshift-petition-signer")
    add = ["CONTROLSHIFT-petition-signer", "never-created", "controlshift-petition-signer"]
    assert signup(an, "ann@example.org", add_tags=add).status_code == 200
    assert lookup(sim, "ann@example.org")["tags"] == {"controlshift-petition-signer"}
    assert sim.tag_names() == {"controlshift-petition-signer"}

    signup(an, "ann@example.org", remove_tags=["controlshift-petition-signer", "never-created"])
    assert lookup(sim, "ann@example.org")["tags"] == set()


# ------------------------------------------------------------------ Record Signature Helper


@pytest.mark.parametrize("sent", [None, "subscribed"])
def test_signature_subscribes_a_new_person(
    sim: ActionNetworkSim, an: httpx.Client, sent: str | None
) -> None:
    petition = new_petition(an)
    response = sign(an, petition, {"person": person("bob@example.org", sent, given_name="Bob")})
    assert response.status_code == 200
    stored = lookup(sim, "bob@example.org")
    assert (stored["status"], stored["given_name"], stored["created_by"]) == (
        "subscribed",
        "Bob",
        "api",
    )


@pytest.mark.parametrize("status", ["unsubscribed", "bouncing"])
def test_signature_accepts_no_status_but_subscribed(
    sim: ActionNetworkSim, an: httpx.Client, status: str
) -> None:
    petition = new_petition(an)
    sim.add_person("bob@example.org", status="unsubscribed")
    for email in ("bob@example.org", "new@example.org"):
        response = sign(an, petition, {"person": person(email, status)})
        assert response.status_code == 400 and response.json()["error"]
    assert sim.person("new@example.org") is None
    assert sim.signatures() == []


@pytest.mark.parametrize(
    ("before", "sent", "after"),
    [
        ("unsubscribed", None, "unsubscribed"),
        ("unsubscribed", "subscribed", "subscribed"),
        ("subscribed", None, "subscribed"),
    ],
)
def test_signature_changes_an_existing_persons_status_only_when_subscribed_is_sent(
    sim: ActionNetworkSim, an: httpx.Client, before: str, sent: str | None, after: str
) -> None:
    petition = new_petition(an)
    sim.add_person("bob@example.org", status=before)
    assert sign(an, petition, {"person": person("BOB@example.org", sent)}).status_code == 200
    assert lookup(sim, "bob@example.org")["status"] == after
    assert len(sim.people()) == 1


def test_signature_response_and_one_signature_per_person(
    sim: ActionNetworkSim, an: httpx.Client, clock: FakeClock
) -> None:
    petition = new_petition(an)
    sim.add_tag("controlshift-petition-signer")
    body = {
        "person": person("bob@example.org"),
        "add_tags": ["controlshift-petition-signer", "nope"],
    }
    first = sign(an, petition, {**body, "comments": "first"}).json()
    bob = sim.person("bob@example.org")
    assert bob is not None and bob["tags"] == {"controlshift-petition-signer"}
    assert first["action_network:person_id"] == bob["uuid"]
    assert first["action_network:petition_id"] == petition
    assert first["_links"]["osdi:person"]["href"] == f"{an.base_url}people/{bob['uuid']}"
    signature_uuid = first["identifiers"][0].removeprefix("action_network:")
    assert first["_links"]["self"]["href"] == (
        f"{an.base_url}petitions/{petition}/signatures/{signature_uuid}"
    )

    clock.now += 60
    again = sign(an, petition, {**body, "comments": "second"}).json()
    assert again["identifiers"] == first["identifiers"]
    [signature] = sim.signatures()
    assert signature["uuid"] == signature_uuid
    assert signature["modified"] == signature["created"] + 60
    assert signature["comments"] == "second"
    assert an.get(f"/petitions/{petition}").json()["total_signatures"] == 1


def test_signature_by_link_to_a_known_person_keeps_their_status(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    petition = new_petition(an)
    uuid = sim.add_person("bob@example.org", status="unsubscribed")
    link = {"_links": {"osdi:person": {"href": f"{an.base_url}people/{uuid}"}}}
    response = sign(an, petition, link)
    assert response.status_code == 200
    assert response.json()["action_network:person_id"] == uuid
    assert lookup(sim, "bob@example.org")["status"] == "unsubscribed"
    assert [(s["petition_uuid"], s["person_uuid"]) for s in sim.signatures()] == [(petition, uuid)]


def test_signature_errors(sim: ActionNetworkSim, an: httpx.Client) -> None:
    petition = new_petition(an)
    unknown_person = {"_links": {"osdi:person": {"href": f"{an.base_url}people/missing"}}}
    assert sign(an, petition, unknown_person).status_code == 404
    assert sign(an, "missing", {"person": person("bob@example.org")}).status_code == 404
    assert sign(an, petition, {"comments": "who?"}).status_code == 400
    assert sim.people() == [] and sim.signatures() == []


# ------------------------------------------------------------------ petitions


def test_petition_creation_and_lookup_by_identifier(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    creator = sim.add_person("cat@example.org")
    body = {
        "title": "Save the park",
        "description": "https://cs.example.org/petitions/save-the-park",
        "origin_system": "Controlshift Petition",
        "identifiers": ["controlshift-org:petition-7"],
        "_links": {"osdi:creator": {"href": f"{an.base_url}people/{creator}"}},
    }
    doc = an.post("/petitions", json=body).json()
    [stored] = sim.petitions()
    assert stored == {
        "uuid": stored["uuid"],
        "title": "Save the park",
        "description": "https://cs.example.org/petitions/save-the-park",
        "origin_system": "Controlshift Petition",
        "browser_url": None,
        "identifiers": [f"action_network:{stored['uuid']}", "controlshift-org:petition-7"],
        "creator_uuid": creator,
    }
    assert doc["_links"]["self"]["href"] == f"{an.base_url}petitions/{stored['uuid']}"
    assert doc["_links"]["osdi:creator"]["href"] == f"{an.base_url}people/{creator}"

    found = an.get("/petitions", params={"filter": "identifier eq 'controlshift-org:petition-7'"})
    assert [p["title"] for p in found.json()["_embedded"]["osdi:petitions"]] == ["Save the park"]
    none = an.get("/petitions", params={"filter": "identifier eq 'controlshift-org:petition-8'"})
    assert none.json()["_embedded"]["osdi:petitions"] == []
    assert an.get(f"/petitions/{stored['uuid']}").json()["title"] == "Save the park"
    assert an.get("/petitions/missing").status_code == 404


def test_petition_identifiers_are_never_reused(sim: ActionNetworkSim, an: httpx.Client) -> None:
    new_petition(an, "controlshift-org:petition-1")
    response = an.post(
        "/petitions",
        json={"title": "Again", "identifiers": ["other:1", "controlshift-org:petition-1"]},
    )
    assert (response.status_code, response.json()) == (400, {"error": "identifier already in use"})
    assert len(sim.petitions()) == 1
    assert sim.stats()["duplicate_identifier_posts"] == 1
    assert (
        an.post("/petitions", json={"title": "Other", "identifiers": ["other:1"]}).status_code
        == 200
    )


def test_petition_validation(sim: ActionNetworkSim, an: httpx.Client) -> None:
    assert an.post("/petitions", json={"description": "no title"}).status_code == 400
    assert (
        an.post("/petitions", json={"title": "x", "identifiers": ["no-colon"]}).status_code == 400
    )
    unknown_creator = {"osdi:creator": {"href": f"{an.base_url}people/missing"}}
    assert an.post("/petitions", json={"title": "x", "_links": unknown_creator}).status_code == 400
    assert an.get("/petitions", params={"filter": "description eq 'x'"}).status_code == 400
    assert an.get("/petitions", params={"filter": "title eq 'x'"}).status_code == 200
    assert sim.petitions() == []


def test_petition_lists_carry_totals_and_end(an: httpx.Client) -> None:
    for n in range(26):
        new_petition(an, f"controlshift-org:petition-{n}")
    first = an.get("/petitions").json()
    assert (first["total_records"], first["total_pages"]) == (26, 2)
    assert len(first["_embedded"]["osdi:petitions"]) == 25
    last = httpx.get(first["_links"]["next"]["href"], headers=an.headers).json()
    assert len(last["_embedded"]["osdi:petitions"]) == 1
    assert "next" not in last["_links"]


# ------------------------------------------------------------------ people lookups


def test_email_filter_needs_plus_encoded(sim: ActionNetworkSim, an: httpx.Client) -> None:
    uuid = sim.add_person("Ann+cs@Example.org")
    encoded = an.get("/people", params={"filter": "email_address eq 'ann+CS@example.org'"})
    assert "%2B" in str(encoded.request.url)
    [found] = encoded.json()["_embedded"]["osdi:people"]
    assert found["identifiers"] == [f"action_network:{uuid}"]
    raw = an.get("/people?filter=email_address eq 'ann+cs@example.org'")
    assert raw.status_code == 200 and raw.json()["_embedded"]["osdi:people"] == []


def test_email_filter_no_match_quotes_and_bad_filters(
    sim: ActionNetworkSim, an: httpx.Client
) -> None:
    sim.add_person("o'brien@example.org")
    nobody = an.get("/people", params={"filter": "email_address eq 'nobody@example.org'"})
    assert nobody.status_code == 200 and nobody.json()["_embedded"]["osdi:people"] == []
    quoted = an.get("/people", params={"filter": "email_address eq 'o''brien@example.org'"})
    assert len(quoted.json()["_embedded"]["osdi:people"]) == 1
    assert an.get("/people", params={"filter": "family_name eq 'x'"}).status_code == 400


def test_people_pages_always_have_a_next_link(sim: ActionNetworkSim, an: httpx.Client) -> None:
    for n in range(30):
        sim.add_person(f"p{n}@example.org")
    sizes = []
    url = f"{an.base_url}people"
    for _ in range(3):
        page = httpx.get(url, headers=an.headers).json()
        assert "total_pages" not in page and "total_records" not in page
        sizes.append(len(page["_embedded"]["osdi:people"]))
        url = page["_links"]["next"]["href"]
    assert sizes == [25, 5, 0]
    assert an.get("/people", params={"page": "zero"}).status_code == 400


def test_get_and_put_person(sim: ActionNetworkSim, an: httpx.Client) -> None:
    uuid = sim.add_person("ann@example.org", given_name="Ann")
    sim.add_person("bob@example.org")
    assert an.get(f"/people/{uuid}").json()["given_name"] == "Ann"
    assert an.get("/people/missing").status_code == 404
    assert an.put("/people/missing", json={"given_name": "x"}).status_code == 404

    unsubscribe = {"email_addresses": [{"address": "ann@example.org", "status": "unsubscribed"}]}
    assert an.put(f"/people/{uuid}", json=unsubscribe).json()["email_addresses"][0]["status"] == (
        "unsubscribed"
    )
    assert an.put(f"/people/{uuid}", json={"family_name": "Lee"}).status_code == 200
    stored = lookup(sim, "ann@example.org")
    assert (stored["status"], stored["given_name"], stored["family_name"]) == (
        "unsubscribed",
        "Ann",
        "Lee",
    )

    bouncing = {"email_addresses": [{"status": "bouncing"}]}
    assert an.put(f"/people/{uuid}", json=bouncing).status_code == 400
    taken = {"email_addresses": [{"address": "BOB@example.org"}]}
    assert an.put(f"/people/{uuid}", json=taken).status_code == 400
    moved = {"email_addresses": [{"address": "ann@new.example.org"}]}
    assert an.put(f"/people/{uuid}", json=moved).status_code == 200
    assert sim.person("ann@example.org") is None
    assert lookup(sim, "ann@new.example.org")["uuid"] == uuid


# ------------------------------------------------------------------ tags


def test_tag_list_pages_and_ignores_filters(sim: ActionNetworkSim, an: httpx.Client) -> None:
    for n in range(30):
        sim.add_tag(f"tag-{n}")
    first = an.get("/tags", params={"filter": "name eq 'tag-3'"}).json()
    tags = first["_embedded"]["osdi:tags"]
    assert len(tags) == 25 and tags[0]["name"] == "tag-0"
    assert tags[0]["_links"]["self"]["href"].startswith(f"{an.base_url}tags/")
    assert tags[0]["identifiers"][0].startswith("action_network:")
    second = httpx.get(first["_links"]["next"]["href"], headers=an.headers).json()
    assert len(second["_embedded"]["osdi:tags"]) == 5 and "next" not in second["_links"]


@pytest.mark.parametrize("repost_tag", ["existing", "error"])
def test_reposting_a_tag_name(repost_tag: str, serve: Serve) -> None:
    sim = ActionNetworkSim(requests_per_second=None, repost_tag=repost_tag)
    with serve(sim) as an:
        created = an.post("/tags", json={"name": "controlshift:Avoiding Taxes"})
        assert created.status_code == 200
        again = an.post("/tags", json={"name": "CONTROLSHIFT:avoiding taxes"})
        if repost_tag == "existing":
            assert again.status_code == 200
            assert again.json()["identifiers"] == created.json()["identifiers"]
            assert again.json()["name"] == "controlshift:Avoiding Taxes"
        else:
            assert again.status_code == 400 and again.json()["error"]
        assert sim.tag_names() == {"controlshift:Avoiding Taxes"}
        assert an.post("/tags", json={"name": " "}).status_code == 400


def test_taggings_are_idempotent(sim: ActionNetworkSim, an: httpx.Client) -> None:
    tag = sim.add_tag("controlshift-petition-creator")
    uuid = sim.add_person("cat@example.org")
    link = {"_links": {"osdi:person": {"href": f"{an.base_url}people/{uuid}"}}}
    first = an.post(f"/tags/{tag}/taggings", json=link)
    second = an.post(f"/tags/{tag}/taggings", json=link)
    assert first.status_code == second.status_code == 200
    assert first.json()["identifiers"] == second.json()["identifiers"]
    assert first.json()["_links"]["osdi:tag"]["href"] == f"{an.base_url}tags/{tag}"
    assert lookup(sim, "cat@example.org")["tags"] == {"controlshift-petition-creator"}
    assert an.post("/tags/missing/taggings", json=link).status_code == 404
    nobody = {"_links": {"osdi:person": {"href": f"{an.base_url}people/missing"}}}
    assert an.post(f"/tags/{tag}/taggings", json=nobody).status_code == 404


# ------------------------------------------------------------------ rate limit


@pytest.mark.parametrize("send_retry_after", [True, False])
def test_rate_limit_answers_429_then_recovers(
    clock: FakeClock, send_retry_after: bool, serve: Serve
) -> None:
    sim = ActionNetworkSim(
        requests_per_second=4, burst=2, send_retry_after=send_retry_after, clock=clock
    )
    with serve(sim) as an:
        assert [an.get("/tags").status_code for _ in range(2)] == [200, 200]
        limited = signup(an, "ann@example.org")
        assert limited.status_code == 429
        assert limited.json() == {"error": "You have exceeded your rate limit"}
        assert limited.headers.get("Retry-After") == ("1" if send_retry_after else None)
        assert sim.people() == []  # nothing was done
        clock.now += 0.25  # one token back at 4/s
        assert signup(an, "ann@example.org").status_code == 200
        assert signup(an, "ann@example.org").status_code == 429
    stats = sim.stats()
    assert (stats["requests"], stats["rate_limited"]) == (5, 2)
    assert stats["by_route"] == {"GET /tags": 2, "POST /people": 3}
    assert stats["request_times"] == [1000.0, 1000.0, 1000.25]


def test_rate_limit_is_checked_before_faults_and_skips_bad_keys(
    clock: FakeClock, serve: Serve
) -> None:
    sim = ActionNetworkSim(requests_per_second=1, clock=clock)
    sim.faults.error_rate = 1.0
    with serve(sim) as an:
        assert an.get("/tags", headers={"OSDI-API-Token": "wrong"}).status_code == 403
        assert an.get("/tags").status_code >= 500  # the one token goes here
        assert an.get("/tags").status_code == 429
    assert sim.stats()["faults"] == {"error": 1}


def test_no_rate_limit_when_disabled(sim: ActionNetworkSim, an: httpx.Client) -> None:
    assert {an.get("/tags").status_code for _ in range(10)} == {200}


# ------------------------------------------------------------------ faults


def test_empty_200_quirk_does_nothing(sim: ActionNetworkSim, an: httpx.Client) -> None:
    petition = new_petition(an)
    sim.faults.empty_200_rate = 1.0
    for response in (
        signup(an, "ann@example.org"),
        sign(an, petition, {"person": person("bob@example.org")}),
    ):
        assert (response.status_code, response.json()) == (200, {})
    assert sim.people() == [] and sim.signatures() == []
    assert an.get("/tags").json()["_embedded"]["osdi:tags"] == []  # other routes unaffected
    assert sim.stats()["faults"] == {"empty_200": 2}


def test_server_errors_do_nothing(sim: ActionNetworkSim, an: httpx.Client) -> None:
    sim.faults.error_rate = 1.0
    statuses = {signup(an, f"p{n}@example.org").status_code for n in range(12)}
    assert statuses <= {500, 502, 503} and len(statuses) > 1
    assert sim.people() == []
    assert sim.stats()["faults"] == {"error": 12}


def test_faults_are_reproducible_from_the_seed(serve: Serve) -> None:
    runs = []
    for _ in range(2):
        sim = ActionNetworkSim(requests_per_second=None, seed=7)
        sim.faults.error_rate = 0.5
        with serve(sim) as an:
            runs.append([an.get("/tags").status_code for _ in range(12)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_dropped_connection_is_a_transport_error(sim: ActionNetworkSim, an: httpx.Client) -> None:
    sim.faults.drop_rate = 1.0
    with pytest.raises(httpx.RemoteProtocolError):
        signup(an, "ann@example.org")
    assert sim.people() == []
    sim.faults.drop_rate = 0.0
    assert signup(an, "ann@example.org").status_code == 200
    assert sim.stats()["faults"] == {"drop": 1}


def test_fail_after_commit_writes_then_answers_500(sim: ActionNetworkSim, an: httpx.Client) -> None:
    sim.faults.fail_after_commit_rate = 1.0
    response = signup(an, "ann@example.org")
    assert response.status_code == 500 and response.json()["error"]
    assert sim.person("ann@example.org") is not None
    assert an.get("/people").status_code == 200  # reads have nothing to commit
    assert sim.stats()["faults"] == {"fail_after_commit": 1}


def test_slow_answers_and_writes_that_outlive_a_client_timeout(serve: Serve) -> None:
    sim = ActionNetworkSim(requests_per_second=None)
    sim.faults.slow_rate = 1.0
    sim.faults.slow_seconds = 0.3
    with serve(sim, timeout=0.1) as an:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            signup(an, "ann@example.org")
        while sim.person("ann@example.org") is None and time.monotonic() - started < 5:
            time.sleep(0.02)
        assert sim.person("ann@example.org") is not None
        assert time.monotonic() - started >= 0.3
    assert sim.stats()["faults"] == {"slow": 1}


def test_faults_spare_requests_with_a_bad_key(sim: ActionNetworkSim, an: httpx.Client) -> None:
    sim.faults.drop_rate = 1.0
    assert an.get("/tags", headers={"OSDI-API-Token": "wrong"}).status_code == 403
    assert an.get("/", headers={"OSDI-API-Token": "wrong"}).status_code == 200
    assert sim.stats()["faults"] == {}


# ------------------------------------------------------------------ test-side API


def test_stats_history_and_reset(sim: ActionNetworkSim, an: httpx.Client, clock: FakeClock) -> None:
    petition = new_petition(an)
    signup(an, "ann@example.org", "unsubscribed")
    clock.now += 1
    sign(an, petition, {"person": person("ann@example.org", "subscribed")})
    an.get("/nowhere")
    stats = sim.stats()
    assert stats["by_route"] == {
        "POST /petitions": 1,
        "POST /people": 1,
        "POST /petitions/{uuid}/signatures": 1,
        "GET /nowhere": 1,
    }
    assert stats["requests"] == 4 and len(stats["request_times"]) == 4
    history = sim.history("ANN@example.org")
    assert [(h["action"], h["status"], h["at"]) for h in history] == [
        ("POST /people", "unsubscribed", 1000.0),
        ("POST /petitions/{uuid}/signatures", "subscribed", 1001.0),
    ]
    assert history[1]["petition_uuid"] == petition
    assert sim.history("nobody@example.org") == []

    sim.reset_stats()
    assert sim.stats() == {
        "requests": 0,
        "by_route": {},
        "rate_limited": 0,
        "forbidden": 0,
        "faults": {},
        "duplicate_identifier_posts": 0,
        "request_times": [],
    }


def test_add_person_creates_tags_and_refuses_duplicates(sim: ActionNetworkSim) -> None:
    sim.add_tag("Existing")
    uuid = sim.add_person("ann@example.org", status="unsubscribed", tags=["existing", "new"])
    assert sim.tag_names() == {"Existing", "new"}
    assert sim.person("ann@example.org") == {
        "uuid": uuid,
        "email": "ann@example.org",
        "status": "unsubscribed",
        "given_name": None,
        "family_name": None,
        "postal_code": None,
        "tags": {"Existing", "new"},
        "created_by": "setup",
    }
    with pytest.raises(ValueError):
        sim.add_person("ANN@example.org")
    with pytest.raises(ValueError):
        sim.add_person("bob@example.org", status="bouncing")
