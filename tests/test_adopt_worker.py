"""The worker adopts the hosted integration's AN petition instead of creating a second one
(csand.sync.adopter, inside PetitionMirror.ensure), against the Action Network simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from csand.adopt import decide
from csand.model import SIGNER_TAG
from csand.sync.adoption import ambiguous_key, identify_key
from tests.test_worker import ORG, Env, drain, make_env, sig

IDENT = f"controlshift-{ORG}:petition-1"
URL = "https://cs.example.org/petitions/petition-1"


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[Env]:  # type: ignore[no-untyped-def]
    async with make_env(tmp_path) as e:
        await e.known_tags(SIGNER_TAG)
        yield e


def hosted(env: Env, title: str = "Petition 1", url: str | None = URL) -> str:
    return env.sim.add_petition(title, description=f"<p>{url}</p>" if url else "A petition")


def posts(env: Env) -> int:
    return env.routes().get("POST /petitions", 0)


@pytest.mark.anyio
async def test_adopts_the_hosted_petition_instead_of_creating(env: Env) -> None:
    other = hosted(env, url="https://cs.example.org/petitions/another-one")  # not this one's
    mine = hosted(env)
    hosted(env, title="Petition 2")
    await env.store.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])

    await drain(env.dispatcher(workers=2), 2)

    assert posts(env) == 0
    assert env.routes()["PUT /petitions/{uuid}"] == 1
    petitions = {p["uuid"]: p for p in env.sim.petitions()}
    assert IDENT in petitions[mine]["identifiers"] and IDENT not in petitions[other]["identifiers"]
    assert await env.store.petition_uuid(1) == mine
    assert {s["petition_uuid"] for s in env.sim.signatures()} == {mine}
    assert [r["status"] for r in env.outbox()] == ["done", "done"]


@pytest.mark.anyio
async def test_ambiguous_goes_dead_creates_nothing_until_a_person_picks(env: Env) -> None:
    a, b = hosted(env, url=None), hosted(env, url=None)
    await env.store.enqueue([sig(1, "ann@example.org")])

    await drain(env.dispatcher(), 1)

    (dead,) = await env.store.dead_items()
    assert "ambiguous" in dead["last_error"] and "petition-1" in dead["last_error"]
    assert a in dead["last_error"] and b in dead["last_error"]
    assert "csand adopt --pick petition-1=" in dead["last_error"]
    assert posts(env) == 0 and env.routes().get("PUT /petitions/{uuid}", 0) == 0
    assert env.sim.signatures() == []
    status = await env.store.status()
    assert status["adoption_ambiguous"] == [
        {"slug": "petition-1", "title": "Petition 1", "candidates": sorted([a, b])}]

    assert await decide(env.store, [("petition-1", b)], []) == 1
    assert (await env.store.status())["adoption_ambiguous"] == []
    assert (await env.store.requeue_dead()).queued == 1
    await drain(env.dispatcher(), 1)

    assert posts(env) == 0
    assert await env.store.petition_uuid(1) == b
    assert IDENT in {p["uuid"]: p for p in env.sim.petitions()}[b]["identifiers"]
    assert {s["petition_uuid"] for s in env.sim.signatures()} == {b}


@pytest.mark.anyio
async def test_decision_to_create_makes_a_fresh_twin(env: Env) -> None:
    a, b = hosted(env, url=None), hosted(env, url=None)
    await env.store.enqueue([sig(1, "ann@example.org")])
    await drain(env.dispatcher(), 1)
    await decide(env.store, [], ["petition-1"])
    await env.store.requeue_dead()

    await drain(env.dispatcher(), 1)

    assert posts(env) == 1
    mine = await env.store.petition_uuid(1)
    assert mine not in (a, b, None)
    assert [IDENT in p["identifiers"] for p in env.sim.petitions()] == [False, False, True]
    assert [r["status"] for r in env.outbox()] == ["done"]


@pytest.mark.anyio
async def test_crash_after_the_identifier_put_is_found_by_identifier(env: Env) -> None:
    mine = hosted(env)
    # The PUT of an adoption reached AN, the process died before recording the uuid.
    await env.an.add_petition_identifier(mine, IDENT)
    env.sim.reset_stats()
    await env.store.enqueue([sig(1, "ann@example.org")])

    await drain(env.dispatcher(), 1)

    assert env.routes().get("PUT /petitions/{uuid}", 0) == 0 and posts(env) == 0
    assert await env.store.petition_uuid(1) == mine
    assert env.sim.stats()["duplicate_identifier_posts"] == 0


@pytest.mark.anyio
async def test_identifier_of_an_up_front_adoption_is_added_on_first_use_only(env: Env) -> None:
    mine = hosted(env)
    await env.store.set_meta(**{identify_key(mine): "1"})  # as csand adopt records it
    await env.store.set_petition_uuid(1, "petition-1", mine)
    await env.store.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])

    await drain(env.dispatcher(workers=2), 2)

    assert env.routes()["PUT /petitions/{uuid}"] == 1 and posts(env) == 0
    assert IDENT in env.sim.petitions()[0]["identifiers"]
    assert await env.store.get_meta(identify_key(mine)) is None
    assert {s["petition_uuid"] for s in env.sim.signatures()} == {mine}


@pytest.mark.anyio
async def test_up_front_adoption_deleted_since_is_mirrored_again(env: Env) -> None:
    gone = hosted(env)
    await env.store.set_meta(**{identify_key(gone): "1"})
    await env.store.set_petition_uuid(1, "petition-1", gone)
    env.sim.delete_petition(gone)
    await env.store.enqueue([sig(1, "ann@example.org")])

    await drain(env.dispatcher(), 1)

    assert posts(env) == 1
    (created,) = env.sim.petitions()
    assert await env.store.petition_uuid(1) == created["uuid"] != gone
    assert await env.store.get_meta(identify_key(gone)) is None


@pytest.mark.anyio
async def test_adopted_petition_deleted_by_an_admin_is_mirrored_again(env: Env) -> None:
    mine = hosted(env)
    await env.store.enqueue([sig(1, "ann@example.org")])
    await drain(env.dispatcher(), 1)
    assert await env.store.petition_uuid(1) == mine
    env.sim.delete_petition(mine)
    await env.store.enqueue([sig(2, "bob@example.org")])

    dispatcher = env.dispatcher()
    await drain(dispatcher, 1)

    (created,) = env.sim.petitions()
    assert created["uuid"] != mine and IDENT in created["identifiers"]
    assert await env.store.petition_uuid(1) == created["uuid"]
    assert [r["status"] for r in env.outbox()] == ["done", "done"]


@pytest.mark.anyio
async def test_ambiguity_resolved_in_an_clears_the_status_on_retry(env: Env) -> None:
    a, b = hosted(env, url=None), hosted(env, url=None)
    await env.store.enqueue([sig(1, "ann@example.org")])
    await drain(env.dispatcher(), 1)
    assert (await env.store.get_meta(ambiguous_key("petition-1")))
    env.sim.delete_petition(b)  # an AN admin removed the duplicate
    await env.store.requeue_dead()

    await drain(env.dispatcher(), 1)

    assert await env.store.petition_uuid(1) == a
    assert (await env.store.status())["adoption_ambiguous"] == []


@pytest.mark.anyio
async def test_a_picked_petition_that_does_not_exist_goes_dead_saying_so(env: Env) -> None:
    hosted(env, url=None)
    hosted(env, url=None)
    await decide(env.store, [("petition-1", "no-such-uuid")], [])
    await env.store.enqueue([sig(1, "ann@example.org")])

    await drain(env.dispatcher(), 1)

    (dead,) = await env.store.dead_items()
    assert "no-such-uuid" in dead["last_error"] and "pick again" in dead["last_error"]
    assert posts(env) == 0 and await env.store.petition_uuid(1) is None


@pytest.mark.anyio
async def test_worker_keeps_an_ambiguity_csand_adopt_found_with_a_same_title_rival(
        env: Env) -> None:
    only = hosted(env, url=None)
    # csand adopt saw CS petition 2 with the same title: the one AN petition could be either's.
    await env.store.set_meta(**{ambiguous_key("petition-1"): json.dumps({
        "cs_id": 1, "title": "Petition 1", "candidates": [only],
        "rivals": [{"cs_id": 2, "slug": "petition-2"}]})})
    await env.store.enqueue([sig(1, "ann@example.org")])

    await drain(env.dispatcher(), 1)

    (dead,) = await env.store.dead_items()
    assert "petition-2" in dead["last_error"] and only in dead["last_error"]
    assert posts(env) == 0 and env.sim.signatures() == []

    await env.mirrored(2)  # the rival got its own twin meanwhile: the candidate is this one's
    await env.store.requeue_dead()
    await drain(env.dispatcher(), 1)
    assert await env.store.petition_uuid(1) == only


@pytest.mark.anyio
async def test_a_twin_made_without_the_creator_synced_links_the_creator_already_in_an(
    env: Env,
) -> None:
    # The creator's activity was held back (before sync.history_start): only the signature runs.
    creator = env.sim.add_person("creator1@example.org", status="subscribed")
    await env.store.enqueue([sig(1, "ann@example.org")])
    await drain(env.dispatcher(), 1)
    (petition,) = env.sim.petitions()
    assert petition["creator_uuid"] == creator
    assert env.sim.person("creator1@example.org")["status"] == "subscribed"  # only read
