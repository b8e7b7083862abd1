"""The retry policy (csand.retry): one value for every backoff, and the named policies' numbers."""

from __future__ import annotations

import ast
import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import csand.retry
from csand.config import SyncSettings
from csand.retry import (
    CS_RATE_LIMITED,
    CS_TRANSIENT,
    LIMITER_PAUSE,
    OUTBOX,
    WEBHOOK_EVENTS,
    RetryPolicy,
)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)


class _Fixed(random.Random):
    """A random source pinned to one value, to read the jitter bounds exactly."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.value


def raw_delay(policy: RetryPolicy, attempts: int) -> float:
    return min(policy.cap, policy.base * policy.factor ** max(0, attempts - 1))


# ---- the named policies: every backoff csand has, with its numbers --------------------------

# (policy, upper bound of the delays after failures 1..8 (the delays themselves when there is no
#  jitter), fraction that is randomised, the attempts at which it gives up (None: never))
NAMED = {
    "outbox": (OUTBOX, [2, 4, 8, 16, 32, 64, 128, 256], 0.5, 100),
    "webhook events": (WEBHOOK_EVENTS, [1, 2, 4, 8, 16, 32, 64, 128], 0.5, None),
    "cs transient": (CS_TRANSIENT, [1, 2, 4, 8, 16, 30, 30, 30], 0.0, 5),
    "cs rate limited": (CS_RATE_LIMITED, [5, 5, 5, 5, 5, 5, 5, 5], 0.0, None),
    "limiter pause": (LIMITER_PAUSE, [1, 2, 4, 8, 16, 30, 30, 30], 0.0, None),
}


@pytest.mark.parametrize(("policy", "highs", "jitter", "gives_up_at"), NAMED.values(),
                         ids=NAMED.keys())
def test_named_policy_schedule(policy: RetryPolicy, highs: list[float], jitter: float,
                               gives_up_at: int | None) -> None:
    attempts = range(1, len(highs) + 1)
    assert [policy.delay(n, _Fixed(1.0)) for n in attempts] == highs
    assert [policy.delay(n, _Fixed(0.0)) for n in attempts] == [h * (1 - jitter) for h in highs]
    assert policy.jitter == jitter
    if gives_up_at is None:
        assert policy.max_attempts is None
        assert not any(policy.gives_up(n) for n in (0, 1, 100, 10**9))
    else:
        assert not policy.gives_up(gives_up_at - 1)
        assert policy.gives_up(gives_up_at)


@pytest.mark.parametrize("policy", [p for p, *_ in NAMED.values()], ids=NAMED.keys())
@pytest.mark.parametrize("attempts", [1025, 5000, 10**6])
def test_named_policy_stays_capped_for_huge_attempt_counts(policy: RetryPolicy,
                                                           attempts: int) -> None:
    delay = policy.delay(attempts, random.Random(1))
    assert policy.cap * (1 - policy.jitter) <= delay <= policy.cap


def test_cs_transient_gives_five_tries() -> None:
    """Four retries after the first try: CSError once the fifth has failed, as the client did."""
    assert [CS_TRANSIENT.gives_up(n) for n in range(1, 6)] == [False] * 4 + [True]


def test_outbox_policy_is_the_configured_default() -> None:
    sync = SyncSettings()
    configured = RetryPolicy(base=sync.retry_base, cap=sync.retry_cap,
                             max_attempts=sync.max_attempts)
    assert configured == OUTBOX == RetryPolicy()


def test_retry_module_imports_nothing_from_csand() -> None:
    tree = ast.parse(Path(csand.retry.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "csand"]


def test_no_jitter_leaves_the_random_source_alone() -> None:
    rng = _Fixed(0.3)
    assert LIMITER_PAUSE.delay(3, rng) == 4.0
    assert rng.calls == 0
    assert OUTBOX.delay(3, rng) == pytest.approx(8.0 * 0.5 + 8.0 * 0.5 * 0.3)
    assert rng.calls == 1


# ---- RetryPolicy in general -----------------------------------------------------------------


policies = st.builds(
    RetryPolicy,
    base=st.floats(min_value=0.1, max_value=10),
    factor=st.floats(min_value=1.0, max_value=4),
    cap=st.floats(min_value=1, max_value=3600),
    jitter=st.floats(min_value=0, max_value=1),
    max_attempts=st.none() | st.integers(min_value=1, max_value=200),
)


@PROPERTY_SETTINGS
@given(policies, st.integers(min_value=1, max_value=200), st.integers(0, 2**32))
def test_delay_within_jitter_bounds_and_cap(policy: RetryPolicy, attempts: int, seed: int) -> None:
    raw = raw_delay(policy, attempts)
    delay = policy.delay(attempts, random.Random(seed))
    assert raw * (1 - policy.jitter) - 1e-9 <= delay <= raw + 1e-9
    assert delay <= policy.cap + 1e-9
    assert delay >= 0


@PROPERTY_SETTINGS
@given(policies, st.integers(min_value=1, max_value=199))
def test_delay_bounds_grow_monotonically(policy: RetryPolicy, attempts: int) -> None:
    low = [policy.delay(n, _Fixed(0.0)) for n in (attempts, attempts + 1)]
    high = [policy.delay(n, _Fixed(1.0)) for n in (attempts, attempts + 1)]
    assert low[0] <= low[1] + 1e-9
    assert high[0] <= high[1] + 1e-9
    assert high[1] <= policy.cap + 1e-9


def test_default_schedule() -> None:
    policy = RetryPolicy()
    lows = [policy.delay(n, _Fixed(0.0)) for n in range(1, 12)]
    highs = [policy.delay(n, _Fixed(1.0)) for n in range(1, 12)]
    assert highs[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert lows[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert highs[-1] == 900.0 and lows[-1] == 450.0
    # mean delay never falls as attempts grow
    means = [(lo + hi) / 2 for lo, hi in zip(lows, highs, strict=True)]
    assert means == sorted(means)


@pytest.mark.parametrize("attempts", [0, -3])
def test_no_failures_yet_waits_the_base(attempts: int) -> None:
    assert CS_TRANSIENT.delay(attempts) == CS_TRANSIENT.base


def test_delay_uses_the_given_rng_deterministically() -> None:
    policy = RetryPolicy()
    a = [policy.delay(n, random.Random(7)) for n in range(1, 20)]
    b = [policy.delay(n, random.Random(7)) for n in range(1, 20)]
    assert a == b


@PROPERTY_SETTINGS
@given(st.integers(min_value=1, max_value=500), st.integers(min_value=0, max_value=600))
def test_gives_up_exactly_at_max_attempts(max_attempts: int, attempts: int) -> None:
    policy = RetryPolicy(max_attempts=max_attempts)
    assert policy.gives_up(attempts) is (attempts >= max_attempts)


def test_gives_up_boundary() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.gives_up(n) for n in range(5)] == [False, False, False, True, True]


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.cap = 1.0  # type: ignore[misc]
    assert hash(policy) == hash(RetryPolicy())


@pytest.mark.parametrize("attempts", [1025, 5000])
def test_delay_stays_capped_for_very_many_attempts(attempts: int) -> None:
    policy = RetryPolicy(max_attempts=10_000)
    delay = policy.delay(attempts, random.Random(1))
    assert policy.cap * (1 - policy.jitter) <= delay <= policy.cap
