"""Classifying Action Network answers (csand.actionnetwork.errors)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csand.actionnetwork.errors import (
    Outcome,
    Verdict,
    classify_exception,
    classify_response,
    parse_retry_after,
)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)

PERSON = {"identifiers": ["action_network:1234"], "email_addresses": [{"address": "a@b.org"}]}


# ---- 2xx ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "helper"),
    [
        (200, PERSON, True),
        (200, PERSON, False),
        (201, PERSON, True),
        (200, {"_embedded": {"osdi:people": []}}, False),  # an empty lookup is still an answer
        (204, None, False),
        (200, {}, False),  # a non-helper call (e.g. PUT) may answer an empty object
        (200, "ok", True),
        (299, PERSON, False),
    ],
)
def test_2xx_is_ok(status: int, body, helper: bool) -> None:
    outcome = classify_response(status, body, helper=helper)
    assert outcome.verdict is Verdict.OK
    assert outcome.status == status


@pytest.mark.parametrize("body", [{}, None, ""], ids=["empty-object", "no-body", "empty-string"])
@pytest.mark.parametrize("status", [200, 201])
def test_helper_empty_2xx_is_a_failure_to_retry(status: int, body) -> None:
    outcome = classify_response(status, body, helper=True)
    assert outcome.verdict is Verdict.RETRY
    assert "empty" in outcome.reason
    assert outcome.status == status


# ---- 429 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("3", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 7 ", 7.0),
        ("-5", 0.0),  # never a negative pause
        ("999999", 3600.0),  # capped at an hour
        ("soon", None),
    ],
)
def test_429_is_rate_limited(header: str | None, expected: float | None) -> None:
    outcome = classify_response(429, {"error": "too many requests"}, retry_after=header)
    assert outcome.verdict is Verdict.RATE_LIMITED
    assert outcome.status == 429
    assert outcome.retry_after == expected
    assert "rate limited" in outcome.reason


@pytest.mark.parametrize("helper", [True, False])
@pytest.mark.parametrize("by_id", [True, False])
def test_429_is_rate_limited_whatever_the_call(helper: bool, by_id: bool) -> None:
    outcome = classify_response(429, None, helper=helper, by_id=by_id, retry_after="2")
    assert outcome.verdict is Verdict.RATE_LIMITED
    assert outcome.retry_after == 2.0


def test_429_with_http_date_retry_after_is_rate_limited() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    header = format_datetime(when, usegmt=True)
    outcome = classify_response(429, {"error": "slow down"}, retry_after=header)
    assert outcome.verdict is Verdict.RATE_LIMITED
    # either honoured as seconds from now, or left to the limiter's own backoff; never garbage
    assert outcome.retry_after is None or 0.0 <= outcome.retry_after <= 31.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("abc", None), ("10", 10.0), ("3600.5", 3600.0), ("-1", 0.0)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


@PROPERTY_SETTINGS
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_parse_retry_after_is_always_a_sane_pause(seconds: float) -> None:
    parsed = parse_retry_after(repr(seconds))
    assert parsed is not None and 0.0 <= parsed <= 3600.0


# ---- 4xx / 5xx ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("by_id", [True, False])
def test_bad_key_is_auth(status: int, by_id: bool) -> None:
    outcome = classify_response(status, {"error": "API Key invalid or not present"}, by_id=by_id)
    assert outcome.verdict is Verdict.AUTH
    assert str(status) in outcome.reason
    assert "API Key invalid" in outcome.reason


def test_404_by_id_is_gone() -> None:
    outcome = classify_response(404, {"error": "Couldn't find Person with id=1"}, by_id=True)
    assert outcome.verdict is Verdict.GONE
    assert outcome.status == 404
    assert "Couldn't find Person" in outcome.reason


@pytest.mark.parametrize("helper", [True, False])
def test_404_otherwise_is_dead_with_ans_message(helper: bool) -> None:
    outcome = classify_response(404, {"error": "Petition not found"}, helper=helper)
    assert outcome.verdict is Verdict.DEAD
    assert "404" in outcome.reason
    assert "Petition not found" in outcome.reason


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"error": "Email address is invalid"}, "Email address is invalid"),
        ({"message": "given_name is too long"}, "given_name is too long"),
        ({"errors": ["bad postal code"]}, "bad postal code"),
        ("Bad Request: malformed JSON", "Bad Request: malformed JSON"),
    ],
)
def test_400_is_dead_carrying_ans_text(body, text: str) -> None:
    outcome = classify_response(400, body, helper=True)
    assert outcome.verdict is Verdict.DEAD
    assert outcome.status == 400
    assert text in outcome.reason
    assert "400" in outcome.reason


@pytest.mark.parametrize("body", [None, {}, "", "   "])
def test_400_without_a_message_still_says_why(body) -> None:
    outcome = classify_response(400, body)
    assert outcome.verdict is Verdict.DEAD
    assert "no message" in outcome.reason


@pytest.mark.parametrize("status", [409, 410, 422])
def test_other_4xx_is_dead(status: int) -> None:
    assert classify_response(status, {"error": "nope"}).verdict is Verdict.DEAD


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520, 408])
@pytest.mark.parametrize("by_id", [True, False])
def test_5xx_and_408_are_retried(status: int, by_id: bool) -> None:
    outcome = classify_response(status, {"error": "Internal Server Error"}, by_id=by_id)
    assert outcome.verdict is Verdict.RETRY
    assert str(status) in outcome.reason
    assert outcome.status == status


def test_long_text_bodies_are_trimmed_in_reasons() -> None:
    outcome = classify_response(502, "<html>" + "x" * 5000 + "</html>")
    assert outcome.verdict is Verdict.RETRY
    assert len(outcome.reason) < 300


STATUS_TABLE = [
    # (status, body, helper, by_id, verdict)
    (200, PERSON, True, False, Verdict.OK),
    (200, {}, True, False, Verdict.RETRY),
    (429, None, False, False, Verdict.RATE_LIMITED),
    (401, None, False, False, Verdict.AUTH),
    (403, None, False, True, Verdict.AUTH),
    (404, None, False, True, Verdict.GONE),
    (404, None, False, False, Verdict.DEAD),
    (400, {"error": "x"}, True, False, Verdict.DEAD),
    (408, None, False, False, Verdict.RETRY),
    (500, None, True, True, Verdict.RETRY),
    (503, None, False, False, Verdict.RETRY),
]


@pytest.mark.parametrize(("status", "body", "helper", "by_id", "verdict"), STATUS_TABLE)
def test_status_table(status: int, body, helper: bool, by_id: bool, verdict: Verdict) -> None:
    assert classify_response(status, body, helper=helper, by_id=by_id).verdict is verdict


# ---- exceptions ---------------------------------------------------------------------------

REQUEST = httpx.Request("POST", "https://actionnetwork.org/api/v2/people")


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectTimeout("timed out connecting", request=REQUEST),
        httpx.ReadTimeout("timed out reading", request=REQUEST),
        httpx.ConnectError("connection refused", request=REQUEST),
        httpx.RemoteProtocolError("server disconnected", request=REQUEST),
        httpx.ReadTimeout(""),
    ],
    ids=["connect-timeout", "read-timeout", "connect-error", "protocol-error", "no-message"],
)
def test_network_failures_are_retried_and_named(exc: Exception) -> None:
    outcome = classify_exception(exc)
    assert outcome.verdict is Verdict.RETRY
    assert type(exc).__name__ in outcome.reason
    if str(exc):
        assert str(exc) in outcome.reason
    assert outcome.status is None


def test_exception_reason_is_bounded() -> None:
    outcome = classify_exception(httpx.ConnectError("x" * 1000))
    assert len(outcome.reason) <= 300


def test_outcome_is_immutable() -> None:
    outcome = Outcome(Verdict.OK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.verdict = Verdict.DEAD  # type: ignore[misc]
