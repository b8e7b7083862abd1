"""End-to-end: custom fields and phone numbers, the real ``csand run`` against both simulators.

Signatures carry answers to custom questions, phone numbers as people type them, and SMS
opt-ins; AN must end with each person's answers from their most recent activity, the number
where the mode puts it, and an SMS subscription only where the person explicitly opted in to
texts together with their newest email opt-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import World, make_world

pytestmark = pytest.mark.e2e


def sign(world: World, slug: str, email: str, **extra: Any) -> None:
    world.cs.add_signature(slug, email=email, first_name="Pat", last_name="Lee", **extra)


def sms_statuses(world: World, email: str) -> list[str]:
    """Every SMS status the person's numbers ever had in AN, oldest first."""
    statuses = []
    for snapshot in world.an.history(email):
        for phone in snapshot.get("phone_numbers") or []:
            statuses.append(phone.get("status"))
    return statuses


def scenario(world: World) -> str:
    world.populate(petitions=2, signatures=10, seed=41)
    slug = next(p["slug"] for p in world.cs.petitions() if p["launched"])
    sign(world, slug, "answers@example.org", join_organisation=True,
         additional_fields={"ward": "North", "age": 42, "topics": ["parks", "buses"], "blank": ""},
         phone_number="0412 345 678", opt_in_sms=True)
    sign(world, slug, "sms.only@example.org", join_organisation=False,
         phone_number="+61 413 000 111", opt_in_sms=True)
    sign(world, slug, "no.sms@example.org", join_organisation=True,
         phone_number="0414 222 333", opt_in_sms=False)
    sign(world, slug, "bad.number@example.org", join_organisation=True, phone_number="123-456",
         additional_fields={"ward": "South"})
    return slug


def test_custom_fields_and_the_phone_number_as_a_custom_field(tmp_path: Path) -> None:
    for world in make_world(tmp_path):
        scenario(world)
        daemon = world.csand().start()
        daemon.wait_drained()
        world.check()
        answers = world.an.person("answers@example.org")
        assert answers["custom_fields"] == {"ward": "North", "age": "42", "topics": "parks, buses",
                                            "phone_number": "0412 345 678"}
        assert world.an.person("bad.number@example.org")["custom_fields"] == {
            "ward": "South", "phone_number": "123-456"}
        for email in ("answers@example.org", "sms.only@example.org", "no.sms@example.org"):
            assert not world.an.person(email).get("phone_numbers")
        code, _ = daemon.terminate()
        assert code == 0


def test_mobile_numbers_in_e164_and_sms_only_with_an_explicit_opt_in(tmp_path: Path) -> None:
    for world in make_world(tmp_path):
        scenario(world)
        daemon = world.csand(sync={"phone": "mobile", "phone_country": "AU",
                                   "custom_fields": {"ward": "Ward"}}).start()
        daemon.wait_drained()
        world.check()
        answers = world.an.person("answers@example.org")
        assert answers["custom_fields"] == {"Ward": "North"}  # renamed; the others not chosen
        assert [(p["number"], p["status"]) for p in answers["phone_numbers"]] == [
            ("+61412345678", "subscribed")]
        # An SMS opt-in without an email opt-in: the number, never a subscription.
        assert "subscribed" not in sms_statuses(world, "sms.only@example.org")
        assert world.an.person("sms.only@example.org")["phone_numbers"][0]["number"] \
            == "+61413000111"
        assert "subscribed" not in sms_statuses(world, "no.sms@example.org")
        # A number that is not one is left out; the rest of the signature synced.
        bad = world.an.person("bad.number@example.org")
        assert not bad.get("phone_numbers") and bad["custom_fields"] == {"Ward": "South"}
        assert any(e.get("event") == "sync.phone_dropped" for e in daemon.log_events())
        assert not any("123-456" in line or "0412" in line for line in daemon.log_lines())
        code, _ = daemon.terminate()
        assert code == 0
