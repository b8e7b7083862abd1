"""One value for every backoff in csand: :class:`RetryPolicy`, and the named policies.

Pure, and it imports nothing from csand, so the outbox, the webhook processor, the ControlShift
client and the limiter all take their waits from here. Reading this module gives every backoff
number csand uses; only the outbox's can be changed by configuration (``[sync]``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter on the upper half, capped; give up after a number.

    With the defaults an item is tried for roughly a day (2 s doubling to a 15 min cap) before
    it goes to the dead letters, which rides out any plausible AN outage.
    """

    base: float = 2.0
    factor: float = 2.0
    cap: float = 900.0
    jitter: float = 0.5  # fraction of the delay that is randomised
    max_attempts: int | None = 100  # None: never gives up (a 429 is not the request's fault)

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Delay before try number ``attempts + 1`` (``attempts`` ≥ 1 failures so far)."""
        try:
            raw = min(self.cap, self.base * self.factor ** max(0, attempts - 1))
        except OverflowError:  # thousands of attempts: far beyond the cap anyway
            raw = self.cap
        if not self.jitter:  # exact, and leaves the random source alone
            return raw
        r = (rng or random).random()
        return raw * (1 - self.jitter) + raw * self.jitter * r

    def gives_up(self, attempts: int) -> bool:
        """True once ``attempts`` tries have failed and no more are allowed."""
        return self.max_attempts is not None and attempts >= self.max_attempts


# An outbox item (the worker). These are the defaults of sync.retry_base, sync.retry_cap and
# sync.max_attempts, which the daemon passes in.
OUTBOX = RetryPolicy()

# A stored CS webhook event whose processing failed (ControlShift could not be read). Never
# given up on: the event is all csand has of that change until the next poll.
WEBHOOK_EVENTS = RetryPolicy(base=1.0, cap=300.0, max_attempts=None)

# A ControlShift GET that failed transiently (5xx, 408, timeouts, dropped connections): 1, 2, 4,
# 8 s, then CSError after 5 tries. No jitter: the poller is CS's only caller, nothing to spread.
CS_TRANSIENT = RetryPolicy(base=1.0, factor=2.0, cap=30.0, jitter=0.0, max_attempts=5)

# A ControlShift 429 without a readable RateLimit-Reset: a flat 5 s pause, for as long as it
# lasts. With the header, its value (at least 1 s) is the pause.
CS_RATE_LIMITED = RetryPolicy(base=5.0, factor=1.0, cap=5.0, jitter=0.0, max_attempts=None)

# The limiter's pause after consecutive 429s without Retry-After: 1, 2, 4 ... 30 s. No jitter:
# the pause is one shared by every worker of the bucket, so there is nothing to spread out.
LIMITER_PAUSE = RetryPolicy(base=1.0, factor=2.0, cap=30.0, jitter=0.0, max_attempts=None)

# A bulk-data file whose download failed for every try of bulk.BULK_DOWNLOAD (or the store
# failed meanwhile): tried again after 30 s, 1, 2, 4 ... 30 min, until its URL expires (then it
# is marked expired). Jitter spreads instances that failed on the same outage.
BULK_FILES = RetryPolicy(base=30.0, factor=2.0, cap=1800.0, jitter=0.2, max_attempts=None)
