"""Adopting the AN petitions ControlShift's hosted integration made: which one, if any, is a CS
petition's twin. Pure: no I/O; the worker (one petition, when it is first needed) and
``csand adopt`` (the whole organisation, up front) both decide with :func:`match`.

The hosted integration mirrored every CS petition as an AN petition with ``origin_system``
``Controlshift Petition``, the CS title, perhaps the CS petition URL in its description or
``browser_url``, and no csand identifier. The rule:

1. Candidates are the AN petitions with that origin system whose title equals the CS title, both
   normalised by :func:`title_key`: Unicode NFC, trimmed, runs of whitespace collapsed to one
   space, case-folded (an AN admin fixing a capital letter must not make a duplicate).
2. A candidate already carrying a csand identifier (``controlshift-…:petition-…``) for another
   CS petition, or recorded in csand's store as another petition's twin, is someone else's.
3. A candidate whose description or ``browser_url`` names a CS petition URL
   (``…/petitions/<slug>``) names *that* petition: if some candidates name this petition, only
   they count; otherwise candidates naming another petition are excluded. URLs are compared by
   their petition slug (case-insensitively), so a custom domain and the ControlShift one agree.
4. Other CS petitions with the same title that no candidate names by URL and that are not
   mirrored yet (``rivals``, known to ``csand adopt``, which sees the whole organisation) could
   own any candidate that names no URL: then any such candidate makes it ambiguous.
5. Exactly one candidate left: adopt it. None: create a twin as for any new petition. Two or
   more: ambiguous — adopt none, create none, a person decides (``csand adopt --pick`` or
   ``--create``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from csand.model import PetitionRef

ADOPT = "adopt"
CREATE = "create"
AMBIGUOUS = "ambiguous"

_WHITESPACE = re.compile(r"\s+")
# A ControlShift petition page: https://<host>/petitions/<slug>[/...][?...]
_PETITION_URL = re.compile(r"https?://[^\s\"'<>]+?/petitions/([A-Za-z0-9._~%-]+)", re.IGNORECASE)
_CSAND_IDENTIFIER = re.compile(r"^controlshift-[^:]+:petition-\d+$")


def title_key(title: str | None) -> str:
    """The title as compared: NFC, trimmed, whitespace collapsed, case-folded."""
    text = unicodedata.normalize("NFC", title or "")
    return _WHITESPACE.sub(" ", text).strip().casefold()


def named_slugs(*texts: str | None) -> frozenset[str]:
    """The (lower-cased) slugs of the CS petition URLs the texts name."""
    return frozenset(m.group(1).lower() for text in texts if text
                     for m in _PETITION_URL.finditer(text))


@dataclass(frozen=True, slots=True)
class ANPetition:
    """What matching needs of an AN petition."""

    uuid: str
    title: str
    origin_system: str | None = None
    description: str | None = None
    browser_url: str | None = None
    identifiers: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, resource: dict[str, Any], uuid: str) -> ANPetition:
        def text(name: str) -> str | None:
            value = resource.get(name)
            return value if isinstance(value, str) else None

        return cls(uuid=uuid, title=text("title") or "", origin_system=text("origin_system"),
                   description=text("description"), browser_url=text("browser_url"),
                   identifiers=tuple(i for i in resource.get("identifiers") or ()
                                     if isinstance(i, str)))

    @property
    def slugs(self) -> frozenset[str]:
        return named_slugs(self.description, self.browser_url)

    def csand_identifiers(self) -> tuple[str, ...]:
        return tuple(i for i in self.identifiers if _CSAND_IDENTIFIER.match(i))


@dataclass(frozen=True, slots=True)
class Match:
    """The verdict for one CS petition: ``adopt`` ``uuid``, ``create``, or ``ambiguous`` between
    ``candidates`` (AN uuids); ``reason`` says why in words an operator can act on."""

    kind: Literal["adopt", "create", "ambiguous"]
    uuid: str | None = None
    candidates: tuple[str, ...] = ()
    reason: str = ""


def match(
    petition: PetitionRef,
    an_petitions: Iterable[ANPetition],
    *,
    origin_system: str,
    claimed: Mapping[str, int] | None = None,
    rivals: Iterable[PetitionRef] = (),
) -> Match:
    """Which AN petition, if any, is ``petition``'s twin made by the hosted integration.

    ``an_petitions`` may hold anything (the group's petitions, or those with the same title);
    ``claimed`` maps AN uuids recorded in csand's store to the CS petition id they mirror;
    ``rivals`` are other CS petitions of the organisation (only unmirrored ones with the same
    title matter; the caller may pass them all).
    """
    claimed = claimed or {}
    key = title_key(petition.title)
    slug = petition.slug.lower()
    same_title = [p for p in an_petitions
                  if p.origin_system == origin_system and title_key(p.title) == key]
    for p in same_title:  # already ours: nothing to decide (the identifier lookup's case)
        if petition.identifier in p.identifiers:
            return Match(ADOPT, p.uuid, (p.uuid,), "carries csand's identifier already")
    pool = [p for p in same_title
            if claimed.get(p.uuid, petition.cs_id) == petition.cs_id
            and not p.csand_identifiers()]
    naming_this = [p for p in pool if slug in p.slugs]
    if naming_this:
        pool, why = naming_this, "names this petition's URL"
    else:
        pool = [p for p in pool if not p.slugs]
        why = "same title and origin system"
        competing = sorted(r.slug for r in rivals
                           if r.cs_id != petition.cs_id and title_key(r.title) == key
                           and not any(r.slug.lower() in p.slugs for p in same_title)
                           and r.identifier not in {i for p in same_title for i in p.identifiers}
                           and r.cs_id not in claimed.values())
        if pool and competing:
            uuids = tuple(sorted(p.uuid for p in pool))
            return Match(AMBIGUOUS, None, uuids, (
                f"ControlShift petitions {', '.join([petition.slug, *competing])} share the "
                f"title {petition.title!r} and no candidate names their URL; Action Network "
                f"petitions {', '.join(uuids)} could be any of theirs"))
    if not pool:
        return Match(CREATE, reason="no Action Network petition from the hosted integration "
                     "with this title")
    if len(pool) == 1:
        return Match(ADOPT, pool[0].uuid, (pool[0].uuid,), why)
    uuids = tuple(sorted(p.uuid for p in pool))
    return Match(AMBIGUOUS, None, uuids, (
        f"{len(uuids)} Action Network petitions ({why}) could be ControlShift petition "
        f"{petition.slug}'s twin: {', '.join(uuids)}"))


def ambiguous_reason(petition: PetitionRef, found: Match) -> str:
    """The dead-letter reason of an item whose petition is ambiguous: names the slug, the AN
    uuids and what the operator can do."""
    return (f"ambiguous adoption of ControlShift petition {petition.slug}: {found.reason}. "
            f"Choose with `csand adopt --pick {petition.slug}=<AN uuid>` or "
            f"`csand adopt --create {petition.slug}`, then `csand dead retry --all`")


# ---- what csand keeps of adoption, as meta keys (key/value: no schema change) ----

DECISION_KEY = "adopt.decision."  # + slug → an AN uuid (adopt that one) or CREATE
AMBIGUOUS_KEY = "adopt.ambiguous."  # + slug → JSON {cs_id, title, candidates}, until decided
# + AN uuid → the CS petition id it was adopted for, while csand's identifier is still to be
# added to it (``csand adopt`` leaves that to the worker's first use of the petition)
IDENTIFY_KEY = "adopt.identify."


def decision_key(slug: str) -> str:
    return DECISION_KEY + slug


def ambiguous_key(slug: str) -> str:
    return AMBIGUOUS_KEY + slug


def identify_key(an_uuid: str) -> str:
    return IDENTIFY_KEY + an_uuid
