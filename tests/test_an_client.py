"""The Action Network client (csand.actionnetwork.client) against mocked HTTP (respx)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from csand.actionnetwork.client import ActionNetworkClient, ANFailure, PersonRecord
from csand.actionnetwork.errors import Verdict
from csand.model import Fields
from csand.ratelimit import TokenBucket
from tests.fakes import FakeClock

BASE = "https://an.test/api/v2"
KEY = "an-secret-key-123"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def an(clock: FakeClock) -> AsyncIterator[ActionNetworkClient]:
    limiter = TokenBucket(4.0, clock=clock, sleep=clock.sleep)
    async with httpx.AsyncClient() as http:
        yield ActionNetworkClient(http, BASE + "/", KEY, limiter)


@pytest.fixture
def mock() -> respx.MockRouter:
    with respx.mock(assert_all_called=False) as router:
        yield router


def person_doc(uuid: str, email: str, status: str = "subscribed") -> dict[str, Any]:
    return {
        "identifiers": [f"action_network:{uuid}", "other:1"],
        "email_addresses": [{"primary": True, "address": email, "status": status}],
        "_links": {"self": {"href": f"{BASE}/people/{uuid}"}},
    }


def people_page(*people: dict[str, Any]) -> dict[str, Any]:
    return {"_embedded": {"osdi:people": list(people)},
            "_links": {"next": {"href": f"{BASE}/people?page=2"}}}


def body_of(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


def raw_query(route: respx.Route) -> str:
    return route.calls.last.request.url.query.decode()


# ---------------------------------------------------------------- people


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("email", "encoded"),
    [
        ("ann+news@example.org", "email_address%20eq%20%27ann%2Bnews%40example.org%27"),
        ("o'brien@example.org", "email_address%20eq%20%27o%27%27brien%40example.org%27"),
    ],
)
async def test_find_person_encodes_the_filter(
    an: ActionNetworkClient, mock: respx.MockRouter, email: str, encoded: str
) -> None:
    route = mock.get(url__startswith=f"{BASE}/people").respond(
        200, json=people_page(person_doc("uuid-1", email, "unsubscribed"))
    )
    found = await an.find_person(email)
    assert found == PersonRecord("uuid-1", False)
    assert raw_query(route) == f"filter={encoded}"
    assert route.calls.last.request.url.path == "/api/v2/people"
    assert "+" not in raw_query(route) and "@" not in raw_query(route)


@pytest.mark.anyio
async def test_find_person_none_on_empty_list(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.get(url__startswith=f"{BASE}/people").respond(200, json=people_page())
    assert await an.find_person("nobody@example.org") is None


@pytest.mark.anyio
async def test_find_person_picks_the_matching_address(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.get(url__startswith=f"{BASE}/people").respond(200, json=people_page(
        person_doc("uuid-x", "other@example.org"), person_doc("uuid-2", "Ann@Example.org ")))
    assert await an.find_person("ann@example.org") == PersonRecord("uuid-2", True)


@pytest.mark.anyio
async def test_api_key_and_content_type_headers(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.get(url__startswith=f"{BASE}/people").respond(200, json=people_page())
    await an.find_person("ann@example.org")
    headers = route.calls.last.request.headers
    assert headers["OSDI-API-Token"] == KEY
    assert headers["Content-Type"] == "application/json"
    assert an.requests == 1


@pytest.mark.anyio
async def test_signup_payload_omits_status_and_empty_fields(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    route = mock.post(f"{BASE}/people").respond(200, json=person_doc("uuid-1", "ann@example.org"))
    fields = Fields(email="ann@example.org", given_name="Ann", family_name=None, postal_code="")
    record = await an.signup(fields, None, ("controlshift-petition-signer", "controlshift:Water"))
    assert record == PersonRecord("uuid-1", True)
    assert body_of(route) == {
        "person": {"email_addresses": [{"address": "ann@example.org"}], "given_name": "Ann"},
        "add_tags": ["controlshift-petition-signer", "controlshift:Water"],
    }


@pytest.mark.anyio
async def test_signup_payload_with_status_and_every_field(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    route = mock.post(f"{BASE}/people").respond(
        200, json=person_doc("uuid-1", "ann@example.org", "unsubscribed"))
    fields = Fields(email="ann@example.org", given_name="Ann", family_name="Lee", postal_code="2000")
    record = await an.signup(fields, "unsubscribed", ())
    assert record == PersonRecord("uuid-1", False)
    assert body_of(route) == {
        "person": {
            "email_addresses": [{"address": "ann@example.org", "status": "unsubscribed"}],
            "given_name": "Ann", "family_name": "Lee",
            "postal_addresses": [{"postal_code": "2000"}],
        },
        "add_tags": [],
    }


@pytest.mark.anyio
async def test_record_signature_payload_and_person_id(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.post(f"{BASE}/petitions/pet-1/signatures").respond(
        200, json={"identifiers": ["action_network:sig-1"], "action_network:person_id": "uuid-9"})
    uuid = await an.record_signature(
        "pet-1", Fields(email="ann@example.org", family_name="Lee"), "subscribed", ("t1",))
    assert uuid == "uuid-9"
    assert body_of(route) == {
        "person": {"email_addresses": [{"address": "ann@example.org", "status": "subscribed"}],
                   "family_name": "Lee"},
        "add_tags": ["t1"],
    }

    route.respond(200, json={"_links": {"osdi:person": {"href": f"{BASE}/people/uuid-7"}}})
    assert await an.record_signature("pet-1", Fields(email="ann@example.org"), None, ()) == "uuid-7"
    assert body_of(route)["person"] == {"email_addresses": [{"address": "ann@example.org"}]}


@pytest.mark.anyio
async def test_sign_as_and_set_status_payloads(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    sign = mock.post(f"{BASE}/petitions/pet-1/signatures").respond(
        200, json={"action_network:person_id": "uuid-1"})
    put = mock.put(f"{BASE}/people/uuid-1").respond(200, json=person_doc("uuid-1", "a@example.org"))
    await an.sign_as("pet-1", "uuid-1")
    assert body_of(sign) == {"_links": {"osdi:person": {"href": f"{BASE}/people/uuid-1"}}}
    await an.set_status("uuid-1", "a@example.org", "unsubscribed")
    assert body_of(put) == {"email_addresses": [{"address": "a@example.org", "status": "unsubscribed"}]}


# ---------------------------------------------------------------- petitions and tags


@pytest.mark.anyio
async def test_find_and_create_petition(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    identifier = "controlshift-org:petition-12"
    listing = mock.get(url__startswith=f"{BASE}/petitions").respond(200, json={"_embedded": {"osdi:petitions": [
        {"identifiers": ["action_network:pet-9", identifier]}]}})
    assert await an.find_petition(identifier) == "pet-9"
    assert raw_query(listing) == "filter=identifier%20eq%20%27controlshift-org%3Apetition-12%27"
    listing.respond(200, json={"_embedded": {"osdi:petitions": []}})
    assert await an.find_petition(identifier) is None

    create = mock.post(f"{BASE}/petitions").respond(200, json={"identifiers": ["action_network:pet-1"]})
    uuid = await an.create_petition(title="Save it", description="d", identifier=identifier,
                                    origin_system="Controlshift Petition", creator_uuid="uuid-c")
    assert uuid == "pet-1"
    assert body_of(create) == {
        "title": "Save it", "description": "d", "origin_system": "Controlshift Petition",
        "identifiers": [identifier],
        "_links": {"osdi:creator": {"href": f"{BASE}/people/uuid-c"}},
    }
    await an.create_petition(title="Save it", description="d", identifier=identifier,
                             origin_system="Controlshift Petition", creator_uuid=None)
    assert "_links" not in body_of(create)


@pytest.mark.anyio
async def test_list_tags_pages_until_an_empty_page(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    def page(n: int, names: list[str]) -> dict[str, Any]:
        return {
            "_embedded": {"osdi:tags": [
                {"name": name, "identifiers": [f"action_network:tag-{name}"]} for name in names]},
            "_links": {"next": {"href": f"{BASE}/tags?page={n + 1}"}},
        }

    pages = {"1": page(1, ["a", "b"]), "2": page(2, ["c"]), "3": page(3, [])}
    route = mock.get(url__startswith=f"{BASE}/tags").mock(
        side_effect=lambda request: httpx.Response(200, json=pages[request.url.params["page"]]))
    assert await an.list_tags() == {"a": "tag-a", "b": "tag-b", "c": "tag-c"}
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2", "3"]


@pytest.mark.anyio
async def test_create_tag(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.post(f"{BASE}/tags").respond(200, json={"identifiers": ["action_network:tag-1"], "name": "x"})
    assert await an.create_tag("controlshift:Avoiding Taxes") == "tag-1"
    assert body_of(route) == {"name": "controlshift:Avoiding Taxes"}


@pytest.mark.anyio
@pytest.mark.parametrize(("links", "expected"), [
    ({"self": {"href": BASE}, "osdi:tags": {"href": f"{BASE}/tags"}}, True),
    ({"self": {"href": BASE}, "docs": {"href": "https://actionnetwork.org/docs"}}, False),
])
async def test_check_key_looks_for_the_tags_link(
    an: ActionNetworkClient, mock: respx.MockRouter, links: dict[str, Any], expected: bool
) -> None:
    route = mock.get(f"{BASE}/").respond(200, json={"motd": "hi", "_links": links})
    assert await an.check_key() is expected
    assert route.calls.last.request.headers["OSDI-API-Token"] == KEY


# ---------------------------------------------------------------- failures


@pytest.mark.anyio
@pytest.mark.parametrize("content", [b"{}", b""])
async def test_helper_answering_200_empty_is_a_retry(
    an: ActionNetworkClient, mock: respx.MockRouter, content: bytes
) -> None:
    mock.post(f"{BASE}/people").respond(200, content=content, headers={"Content-Type": "application/hal+json"})
    mock.post(f"{BASE}/petitions/pet-1/signatures").respond(200, content=content)
    mock.post(f"{BASE}/petitions").respond(200, content=content)
    fields = Fields(email="ann@example.org")
    calls = [
        an.signup(fields, None, ()),
        an.record_signature("pet-1", fields, "subscribed", ()),
        an.sign_as("pet-1", "uuid-1"),
        an.create_petition(title="t", description="d", identifier="x:1", origin_system="o",
                           creator_uuid=None),
    ]
    for call in calls:
        with pytest.raises(ANFailure) as info:
            await call
        assert info.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_429_informs_the_limiter_and_retries(
    an: ActionNetworkClient, mock: respx.MockRouter, clock: FakeClock
) -> None:
    route = mock.post(f"{BASE}/people").mock(side_effect=[
        httpx.Response(429, json={"error": "You have exceeded your rate limit"}, headers={"Retry-After": "3"}),
        httpx.Response(429, json={"error": "You have exceeded your rate limit"}),
        httpx.Response(200, json=person_doc("uuid-1", "ann@example.org")),
    ])
    start = clock()
    record = await an.signup(Fields(email="ann@example.org"), None, ())
    assert record.uuid == "uuid-1"
    assert route.call_count == 3
    assert an.limiter.rate_limited_count == 2
    # Retry-After 3 honoured, then AN's exponential back-off (second strike: 2 s).
    assert clock() - start >= 3 + 2
    assert an.limiter.current_rate() < an.limiter.target_rate
    assert an.requests == 3


@pytest.mark.anyio
async def test_persistent_429_gives_up_as_rate_limited(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.get(url__startswith=f"{BASE}/people").respond(429, json={"error": "slow down"})
    with pytest.raises(ANFailure) as info:
        await an.find_person("ann@example.org")
    assert info.value.outcome.verdict is Verdict.RATE_LIMITED
    assert route.call_count == 5


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_bad_key_is_auth(an: ActionNetworkClient, mock: respx.MockRouter, status: int) -> None:
    mock.post(f"{BASE}/people").respond(status, json={"error": "API Key invalid or not present"})
    with pytest.raises(ANFailure) as info:
        await an.signup(Fields(email="ann@example.org"), None, ())
    assert info.value.outcome.verdict is Verdict.AUTH
    assert "API Key invalid" in info.value.outcome.reason


@pytest.mark.anyio
async def test_400_is_dead_with_an_error_text(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.post(f"{BASE}/people").respond(400, json={"error": "Email address is invalid"})
    with pytest.raises(ANFailure) as info:
        await an.signup(Fields(email="ann@example"), None, ())
    outcome = info.value.outcome
    assert outcome.verdict is Verdict.DEAD
    assert outcome.status == 400
    assert "Email address is invalid" in outcome.reason
    assert str(info.value) == outcome.reason


@pytest.mark.anyio
async def test_404_on_by_id_calls_is_gone(an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.put(f"{BASE}/people/uuid-gone").respond(404, json={"error": "Person not found"})
    mock.post(f"{BASE}/petitions/pet-gone/signatures").respond(404, json={"error": "Petition not found"})
    calls = [
        an.set_status("uuid-gone", "a@example.org", "unsubscribed"),
        an.sign_as("pet-gone", "uuid-1"),
        an.record_signature("pet-gone", Fields(email="a@example.org"), "subscribed", ()),
    ]
    for call in calls:
        with pytest.raises(ANFailure) as info:
            await call
        assert info.value.outcome.verdict is Verdict.GONE


@pytest.mark.anyio
@pytest.mark.parametrize("error", [
    httpx.ReadTimeout("timed out"), httpx.ConnectTimeout("timed out"),
    httpx.ConnectError("connection refused"), httpx.RemoteProtocolError("peer closed"),
])
async def test_transport_failures_are_retry(
    an: ActionNetworkClient, mock: respx.MockRouter, error: Exception
) -> None:
    mock.post(f"{BASE}/people").mock(side_effect=error)
    with pytest.raises(ANFailure) as info:
        await an.signup(Fields(email="ann@example.org"), None, ())
    assert info.value.outcome.verdict is Verdict.RETRY
    assert type(error).__name__ in info.value.outcome.reason


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_retry(an: ActionNetworkClient, mock: respx.MockRouter, status: int) -> None:
    mock.post(f"{BASE}/people").respond(status, text="<html><h1>Bad Gateway</h1></html>")
    with pytest.raises(ANFailure) as info:
        await an.signup(Fields(email="ann@example.org"), None, ())
    assert info.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_find_petition_pages_when_the_filter_is_refused(
    an: ActionNetworkClient, mock: respx.MockRouter
) -> None:
    identifier = "controlshift-org:petition-12"

    def respond(request: httpx.Request) -> httpx.Response:
        if "filter" in request.url.params:
            return httpx.Response(400, json={"error": "Unsupported filter"})
        page = request.url.params["page"]
        petitions = {
            "1": [{"identifiers": ["action_network:pet-1", "controlshift-org:petition-1"]}],
            "2": [{"identifiers": ["action_network:pet-12", identifier]}],
        }.get(page, [])
        return httpx.Response(200, json={"_embedded": {"osdi:petitions": petitions}})

    route = mock.get(url__startswith=f"{BASE}/petitions").mock(side_effect=respond)
    assert await an.find_petition(identifier) == "pet-12"
    assert route.call_count == 3
    assert await an.find_petition("controlshift-org:petition-99") is None


@pytest.mark.parametrize("body", [{}, None, {"_embedded": {"osdi:people": "oops"}}])
@pytest.mark.anyio
async def test_a_lookup_without_a_list_is_a_failure_not_absence(
        an: ActionNetworkClient, mock: respx.MockRouter, body: Any) -> None:
    """Reading AN's ``200 {}`` as "not in AN" would force unsubscribed on a subscribed person."""
    mock.get(f"{BASE}/people").mock(return_value=httpx.Response(
        200, content=b"" if body is None else json.dumps(body).encode()))
    with pytest.raises(ANFailure) as failure:
        await an.find_person("ann@example.org")
    assert failure.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_a_petition_lookup_without_a_list_is_a_failure(
        an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.get(f"{BASE}/petitions").mock(return_value=httpx.Response(200, json={}))
    with pytest.raises(ANFailure):
        await an.find_petition("controlshift-org:petition-1")


@pytest.mark.parametrize("body", [
    {"_links": {"self": {"href": f"{BASE}/people"}}},
    {"_embedded": {}, "_links": {}},
    {"_embedded": {"osdi:people": []}, "total_pages": 1},
])
@pytest.mark.anyio
async def test_a_real_list_answer_without_items_is_no_match(
        an: ActionNetworkClient, mock: respx.MockRouter, body: Any) -> None:
    mock.get(f"{BASE}/people").mock(return_value=httpx.Response(200, json=body))
    assert await an.find_person("ann@example.org") is None
