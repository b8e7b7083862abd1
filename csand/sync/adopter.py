"""The worker's side of adoption: before a CS petition gets a new AN twin, take over the one
ControlShift's hosted integration made (the rule: :mod:`csand.sync.adoption`).

:class:`Adopter` runs inside :class:`csand.sync.worker.PetitionMirror`'s per-petition lock and
the store's mirror lock, after csand found no twin of its own (none recorded, none carrying its
identifier), so two workers or instances never adopt for one petition at once. Order of writes:
csand's identifier goes onto the AN petition first (``PUT``, AN appends it), the uuid into the
store second; a crash in between is found again by the identifier lookup that precedes this.
"""

from __future__ import annotations

import json
from typing import Any

from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.actionnetwork.errors import Outcome, Verdict
from csand.logs import get_logger
from csand.model import PetitionRef
from csand.storage import Storage
from csand.sync.adoption import (
    ADOPT,
    AMBIGUOUS,
    CREATE,
    ANPetition,
    ambiguous_key,
    ambiguous_reason,
    decision_key,
    identify_key,
    match,
)

log = get_logger("adopt")


class Adopter:
    def __init__(self, an: ActionNetworkClient, store: Storage, origin_system: str) -> None:
        self._an = an
        self._store = store
        self._origin = origin_system

    async def adopt(self, petition: PetitionRef) -> str | None:
        """The AN uuid adopted for ``petition`` (csand's identifier added to it), or None: no
        twin to adopt, create one. An ambiguous match raises :class:`ANFailure` (dead), with a
        reason naming the slug and the candidates, and is recorded for ``csand status``."""
        decision = await self._store.get_meta(decision_key(petition.slug))
        if decision == CREATE:
            await self._settled(petition)
            return None
        if decision:  # a person picked this one (csand adopt --pick)
            gone, _ = await self._identify(petition, decision)
            if gone:
                raise ANFailure(Outcome(Verdict.DEAD, (
                    f"the Action Network petition {decision} picked for ControlShift petition "
                    f"{petition.slug} does not exist (any more): pick again with `csand adopt "
                    f"--pick {petition.slug}=<AN uuid>` or `--create {petition.slug}`")))
            await self._settled(petition)
            log.info("an.petition_adopted", petition=petition.slug, an_petition=decision,
                     how="picked")
            return decision
        candidates = await self._candidates(petition)
        recorded = await self._recorded_rivals(petition)
        found = match(petition, candidates, origin_system=self._origin,
                      claimed=await self._claimed(candidates),
                      rivals=[r for r, _ in recorded if not await self._store.petition_uuid(r.cs_id)])
        if found.kind == AMBIGUOUS:
            await self._store.set_meta(**{ambiguous_key(petition.slug): json.dumps({
                "cs_id": petition.cs_id, "title": petition.title,
                "candidates": list(found.candidates), "rivals": [raw for _, raw in recorded]})})
            log.warning("an.petition_ambiguous", petition=petition.slug,
                        candidates=list(found.candidates))
            raise ANFailure(Outcome(Verdict.DEAD, ambiguous_reason(petition, found)))
        if found.kind == CREATE:
            await self._settled(petition)
            return None
        assert found.kind == ADOPT and found.uuid
        gone, _ = await self._identify(petition, found.uuid)
        if gone:  # deleted between the listing and now: decide again on the next attempt
            raise ANFailure(Outcome(Verdict.RETRY, f"the Action Network petition {found.uuid} "
                                    "to adopt vanished; looking again"))
        await self._settled(petition)
        log.info("an.petition_adopted", petition=petition.slug, an_petition=found.uuid,
                 how=found.reason)
        return found.uuid

    async def identified(self, petition: PetitionRef, uuid: str) -> bool:
        """``csand adopt`` recorded ``uuid`` without adding csand's identifier to it: add it now
        (once). False when AN no longer has the petition (the caller mirrors it again)."""
        pending = await self._store.get_meta(identify_key(uuid))
        if not pending:
            return True
        gone, _ = await self._identify(petition, uuid)
        if gone:
            log.warning("an.petition_gone", petition=petition.slug, an_petition=uuid,
                        msg="the adopted petition is gone from Action Network; mirroring again")
            await self._store.clear_petition_uuid(petition.cs_id, uuid)
        await self._store.set_meta(**{identify_key(uuid): None})
        return not gone

    async def _identify(self, petition: PetitionRef, uuid: str) -> tuple[bool, None]:
        try:
            await self._an.add_petition_identifier(uuid, petition.identifier)
        except ANFailure as failure:
            if failure.outcome.verdict is not Verdict.GONE:
                raise
            return True, None
        return False, None

    async def _candidates(self, petition: PetitionRef) -> list[ANPetition]:
        """AN petitions titled as the CS petition (AN's filter is exact: the title as
        ControlShift has it, and its trimmed, whitespace-collapsed form when that differs)."""
        titles = dict.fromkeys([petition.title, " ".join(petition.title.split())])
        found: dict[str, ANPetition] = {}
        for title in titles:
            if not title:
                continue
            for uuid, resource in await self._an.list_petitions("title", title):
                found[uuid] = ANPetition.from_json(resource, uuid)
        return list(found.values())

    async def _claimed(self, candidates: list[ANPetition]) -> dict[str, int]:
        """Candidates ``csand adopt`` recorded for other CS petitions whose identifier is not
        on them yet (all other twins carry csand's identifier)."""
        claimed: dict[str, int] = {}
        for candidate in candidates:
            owner = await self._store.get_meta(identify_key(candidate.uuid))
            if owner and owner.isdigit():
                claimed[candidate.uuid] = int(owner)
        return claimed

    async def _recorded_rivals(self, petition: PetitionRef
                               ) -> list[tuple[PetitionRef, dict[str, Any]]]:
        """The CS petitions of the same title ``csand adopt`` saw when it found ``petition``
        ambiguous: the worker sees one petition at a time, and must not take a candidate that
        could be theirs."""
        raw = await self._store.get_meta(ambiguous_key(petition.slug))
        try:
            rivals = (json.loads(raw) or {}).get("rivals") or [] if raw else []
        except ValueError:
            return []
        org = petition.identifier.rsplit(":petition-", 1)[0]
        return [(PetitionRef(int(r["cs_id"]), str(r["slug"]), petition.title, None,
                             f"{org}:petition-{int(r['cs_id'])}"), r)
                for r in rivals if isinstance(r, dict) and str(r.get("cs_id", "")).isdigit()
                and r.get("slug")]

    async def _settled(self, petition: PetitionRef) -> None:
        if await self._store.get_meta(ambiguous_key(petition.slug)):
            await self._store.set_meta(**{ambiguous_key(petition.slug): None})

