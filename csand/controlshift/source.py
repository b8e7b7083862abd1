"""Bulk-data rows as the records the REST API shows. Pure.

With ``[controlshift] source = "bulk"`` signatures, petitions and creators come from the export
files (CSV rows, every cell a string) instead of REST listings. These functions give each row
the shape REST gives the same record, so that :func:`csand.model.signature_activity`,
:func:`csand.model.creator_activity` and :func:`csand.controlshift.versions.see_signature`
build the very same activities (source keys, fingerprints, dedupe keys) from either source:
switching source, or a webhook racing an export, never duplicates or re-sends anything.

* A signature row → the REST signature: text cells as text (empty → null), ``t``/``f`` →
  booleans, timestamps → ISO 8601 (UTC), ``additional_fields`` parsed from its JSON text.
* A petition row joined with its ``users`` row (``petitions.user_id``) and its category names
  (``categorized_petitions`` → ``categories``) → the REST petition: ``url`` is
  ``<organisation url>/petitions/<slug>`` (the file has none). The creator carries what the
  ``users`` row has: names, email and phone, as REST shows them, plus ``postcode`` and
  ``join_organisation``, which REST lacks and a ``petition.*`` webhook adds (so the creator
  activity equals the one polling builds after that webhook).

A cell that cannot be read (a boolean that is not ``t``/``f``, an id that is not a number) raises
:class:`~csand.model.MalformedRecord`: the caller makes a dead letter of the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from csand.controlshift.bulk import parse_bool, parse_int, parse_timestamp, text
from csand.model import MalformedRecord

Row = Mapping[str, str | None]

SIGNATURE_TEXT = ("email", "first_name", "last_name", "phone_number", "postcode", "country",
                  "source", "locale")
SIGNATURE_TIMES = ("created_at", "updated_at", "confirmed_at", "deleted_at", "unsubscribe_at")
# Kept as aware datetimes (``time_field`` takes them as they are: no text round trip for each
# of a million rows); the others as ISO text, as REST gives them.
PARSED_TIMES = frozenset({"created_at", "updated_at", "confirmed_at"})
SIGNATURE_BOOLS = ("join_organisation", "opt_in_sms")
USER_TEXT = ("email", "first_name", "last_name", "phone_number", "postcode")


def row_id(row: Row, column: str = "id") -> int:
    """An id cell as an int; :class:`MalformedRecord` when missing or not a number."""
    try:
        value = parse_int(row.get(column))
    except (MalformedRecord, ValueError) as exc:
        raise MalformedRecord(f"{column} is not an integer ({str(row.get(column))[:40]!r})"
                              ) from exc
    if value is None:
        raise MalformedRecord(f"{column} is missing")
    return value


def iso_cell(row: Row, column: str) -> str | None:
    """A timestamp cell as ISO 8601 in UTC (what REST shows), None when empty."""
    moment = time_cell(row, column)
    return moment.isoformat() if moment is not None else None


def bool_cell(row: Row, column: str) -> bool | None:
    try:
        return parse_bool(row.get(column))
    except (MalformedRecord, ValueError) as exc:
        raise MalformedRecord(f"{column} is not t or f ({str(row.get(column))[:40]!r})"
                              ) from exc


def json_cell(row: Row, column: str) -> Any:
    """A json column's text parsed; text that is not JSON is kept as text (the activity
    builder then calls it malformed, naming the field)."""
    raw = text(row.get(column))
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def time_cell(row: Row, column: str) -> datetime | None:
    try:
        return parse_timestamp(row.get(column))
    except (MalformedRecord, ValueError) as exc:
        raise MalformedRecord(f"{column} is not a timestamp ({str(row.get(column))[:40]!r})"
                              ) from exc


def signature_record(row: Row) -> dict[str, Any]:
    """A ``signatures`` row as the REST signature (plus ``petition_id``); ``created_at``,
    ``updated_at`` and ``confirmed_at`` as aware datetimes (see :data:`PARSED_TIMES`), the
    record as JSON with :func:`record_json`."""
    record: dict[str, Any] = {"id": row_id(row), "petition_id": row_id(row, "petition_id")}
    for column in SIGNATURE_TEXT:
        record[column] = text(row.get(column))
    for column in SIGNATURE_TIMES:
        record[column] = (time_cell(row, column) if column in PARSED_TIMES
                          else iso_cell(row, column))
    for column in SIGNATURE_BOOLS:
        record[column] = bool_cell(row, column)
    record["additional_fields"] = json_cell(row, "additional_fields")
    return record


def record_json(record: dict[str, Any]) -> str:
    """A record as JSON, datetimes as ISO 8601 (what REST would have shown)."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True,
                      default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def petition_url(org_url: str | None, slug: str) -> str | None:
    """``<organisation url>/petitions/<slug>``: the public URL the ``petitions`` file lacks."""
    if not org_url:
        return None
    return f"{org_url.rstrip('/')}/petitions/{slug}"


def creator_from_user(user: Row | None) -> dict[str, Any] | None:
    """A ``users`` row as a petition's creator (see the module docstring)."""
    if user is None:
        return None
    creator: dict[str, Any] = {column: text(user.get(column)) for column in USER_TEXT}
    creator["join_organisation"] = bool_cell(user, "join_organisation")
    return creator


def petition_record(row: Row, user: Row | None, categories: Iterable[str],
                    org_url: str | None) -> dict[str, Any]:
    """A ``petitions`` row joined with its creator's ``users`` row and its category names, as
    the REST petition (``launched`` from the row: only launched petitions sync)."""
    slug = text(row.get("slug"))
    if slug is None or not slug.strip():
        raise MalformedRecord("slug is missing")
    launched = bool_cell(row, "launched")
    return {
        "id": row_id(row),
        "slug": slug,
        "title": text(row.get("title")),
        "url": petition_url(org_url, slug),
        "launched": launched is True,
        "created_at": iso_cell(row, "created_at"),
        "updated_at": iso_cell(row, "updated_at"),
        "creator": creator_from_user(user),
        "categories": [{"name": name} for name in sorted(set(categories))],
    }


def user_id(row: Row) -> int | None:
    """``petitions.user_id``, None when empty."""
    return row_id(row, "user_id") if text(row.get("user_id")) else None
