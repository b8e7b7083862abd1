"""The scenario generator and the expected-state oracle."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import (
    CREATOR_TAG,
    SIGNER_TAG,
    ExistingPerson,
    expected_state,
    normalize_email,
    populate,
)
from csand.sim.server import ServedApp

NOW = datetime(2024, 10, 1, 15, 30, tzinfo=UTC)


class FakeAN:
    def __init__(self) -> None:
        self.people: list[tuple[str, dict[str, Any]]] = []

    def add_person(self, email: str, **fields: Any) -> None:
        self.people.append((email, fields))


def make(seed: int = 0, **kwargs: Any) -> tuple[ControlShiftSim, FakeAN, Any]:
    cs = ControlShiftSim(now=lambda: NOW)
    an = FakeAN()
    return cs, an, populate(cs, an, seed=seed, **kwargs)


def test_deterministic_from_seed() -> None:
    cs1, an1, s1 = make(seed=3, bad_records=5)
    cs2, an2, s2 = make(seed=3, bad_records=5)
    assert cs1.petitions() == cs2.petitions()
    assert cs1.signatures() == cs2.signatures()
    assert an1.people == an2.people and s1.existing_people == s2.existing_people
    assert s1.expected_an_state() == s2.expected_an_state()
    cs3, _, _ = make(seed=4, bad_records=5)
    assert cs3.signatures() != cs1.signatures()


def test_shape_and_fractions() -> None:
    cs, an, sc = make(petitions=15, signatures=3000, unlaunched=2, seed=1)
    petitions = cs.petitions()
    assert len(petitions) == 15 and sum(not p["launched"] for p in petitions) == 2
    assert all(cs.signatures(p["slug"]) == [] for p in petitions if not p["launched"])
    assert all(0 <= len(p["categories"]) <= 3 for p in petitions)
    assert any(len(p["categories"]) == 0 for p in petitions)
    assert any(len(p["categories"]) >= 2 for p in petitions)

    sigs = cs.signatures()
    assert len(sigs) == 3000
    joins = Counter(s["join_organisation"] for s in sigs)
    assert 0.65 < joins[True] / 3000 < 0.75
    assert joins[False] > 300 and joins[None] > 300

    sizes = sorted((p["public_signature_count"] for p in petitions if p["launched"]), reverse=True)
    assert sizes[0] > 4 * sizes[-1]  # uneven: a few large petitions

    # Ordering: ids grow with created_at; everything is in the past months.
    by_id = sorted(sigs, key=lambda s: s["id"])
    assert [s["created_at"] for s in by_id] == sorted(s["created_at"] for s in by_id)
    oldest = datetime.fromisoformat(min(p["created_at"] for p in petitions))
    newest = datetime.fromisoformat(max(s["created_at"] for s in sigs))
    assert NOW - timedelta(days=190) < oldest and newest < NOW

    # Repeat signers, with their email typed differently at times.
    per_person = Counter(normalize_email(s["email"]) for s in sigs)
    repeaters = [e for e, n in per_person.items() if n > 1]
    assert 0.05 < sum(per_person[e] - 1 for e in repeaters) / 3000 < 0.15
    spellings: dict[str, set[str]] = {}
    for s in sigs:
        spellings.setdefault(normalize_email(s["email"]), set()).add(s["email"])
    assert any(len(v) > 1 for v in spellings.values())
    emails = [s["email"] for s in sigs]
    assert any(e != e.strip() for e in emails)
    assert any("+" in e for e in emails)
    assert any(e != e.lower() for e in emails)
    names = {s["first_name"] for s in sigs} | {s["last_name"] for s in sigs}
    assert {"José", "Zoë", "Łukasz", "田中"} & names
    assert any(n and not n.isascii() for n in names)
    assert all(normalize_email(s["email"]).isascii() for s in sigs)

    # People already in AN.
    people = set(sc.people)
    assert 0.15 < len(sc.existing_people) / len(people) < 0.25
    statuses = Counter(p.status for p in sc.existing_people.values())
    assert 0.4 < statuses["subscribed"] / len(sc.existing_people) < 0.6
    assert [e for e, _ in an.people] == list(sc.existing_people)
    assert set(sc.existing_people) <= people


def test_bad_records() -> None:
    cs, _, sc = make(signatures=50, bad_records=10)
    assert len(cs.signatures()) == 60 and len(sc.bad_records) == 10
    assert Counter(sc.bad_records.values()) == {
        "missing_email": 2,
        "invalid_email": 2,
        "null_names": 2,
        "long_first_name": 2,
        "non_ascii": 2,
    }
    dead = {d.signature_id: d.reason for d in sc.expected_dead()}
    for sig_id, kind in sc.bad_records.items():
        expected = {
            "missing_email": "missing email",
            "invalid_email": "invalid email",
            "long_first_name": "field too long",
        }.get(kind)
        assert dead.get(sig_id) == expected
    state = sc.expected_an_state()
    sigs = {s["id"]: s for s in cs.signatures()}
    for sig_id, kind in sc.bad_records.items():
        if kind in ("null_names", "non_ascii"):
            person = state[normalize_email(sigs[sig_id]["email"])]
            assert person.tags >= {SIGNER_TAG}


def test_scenario_is_served() -> None:
    cs, _, sc = make(petitions=4, signatures=40)
    with ServedApp(cs.app) as served:
        headers = {"Authorization": "Bearer cs-test-key"}
        with httpx.Client(base_url=served.url, headers=headers) as c:
            total = 0
            page: int | None = 1
            while page:
                body = c.get("/api/v1/petitions", params={"page": page}).json()
                for p in body["petitions"]:
                    total += p["public_signature_count"]
                page = body["meta"]["next_page"]
    assert total == 40 == sc.summary()["signatures"]


def test_oracle_is_live_and_populate_works_without_an() -> None:
    cs = ControlShiftSim(now=lambda: NOW)
    sc = populate(cs, None, petitions=3, signatures=30, unlaunched=0, not_opted_in=1.0)
    state = sc.expected_an_state()
    target = next(
        e for e, p in state.items() if SIGNER_TAG in p.tags and e not in sc.existing_people
    )
    assert state[target].status == "unsubscribed"
    sig = next(s for s in cs.signatures() if normalize_email(s["email"]) == target)
    cs.update_signature(sig["id"], join_organisation=True)
    assert sc.expected_an_state()[target].status == "subscribed"
    cs.delete_signature(sig["id"])
    assert any(d.signature_id == sig["id"] and d.reason == "deleted" for d in sc.expected_dead())


# -------------------------------------------------------------- the oracle on hand-made data


def petition(pid: int, slug: str, email: str, *, launched: bool = True, day: int = 1,
             categories: tuple[str, ...] = (), first: str | None = "Cy") -> dict[str, Any]:  # fmt: skip
    return {
        "id": pid,
        "slug": slug,
        "launched": launched,
        "created_at": f"2024-09-{day:02d}T10:00:00Z",
        "categories": [{"slug": c.lower(), "name": c} for c in categories],
        "creator": {"first_name": first, "last_name": "Creator", "email": email},
    }


def signature(sid: int, slug: str, email: str | None, join: bool | None, *, day: int,
              first: str | None = None, last: str | None = None, postcode: str | None = None,
              deleted: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "id": sid,
        "email": email,
        "first_name": first,
        "last_name": last,
        "postcode": postcode,
        "join_organisation": join,
        "deleted_at": "2024-09-28T00:00:00Z" if deleted else None,
        "created_at": f"2024-09-{day:02d}T12:00:00+00:00",
        "petition": {"slug": slug},
    }


def test_oracle_decision_table_tags_and_names() -> None:
    petitions = [
        petition(1, "tax", "creator@example.org", categories=("Avoiding Taxes", "Health")),
        petition(2, "bus", "opted@example.org", day=2, categories=("Public Transport",)),
        petition(3, "draft", "drafty@example.org", launched=False),
    ]
    signatures = [
        signature(1, "tax", "new-yes@example.org", True, day=5, first="Ann", postcode="2000"),
        signature(2, "tax", "new-no@example.org", False, day=5),
        signature(3, "tax", "sub-no@example.org", None, day=5),
        signature(4, "tax", "unsub-yes@example.org", True, day=5),
        signature(5, "tax", "unsub-no@example.org", False, day=5),
        signature(6, "tax", "OPTED@example.org ", True, day=3, first="Old", last="Name"),
        signature(7, "bus", " New-Yes@Example.org", None, day=9, first="Anna", postcode=""),
        signature(8, "bus", "new-no@example.org", False, day=6, deleted=True),
        signature(9, "bus", "not-an-email", True, day=6),
        signature(10, "bus", None, True, day=6),
        signature(11, "bus", "long@example.org", True, day=6, first="x" * 300),
    ]
    existing = {
        e: ExistingPerson(e, "Was", "There", status)
        for e, status in [
            ("sub-no@example.org", "subscribed"),
            ("unsub-yes@example.org", "unsubscribed"),
            ("unsub-no@example.org", "unsubscribed"),
            ("bystander@example.org", "subscribed"),
        ]
    }
    state, dead = expected_state(petitions, signatures, existing)

    assert {e: p.status for e, p in state.items()} == {
        "creator@example.org": "unsubscribed",  # creators carry no opt-in
        "opted@example.org": "subscribed",  # ... unless they also signed with one
        "new-yes@example.org": "subscribed",
        "new-no@example.org": "unsubscribed",
        "sub-no@example.org": "subscribed",
        "unsub-yes@example.org": "subscribed",
        "unsub-no@example.org": "unsubscribed",
        "bystander@example.org": "subscribed",
    }
    assert "drafty@example.org" not in state  # unlaunched petitions do not sync

    tax_tags = {SIGNER_TAG, "controlshift:Avoiding Taxes", "controlshift:Health"}
    assert state["creator@example.org"].tags == {
        CREATOR_TAG,
        "controlshift:Avoiding Taxes",
        "controlshift:Health",
    }
    assert state["opted@example.org"].tags == tax_tags | {
        CREATOR_TAG,
        "controlshift:Public Transport",
    }
    assert state["opted@example.org"].petitions == {"tax", "bus"}
    assert state["new-no@example.org"].tags == tax_tags  # the deleted "bus" signature is gone
    assert state["new-no@example.org"].petitions == {"tax"}
    assert state["bystander@example.org"].tags == frozenset()

    # Names follow the newest activity, falling back to older non-empty values, then AN's.
    ann = state["new-yes@example.org"]
    assert (ann.given_name, ann.family_name, ann.postal_code) == ("Anna", None, "2000")
    opted = state["opted@example.org"]  # signed day 3 as "Old Name", created day 2 as "Cy Creator"
    assert (opted.given_name, opted.family_name) == ("Old", "Name")
    assert (state["sub-no@example.org"].given_name, state["sub-no@example.org"].family_name) == (
        "Was",
        "There",
    )

    assert sorted((d.signature_id, d.reason) for d in dead) == [
        (8, "deleted"),
        (9, "invalid email"),
        (10, "missing email"),
        (11, "field too long"),
    ]


def test_populate_seeds_the_action_network_simulator() -> None:
    an_module = pytest.importorskip("csand.sim.actionnetwork")
    an = an_module.ActionNetworkSim()
    sc = populate(ControlShiftSim(now=lambda: NOW), an, signatures=200, existing_in_an=0.5)
    assert len(an.people()) == len(sc.existing_people) > 50
    for email, before in sc.existing_people.items():
        person = an.person(email)
        assert person is not None and person["status"] == before.status
        assert person["given_name"] == before.given_name
