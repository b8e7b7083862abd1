"""Storage tests: helpers shared by the conformance suite and the SQLite-specific tests."""

from __future__ import annotations

from typing import Any

from csand.model import Activity, SignatureSeen, signature_activity
from csand.storage import PetitionState

ORG = "test-org"
T0 = 1_700_000_000.0



def petition(pid: int = 1, creator_email: str = "creator@example.org", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": pid,
        "slug": f"petition-{pid}",
        "title": f"Petition {pid}",
        "url": f"https://cs.example.org/petitions/petition-{pid}",
        "launched": True,
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "creator": {"first_name": "Cleo", "last_name": "Ng", "email": creator_email},
        "categories": [],
    }
    data.update(extra)
    return data


def signature(sid: int, email: str, created: str = "2024-01-02T00:00:00Z", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": sid,
        "email": email,
        "first_name": "Ann",
        "last_name": "Lee",
        "postcode": "2000",
        "join_organisation": True,
        "created_at": created,
        "updated_at": created,
    }
    data.update(extra)
    return data


def sig(sid: int, email: str, created: str = "2024-01-02T00:00:00Z", pid: int = 1, **extra: Any) -> Activity:
    return signature_activity(signature(sid, email, created, **extra), petition(pid), ORG)


def petition_state(pid: int = 1) -> PetitionState:
    """What a poll recorded of petition ``pid`` after walking it."""
    return PetitionState(
        cs_id=pid, slug=f"petition-{pid}", updated_at="2024-01-01T00:00:00Z", public_count=2,
        content="abc", total_pages=1, an_uuid=None,
    )


def seen_row(sid: int, pid: int = 1) -> SignatureSeen:
    return SignatureSeen(sid, pid, f"fp{sid}", None)


def event_record(slug: str = "picnic", host_email: str = "hana@example.org") -> dict[str, Any]:
    return {"slug": slug, "title": f"Event {slug}", "url": f"https://cs.example.org/events/{slug}",
            "start_at": "2024-06-01T10:00:00Z", "end_at": "2024-06-01T12:00:00Z",
            "launched_at": "2024-05-01T00:00:00Z", "created_at": "2024-05-01T00:00:00Z",
            "host": {"email": host_email, "first_name": "Hana", "last_name": "Host",
                     "join_organisation": True}}


def host(slug: str = "picnic", email: str = "hana@example.org") -> Activity:
    from csand.model import event_ref, host_activity

    record = event_record(slug, email)
    return host_activity(record, event_ref(record, ORG))


def attendance(aid: int, email: str, slug: str = "picnic", updated: str = "2024-05-02T00:00:00Z",
               **extra: Any) -> Activity:
    from csand.model import attendee_activity, event_ref

    record = {"id": aid, "email": email, "first_name": "Ann", "attending_status": "attending",
              "join_organisation": True, "created_at": "2024-05-02T00:00:00Z",
              "updated_at": updated, **extra}
    return attendee_activity(record, event_ref(event_record(slug), ORG))
