"""The Action Network reads ``csand audit`` makes, against the simulator: the person's taggings
and signatures, a petition's signatures (25 a page), a petition by id, the petitions list; and
the simulator's damage methods that the audit tests rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.actionnetwork.errors import Verdict
from csand.model import Fields
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim, ApiError

AN_BASE = "http://an.test/api/v2"
AN_KEY = "an-test-key"


@pytest.fixture
def sim() -> ActionNetworkSim:
    return ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)


@pytest.fixture
async def an(sim: ActionNetworkSim) -> AsyncIterator[ActionNetworkClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
        yield ActionNetworkClient(http, AN_BASE, AN_KEY, TokenBucket(1e6))


@pytest.mark.anyio
async def test_reads_of_a_person_and_a_petition(sim: ActionNetworkSim,
                                                an: ActionNetworkClient) -> None:
    for name in ("signer", "controlshift:Climate"):
        await an.create_tag(name)
    petition = await an.create_petition(title="Save it", description="d", identifier="cs:p-1",
                                        origin_system="Controlshift Petition", creator_uuid=None)
    other = await an.create_petition(title="Other", description="d", identifier="cs:p-2",
                                      origin_system="Controlshift Petition", creator_uuid=None)
    people = []
    for i in range(27):  # more than a page of signatures
        uuid = await an.record_signature(petition, Fields(f"p{i}@example.org"), "subscribed",
                                         ("signer", "controlshift:Climate"))
        people.append(uuid)
    await an.record_signature(other, Fields("p0@example.org"), None, ("signer",))
    tags = await an.list_tags()

    sim.reset_stats()
    assert await an.person_tag_ids(people[0]) == {tags["signer"], tags["controlshift:Climate"]}
    assert await an.person_petition_ids(people[0]) == {petition, other}
    assert sim.stats()["requests"] == 2  # one page each: a short page is the last
    assert await an.petition_signer_ids(petition) == set(people)
    assert sim.stats()["by_route"]["GET /petitions/{uuid}/signatures"] == 2
    assert (await an.get_petition(petition) or {})["title"] == "Save it"
    assert await an.get_petition("00000000-0000-4000-8000-000000000000") is None
    assert {p["title"] for p in await an.all_petitions()} == {"Save it", "Other"}

    # The damage an admin may do, and what the reads then say.
    sim.remove_tagging("p0@example.org", "controlshift:Climate")
    sim.delete_signature("p0@example.org", other)
    assert await an.person_tag_ids(people[0]) == {tags["signer"]}
    assert await an.person_petition_ids(people[0]) == {petition}
    sim.set_status("p1@example.org", "unsubscribed")
    assert (await an.find_person("p1@example.org")).subscribed is False  # type: ignore[union-attr]
    sim.delete_petition(other)
    assert await an.get_petition(other) is None
    assert await an.find_petition("cs:p-2") is None
    copy = sim.add_petition("Save it", origin_system="Controlshift Petition")
    assert {p["title"] for p in await an.all_petitions()} == {"Save it"}
    assert copy in {p["identifiers"][0].split(":", 1)[1] for p in await an.all_petitions()}
    with pytest.raises(ApiError, match="identifier already in use"):
        sim.add_petition("Save it", origin_system="x", identifiers=["cs:p-1"])
    sim.delete_person("p2@example.org")
    with pytest.raises(ANFailure) as gone:
        await an.person_tag_ids(people[2])
    assert gone.value.outcome.verdict is Verdict.GONE


@pytest.mark.anyio
async def test_a_persons_attendances() -> None:
    sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None, events_api=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
        an = ActionNetworkClient(http, AN_BASE, AN_KEY, TokenBucket(1e6))
        event = await an.create_event(
            title="Meet", description=None, start_date=None, end_date=None, location=None,
            browser_url=None, identifier="cs:event-1", origin_system="x", creator_uuid=None,
            campaign_uuid=None)
        person, _ = await an.record_attendance(event, Fields("bo@example.org"), "subscribed", ())
        assert person is not None
        assert await an.person_event_ids(person) == {event}
        sim.delete_attendance("bo@example.org", event)
        assert await an.person_event_ids(person) == set()
