"""``csand adopt``: take over, up front, the AN petitions ControlShift's hosted integration made.

Lists every ControlShift petition and every AN petition of the configured origin system (25 a
page: one AN request per 25 petitions, never one per petition), matches them in memory with
:func:`csand.sync.adoption.match` (the same rule the worker applies to a petition met later, here
with the whole organisation in view, so two CS petitions sharing a title are ambiguous unless
URLs tell them apart), and records the unambiguous twins in the store.

Recording is cheap on purpose: csand's identifier is *not* added to each adopted petition here
(one ``PUT`` each, 21 minutes for 5,000 petitions at AN's 4 requests/second) but by the worker the
first time it needs the petition (:meth:`csand.sync.adopter.Adopter.identified`); most old
petitions never get another signature. Until then the store is the record, and a rerun of
``csand adopt`` decides the same way.

Ambiguous petitions are recorded for ``csand status``; a person decides with ``--pick`` or
``--create`` (:func:`record_decisions`), which the worker then follows.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from csand import __version__
from csand.actionnetwork.client import ActionNetworkClient
from csand.checks import open_configured_store
from csand.config import Settings
from csand.controlshift.client import ControlShiftClient, configured_client
from csand.model import MalformedRecord, PetitionRef, is_launched, petition_ref
from csand.ratelimit import SharedTokenBucket, TokenBucket
from csand.storage import Storage
from csand.sync.adoption import (
    ADOPT,
    AMBIGUOUS,
    CREATE,
    ANPetition,
    ambiguous_key,
    decision_key,
    identify_key,
    match,
    title_key,
)

AN_HEADROOM = 0.97  # as the daemon: 3% under AN's limit


@dataclass
class Verdict:
    slug: str
    cs_id: int
    title: str
    an_uuid: str | None = None
    candidates: list[str] = field(default_factory=list)
    reason: str = ""
    # Other unmirrored CS petitions of the same title ({cs_id, slug}): kept with an ambiguity so
    # the worker, which sees one petition at a time, judges it with them in view too.
    rivals: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AdoptResult:
    dry_run: bool
    adopted: list[Verdict] = field(default_factory=list)  # (would be) adopted now
    create: list[Verdict] = field(default_factory=list)  # no twin: csand creates one
    ambiguous: list[Verdict] = field(default_factory=list)  # a person must choose
    decided: list[Verdict] = field(default_factory=list)  # a person chose (--pick / --create)
    mirrored: int = 0  # already mirrored by csand (recorded, or carrying csand's identifier)
    cs_petitions: int = 0  # launched ones
    an_petitions: int = 0  # of the origin system
    an_requests: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds: listing, matching, recording

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 2)
        return data


def parse_pick(text: str) -> tuple[str, str]:
    """``SLUG=AN_UUID`` → (slug, uuid); ValueError otherwise."""
    slug, sep, uuid = text.partition("=")
    if not sep or not slug.strip() or not uuid.strip():
        raise ValueError(f"--pick {text!r}: expected SLUG=AN_UUID")
    return slug.strip(), uuid.strip()


async def decide(store: Storage, picks: list[tuple[str, str]], creates: list[str]) -> int:
    """A person's choice for ambiguous petitions, kept in the store: the worker adopts the
    picked AN petition (adding csand's identifier to it) or creates a fresh twin. Their dead
    items go through again with ``csand dead retry``. Returns how many were recorded."""
    values: dict[str, str | None] = {}
    for slug, uuid in picks:
        values[decision_key(slug)] = uuid
        values[ambiguous_key(slug)] = None
    for slug in creates:
        values[decision_key(slug)] = CREATE
        values[ambiguous_key(slug)] = None
    if values:
        await store.set_meta(**values)
    return len(picks) + len(creates)


async def run_adopt(
    settings: Settings, *, dry_run: bool, console: Console | None = None,
    an_transport: httpx.AsyncBaseTransport | None = None,
    cs_transport: httpx.AsyncBaseTransport | None = None,
) -> AdoptResult:
    console = console or Console(stderr=True)
    started = time.monotonic()
    result = AdoptResult(dry_run=dry_run)
    store = await open_configured_store(settings)
    headers = {"User-Agent": f"csand/{__version__}"}
    try:
        # On SQLite the daemon must not run meanwhile (its worker would not see this process
        # recording twins); on PostgreSQL each record is taken under the petition's mirror lock.
        with _exclusive(settings, store, dry_run):
            async with httpx.AsyncClient(transport=cs_transport, headers=headers,
                                         timeout=settings.controlshift.timeout) as cs_http, \
                    httpx.AsyncClient(transport=an_transport, headers=headers,
                                      timeout=settings.action_network.timeout) as an_http:
                cs = configured_client(settings.controlshift, cs_http)
                an = _an_client(settings, an_http, store)
                with Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                              transient=True, disable=not console.is_terminal) as bar:
                    # Both lists at once: each service has its own rate limit.
                    listing = bar.add_task("Action Network petitions", total=None)
                    lists: dict[str, Any] = {}

                    async def an_petitions() -> None:
                        lists["an"] = await an.list_petitions(
                            "origin_system", settings.sync.origin_system,
                            on_page=lambda items: bar.advance(listing, len(items)))

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(an_petitions)
                        refs = await _cs_petitions(settings, cs, store, bar, dry_run)
                    result.phases["listing"] = round(time.monotonic() - started, 2)
                    an_list = lists["an"]
                    result.cs_petitions = len(refs)
                    result.an_petitions = len(an_list)
                    await _decide(settings, store, refs, an_list, result, bar, dry_run)
                result.an_requests = an.requests
    finally:
        await store.close()
    result.seconds = time.monotonic() - started
    return result


def _exclusive(settings: Settings, store: Storage, dry_run: bool) -> Any:
    if dry_run or store.shared:
        return nullcontext()
    from csand.storage.sqlite import single_instance

    return single_instance(Path(settings.store.path))


def _an_client(settings: Settings, http: httpx.AsyncClient, store: Storage) -> ActionNetworkClient:
    an = settings.action_network
    # AN's limit is per key: beside running instances on PostgreSQL, share their bucket.
    limiter = (SharedTokenBucket(store, an.requests_per_second, headroom=AN_HEADROOM)
               if store.shared else TokenBucket(an.requests_per_second, headroom=AN_HEADROOM))
    return ActionNetworkClient(http, an.url, an.api_key.get_secret_value(),  # type: ignore[union-attr]
                               limiter)


async def _cs_petitions(settings: Settings, cs: ControlShiftClient, store: Storage,
                        bar: Progress, dry_run: bool) -> list[PetitionRef]:
    org = settings.controlshift.org_slug or await store.get_meta("org_slug")
    if not org:
        org = str((await cs.organisation()).get("slug") or "").strip()
        if not org:
            raise RuntimeError("ControlShift /api/v1/organisation returned no slug")
        if not dry_run:
            await store.set_meta(org_slug=org)
    task = bar.add_task("ControlShift petitions", total=None)
    refs: list[PetitionRef] = []
    async for items, _ in cs.pages("/petitions", "petitions"):
        for petition in items:
            if not isinstance(petition, dict) or not is_launched(petition):
                continue
            try:
                refs.append(petition_ref(petition, org))
            except MalformedRecord:
                continue  # the poller makes it a dead letter; nothing to mirror
        bar.advance(task, len(items))
    return refs


async def _decide(settings: Settings, store: Storage, refs: list[PetitionRef],
                  an_list: list[tuple[str, dict[str, Any]]], result: AdoptResult,
                  bar: Progress, dry_run: bool) -> None:
    origin = settings.sync.origin_system
    an_petitions = [ANPetition.from_json(resource, uuid) for uuid, resource in an_list]
    by_identifier = {i: p.uuid for p in an_petitions for i in p.identifiers}
    by_title: dict[str, list[ANPetition]] = defaultdict(list)
    for p in an_petitions:
        by_title[title_key(p.title)].append(p)
    refs_by_title: dict[str, list[PetitionRef]] = defaultdict(list)
    for ref in refs:
        refs_by_title[title_key(ref.title)].append(ref)

    began = time.monotonic()
    task = bar.add_task("matching", total=len(refs))
    recorded: dict[int, str] = {}
    claimed: dict[str, int] = {}
    for ref in refs:
        uuid = await store.petition_uuid(ref.cs_id)
        if uuid:
            recorded[ref.cs_id] = uuid
            claimed[uuid] = ref.cs_id
    to_record: list[tuple[PetitionRef, str, bool]] = []  # (petition, uuid, identified)
    for ref in refs:
        bar.advance(task)
        if ref.cs_id in recorded:
            result.mirrored += 1
            continue
        own = by_identifier.get(ref.identifier)
        if own:  # csand made or adopted it before and did not get to record it
            result.mirrored += 1
            to_record.append((ref, own, True))
            claimed[own] = ref.cs_id
            continue
        decision = await store.get_meta(decision_key(ref.slug))
        if decision:
            result.decided.append(Verdict(ref.slug, ref.cs_id, ref.title,
                                          None if decision == CREATE else decision,
                                          reason="create" if decision == CREATE else "pick"))
            continue
        key = title_key(ref.title)
        rivals = [r for r in refs_by_title[key] if r.cs_id not in recorded]
        found = match(ref, by_title.get(key, ()), origin_system=origin, claimed=claimed,
                      rivals=rivals)
        verdict = Verdict(ref.slug, ref.cs_id, ref.title, found.uuid, list(found.candidates),
                          found.reason, [{"cs_id": r.cs_id, "slug": r.slug} for r in rivals
                                         if r.cs_id != ref.cs_id])
        if found.kind == ADOPT:
            assert found.uuid is not None
            if claimed.get(found.uuid, ref.cs_id) != ref.cs_id:  # taken by an earlier match
                verdict.reason = f"its only candidate {found.uuid} is another petition's twin"
                result.ambiguous.append(verdict)
                continue
            claimed[found.uuid] = ref.cs_id
            result.adopted.append(verdict)
            to_record.append((ref, found.uuid, False))
        elif found.kind == CREATE:
            result.create.append(verdict)
        else:
            assert found.kind == AMBIGUOUS
            result.ambiguous.append(verdict)
    result.phases["matching"] = round(time.monotonic() - began, 2)
    if dry_run:
        return
    began = time.monotonic()
    await _record(store, to_record, result, bar)
    result.phases["recording"] = round(time.monotonic() - began, 2)


async def _record(store: Storage, to_record: list[tuple[PetitionRef, str, bool]],
                  result: AdoptResult, bar: Progress) -> None:
    task = bar.add_task("recording", total=len(to_record))
    # The identifier marks first: a crash before the uuid is recorded leaves only a mark the
    # next run (or the worker) agrees with.
    marks: dict[str, str | None] = {identify_key(uuid): str(ref.cs_id)
                                    for ref, uuid, identified in to_record if not identified}
    marks |= {ambiguous_key(v.slug): json.dumps({"cs_id": v.cs_id, "title": v.title,
                                                 "candidates": v.candidates,
                                                 "rivals": v.rivals})
              for v in result.ambiguous}
    marks |= {ambiguous_key(v.slug): None for v in [*result.adopted, *result.create]}
    keys = list(marks)
    for start in range(0, len(keys), 500):
        await store.set_meta(**{k: marks[k] for k in keys[start:start + 500]})
    for ref, uuid, _ in to_record:
        async with store.mirror_lock(ref.cs_id):
            if not await store.petition_uuid(ref.cs_id):  # a worker may have mirrored it since
                await store.set_petition_uuid(ref.cs_id, ref.slug, uuid)
        bar.advance(task)


def print_result(result: AdoptResult, console: Console, limit: int = 20) -> None:
    from rich.table import Table

    verb = "would adopt" if result.dry_run else "adopted"
    console.print(
        f"{result.cs_petitions} launched ControlShift petitions, {result.an_petitions} Action "
        f"Network petitions of the origin system; {result.an_requests} Action Network requests "
        f"in {result.seconds:.1f} s", soft_wrap=True, highlight=False)

    def table(title: str, rows: list[Verdict], columns: tuple[str, ...]) -> None:
        if not rows:
            return
        t = Table(title=f"{title}: {len(rows)}")
        for column in columns:
            t.add_column(column)
        for v in rows[:limit]:
            values = {"slug": v.slug, "title": v.title, "AN petition": v.an_uuid or "",
                      "candidates": "\n".join(v.candidates), "why": v.reason}
            t.add_row(*(values[c] for c in columns))
        console.print(t)
        if len(rows) > limit:
            console.print(f"... and {len(rows) - limit} more (--json lists them all)")

    table(f"matched ({verb})", result.adopted, ("slug", "title", "AN petition"))
    table("no match (csand will create them)", result.create, ("slug", "title"))
    table("decided by a person", result.decided, ("slug", "AN petition", "why"))
    table("[yellow]ambiguous (a person must choose)[/yellow]", result.ambiguous,
          ("slug", "title", "candidates"))
    console.print(f"{result.mirrored} already mirrored by csand.", highlight=False)
    if result.ambiguous:
        console.print("Choose for each ambiguous petition: csand adopt --pick SLUG=AN_UUID "
                      "(adopt that one) or csand adopt --create SLUG (a fresh twin).",
                      soft_wrap=True, highlight=False)
    elif result.dry_run:
        console.print("Nothing ambiguous: run csand adopt (without --dry-run) to record these.",
                      highlight=False)
