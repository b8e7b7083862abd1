"""Minimal histories the model-based test (test_history.py) found, replayed as plain tests.

Each test replays the shrunk sequence of steps hypothesis printed, then runs the same checks
(AN's history after the steps, and again after draining). Each failed before the fix it is
named after (see the git history); every one passes now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.model.test_history import Fault, World

ANN = "ann@example.org"
BO = "bo@example.org"
CY = "cy@example.org"

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def world_in(tmp_path: Path) -> AsyncIterator[World]:
    world = await World.create(tmp_path)
    try:
        yield world
    finally:
        await world.close()


async def finish(world: World) -> None:
    """The checks the state machine runs after every step and at its end."""
    world.check_history()
    await world.drain()
    world.check_history()
    await world.check_end()


async def test_a_retried_creator_item_does_not_send_its_opt_in_again(tmp_path: Path) -> None:
    """Ann launched petition 1 and opted in. csand subscribed her (AN acknowledged), she then
    unsubscribed in AN, and the next request of the same item (the petition lookup) failed.
    The retry must carry on from there, not subscribe her a second time."""
    async with world_in(tmp_path) as world:
        world.launch(1, creator_join=True)
        world.an_unsubscribe_after(ANN, 3)  # tags list, tag created, signup: then she leaves
        await world.deliver(0)
        await world.lease()
        await world.apply(0, Fault("error", at=3))  # 5xx on the petition lookup
        await finish(world)


async def test_a_late_older_org_wide_unsubscribe_does_not_undo_a_newer_opt_in(
        tmp_path: Path) -> None:
    """Ann unsubscribed org-wide (00:01), then launched petition 1 and opted in (00:02). The
    creator item is synced first; the older unsubscribe, delivered later, must not unsubscribe
    her."""
    async with world_in(tmp_path) as world:
        world.org_unsubscribe(ANN)
        world.launch(1, creator_join=True)
        await world.deliver(1)  # the creator; the unsubscribe stays in the pool
        await world.lease()
        await finish(world)  # the creator is applied, then the unsubscribe is delivered


async def test_a_known_newer_org_wide_unsubscribe_stops_an_older_opt_in(tmp_path: Path) -> None:
    """Ann launched petition 1 and opted in (00:01), then unsubscribed org-wide (00:02); csand
    receives both before its workers run. It applies the opt-in first (per-person order by CS
    time), so AN shows her subscribed until the unsubscribe item runs: she must never be
    subscribed on an opt-in older than an unsubscribe csand already holds."""
    async with world_in(tmp_path) as world:
        world.launch(1, creator_join=True)
        world.org_unsubscribe(ANN)
        await finish(world)


async def test_a_signature_deleted_while_in_flight_is_not_synced_on_retry(tmp_path: Path) -> None:
    """Bo signs petition 1 and opts in; csand leases the item; the signature is deleted on CS
    ("This wasn't me") and csand records the deletion; then the attempt fails (5xx). The retry
    must not write Bo to AN, let alone subscribe him."""
    async with world_in(tmp_path) as world:
        await world.cs_events([("sign", BO, 1, True)])  # pool: petition 1's creator, Bo's signature
        await world.deliver(1)
        await world.lease()
        await world.cs_events([("delete", 0)])
        await world.deliver(1)  # the deleted version
        await world.apply(0, Fault("error", at=0))
        await finish(world)


async def test_an_edit_after_an_org_wide_unsubscribe_does_not_revive_the_opt_in(
        tmp_path: Path) -> None:
    """Cy signs petition 1 and opts in (00:02), unsubscribes org-wide (00:03), then edits her
    name (00:04). csand applies the unsubscribe, then sees only the edited version: its opt-in
    still dates from 00:02, before the unsubscribe, so it must not subscribe her."""
    async with world_in(tmp_path) as world:
        await world.cs_events([("sign", CY, 1, True), ("org_unsubscribe", CY),
                               ("rename", 0, "Cyd")])
        # pool: creator of petition 1, Cy's signature, the unsubscribe, the edited signature
        await world.deliver(2)
        await world.work()
        await world.deliver(2)  # the edited version
        await world.work()
        await finish(world)


async def test_a_late_older_opt_in_does_not_resubscribe_after_an_unsubscribe_in_an(
        tmp_path: Path) -> None:
    """Ann opts in on petition 1 (00:02) and on petition 2 (00:04). csand syncs the newer one
    first (AN acknowledges "subscribed"); Ann then unsubscribes in AN; the older signature
    arrives late (a backfill). An opt-in counts once, at its time: one older than an opt-in
    AN already applied must not subscribe her again."""
    async with world_in(tmp_path) as world:
        await world.cs_events([("sign", ANN, 1, True), ("sign", ANN, 2, True)])
        # pool: creator 1 (Ann), Ann's signature 1, creator 2 (Bo), Ann's signature 2
        await world.deliver(3)
        await world.work()
        await world.an_unsubscribe(ANN)
        await world.deliver(1)  # the older opt-in
        await world.work()
        await finish(world)
