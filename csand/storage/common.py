"""What both storage backends share: the row formats of activities, dead letters, times and
the cluster view, so the two store exactly the same things."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from csand.model import Activity, DeadLetter, before_history, parse_time

# Which pending item is ready to lease: the rules of csand.storage.Outbox, in SQL both backends
# run as written (no parameters). At most one item per person in flight, each person's items in
# the order they happened; a signature waits for its petition's mirror (or for no creator item
# left to make it), an attendance and an event change for their event's.
LEASE_RULES = """  AND NOT EXISTS (
        SELECT 1 FROM outbox AS busy
        WHERE busy.person_key = o.person_key AND busy.status = 'in_flight')
  AND NOT EXISTS (
        SELECT 1 FROM outbox AS earlier
        WHERE earlier.person_key = o.person_key AND earlier.status = 'pending'
          AND (earlier.occurred_at < o.occurred_at
               OR (earlier.occurred_at = o.occurred_at AND earlier.id < o.id))
          -- A host who RSVPed to their own event before it launched: the hosting goes first
          -- (the RSVP waits for the event it creates), else each would wait for the other.
          AND NOT (o.kind = 'event_hosted' AND earlier.kind = 'attendance'
                   AND earlier.event_slug = o.event_slug))
  AND (o.kind != 'signature'
       OR EXISTS (SELECT 1 FROM cs_petitions AS p
                  WHERE p.cs_id = o.petition_id AND p.an_uuid IS NOT NULL)
       OR NOT EXISTS (SELECT 1 FROM outbox AS c
                      WHERE c.petition_id = o.petition_id AND c.kind = 'petition_created'
                        AND c.status IN ('pending', 'in_flight')))
  AND (o.kind != 'attendance'
       OR EXISTS (SELECT 1 FROM cs_events AS e
                  WHERE e.slug = o.event_slug AND e.an_uuid IS NOT NULL)
       OR NOT EXISTS (SELECT 1 FROM outbox AS h
                      WHERE h.event_slug = o.event_slug AND h.kind = 'event_hosted'
                        AND h.status IN ('pending', 'in_flight')))
  -- A change to an event not mirrored yet waits for every item that may mirror it (with the
  -- content it carries): it then updates that mirror, or finds none and is done.
  AND (o.kind != 'event_changed'
       OR EXISTS (SELECT 1 FROM cs_events AS e
                  WHERE e.slug = o.event_slug AND e.an_uuid IS NOT NULL)
       OR NOT EXISTS (SELECT 1 FROM outbox AS m
                      WHERE m.event_slug = o.event_slug
                        AND m.kind IN ('event_hosted', 'attendance')
                        AND m.status IN ('pending', 'in_flight')))
"""

# The figures of ``csand status`` besides the outbox counts, in one round trip ({hour}: the
# backend's placeholder for "an hour ago").
STATUS_FIGURES = (
    "SELECT "
    "(SELECT MIN(enqueued_at) FROM outbox WHERE status IN ('pending', 'in_flight')) AS oldest, "
    "(SELECT COUNT(*) FROM outbox WHERE status = 'dead' AND finished_at > {hour}) "
    "  AS dead_recent, "
    "(SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND attempts > 0) AS waiting, "
    "(SELECT COUNT(*) FROM cs_petitions) AS petitions, "
    "(SELECT COUNT(an_uuid) FROM cs_petitions) AS petitions_mirrored, "
    "(SELECT COUNT(*) FROM cs_signatures) AS signatures, "
    "(SELECT COUNT(deleted_at) FROM cs_signatures) AS signatures_deleted, "
    "(SELECT COUNT(*) FROM cs_events) AS events, "
    "(SELECT COUNT(an_uuid) FROM cs_events) AS events_mirrored, "
    "(SELECT COUNT(*) FROM cs_attendees) AS attendees, "
    "(SELECT COUNT(deleted_at) FROM cs_attendees) AS attendees_deleted, "
    "(SELECT COUNT(*) FROM webhook_events) AS webhooks, "
    "(SELECT COUNT(processed_at) FROM webhook_events) AS webhooks_processed, "
    "(SELECT COUNT(*) FROM webhook_events WHERE processed_at IS NOT NULL "
    "  AND error IS NOT NULL) AS webhooks_failed"
)
DEAD_REASONS = (
    "SELECT last_error AS reason, COUNT(*) AS n FROM outbox WHERE status = 'dead' "
    "GROUP BY last_error ORDER BY n DESC, last_error LIMIT 5"
)

# The note of an item older than sync.history_start: recorded as seen, never sent to AN.
HISTORY_NOTE = "before sync.history_start: recorded, not synced"

PRUNED = "pruned:"  # person key prefix of items whose personal data was pruned (see prune)


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


def field_times(value: str | None) -> MappingProxyType[str, datetime]:
    times: dict[str, datetime] = {}
    for name, stamp in (json.loads(value) if value else {}).items():
        parsed = parse_time(stamp)
        if parsed is not None:
            times[name] = parsed
    return MappingProxyType(times)


def float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def signature_id(source_key: str) -> int | None:
    return record_number(source_key, "signature")


def record_number(source_key: str, kind: str) -> int | None:
    """The CS id in a source key such as ``signature:42`` or ``attendee:7``."""
    prefix, _, rest = source_key.partition(":")
    return int(rest) if prefix == kind and rest.isdigit() else None


def stale_versions(recorded: Iterable[tuple[int, str | None, str | None]],
                   seen: dict[int, Any]) -> set[int]:
    """Ids among ``seen`` (versions with ``deleted_at`` and ``updated_at``) older than what is
    ``recorded`` as (id, deleted_at, updated_at), or live copies of deleted records."""
    stale: set[int] = set()
    for cs_id, deleted_at, updated_at in recorded:
        new = seen[cs_id]
        if deleted_at and not new.deleted_at:
            stale.add(cs_id)
        elif updated_at and new.updated_at and newer(updated_at, new.updated_at):
            stale.add(cs_id)
    return stale


def newer(recorded: str, seen: str) -> bool:
    a, b = parse_time(recorded), parse_time(seen)
    return a is not None and b is not None and a > b


def outbox_row(a: Activity, now: float) -> tuple[Any, ...]:
    occurred = a.occurred_at.isoformat() if a.occurred_at else ""
    return (
        a.dedupe_key,
        a.source_key,
        a.person_key,
        a.petition.cs_id if a.petition else None,
        str(a.kind),
        json.dumps(a.to_json(), separators=(",", ":")),
        occurred,
        now,
        a.event.slug if a.event else None,
    )


def split_history(rows_of: Iterable[tuple[Activity, tuple[Any, ...]]],
                  start: datetime | None) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Outbox rows ``(to sync, before sync.history_start)`` of ``(activity, row)`` pairs."""
    live: list[tuple[Any, ...]] = []
    history: list[tuple[Any, ...]] = []
    for activity, row in rows_of:
        (history if before_history(activity, start) else live).append(row)
    return live, history


# An org-wide unsubscribe is one outbox item per ControlShift unsubscribe, whichever source
# (its webhook, an export file, the nightly copy) brought it first: the sources may render its
# time or email differently, which would otherwise make a second version.
UNSUBSCRIBE_KIND = "global_unsubscribe"
UNSUBSCRIBES_KNOWN = ("SELECT DISTINCT source_key FROM outbox WHERE kind = 'global_unsubscribe' "
                      "AND source_key IN ({marks})")


def unsubscribe_keys(rows: Iterable[tuple[Any, ...]]) -> list[str]:
    """The source keys of the org-wide unsubscribes among outbox rows (see :func:`outbox_row`)."""
    return list(dict.fromkeys(r[1] for r in rows if r[4] == UNSUBSCRIBE_KIND))


def first_unsubscribes(rows: list[tuple[Any, ...]], known: set[str]) -> list[tuple[Any, ...]]:
    """``rows`` without the org-wide unsubscribes the outbox already has (``known``), and with
    the first of those that come more than once."""
    taken = set(known)
    kept = []
    for r in rows:
        if r[4] == UNSUBSCRIBE_KIND:
            if r[1] in taken:
                continue
            taken.add(r[1])
        kept.append(r)
    return kept


def dead_letter_row(d: DeadLetter, now: float) -> tuple[Any, ...]:
    return (
        d.dedupe_key, d.source_key, f"invalid:{d.source_key}", d.petition_id,
        json.dumps(d.payload(), separators=(",", ":")), iso(now) or "", d.reason,
        "malformed ControlShift record: syncs by itself once corrected on ControlShift",
        now, now,
    )


def cluster_view(now: float, leader: Any, rows: Iterable[Any]) -> dict[str, Any]:
    """The shape of :meth:`csand.storage.Cluster.cluster`, from rows of either backend."""
    alive = leader is not None and leader[2] >= now
    return {
        "leader": leader[0] if alive else None,
        "term": int(leader[1]) if leader is not None else None,
        "leader_for_s": round(leader[2] - now, 1) if alive else None,
        "instances": [
            {"instance": r[0], "heartbeat_at": iso(r[1]),
             "heartbeat_age_s": round(now - r[1], 1),
             **(json.loads(r[2]) if isinstance(r[2], str) else dict(r[2] or {}))}
            for r in rows
        ],
    }


def steps_of(progress: str | None) -> frozenset[str]:
    return frozenset(json.loads(progress)) if progress else frozenset()


def reason_of(exc: BaseException) -> str:
    """The first line of an exception's message (libpq's are several lines long)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def status_view(counts: dict[str, int], meta: dict[str, str], row: Any, reasons: Iterable[Any],
                now: float, statuses: Iterable[str]) -> dict[str, Any]:
    """What ``csand status`` prints, from the outbox counts, the meta table, a row of
    :data:`STATUS_FIGURES` and the rows of :data:`DEAD_REASONS` (either backend's)."""
    oldest = row["oldest"]
    return {
        **{k: counts[k] for k in statuses},
        "retrying": row["waiting"],
        "oldest_pending_age_s": round(now - oldest, 1) if oldest else None,
        "last_poll_at": iso(float_or_none(meta.get("last_poll_at"))),
        "last_reconcile_at": iso(float_or_none(meta.get("last_reconcile_at"))),
        "backfill_done": meta.get("backfill_done") == "1",
        "history_start": meta.get("history_start") or None,
        "history_skipped": int(meta.get("history_skipped") or 0),
        "petitions_seen": row["petitions"],
        "petitions_mirrored": row["petitions_mirrored"],
        "signatures_seen": row["signatures"],
        "signatures_deleted": row["signatures_deleted"],
        "events_seen": row["events"],
        "events_mirrored": row["events_mirrored"],
        "attendees_seen": row["attendees"],
        "attendees_deleted": row["attendees_deleted"],
        "an_paused": meta.get("an_paused") or None,
        "an_rate": float_or_none(meta.get("an_rate")),
        "an_429s_since_start": int(meta.get("an_rate_limited") or 0),
        "last_poll_result": meta.get("last_poll_result"),
        "daemon_heartbeat_at": iso(float_or_none(meta.get("heartbeat_at"))),
        "daemon_started_at": iso(float_or_none(meta.get("started_at"))),
        "dead_last_hour": row["dead_recent"],
        "webhooks_received": row["webhooks"],
        "webhooks_waiting": row["webhooks"] - row["webhooks_processed"],
        "webhooks_failed": row["webhooks_failed"] or 0,
        "webhook_endpoint": json.loads(meta["webhook_endpoint"])
        if meta.get("webhook_endpoint") else None,
        "dead_reasons": [{"reason": r["reason"], "count": r["n"]} for r in reasons],
        "adoption_ambiguous": ambiguous_adoptions(meta),
        # ControlShift budget use, as the daemon last wrote it (csand.controlshift.budget)
        "cs_budget": _json_or_none(meta.get("cs_budget")),
        # controlshift.source = "bulk": the poller's last check that the exports arrive
        "bulk_source": _json_or_none(meta.get("bulk_source")),
    }


def ambiguous_adoptions(meta: dict[str, str]) -> list[dict[str, Any]]:
    """Petitions waiting for a person to choose their AN twin (``csand adopt --pick`` or
    ``--create``): meta ``adopt.ambiguous.<slug>`` → JSON ``{cs_id, title, candidates}``."""
    found = []
    for key, value in sorted(meta.items()):
        if key.startswith("adopt.ambiguous.") and value:
            try:
                detail = json.loads(value)
            except ValueError:
                detail = {}
            found.append({"slug": key.removeprefix("adopt.ambiguous."),
                          "title": detail.get("title"),
                          "candidates": detail.get("candidates") or []})
    return found


# ---- csand audit ----

# The activities an audit checks: petition creators, signers, event hosts, attendees and
# org-wide unsubscribes.
AUDIT_KINDS = ("petition_created", "signature", "global_unsubscribe", "event_hosted",
               "attendance")


def audit_sample_where(petition_id: int | None, kinds: Sequence[str], mark: str
                       ) -> tuple[str, dict[str, Any]]:
    """The outbox rows an audit may sample: the latest synced (``done``) version of each record
    of ``kinds`` (AN keeps what it gave also while a newer version or a repair waits), not
    deleted on ControlShift since, its personal data not pruned; only
    ``petition_id``'s when given. ``mark`` formats a named parameter (``":{}"``,
    ``"%({})s"``)."""
    names = [f"kind{i}" for i in range(len(kinds))]
    params: dict[str, Any] = dict(zip(names, kinds, strict=True)) | {"pruned": f"{PRUNED}%"}
    where = (f"status = 'done' AND kind IN ({', '.join(mark.format(n) for n in names)}) "
             "AND source_deleted_at IS NULL "
             f"AND person_key NOT LIKE {mark.format('pruned')} "
             "AND id IN (SELECT MAX(id) FROM outbox WHERE status = 'done' "
             "GROUP BY source_key)")
    if petition_id is not None:
        where += f" AND petition_id = {mark.format('petition')}"
        params["petition"] = petition_id
    return where, params


def _json_or_none(value: str | None) -> Any:
    try:
        return json.loads(value) if value else None
    except ValueError:
        return None
