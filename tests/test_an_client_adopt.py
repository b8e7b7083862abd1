"""The AN client's calls for adoption: petitions listed by a field (25 a page) and an identifier
added to a petition; against respx for the wire format, and the simulator for the behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.actionnetwork.errors import Verdict
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim
from tests.fakes import FakeClock
from tests.test_an_client import BASE, KEY, body_of, raw_query

SIM_BASE = "http://an.test/api/v2"


@pytest.fixture
async def an() -> AsyncIterator[ActionNetworkClient]:
    clock = FakeClock()
    async with httpx.AsyncClient() as http:
        yield ActionNetworkClient(http, BASE, KEY, TokenBucket(4.0, clock=clock, sleep=clock.sleep))


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def petition(uuid: str, title: str = "T", origin: str = "Controlshift Petition") -> dict[str, Any]:
    return {"identifiers": [f"action_network:{uuid}"], "title": title, "origin_system": origin}


def page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    links: dict[str, Any] = {"self": {"href": "x"}}
    if more:
        links["next"] = {"href": "y"}
    return {"_embedded": {"osdi:petitions": items}, "_links": links}


@pytest.mark.anyio
async def test_list_petitions_encodes_the_filter_and_pages_until_no_next(
        an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.get(url__startswith=f"{BASE}/petitions").mock(side_effect=[
        httpx.Response(200, json=page([petition("a"), petition("b")], more=True)),
        httpx.Response(200, json=page([petition("c")], more=False)),
    ])
    seen: list[int] = []
    found = await an.list_petitions("title", "Don't + stop", on_page=lambda i: seen.append(len(i)))
    assert [u for u, _ in found] == ["a", "b", "c"] and seen == [2, 1]
    assert raw_query(route) == "filter=title%20eq%20%27Don%27%27t%20%2B%20stop%27&page=2"


@pytest.mark.anyio
async def test_list_petitions_falls_back_to_paging_when_the_filter_is_refused(
        an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.get(url__startswith=f"{BASE}/petitions?filter").mock(
        return_value=httpx.Response(400, json={"error": "bad filter"}))
    mock.get(url__startswith=f"{BASE}/petitions?page").mock(side_effect=[
        httpx.Response(200, json=page([petition("a", origin="Other"), petition("b")], True)),
        httpx.Response(200, json=page([], True)),
    ])
    found = await an.list_petitions("origin_system", "Controlshift Petition")
    assert [u for u, _ in found] == ["b"]


@pytest.mark.anyio
async def test_list_petitions_refuses_a_petition_without_an_id(
        an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    mock.get(url__startswith=f"{BASE}/petitions").mock(
        return_value=httpx.Response(200, json=page([{"title": "T"}], False)))
    with pytest.raises(ANFailure) as failure:
        await an.list_petitions("title", "T")
    assert failure.value.outcome.verdict is Verdict.RETRY


@pytest.mark.anyio
async def test_add_identifier_puts_it_and_a_404_is_gone(
        an: ActionNetworkClient, mock: respx.MockRouter) -> None:
    route = mock.put(f"{BASE}/petitions/p1").mock(return_value=httpx.Response(200, json=petition("p1")))
    await an.add_petition_identifier("p1", "controlshift-org:petition-1")
    assert body_of(route) == {"identifiers": ["controlshift-org:petition-1"]}
    mock.put(f"{BASE}/petitions/p2").mock(return_value=httpx.Response(404, json={"error": "x"}))
    with pytest.raises(ANFailure) as failure:
        await an.add_petition_identifier("p2", "controlshift-org:petition-2")
    assert failure.value.outcome.verdict is Verdict.GONE


@pytest.fixture
async def sim_an() -> AsyncIterator[tuple[ActionNetworkSim, ActionNetworkClient]]:
    sim = ActionNetworkSim(requests_per_second=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
        yield sim, ActionNetworkClient(http, SIM_BASE, sim.api_key, TokenBucket(1e6))


@pytest.mark.anyio
async def test_simulator_filters_petitions_by_title_and_origin_system(
        sim_an: tuple[ActionNetworkSim, ActionNetworkClient]) -> None:
    sim, client = sim_an
    hosted = [sim.add_petition(f"Title {i % 2}", description="x") for i in range(30)]
    sim.add_petition("Title 0", origin_system="Action Network")
    by_origin = await client.list_petitions("origin_system", "Controlshift Petition")
    assert [u for u, _ in by_origin] == hosted  # two pages of 25
    assert sim.stats()["by_route"]["GET /petitions"] == 2
    titled = await client.list_petitions("title", "Title 0")
    assert len(titled) == 16
    assert await client.list_petitions("title", "title 0") == []  # AN's filter is exact


@pytest.mark.anyio
async def test_simulator_appends_identifiers_on_put_and_keeps_them_unique(
        sim_an: tuple[ActionNetworkSim, ActionNetworkClient]) -> None:
    sim, client = sim_an
    a, b = sim.add_petition("A"), sim.add_petition("B")
    await client.add_petition_identifier(a, "controlshift-org:petition-1")
    await client.add_petition_identifier(a, "controlshift-org:petition-1")  # repeating is harmless
    assert await client.find_petition("controlshift-org:petition-1") == a
    with pytest.raises(ANFailure) as failure:
        await client.add_petition_identifier(b, "controlshift-org:petition-1")
    assert failure.value.outcome.verdict is Verdict.DEAD
    assert sim.petitions()[0]["identifiers"] == [f"action_network:{a}",
                                                 "controlshift-org:petition-1"]
    sim.delete_petition(a)
    assert await client.find_petition("controlshift-org:petition-1") is None
    with pytest.raises(ANFailure) as failure:
        await client.add_petition_identifier(a, "controlshift-org:petition-1")
    assert failure.value.outcome.verdict is Verdict.GONE
