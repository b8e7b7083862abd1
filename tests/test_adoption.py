"""The adoption rule (csand.sync.adoption.match): pure, table-driven, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csand.model import PetitionRef, petition_identifier
from csand.sync.adoption import (
    ADOPT,
    AMBIGUOUS,
    CREATE,
    ANPetition,
    match,
    named_slugs,
    title_key,
)

ORG = "org"
HOSTED = "Controlshift Petition"
CS = "https://demo.controlshift.app/petitions"


def ref(cs_id: int = 1, title: str = "Save the library", slug: str | None = None) -> PetitionRef:
    slug = slug or f"save-{cs_id}"
    return PetitionRef(cs_id, slug, title, f"{CS}/{slug}", petition_identifier(ORG, cs_id))


def an(uuid: str, title: str = "Save the library", *, origin: str | None = HOSTED,
       description: str | None = None, browser_url: str | None = None,
       identifiers: tuple[str, ...] = ()) -> ANPetition:
    return ANPetition(uuid, title, origin, description, browser_url,
                      (f"action_network:{uuid}", *identifiers))


CASES = [
    # (name, AN petitions, claimed, rivals, kind, uuid or candidates)
    ("none at all", [], {}, [], CREATE, None),
    ("one with the title", [an("a")], {}, [], ADOPT, "a"),
    ("title differs", [an("a", "Save the pool")], {}, [], CREATE, None),
    ("another origin system", [an("a", origin="Action Network")], {}, [], CREATE, None),
    ("no origin system", [an("a", origin=None)], {}, [], CREATE, None),
    ("case and spaces differ", [an("a", "  save THE\tlibrary ")], {}, [], ADOPT, "a"),
    ("two with the title", [an("a"), an("b")], {}, [], AMBIGUOUS, ("a", "b")),
    ("one names this URL", [an("a"), an("b", description=f"Sign: {CS}/save-1")], {}, [],
     ADOPT, "b"),
    ("URL in browser_url", [an("a"), an("b", browser_url=f"{CS}/save-1/")], {}, [], ADOPT, "b"),
    ("URL slug case-insensitive", [an("b", description=f"{CS}/SAVE-1")], {}, [], ADOPT, "b"),
    ("names another petition", [an("a", description=f"{CS}/save-9")], {}, [], CREATE, None),
    ("other URL excluded, one left", [an("a", description=f"{CS}/save-9"), an("b")], {}, [],
     ADOPT, "b"),
    ("two name this URL", [an("a", description=f"{CS}/save-1"),
                           an("b", browser_url=f"{CS}/save-1")], {}, [], AMBIGUOUS, ("a", "b")),
    ("other csand identifier", [an("a", identifiers=(petition_identifier(ORG, 7),))], {}, [],
     CREATE, None),
    ("other csand identifier, one left",
     [an("a", identifiers=(petition_identifier(ORG, 7),)), an("b")], {}, [], ADOPT, "b"),
    ("our identifier already", [an("a"), an("b", identifiers=(petition_identifier(ORG, 1),))],
     {}, [], ADOPT, "b"),
    ("an unrelated identifier is fine", [an("a", identifiers=("other:42",))], {}, [], ADOPT, "a"),
    ("claimed by another petition", [an("a"), an("b")], {"a": 2}, [], ADOPT, "b"),
    ("claimed by this petition", [an("a")], {"a": 1}, [], ADOPT, "a"),
    ("rival with the title, no URLs", [an("a")], {}, [ref(2)], AMBIGUOUS, ("a",)),
    ("rival with another title", [an("a")], {}, [ref(2, "Other")], ADOPT, "a"),
    ("rival already mirrored", [an("a"), an("b")], {"b": 2}, [ref(2)], ADOPT, "a"),
    ("rival named by a URL elsewhere", [an("a"), an("b", description=f"{CS}/save-2")], {},
     [ref(2)], ADOPT, "a"),
    ("rival, but this URL named", [an("a", description=f"{CS}/save-1"), an("b")], {}, [ref(2)],
     ADOPT, "a"),
    ("rival and nothing to adopt", [], {}, [ref(2)], CREATE, None),
    ("the petition itself among rivals", [an("a")], {}, [ref(1)], ADOPT, "a"),
]


@pytest.mark.parametrize(("an_petitions", "claimed", "rivals", "kind", "want"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_match(an_petitions: list[ANPetition], claimed: dict[str, int],
               rivals: list[PetitionRef], kind: str, want: object) -> None:
    found = match(ref(), an_petitions, origin_system=HOSTED, claimed=claimed, rivals=rivals)
    assert found.kind == kind, found.reason
    if kind == ADOPT:
        assert found.uuid == want
    elif kind == AMBIGUOUS:
        assert found.uuid is None and found.candidates == want
        assert "save-1" in found.reason and all(u in found.reason for u in found.candidates)
    else:
        assert found.uuid is None and found.candidates == ()


def test_title_key_normalises_unicode_space_and_case() -> None:
    assert title_key(" Café\u00a0 Ünïcode\n") == title_key("cafe\u0301 ünïcode")
    assert title_key("Straße") == title_key("STRASSE")
    assert title_key(None) == ""


def test_named_slugs_reads_petition_urls_only() -> None:
    text = (f"<p>Sign at <a href=\"{CS}/Save-1?utm=x\">here</a>; see also "
            "https://example.org/about and http://x.example/petitions/b_2/signatures</p>")
    assert named_slugs(text, None) == {"save-1", "b_2"}


def test_from_json_reads_what_an_lists() -> None:
    p = ANPetition.from_json({"title": "T", "origin_system": HOSTED, "description": 5,
                              "browser_url": f"{CS}/x", "identifiers": ["action_network:u", 3]},
                             "u")
    assert (p.title, p.description, p.slugs, p.identifiers) == ("T", None, {"x"}, ("action_network:u",))


# ---------------------------------------------------------------- properties

titles = st.sampled_from(["Save the library", "save the  library", "Stop the motorway", "Other"])
urls = st.sampled_from([None, f"{CS}/save-1", f"{CS}/save-2", "https://example.org/"])
petitions = st.lists(
    st.builds(an, st.sampled_from("abcdefgh"), titles,
              origin=st.sampled_from([HOSTED, HOSTED, "Action Network"]), description=urls,
              browser_url=urls,
              identifiers=st.sampled_from([(), (), (petition_identifier(ORG, 2),)])),
    max_size=6, unique_by=lambda p: p.uuid)
claims = st.dictionaries(st.sampled_from("abcdefgh"), st.sampled_from([1, 2, 3]), max_size=3)
rival_lists = st.lists(st.builds(ref, st.sampled_from([2, 3]), titles), max_size=2)


@settings(max_examples=300, deadline=None)
@given(petitions, claims, rival_lists)
def test_match_properties(an_petitions: list[ANPetition], claimed: dict[str, int],
                          rivals: list[PetitionRef]) -> None:
    petition = ref()
    found = match(petition, an_petitions, origin_system=HOSTED, claimed=claimed, rivals=rivals)
    by_uuid = {p.uuid: p for p in an_petitions}
    assert match(petition, list(reversed(an_petitions)), origin_system=HOSTED, claimed=claimed,
                 rivals=rivals) == found  # the order AN lists them in does not matter
    if found.kind == ADOPT:
        chosen = by_uuid[found.uuid]  # type: ignore[index]
        # Only ever a petition of the hosted integration, with this title, nobody else's.
        assert chosen.origin_system == HOSTED
        assert title_key(chosen.title) == title_key(petition.title)
        assert not chosen.slugs or "save-1" in chosen.slugs
        assert claimed.get(chosen.uuid, 1) == 1
        assert set(chosen.csand_identifiers()) <= {petition.identifier}
    elif found.kind == AMBIGUOUS:
        assert found.uuid is None and found.candidates
        assert all(by_uuid[u].origin_system == HOSTED for u in found.candidates)
    else:
        # Creating is right only when no untaken, unnamed-elsewhere candidate is left.
        assert not [p for p in an_petitions if p.origin_system == HOSTED
                    and title_key(p.title) == title_key(petition.title)
                    and claimed.get(p.uuid, 1) == 1 and not p.csand_identifiers()
                    and (not p.slugs or "save-1" in p.slugs)]
    # Giving a candidate away to another petition never makes this one adopt it.
    if found.kind == ADOPT and found.uuid not in claimed:
        again = match(petition, an_petitions, origin_system=HOSTED,
                      claimed={**claimed, found.uuid: 9}, rivals=rivals)  # type: ignore[dict-item]
        assert again.uuid != found.uuid
