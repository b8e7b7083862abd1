"""Action Network answer → retry, dead, pause or re-plan. Pure, no I/O.

:class:`Outcome` is how one AN answer is classified. The worker turns it into what happens to
the outbox item, with :class:`csand.retry.RetryPolicy` saying when a failed item is tried again;
the result (attempts, next attempt time, reason) is persisted in the outbox, so a restart
continues exactly where the last process left off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

__all__ = ["Outcome", "Verdict", "classify_exception", "classify_response", "parse_retry_after"]


class Verdict(StrEnum):
    OK = "ok"
    RETRY = "retry"  # transient: 5xx, timeouts, connection errors, AN's "200 {}"
    DEAD = "dead"  # the record is bad: AN will never accept it as it is
    AUTH = "auth"  # the key is bad: pause everything, do not burn the queue
    RATE_LIMITED = "rate_limited"  # 429: slow down, not the item's fault
    GONE = "gone"  # 404 on a resource csand addressed by id: forget it and re-plan


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    reason: str = ""
    status: int | None = None
    retry_after: float | None = None


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "errors"):
            if body.get(key):
                return str(body[key])
    if isinstance(body, str) and body.strip():
        return body.strip()[:200]
    return ""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait, from either form of ``Retry-After`` (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, min(seconds, 3600.0))


def classify_response(
    status: int, body: Any, *, helper: bool = False, by_id: bool = False,
    retry_after: str | None = None,
) -> Outcome:
    """Classify one AN answer.

    ``helper``: a foreground helper POST, where AN may answer ``200 {}`` on failure.
    ``by_id``: the URL addressed a resource by uuid, so a 404 means csand's knowledge is stale.
    """
    message = _error_text(body)
    if 200 <= status < 300:
        if helper and (body is None or body == {} or body == ""):
            return Outcome(Verdict.RETRY, "Action Network answered 200 with an empty body", status)
        return Outcome(Verdict.OK, status=status)
    if status == 429:
        return Outcome(
            Verdict.RATE_LIMITED, "rate limited by Action Network", status,
            parse_retry_after(retry_after),
        )
    if status in (401, 403):
        return Outcome(Verdict.AUTH, f"Action Network rejected the API key ({status} {message})".strip(), status)
    if status == 404 and by_id:
        return Outcome(Verdict.GONE, f"not found in Action Network: {message}".strip(), status)
    if status in (408, 425) or status >= 500:
        return Outcome(Verdict.RETRY, f"Action Network error {status} {message}".strip(), status)
    return Outcome(
        Verdict.DEAD,
        f"Action Network refused the record ({status}): {message or 'no message'}",
        status,
    )


def classify_exception(exc: BaseException) -> Outcome:
    """Timeouts and connection failures are transient; name the failure for the operator."""
    name = type(exc).__name__
    detail = str(exc) or name
    return Outcome(Verdict.RETRY, f"{name}: {detail}"[:300])
