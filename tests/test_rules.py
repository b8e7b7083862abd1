"""The mapping rules (csand.sync.rules), driven against a small in-memory Action Network.

The fake AN below applies each operation with the semantics AN documents for its helpers
(docs/actionnetwork-api.md); the driver folds every answer back into ``Progress`` exactly as the
worker does. Every row of the subscription decision table (docs/rules.md §2) is checked for a
signer and for a petition creator, with and without csand's own knowledge of the person.
"""

from __future__ import annotations

import itertools
from dataclasses import FrozenInstanceError, dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csand.model import (
    CREATOR_TAG,
    SIGNER_TAG,
    Activity,
    ActivityKind,
    PetitionRef,
    creator_activity,
    global_unsubscribe_activity,
    signature_activity,
)
from csand.sync.rules import (
    FIELD_NAMES,
    MAX_STEPS,
    Dead,
    Done,
    EnsurePetition,
    EnsureTags,
    Fields,
    LookupPerson,
    Operation,
    Person,
    Progress,
    RecordSignature,
    SetStatus,
    SignAs,
    Signup,
    Step,
    after_lookup,
    after_person_write,
    after_status,
    after_unsubscribe,
    fields_for,
    forget_person,
    knowledge_to_keep,
    next_step,
    opts_in,
)

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EMAIL = "ann@example.org"
CATEGORY = "controlshift:Avoiding Taxes"

SUBSCRIBED = "subscribed"
UNSUBSCRIBED = "unsubscribed"
ABSENT = "absent"


def petition(cs_id: int = 12) -> PetitionRef:
    return PetitionRef(
        cs_id=cs_id,
        slug=f"petition-{cs_id}",
        title=f"Petition {cs_id}",
        url=f"https://cs.example.org/petitions/petition-{cs_id}",
        identifier=f"controlshift-org:petition-{cs_id}",
        creator_email="creator@example.org",
    )


def signer(
    *, opted_in: bool = False, email: str | None = EMAIL, pet: PetitionRef | None = None,
    fields_at: datetime | None = T0, first_name: str | None = "Ann",
    last_name: str | None = "Lee", postcode: str | None = "2000", source_id: int = 1,
    raw_email: str | None = None, no_petition: bool = False,
) -> Activity:
    return Activity(
        kind=ActivityKind.SIGNATURE,
        source_key=f"signature:{source_id}",
        email=email,
        raw_email=raw_email if raw_email is not None else email,
        first_name=first_name,
        last_name=last_name,
        postcode=postcode,
        opted_in=opted_in,
        occurred_at=fields_at,
        fields_at=fields_at,
        petition=None if no_petition else (pet or petition()),
        tags=(SIGNER_TAG, CATEGORY),
    )


def creator(
    *, opted_in: bool = False, email: str | None = EMAIL, pet: PetitionRef | None = None,
    fields_at: datetime | None = T0, first_name: str | None = "Ann",
    last_name: str | None = "Lee", postcode: str | None = "2000", no_petition: bool = False,
) -> Activity:
    pet = pet or petition()
    return Activity(
        kind=ActivityKind.PETITION_CREATED,
        source_key=f"petition:{pet.cs_id}:creator",
        email=email,
        raw_email=email,
        first_name=first_name,
        last_name=last_name,
        postcode=postcode,
        opted_in=opted_in,
        occurred_at=fields_at,
        fields_at=fields_at,
        petition=None if no_petition else pet,
        tags=(CREATOR_TAG, CATEGORY),
    )


def unsubscribe(email: str | None = EMAIL, at: datetime = T0, uid: int = 1) -> Activity:
    return global_unsubscribe_activity(uid, email, at)


def action(kind: str, **kwargs) -> Activity:
    return signer(**kwargs) if kind == "signature" else creator(**kwargs)


# ---------------------------------------------------------------------------------------------
# A fake Action Network with the documented helper semantics
# ---------------------------------------------------------------------------------------------


@dataclass
class ANPerson:
    uuid: str
    email: str
    status: str
    tags: set[str] = field(default_factory=set)
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class ANPetition:
    uuid: str
    identifier: str
    creator_uuid: str | None


class FakeAN:
    def __init__(self, tags: set[str] | None = None) -> None:
        self.people: dict[str, ANPerson] = {}
        self.tags: set[str] = set(tags or ())
        self.petitions: dict[str, ANPetition] = {}  # by identifier
        self.signatures: list[tuple[str, str]] = []  # (petition uuid, person uuid), one per pair
        self.requests: list[str] = []
        self._ids = itertools.count(1)

    # -- setup --
    def add_person(self, email: str, status: str, **names: str) -> ANPerson:
        person = ANPerson(uuid=f"person-{next(self._ids)}", email=email, status=status,
                          names=dict(names))
        self.people[email] = person
        return person

    def mirror(self, pet: PetitionRef) -> str:
        uuid = f"petition-{next(self._ids)}"
        self.petitions[pet.identifier] = ANPetition(uuid, pet.identifier, None)
        return uuid

    def status_of(self, email: str) -> str:
        person = self.people.get(email)
        return person.status if person else ABSENT

    def _by_uuid(self, uuid: str) -> ANPerson:
        matches = [p for p in self.people.values() if p.uuid == uuid]
        assert matches, f"no AN person {uuid}"
        return matches[0]

    def _petition_uuids(self) -> set[str]:
        return {p.uuid for p in self.petitions.values()}

    def _upsert(self, fields: Fields, tags: tuple[str, ...]) -> tuple[ANPerson, bool]:
        # AN silently ignores unknown tag names: csand must create every tag before using it.
        unknown = [t for t in tags if t not in self.tags]
        assert not unknown, f"tags used before they exist in AN (AN would ignore them): {unknown}"
        person = self.people.get(fields.email)
        new = person is None
        if person is None:
            person = ANPerson(uuid=f"person-{next(self._ids)}", email=fields.email, status="")
            self.people[fields.email] = person
        for key in ("given_name", "family_name", "postal_code"):
            value = getattr(fields, key)
            if value:  # an omitted member never blanks what AN has
                person.names[key] = value
        person.tags |= set(tags)
        return person, new

    def _sign(self, petition_uuid: str, person_uuid: str) -> None:
        assert petition_uuid in self._petition_uuids(), f"no AN petition {petition_uuid}"
        if (petition_uuid, person_uuid) not in self.signatures:  # signing again overwrites
            self.signatures.append((petition_uuid, person_uuid))

    # -- operations --
    def ensure_tags(self, op: EnsureTags) -> None:
        for name in op.names:
            if name not in self.tags:
                self.requests.append(f"create tag {name}")
                self.tags.add(name)

    def ensure_petition(self, op: EnsurePetition) -> str:
        existing = self.petitions.get(op.petition.identifier)
        if existing:
            return existing.uuid
        self.requests.append("create petition")
        uuid = f"petition-{next(self._ids)}"
        self.petitions[op.petition.identifier] = ANPetition(uuid, op.petition.identifier,
                                                            op.creator_uuid)
        return uuid

    def lookup(self, op: LookupPerson) -> tuple[str | None, bool | None]:
        self.requests.append("lookup")
        person = self.people.get(op.email)
        return (person.uuid, person.status == SUBSCRIBED) if person else (None, None)

    def signup(self, op: Signup) -> tuple[str, bool]:
        """Person Signup Helper."""
        self.requests.append("signup")
        assert op.status in (None, SUBSCRIBED, UNSUBSCRIBED), op.status
        person, new = self._upsert(op.fields, op.tags)
        if new:
            person.status = UNSUBSCRIBED if op.status == UNSUBSCRIBED else SUBSCRIBED
        elif op.status is not None:
            person.status = op.status
        return person.uuid, person.status == SUBSCRIBED

    def record_signature(self, op: RecordSignature) -> str:
        """Record Signature Helper: a person new to the list is always subscribed."""
        self.requests.append("record signature")
        assert op.status in (None, SUBSCRIBED), op.status
        assert op.petition_uuid in self._petition_uuids()
        person, new = self._upsert(op.fields, op.tags)
        if new or op.status == SUBSCRIBED:
            person.status = SUBSCRIBED
        self._sign(op.petition_uuid, person.uuid)
        return person.uuid

    def sign_as(self, op: SignAs) -> None:
        """A plain signature: cannot create or subscribe anyone."""
        self.requests.append("sign as")
        self._by_uuid(op.person_uuid)
        self._sign(op.petition_uuid, op.person_uuid)

    def set_status(self, op: SetStatus) -> None:
        self.requests.append("set status")
        assert op.status in (SUBSCRIBED, UNSUBSCRIBED)
        person = self._by_uuid(op.person_uuid)
        assert person.email == op.email
        person.status = op.status


def apply(an: FakeAN, activity: Activity, progress: Progress, step: Operation) -> Progress:
    """Perform one operation and fold the answer back, the way the worker does."""
    match step:
        case EnsureTags():
            an.ensure_tags(step)
            return replace(progress, tags_ready=True)
        case EnsurePetition():
            return replace(progress, petition_uuid=an.ensure_petition(step))
        case LookupPerson():
            uuid, subscribed = an.lookup(step)
            return after_lookup(progress, uuid, subscribed)
        case Signup():
            uuid, subscribed = an.signup(step)
            return after_person_write(progress, activity, step, uuid, subscribed)
        case RecordSignature():
            uuid = an.record_signature(step)
            return after_person_write(progress, activity, step, uuid, None)
        case SignAs():
            an.sign_as(step)
            return replace(progress, signed=True)
        case SetStatus():
            an.set_status(step)
            return after_status(progress, step.status)
    raise AssertionError(f"unexpected step {step!r}")


@dataclass
class Run:
    progress: Progress
    final: Done | Dead
    ops: list[Operation]
    requests: list[str]


def drive(an: FakeAN, activity: Activity, knowledge: Person | None = None) -> Run:
    progress = Progress(person=knowledge or Person())
    ops: list[Operation] = []
    start = len(an.requests)
    for _ in range(MAX_STEPS):
        step: Step = next_step(activity, progress)
        if isinstance(step, Done | Dead):
            if isinstance(step, Done) and activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE:
                progress = after_unsubscribe(progress, activity)  # as the worker does
            return Run(progress, step, ops, an.requests[start:])
        ops.append(step)
        progress = apply(an, activity, progress, step)
    pytest.fail(f"plan did not finish within {MAX_STEPS} steps: {ops}")


def remember(knowledge: Person, run: Run) -> Person:
    """What csand stores about the person after an item (as the worker records it)."""
    return run.progress.person if run.progress.person.exists is not None else knowledge


def start_an(state: str, *, tags_ready: bool = True, mirrored: bool = True) -> FakeAN:
    an = FakeAN(tags={SIGNER_TAG, CREATOR_TAG, CATEGORY} if tags_ready else set())
    if state != ABSENT:
        an.add_person(EMAIL, state, given_name="Old", family_name="Name", postal_code="1000")
    if mirrored:
        an.mirror(petition())
    return an


def knowledge_for(an: FakeAN, state: str, known: bool) -> Person:
    if not known:
        return Person()
    if state == ABSENT:
        return Person(exists=False)
    person = an.people[EMAIL]
    return Person(exists=True, uuid=person.uuid, subscribed=person.status == SUBSCRIBED)


# ---------------------------------------------------------------------------------------------
# The decision table, row by row
# ---------------------------------------------------------------------------------------------

DECISION_TABLE = [
    # (person in AN before, opted in on CS, AN status afterwards)
    (ABSENT, True, SUBSCRIBED),
    (ABSENT, False, UNSUBSCRIBED),
    (SUBSCRIBED, True, SUBSCRIBED),
    (SUBSCRIBED, False, SUBSCRIBED),
    (UNSUBSCRIBED, True, SUBSCRIBED),
    (UNSUBSCRIBED, False, UNSUBSCRIBED),
]


@pytest.mark.parametrize("known", [False, True], ids=["unknown-to-csand", "known-to-csand"])
@pytest.mark.parametrize("kind", ["signature", "creator"])
@pytest.mark.parametrize(("before", "opted_in", "after"), DECISION_TABLE,
                         ids=[f"{b}-{'optin' if o else 'no-optin'}" for b, o, _ in DECISION_TABLE])
def test_decision_table(before: str, opted_in: bool, after: str, kind: str, known: bool) -> None:
    an = start_an(before)
    activity = action(kind, opted_in=opted_in)
    run = drive(an, activity, knowledge_for(an, before, known))

    assert isinstance(run.final, Done), run.final
    assert an.status_of(EMAIL) == after
    person = an.people[EMAIL]
    assert set(activity.tags) <= person.tags
    # the action is in the person's Action History: one signature on the mirrored petition
    pet_uuid = an.petitions[petition().identifier].uuid
    assert an.signatures == [(pet_uuid, person.uuid)]
    assert len(an.petitions) == 1
    # csand's own record of the person matches AN
    assert run.progress.person.exists is True
    assert run.progress.person.uuid == person.uuid
    assert run.progress.person.subscribed in (None, after == SUBSCRIBED)
    if before != ABSENT and not opted_in:
        assert run.progress.person.subscribed in (None, before == SUBSCRIBED)
    else:
        assert run.progress.person.subscribed is (after == SUBSCRIBED)
    assert run.final.note.startswith("signer" if kind == "signature" else "creator")


@pytest.mark.parametrize("kind", ["signature", "creator"])
@pytest.mark.parametrize("before", [ABSENT, SUBSCRIBED, UNSUBSCRIBED])
def test_not_opted_in_unknown_person_is_looked_up_before_any_write(kind: str, before: str) -> None:
    an = start_an(before)
    run = drive(an, action(kind, opted_in=False))
    person_ops = [op for op in run.ops if isinstance(op, LookupPerson | Signup | RecordSignature)]
    assert isinstance(person_ops[0], LookupPerson)
    assert run.requests[0] == "lookup"


@pytest.mark.parametrize("kind", ["signature", "creator"])
def test_not_opted_in_absent_person_is_created_unsubscribed(kind: str) -> None:
    an = start_an(ABSENT)
    run = drive(an, action(kind, opted_in=False))
    writes = [op for op in run.ops if isinstance(op, Signup | RecordSignature)]
    assert len(writes) == 1
    assert isinstance(writes[0], Signup) and writes[0].status == UNSUBSCRIBED
    assert not any(isinstance(op, RecordSignature) for op in run.ops)


@pytest.mark.parametrize("kind", ["signature", "creator"])
@pytest.mark.parametrize("before", [SUBSCRIBED, UNSUBSCRIBED])
def test_not_opted_in_present_person_is_written_without_a_status(kind: str, before: str) -> None:
    an = start_an(before)
    run = drive(an, action(kind, opted_in=False))
    writes = [op for op in run.ops if isinstance(op, Signup | RecordSignature)]
    assert [w.status for w in writes] == [None]


@pytest.mark.parametrize("kind", ["signature", "creator"])
@pytest.mark.parametrize("before", [ABSENT, SUBSCRIBED, UNSUBSCRIBED])
def test_opted_in_needs_no_lookup(kind: str, before: str) -> None:
    an = start_an(before)
    run = drive(an, action(kind, opted_in=True))
    assert not any(isinstance(op, LookupPerson) for op in run.ops)
    writes = [op for op in run.ops if isinstance(op, Signup | RecordSignature)]
    assert [w.status for w in writes] == [SUBSCRIBED]


@pytest.mark.parametrize("kind", ["signature", "creator"])
@pytest.mark.parametrize("opted_in", [True, False])
@pytest.mark.parametrize("before", [ABSENT, SUBSCRIBED])
def test_tags_are_ensured_before_any_operation_that_uses_them(
    kind: str, opted_in: bool, before: str
) -> None:
    an = start_an(before, tags_ready=False)
    run = drive(an, action(kind, opted_in=opted_in))
    assert isinstance(run.ops[0], EnsureTags)
    assert set(run.ops[0].names) == {SIGNER_TAG if kind == "signature" else CREATOR_TAG, CATEGORY}
    tag_users = [i for i, op in enumerate(run.ops) if isinstance(op, Signup | RecordSignature)]
    assert tag_users and min(tag_users) > 0
    for i in tag_users:
        assert run.ops[i].tags == action(kind).tags
    assert set(action(kind).tags) <= an.people[EMAIL].tags


def test_creator_is_written_before_the_petition_is_mirrored_and_linked() -> None:
    an = start_an(ABSENT, mirrored=False)
    run = drive(an, creator(opted_in=True))
    kinds = [type(op) for op in run.ops]
    assert kinds == [EnsureTags, Signup, EnsurePetition, SignAs]
    ensure = run.ops[2]
    assert isinstance(ensure, EnsurePetition)
    assert ensure.creator_uuid == an.people[EMAIL].uuid
    mirrored = an.petitions[petition().identifier]
    assert mirrored.creator_uuid == an.people[EMAIL].uuid
    assert an.signatures == [(mirrored.uuid, an.people[EMAIL].uuid)]


def test_signer_mirrors_the_petition_without_a_creator_link_of_its_own() -> None:
    an = start_an(ABSENT, mirrored=False)
    run = drive(an, signer(opted_in=True))
    ensure = [op for op in run.ops if isinstance(op, EnsurePetition)]
    assert len(ensure) == 1 and ensure[0].creator_uuid is None
    assert ensure[0].petition == petition()


def test_petition_is_mirrored_once_for_many_signers() -> None:
    an = start_an(ABSENT, mirrored=False)
    for i in range(5):
        drive(an, signer(email=f"p{i}@example.org", opted_in=i % 2 == 0, source_id=i))
    assert len(an.petitions) == 1
    assert an.requests.count("create petition") == 1
    assert len(an.signatures) == 5


# ---------------------------------------------------------------------------------------------
# Request counts: what each plan costs in AN requests
# ---------------------------------------------------------------------------------------------


def test_opted_in_signer_with_mirrored_petition_and_ready_tags_costs_one_request() -> None:
    an = start_an(ABSENT)
    run = drive(an, signer(opted_in=True))
    assert run.requests == ["record signature"]
    assert [type(op) for op in run.ops] == [EnsureTags, EnsurePetition, RecordSignature]
    assert an.status_of(EMAIL) == SUBSCRIBED


@pytest.mark.parametrize(
    ("before", "known", "expected"),
    [
        (ABSENT, False, ["lookup", "signup", "sign as"]),
        (SUBSCRIBED, False, ["lookup", "record signature"]),
        (UNSUBSCRIBED, False, ["lookup", "record signature"]),
        (ABSENT, True, ["signup", "sign as"]),
        (SUBSCRIBED, True, ["record signature"]),
        (UNSUBSCRIBED, True, ["record signature"]),
    ],
)
def test_not_opted_in_signer_request_counts(before: str, known: bool, expected: list[str]) -> None:
    an = start_an(before)
    run = drive(an, signer(opted_in=False), knowledge_for(an, before, known))
    assert run.requests == expected


def test_request_counts_headline_numbers() -> None:
    an = start_an(ABSENT)
    assert len(drive(an, signer(opted_in=False)).requests) == 3  # unknown, absent
    an = start_an(UNSUBSCRIBED)
    assert len(drive(an, signer(opted_in=False)).requests) == 2  # unknown, present
    an = start_an(UNSUBSCRIBED)
    known = knowledge_for(an, UNSUBSCRIBED, True)
    assert len(drive(an, signer(opted_in=False), known).requests) == 1  # known, present


def test_first_run_creates_tags_and_petition_once() -> None:
    an = start_an(ABSENT, tags_ready=False, mirrored=False)
    run = drive(an, signer(opted_in=True))
    assert sorted(run.requests) == sorted(
        [f"create tag {SIGNER_TAG}", f"create tag {CATEGORY}", "create petition",
         "record signature"]
    )
    second = drive(an, signer(email="bob@example.org", opted_in=True, source_id=2))
    assert second.requests == ["record signature"]


def test_second_activity_reuses_what_csand_learned() -> None:
    an = start_an(ABSENT)
    first = drive(an, signer(opted_in=False))
    knowledge = remember(Person(), first)
    second = drive(an, signer(opted_in=False, pet=petition(13), source_id=2), knowledge)
    assert "lookup" not in second.requests
    assert second.requests == ["create petition", "record signature"]
    assert an.status_of(EMAIL) == UNSUBSCRIBED


# ---------------------------------------------------------------------------------------------
# Global unsubscribe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before", [SUBSCRIBED, UNSUBSCRIBED])
def test_global_unsubscribe_known_present_puts_unsubscribed(before: str) -> None:
    an = start_an(before)
    knowledge = knowledge_for(an, before, True)
    run = drive(an, unsubscribe(), knowledge)
    assert run.ops == [SetStatus(an.people[EMAIL].uuid, EMAIL, UNSUBSCRIBED)]
    assert run.requests == ["set status"]
    assert isinstance(run.final, Done)
    assert an.status_of(EMAIL) == UNSUBSCRIBED
    assert run.progress.person.subscribed is False


@pytest.mark.parametrize("before", [SUBSCRIBED, UNSUBSCRIBED])
def test_global_unsubscribe_unknown_present_looks_up_first(before: str) -> None:
    an = start_an(before)
    run = drive(an, unsubscribe())
    assert isinstance(run.ops[0], LookupPerson)
    assert run.requests == ["lookup", "set status"]
    assert an.status_of(EMAIL) == UNSUBSCRIBED


def test_global_unsubscribe_present_without_uuid_looks_up_first() -> None:
    an = start_an(SUBSCRIBED)
    run = drive(an, unsubscribe(), Person(exists=True, uuid=None, subscribed=True))
    assert run.requests == ["lookup", "set status"]
    assert an.status_of(EMAIL) == UNSUBSCRIBED


def test_global_unsubscribe_unknown_absent_creates_nobody() -> None:
    an = start_an(ABSENT)
    run = drive(an, unsubscribe())
    assert run.ops == [LookupPerson(EMAIL)]
    assert isinstance(run.final, Done)
    assert "never creates" in run.final.note
    assert an.people == {}
    assert run.progress.person.exists is False


def test_global_unsubscribe_known_absent_costs_nothing() -> None:
    an = start_an(ABSENT)
    run = drive(an, unsubscribe(), Person(exists=False))
    assert run.ops == [] and run.requests == []
    assert isinstance(run.final, Done)
    assert an.people == {}


def test_global_unsubscribe_needs_no_petition() -> None:
    activity = unsubscribe()
    assert activity.petition is None
    assert isinstance(next_step(activity, Progress()), LookupPerson)


def test_set_status_gone_starts_over_from_a_lookup() -> None:
    """AN answered 404 for the uuid csand knew: forget it and look the person up again."""
    activity = unsubscribe()
    p = Progress(person=Person(exists=True, uuid="stale", subscribed=True))
    assert next_step(activity, p) == SetStatus("stale", EMAIL, UNSUBSCRIBED)
    p = forget_person(p)
    assert p.person.exists is None and p.person.uuid is None
    assert next_step(activity, p) == LookupPerson(EMAIL)


@pytest.mark.parametrize("opted_in", [False, True])
def test_sign_as_gone_replans_instead_of_crashing(opted_in: bool) -> None:
    activity = creator(opted_in=opted_in)
    p = Progress(
        person=Person(exists=True, uuid="stale", subscribed=opted_in),
        petition_uuid="petition-1", tags_ready=True, person_written=True,
    )
    assert next_step(activity, p) == SignAs("petition-1", "stale")
    step = next_step(activity, forget_person(p))
    assert isinstance(step, LookupPerson | Signup)


# ---------------------------------------------------------------------------------------------
# Records that can never sync
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [signer, creator, unsubscribe], ids=["signer", "creator", "unsub"])
def test_missing_email_is_dead(make) -> None:
    step = next_step(make(email=None), Progress())
    assert isinstance(step, Dead)
    assert "email" in step.reason


@pytest.mark.parametrize("raw", ["not-an-email", "ann@example", "ann lee@example.org", "@x.org"])
@pytest.mark.parametrize("kind", ["signature", "creator", "unsub"])
def test_invalid_email_is_dead_with_the_address_in_the_reason(raw: str, kind: str) -> None:
    if kind == "unsub":
        activity = unsubscribe(raw)
    else:
        activity = replace(action(kind), email=raw.strip().lower(), raw_email=raw)
    step = next_step(activity, Progress())
    assert isinstance(step, Dead)
    assert raw in step.reason
    assert "email" in step.reason


@pytest.mark.parametrize("kind", ["signature", "creator"])
def test_activity_without_petition_is_dead(kind: str) -> None:
    step = next_step(action(kind, no_petition=True), Progress())
    assert isinstance(step, Dead)
    assert "petition" in step.reason


def test_dead_activity_writes_nothing() -> None:
    an = start_an(ABSENT)
    run = drive(an, signer(email=None))
    assert isinstance(run.final, Dead)
    assert run.ops == [] and an.requests == []


# ---------------------------------------------------------------------------------------------
# Field precedence
# ---------------------------------------------------------------------------------------------


def all_set_at(at: datetime) -> dict[str, datetime]:
    return {name: at for name in FIELD_NAMES}


def test_fields_of_a_newer_or_first_activity_are_sent() -> None:
    activity = signer(fields_at=T0)
    full = Fields(email=EMAIL, given_name="Ann", family_name="Lee", postal_code="2000")
    assert fields_for(activity, Person()) == full
    assert fields_for(activity, Person(exists=True, fields_at=all_set_at(T0))) == full
    earlier = all_set_at(T0 - timedelta(days=1))
    assert fields_for(activity, Person(exists=True, fields_at=earlier)) == full


def test_an_older_activity_sends_only_the_email() -> None:
    activity = signer(fields_at=T0 - timedelta(seconds=1))
    known = Person(exists=True, fields_at=all_set_at(T0))
    assert fields_for(activity, known) == Fields(email=EMAIL)


def test_an_older_activity_fills_only_fields_no_newer_activity_set() -> None:
    activity = signer(fields_at=T0 - timedelta(days=1))
    known = Person(exists=True, fields_at={"given_name": T0})
    assert fields_for(activity, known) == Fields(email=EMAIL, family_name="Lee",
                                                 postal_code="2000")


def test_an_undated_activity_never_overwrites_a_dated_field() -> None:
    activity = signer(fields_at=None)
    known = Person(exists=True, fields_at={"postal_code": T0})
    assert fields_for(activity, known) == Fields(email=EMAIL, given_name="Ann",
                                                 family_name="Lee")


def test_fields_default_to_none() -> None:
    f = Fields(email=EMAIL)
    assert (f.given_name, f.family_name, f.postal_code) == (None, None, None)
    with pytest.raises(FrozenInstanceError):
        f.given_name = "x"  # type: ignore[misc]


def test_missing_fields_are_none_and_never_blank_an() -> None:
    an = start_an(SUBSCRIBED)
    activity = signer(first_name=None, last_name=None, postcode=None)
    run = drive(an, activity)
    writes = [op for op in run.ops if isinstance(op, Signup | RecordSignature)]
    assert writes[0].fields == Fields(email=EMAIL)
    assert an.people[EMAIL].names == {"given_name": "Old", "family_name": "Name",
                                      "postal_code": "1000"}
    assert dict(run.progress.person.fields_at) == {}  # nothing sent, no precedence claimed


def test_blank_cs_fields_reach_rules_as_none() -> None:
    pet = {"id": 12, "slug": "s", "title": "T", "categories": []}
    sig = {"id": 1, "email": EMAIL, "first_name": "  ", "last_name": "", "postcode": None,
           "created_at": "2024-05-01T12:00:00Z"}
    activity = signature_activity(sig, pet, "org")
    assert fields_for(activity, Person()) == Fields(email=EMAIL)


def test_older_activity_discovered_later_keeps_newer_fields_but_lands_tags_and_signature() -> None:
    an = start_an(ABSENT)
    newer = signer(fields_at=T0, first_name="Annie", last_name="Lee-Smith", postcode="3000",
                   opted_in=True)
    older = creator(fields_at=T0 - timedelta(days=30), first_name="Ann", last_name="Lee",
                    postcode="2000", pet=petition(7))
    knowledge = remember(Person(), drive(an, newer))
    run = drive(an, older, knowledge)
    assert isinstance(run.final, Done)
    person = an.people[EMAIL]
    assert person.names == {"given_name": "Annie", "family_name": "Lee-Smith",
                            "postal_code": "3000"}
    assert {SIGNER_TAG, CREATOR_TAG, CATEGORY} <= person.tags
    assert len(an.signatures) == 2
    assert dict(run.progress.person.fields_at) == all_set_at(T0)
    assert person.status == SUBSCRIBED


def test_after_person_write_records_when_each_sent_field_was_set() -> None:
    activity = signer(fields_at=T0)
    op = Signup(Fields(email=EMAIL, given_name="Ann"), None, activity.tags)
    earlier = T0 - timedelta(days=1)
    p = Progress(person=Person(exists=True, uuid="u",
                               fields_at={"given_name": earlier, "postal_code": earlier}))
    out = after_person_write(p, activity, op, "u", None).person.fields_at
    assert dict(out) == {"given_name": T0, "postal_code": earlier}
    assert dict(p.person.fields_at) == {"given_name": earlier, "postal_code": earlier}
    email_only = Signup(Fields(email=EMAIL), None, activity.tags)
    assert dict(after_person_write(p, activity, email_only, "u", None).person.fields_at) == {
        "given_name": earlier, "postal_code": earlier}


# ---------------------------------------------------------------------------------------------
# The folds
# ---------------------------------------------------------------------------------------------


def test_after_lookup() -> None:
    p = Progress(person=Person(fields_at={"given_name": T0}))
    found = after_lookup(p, "u1", True)
    assert (found.person.exists, found.person.uuid, found.person.subscribed) == (True, "u1", True)
    missing = after_lookup(p, None, None)
    assert (missing.person.exists, missing.person.uuid, missing.person.subscribed) == (
        False, None, None)
    assert found.person.fields_at == missing.person.fields_at == p.person.fields_at


@pytest.mark.parametrize(
    ("status", "answer", "prior", "expected"),
    [
        (SUBSCRIBED, None, None, True),
        (UNSUBSCRIBED, None, None, False),
        (None, None, False, False),
        (None, None, None, None),
        (None, True, False, True),  # AN's answer wins
        (UNSUBSCRIBED, True, None, True),
    ],
)
def test_after_person_write_status(status, answer, prior, expected) -> None:
    activity = signer()
    op = Signup(Fields(email=EMAIL), status, activity.tags)
    p = Progress(person=Person(exists=True, uuid="old", subscribed=prior))
    out = after_person_write(p, activity, op, "new", answer)
    assert out.person.subscribed is expected
    assert out.person.uuid == "new" and out.person.exists is True
    assert out.person_written and not out.signed


def test_after_person_write_record_signature_marks_signed() -> None:
    activity = signer()
    op = RecordSignature("pet", Fields(email=EMAIL), None, activity.tags)
    out = after_person_write(Progress(), activity, op, "u", None)
    assert out.signed and out.person_written


@pytest.mark.parametrize(("status", "subscribed"), [(SUBSCRIBED, True), (UNSUBSCRIBED, False)])
def test_after_status(status: str, subscribed: bool) -> None:
    p = after_status(Progress(person=Person(exists=True, uuid="u")), status)
    assert p.person.subscribed is subscribed and p.person_written


# ---------------------------------------------------------------------------------------------
# Properties over sequences of activities
# ---------------------------------------------------------------------------------------------

PETITIONS = [petition(20), petition(21), petition(22)]


@st.composite
def activities(draw) -> Activity:
    kind = draw(st.sampled_from(["signature", "creator", "unsub"]))
    day = draw(st.integers(0, 60))
    at = T0 + timedelta(days=day)
    if kind == "unsub":
        return unsubscribe(at=at, uid=draw(st.integers(1, 10)))
    pet = draw(st.sampled_from(PETITIONS))
    names = st.one_of(st.none(), st.sampled_from(["Ann", "Annie", "A."]))
    kwargs = dict(
        opted_in=draw(st.booleans()), pet=pet, fields_at=at,
        first_name=draw(names), last_name=draw(st.one_of(st.none(), st.just("Lee"))),
        postcode=draw(st.one_of(st.none(), st.just("2000"))),
    )
    if kind == "signature":
        kwargs["source_id"] = draw(st.integers(1, 50))
    return action(kind, **kwargs)


@st.composite
def scenarios(draw, befores: tuple[str, ...] = (ABSENT, SUBSCRIBED, UNSUBSCRIBED)):
    before = draw(st.sampled_from(befores))
    an = FakeAN(tags=draw(st.sampled_from([set(), {SIGNER_TAG}, {SIGNER_TAG, CREATOR_TAG,
                                                                  CATEGORY}])))
    if before != ABSENT:
        an.add_person(EMAIL, before, given_name="Old")
    for pet in PETITIONS:
        if draw(st.booleans()):
            an.mirror(pet)
    # what csand knows must agree with AN (it comes from AN's own answers)
    # per field, when csand set it; only a field AN holds ("Old" given_name) can have a time
    fields_at = draw(st.sampled_from([{}, {"given_name": T0 + timedelta(days=30)}]))
    if before == ABSENT:
        knowledge = draw(st.sampled_from([Person(), Person(exists=False)]))
    else:
        real = an.people[EMAIL]
        knowledge = draw(st.sampled_from([
            Person(),
            Person(exists=True, uuid=real.uuid, subscribed=real.status == SUBSCRIBED),
            Person(exists=True, uuid=real.uuid, subscribed=None),
            Person(exists=True, uuid=None, subscribed=None),
        ]))
    knowledge = replace(knowledge, fields_at=fields_at if knowledge.exists else {})
    acts = draw(st.lists(activities(), min_size=1, max_size=8))
    return before, an, knowledge, acts


@dataclass(frozen=True)
class Consent:
    """The oracle's state: AN's status and the person's consent timeline (CS times)."""

    status: str
    unsubscribed_at: datetime | None = None
    opted_in_at: datetime | None = None  # the latest opt-in applied


def table_status(before: Consent, activity: Activity) -> Consent:
    """docs/rules.md §2 applied to the newest consent only.

    A global unsubscribe unsubscribes a present person, unless an opt-in newer than it was
    applied already (the person acted later). An opt-in counts if it is newer than every
    unsubscribe and every opt-in applied before (an opt-in counts once); otherwise the action
    plans like one without an opt-in.
    """
    def newer(at: datetime | None, *than: datetime | None) -> bool:
        return at is not None and all(t is None or at > t for t in than)

    if activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE:
        at = activity.occurred_at
        latest = at if before.unsubscribed_at is None else max(before.unsubscribed_at, at)
        if newer(before.opted_in_at, at):
            return replace(before, unsubscribed_at=latest)
        status = ABSENT if before.status == ABSENT else UNSUBSCRIBED
        return replace(before, status=status, unsubscribed_at=latest)
    at = activity.opt_in_time
    if activity.opted_in and newer(at, before.unsubscribed_at, before.opted_in_at):
        return replace(before, status=SUBSCRIBED, opted_in_at=at)
    if before.status == ABSENT:
        return replace(before, status=UNSUBSCRIBED)
    return before


def run_sequence(an: FakeAN, knowledge: Person, acts: list[Activity]) -> list[str]:
    statuses = []
    for activity in acts:
        run = drive(an, activity, knowledge)  # fails the test beyond MAX_STEPS
        assert len(run.ops) < MAX_STEPS
        assert isinstance(run.final, Done), run.final
        knowledge = remember(knowledge, run)
        statuses.append(an.status_of(EMAIL))
    return statuses


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_sequence_follows_the_decision_table(scenario) -> None:
    before, an, knowledge, acts = scenario
    expected = Consent(before)
    statuses = run_sequence(an, knowledge, acts)
    for activity, status in zip(acts, statuses, strict=True):
        expected = table_status(expected, activity)
        assert status == expected.status, (activity, statuses)
        if activity.kind is not ActivityKind.GLOBAL_UNSUBSCRIBE:
            person = an.people[EMAIL]
            assert set(activity.tags) <= person.tags
            pet_uuid = an.petitions[activity.petition.identifier].uuid
            assert (pet_uuid, person.uuid) in an.signatures
    # one mirrored petition per CS petition, one signature per person per petition
    assert len({p.identifier for p in an.petitions.values()}) == len(an.petitions)
    assert len(set(an.signatures)) == len(an.signatures)
    assert len(an.people) <= 1


@PROPERTY_SETTINGS
@given(scenarios(befores=(ABSENT,)))
def test_never_opted_in_and_not_present_is_never_subscribed(scenario) -> None:
    _, an, knowledge, acts = scenario
    acts = [replace(a, opted_in=False) for a in acts]
    for status in run_sequence(an, knowledge, acts):
        assert status != SUBSCRIBED


@PROPERTY_SETTINGS
@given(scenarios(befores=(UNSUBSCRIBED,)))
def test_present_unsubscribed_never_opted_in_stays_unsubscribed(scenario) -> None:
    _, an, knowledge, acts = scenario
    acts = [replace(a, opted_in=False) for a in acts]
    assert set(run_sequence(an, knowledge, acts)) == {UNSUBSCRIBED}


@PROPERTY_SETTINGS
@given(scenarios(befores=(SUBSCRIBED,)))
def test_subscribed_stays_subscribed_unless_globally_unsubscribed_last(scenario) -> None:
    _, an, knowledge, acts = scenario
    final = run_sequence(an, knowledge, acts)[-1]
    unsubs = [a for a in acts if a.kind is ActivityKind.GLOBAL_UNSUBSCRIBE]
    if not unsubs:
        assert final == SUBSCRIBED
        return
    # Subscribed at the end iff an opt-in newer than the newest unsubscribe was applied: the
    # order in which csand learnt of them does not matter, only when the person acted.
    newest = max(a.occurred_at for a in unsubs)
    resubscribed = any(a.opted_in and a.opt_in_time > newest for a in acts
                       if a.kind is not ActivityKind.GLOBAL_UNSUBSCRIBE)
    assert final == (SUBSCRIBED if resubscribed else UNSUBSCRIBED)


@PROPERTY_SETTINGS
@given(scenarios())
def test_each_field_follows_the_newest_activity_that_gave_it(scenario) -> None:
    _, an, knowledge, acts = scenario
    actions = [a for a in acts if a.kind is not ActivityKind.GLOBAL_UNSUBSCRIBE]
    before = dict(an.people[EMAIL].names) if EMAIL in an.people else {}
    run_sequence(an, knowledge, acts)
    if not actions:
        return
    names = an.people[EMAIL].names
    attr = {"given_name": "first_name", "family_name": "last_name", "postal_code": "postcode"}
    for name in FIELD_NAMES:
        # candidates: every activity that carried a value, plus what csand set earlier
        candidates = [(a.fields_at, getattr(a, attr[name])) for a in actions
                      if getattr(a, attr[name])]
        if name in knowledge.fields_at:
            candidates.append((knowledge.fields_at[name], before[name]))
        if before.get(name):
            assert names.get(name), f"{name} was blanked"
        if not candidates:
            assert names.get(name) == before.get(name)
            continue
        newest = max(at for at, _ in candidates)
        assert names[name] in {value for at, value in candidates if at == newest}, name


@PROPERTY_SETTINGS
@given(st.data())
def test_plans_terminate_from_any_consistent_progress(data) -> None:
    """Whatever csand already knows or has done, a plan ends within MAX_STEPS."""
    before = data.draw(st.sampled_from([ABSENT, SUBSCRIBED, UNSUBSCRIBED]))
    an = start_an(before, tags_ready=data.draw(st.booleans()), mirrored=data.draw(st.booleans()))
    activity = data.draw(activities())
    knowledge = knowledge_for(an, before, data.draw(st.booleans()))
    run = drive(an, activity, knowledge)
    assert len(run.ops) <= MAX_STEPS
    assert isinstance(run.final, Done)


def test_from_cs_records_to_an() -> None:
    """The model's activities drive the same plans: a real CS record for a new opted-in signer."""
    pet = {"id": 12, "slug": "petition-12", "title": "Petition 12",
           "url": "https://cs.example.org/petitions/petition-12",
           "categories": [{"slug": "avoiding-taxes", "name": "Avoiding Taxes"}],
           "creator": {"email": "creator@example.org"}}
    sig = {"id": 9, "email": " Ann@Example.org ", "first_name": "Ann", "last_name": "Lee",
           "postcode": "2000", "join_organisation": True, "created_at": "2024-05-01T12:00:00Z"}
    an = start_an(ABSENT)
    activity = signature_activity(sig, pet, "org")
    assert activity.petition.identifier == petition().identifier
    run = drive(an, activity)
    assert an.status_of(EMAIL) == SUBSCRIBED
    assert run.requests == ["record signature"]

    an = start_an(ABSENT)
    cre = creator_activity({**pet, "creator": {"email": EMAIL, "first_name": "Ann"}}, "org")
    run = drive(an, cre)
    assert an.status_of(EMAIL) == UNSUBSCRIBED  # REST carries no opt-in for creators


# ---------------------------------------------------------------------------------------------
# An opt-in counts once, at the time it happened
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opted_in", "applied", "unsubscribed", "expected"),
    [
        (True, False, None, True),  # a fresh opt-in
        (False, False, None, False),
        (True, True, None, False),  # the same record synced again (new category, retry)
        (True, False, T0 + timedelta(days=1), False),  # an org-wide unsubscribe came later
        (True, False, T0 - timedelta(days=1), True),  # the opt-in came after the unsubscribe
        (True, False, T0, False),  # same instant: the unsubscribe wins
    ],
)
def test_opts_in_counts_each_opt_in_once_and_in_time_order(
    opted_in: bool, applied: bool, unsubscribed: datetime | None, expected: bool
) -> None:
    activity = replace(signer(opted_in=opted_in), occurred_at=T0)
    progress = Progress(person=Person(unsubscribed_at=unsubscribed), opt_in_applied=applied)
    assert opts_in(activity, progress) is expected


def test_a_spent_opt_in_plans_like_no_opt_in() -> None:
    activity = replace(signer(opted_in=True), occurred_at=T0)
    ready = Progress(tags_ready=True, petition_uuid="pet", opt_in_applied=True)
    assert next_step(activity, ready) == LookupPerson(EMAIL)


def test_after_unsubscribe_keeps_the_latest_time_and_knowledge_keeps_it() -> None:
    early, late = unsubscribe(at=T0), unsubscribe(at=T0 + timedelta(hours=1))
    p = after_unsubscribe(after_unsubscribe(Progress(), late), early)
    assert p.person.unsubscribed_at == T0 + timedelta(hours=1)
    kept = knowledge_to_keep(replace(p.person, exists=True, subscribed=True, uuid="u"))
    assert (kept.exists, kept.subscribed, kept.uuid) == (None, None, "u")
    assert kept.unsubscribed_at == T0 + timedelta(hours=1)


# ---------------------------------------------------------------------------------------------
# The consent timeline: decided from the times the person acted
# ---------------------------------------------------------------------------------------------


def test_an_opt_in_is_timed_by_confirmation_or_creation_never_by_the_last_edit() -> None:
    """Signed with an opt-in in January; unsubscribed org-wide in March; the signature edited
    in June (a single-petition unsubscribe). The opt-in is January's: it does not count."""
    record = {"id": 1, "email": EMAIL, "join_organisation": True,
              "created_at": "2024-01-02T00:00:00Z", "updated_at": "2024-06-01T00:00:00Z",
              "unsubscribe_at": "2024-06-01T00:00:00Z"}
    activity = signature_activity(record, {"id": 20, "slug": "p", "title": "P"}, "org")
    assert activity.opt_in_time == datetime(2024, 1, 2, tzinfo=UTC)
    assert activity.occurred_at == datetime(2024, 6, 1, tzinfo=UTC)  # still orders the queue
    march = Person(unsubscribed_at=datetime(2024, 3, 1, tzinfo=UTC))
    assert opts_in(activity, Progress(person=march)) is False
    confirmed = signature_activity({**record, "confirmed_at": "2024-04-01T00:00:00Z"},
                                   {"id": 20, "slug": "p", "title": "P"}, "org")
    assert confirmed.opt_in_time == datetime(2024, 4, 1, tzinfo=UTC)
    assert opts_in(confirmed, Progress(person=march)) is True
    not_opted = signature_activity({**record, "join_organisation": None},
                                   {"id": 20, "slug": "p", "title": "P"}, "org")
    assert not_opted.opt_in_time is None


@pytest.mark.parametrize(
    ("opted_in_at", "unsubscribed_at", "expected"),
    [
        (None, None, True),
        (T0 - timedelta(days=1), None, True),  # newer than the last opt-in applied
        (T0, None, False),  # the same opt-in again
        (T0 + timedelta(days=1), None, False),  # an older one found late says nothing new
        (None, T0 - timedelta(days=1), True),
        (T0 - timedelta(days=2), T0 + timedelta(days=1), False),
    ],
)
def test_only_the_newest_opt_in_counts(opted_in_at, unsubscribed_at, expected) -> None:
    activity = replace(signer(opted_in=True), occurred_at=T0, fields_at=T0)
    person = Person(opted_in_at=opted_in_at, unsubscribed_at=unsubscribed_at)
    assert opts_in(activity, Progress(person=person)) is expected


def test_an_opt_in_without_a_time_counts_only_without_consent_history() -> None:
    activity = replace(signer(opted_in=True), occurred_at=None, fields_at=None)
    assert opts_in(activity, Progress()) is True
    assert opts_in(activity, Progress(person=Person(unsubscribed_at=T0))) is False
    assert opts_in(activity, Progress(person=Person(opted_in_at=T0))) is False


@pytest.mark.parametrize(
    ("unsubscribed", "opted_in_at", "changes"),
    [
        (T0, None, True),
        (T0, T0 - timedelta(minutes=5), True),  # the unsubscribe is the newer act
        (T0, T0, True),  # same instant: the unsubscribe wins
        (T0 - timedelta(minutes=5), T0, False),  # 10:05 unsubscribe after a 10:10 opt-in
    ],
)
def test_an_org_wide_unsubscribe_older_than_an_applied_opt_in_changes_nothing(
        unsubscribed, opted_in_at, changes) -> None:
    activity = unsubscribe(at=unsubscribed)
    known = Progress(person=Person(exists=True, uuid="u", subscribed=True,
                                   opted_in_at=opted_in_at))
    step = next_step(activity, known)
    assert isinstance(step, SetStatus) is changes
    if not changes:
        assert step == Done("the person opted in again after this unsubscribe: subscription kept")
        assert after_unsubscribe(known, activity).person.unsubscribed_at == unsubscribed


def test_a_sent_opt_in_moves_the_timeline_forward_only() -> None:
    activity = replace(signer(opted_in=True), fields_at=T0)
    op = RecordSignature("pet", Fields(EMAIL), "subscribed", ())
    later = T0 + timedelta(days=3)
    p = Progress(person=Person(opted_in_at=later))
    assert after_person_write(p, activity, op, "u", None).person.opted_in_at == later
    assert after_person_write(Progress(), activity, op, "u", None).person.opted_in_at == T0
    quiet = RecordSignature("pet", Fields(EMAIL), None, ())
    assert after_person_write(Progress(), activity, quiet, "u", None).person.opted_in_at is None
    assert knowledge_to_keep(Person(opted_in_at=T0)).opted_in_at == T0
