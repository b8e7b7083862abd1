"""Log set-up and redaction (csand.logs)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from csand import logs
from csand.logs import Redactor, get_logger, mask_email

SECRET = "an_live_0123456789abcdef"
CS_SECRET = "cs_live_fedcba9876543210"


@pytest.fixture
def redact() -> Redactor:
    return Redactor([SECRET, CS_SECRET, "abc", ""])


def scrub(redactor: Redactor, **event: Any) -> dict[str, Any]:
    return redactor(None, "info", {"event": "test", **event})


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    saved = list(logs.redactor.secrets)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream, secrets=[SECRET])
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        logs.redactor.secrets = saved
        root.handlers = handlers
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------- emails


@pytest.mark.parametrize(("text", "expected"), [
    ("ann@example.org", "a***@example.org"),
    ("signed by Ann.Lee+news@Example.ORG today", "signed by A***@Example.ORG today"),
    ("<ann@example.org>, bob@example.com", "<a***@example.org>, b***@example.com"),
    ("/people?filter=email_address%20eq%20%27ann%40example.org%27",
     "/people?filter=e***%40example.org%27"),
    ("ann%2Bnews%40example.org", "a***%40example.org"),
    ("ann@localhost-like", "a***@localhost-like"),
])
def test_emails_are_masked(text: str, expected: str) -> None:
    assert mask_email(text) == expected


@pytest.mark.parametrize("text", [
    "ann@example.org",
    "Ann.Lee+news@example.org",
    "email_address eq 'ann@example.org'",
    "email_address%20eq%20%27ann%40example.org%27",
    "mailto:ann@example.org",
])
def test_no_local_part_survives(redact: Redactor, text: str) -> None:
    out = json.dumps(scrub(redact, value=text))
    assert "ann@" not in out.lower() and "ann%40" not in out.lower()
    assert "lee+news" not in out.lower()


def test_text_without_emails_is_unchanged(redact: Redactor) -> None:
    event = scrub(redact, note="signer synced (subscribed)", count=3, ratio=0.5, ok=True, nothing=None)
    assert event == {"event": "test", "note": "signer synced (subscribed)", "count": 3, "ratio": 0.5,
                     "ok": True, "nothing": None}


def test_mistyped_address_in_a_dead_letter_reason_is_masked(redact: Redactor) -> None:
    event = scrub(redact, person="ann@@example.org",
                  reason="invalid email address 'ann@@example.org'")
    assert "ann@" not in json.dumps(event)


def test_mask_data_masks_every_string_and_keeps_the_shape() -> None:
    data = {"dead": 2, "healthy": False, "age": 1.5, "none": None,
            "last_poll_result": "failed: 422 for bob@example.org",
            "dead_reasons": [{"reason": "invalid email address 'ann@example'", "count": 2}],
            "pair": ("cleo@example.org", 1)}
    assert logs.mask_data(data) == {
        "dead": 2, "healthy": False, "age": 1.5, "none": None,
        "last_poll_result": "failed: 422 for b***@example.org",
        "dead_reasons": [{"reason": "invalid email address 'a***@example'", "count": 2}],
        "pair": ["c***@example.org", 1]}


# ---------------------------------------------------------------- secrets


def test_secrets_removed_anywhere(redact: Redactor) -> None:
    event = scrub(
        redact,
        reason=f"request failed with key {SECRET} for ann@example.org",
        nested={"deeper": [f"Bearer {CS_SECRET}", ("x", {"y": SECRET})]},
        items={f"prefix-{SECRET}-suffix"},
        obj=ValueError(f"bad key {SECRET}"),
    )
    text = json.dumps(event)
    assert SECRET not in text and CS_SECRET not in text
    assert event["reason"] == "request failed with key *** for a***@example.org"
    assert event["nested"] == {"deeper": ["Bearer ***", ["x", {"y": "***"}]]}
    assert event["items"] == ["prefix-***-suffix"]
    assert event["obj"] == "bad key ***"


def test_short_or_empty_secrets_are_not_used(redact: Redactor) -> None:
    assert scrub(redact, word="abcdef")["word"] == "abcdef"


@pytest.mark.parametrize("key", [
    "api_key", "apikey", "API_KEY", "authorization", "Authorization", "OSDI-API-Token",
    "access_token", "client_secret", "password",
])
def test_values_of_secret_keys_are_blanked(redact: Redactor, key: str) -> None:
    event = scrub(redact, headers={key: "whatever-it-is", "Content-Type": "application/json"},
                  **{key.replace("-", "_"): "also-this"})
    assert event["headers"] == {key: "***", "Content-Type": "application/json"}
    assert event[key.replace("-", "_")] == "***"


def test_add_secrets(redact: Redactor) -> None:
    redact.add_secrets(["new-secret-value", "xy"])
    assert scrub(redact, v="x new-secret-value y")["v"] == "x *** y"
    assert scrub(redact, v="xy")["v"] == "xy"


# ---------------------------------------------------------------- JSON output


def test_json_output_is_one_redacted_object_per_line(json_logs: io.StringIO) -> None:
    log = get_logger("test")
    log.info("sync.done", person="ann@example.org", note="line one\nline two")
    log.warning("an.rate_limited", api_key=SECRET, reason=f"key {SECRET} refused")
    log.debug("an.request", path="/people?filter=x")  # below the configured level
    try:
        raise RuntimeError(f"boom with {SECRET} for ann@example.org")
    except RuntimeError:
        log.exception("worker.error", item=3)

    records = lines(json_logs)
    assert [r["event"] for r in records] == ["sync.done", "an.rate_limited", "worker.error"]
    assert [r["level"] for r in records] == ["info", "warning", "error"]
    assert all(r["component"] == "test" and "timestamp" in r for r in records)
    assert records[0]["person"] == "a***@example.org"
    assert records[0]["note"] == "line one\nline two"
    assert records[1]["api_key"] == "***"
    assert records[1]["reason"] == "key *** refused"
    assert "RuntimeError" in records[2]["exception"]
    raw = json_logs.getvalue()
    assert SECRET not in raw and "ann@" not in raw


def test_level_filter(json_logs: io.StringIO) -> None:
    stream = io.StringIO()
    logs.configure("warning", "json", stream=stream)
    log = get_logger("test")
    log.info("hidden")
    log.error("shown", count=1)
    assert [r["event"] for r in lines(stream)] == ["shown"]


def test_standard_library_logs_are_json_and_redacted(json_logs: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").warning("client ann@example.org sent key %s", SECRET)
    (record,) = lines(json_logs)
    assert record["level"] == "warning"
    assert "a***@example.org" in record["event"]
    assert SECRET not in json_logs.getvalue() and "ann@" not in json_logs.getvalue()


def test_standard_library_exceptions_keep_their_traceback(json_logs: io.StringIO) -> None:
    try:
        raise RuntimeError("failed for ann@example.org")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    (record,) = lines(json_logs)
    rendered = json.dumps(record)
    assert "Traceback (most recent call last)" in rendered
    assert "RuntimeError" in rendered and "ann@" not in rendered
