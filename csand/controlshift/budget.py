"""ControlShift's request budget: who may spend how much of ``requests_per_minute``.

ControlShift allows an organisation 1000 requests/minute on ``/api/v1``, shared with every other
tool it runs. csand's own share is split by *purpose*:

* ``poll``: the incremental poll cycles (listing the petitions, walking what changed);
* ``sweep``: the full reconciliation sweep;
* ``webhook``: what webhook processing fetches (a petition by slug, an event, its attendees);
* ``other``: everything else (start-up checks, the webhook endpoint check, commands).

Every request passes the client's overall bucket (the whole ``requests_per_minute``). Polling
(``poll`` and ``sweep``) additionally passes the *poll bucket* at ``poll_budget_share`` of it, so
however long the petition list is, polling stretches its cycle instead of eating the budget that
webhooks and the operator's commands (separate processes with their own client) need. A sweep
also passes its own pacer, whose rate :func:`plan_sweep` chooses: spread over
``reconcile_interval`` when the poll budget allows, never more than what the incremental cycles
leave (they keep priority: fresh signatures come from them), never less than
:data:`MIN_SWEEP_SHARE` of the poll budget (a sweep must end some day).

The purpose of a request is a context variable (:func:`purpose`), set by the poller's loops and
the webhook processor, so objects they share (the petition directory, the event sync) need not
know who calls them.

ControlShift's page size is undocumented: :func:`learn_page_size` learns it from its answers
(the number of items on a page that has a next page), per list, for the estimates
(:func:`sweep_estimate`).

The pure functions here decide; :class:`CSBudget` holds the state (buckets, the request meter,
what was learned) for one process.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio

from csand.ratelimit import TokenBucket

PURPOSES = ("poll", "sweep", "webhook", "other")
POLLING = frozenset({"poll", "sweep"})
DEFAULT_SHARE = 0.5
HEADROOM = 0.95  # as the client's overall bucket: a little under the limit
SWEEP_FILL = 0.8  # a scheduled sweep is paced to take this fraction of reconcile_interval
MIN_SWEEP_SHARE = 0.25  # of the poll budget, always left to a running sweep
WINDOW = 60.0  # "requests in the last minute"

_purpose: ContextVar[str] = ContextVar("csand_cs_purpose", default="other")


@contextmanager
def purpose(name: str) -> Iterator[None]:
    """Requests made inside (in this task and the tasks it starts) count as ``name``."""
    if name not in PURPOSES:
        raise ValueError(f"unknown purpose {name!r}")
    token = _purpose.set(name)
    try:
        yield
    finally:
        _purpose.reset(token)


def current_purpose() -> str:
    return _purpose.get()


# ---------------------------------------------------------------- pure decisions


def learn_page_size(known: int | None, items: int, next_page: Any) -> int | None:
    """What a list page says of ControlShift's page size, given what was ``known``.

    Only a page that has a next page is full; the last page says nothing. The largest full page
    wins (a page a record vanished from while it was read may be short, never long).
    """
    if next_page is None or next_page is False or items <= 0:
        return known
    return items if known is None else max(known, items)


def pages_for(records: int | None, page_size: int) -> int:
    """Pages a list of ``records`` takes (an empty or unknown list is still one request)."""
    if not records or records <= 0:
        return 1
    return math.ceil(records / page_size)


def sweep_estimate(listed: int, counts: Iterable[int | None], *, petition_page_size: int,
                   signature_page_size: int, other: int = 0) -> int:
    """Requests of one full sweep: the petition list (``listed`` petitions), every page of each
    launched petition's signatures (``counts``: their ``public_signature_count``), plus
    ``other`` (what the last sweep spent on events)."""
    listing = pages_for(listed, petition_page_size)
    return listing + sum(pages_for(c, signature_page_size) for c in counts) + max(0, other)


def idle_rate(idle_requests: float, *, poll_rate: float, poll_interval: float) -> float:
    """Requests/second incremental cycles of ``idle_requests`` each use when alone: each cycle
    takes ``idle_requests / poll_rate`` seconds at most, then pauses ``poll_interval``."""
    if idle_requests <= 0:
        return 0.0
    return idle_requests / (idle_requests / poll_rate + poll_interval)


@dataclass(frozen=True, slots=True)
class SweepPlan:
    rate: float  # requests/second the sweep may use
    seconds: float  # how long it takes at that rate (inf when the estimate is unknown)
    fits: bool  # whether that is within reconcile_interval


def plan_sweep(estimated: int | None, *, reconcile_interval: float, poll_rate: float,
               incremental_rate: float, asked: bool = False) -> SweepPlan:
    """The pace of the next sweep (``poll_rate``, ``incremental_rate``: requests/second).

    A scheduled sweep is spread to take :data:`SWEEP_FILL` of ``reconcile_interval``; one the
    operator asked for (``csand backfill``), or one whose size is unknown, goes as fast as
    allowed. Allowed is what the incremental cycles leave of the poll budget, and never less
    than :data:`MIN_SWEEP_SHARE` of it.
    """
    room = max(poll_rate * MIN_SWEEP_SHARE, poll_rate - incremental_rate)
    room = min(room, poll_rate)
    if asked or not estimated:
        rate = room
    else:
        rate = min(room, estimated / (reconcile_interval * SWEEP_FILL))
    seconds = estimated / rate if estimated else math.inf
    return SweepPlan(rate=rate, seconds=seconds, fits=seconds <= reconcile_interval)


# ---------------------------------------------------------------- state of one process


class RequestMeter:
    """Requests by purpose: totals, and how many in the last :data:`WINDOW` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._recent: deque[tuple[float, str]] = deque()
        self.totals: Counter[str] = Counter()

    def record(self, name: str) -> None:
        now = self._clock()
        self._recent.append((now, name))
        self.totals[name] += 1
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - WINDOW:
            self._recent.popleft()

    def last_minute(self) -> dict[str, int]:
        self._trim(self._clock())
        counts = Counter(name for _, name in self._recent)
        return {name: counts.get(name, 0) for name in PURPOSES}


class CSBudget:
    """One process's ControlShift budget: the poll bucket, the sweep's pacer, the meter, the
    page sizes learned, and the figures ``csand status`` shows (:meth:`snapshot`)."""

    def __init__(self, requests_per_minute: float = 1000.0, share: float = 1.0, *,
                 headroom: float = HEADROOM, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.requests_per_minute = requests_per_minute
        self.share = share
        self.poll_rate = requests_per_minute * share / 60.0 * headroom  # requests/second
        self.clock = clock
        self._sleep = sleep
        self.poll = TokenBucket(self.poll_rate, clock=clock, sleep=sleep)
        self.sweep: TokenBucket | None = None  # while a sweep runs: its pacer
        self.meter = RequestMeter(clock)
        self.page_sizes: dict[str, int] = {}  # list ("petitions", "signatures", ...) → size
        self.largest_page = 0  # the most items seen on one page: a lower bound until learned
        self.page_sizes_changed = False
        self.plan: SweepPlan | None = None  # of the running or last sweep
        self.last_sweep: dict[str, float] | None = None
        self.sweep_started: float | None = None
        self.idle_requests: int | None = None  # of the last incremental cycle that walked nothing
        self.listed = 0  # petitions in the last list
        self.counts: list[int | None] = []  # public_signature_count of each launched petition
        self.sweep_events = 0  # requests the last sweep spent on events

    # -- requests

    async def admit(self, name: str) -> None:
        """Wait until a request of purpose ``name`` may go (before the overall bucket)."""
        if name == "sweep" and self.sweep is not None:
            await self.sweep.acquire()
        if name in POLLING:
            await self.poll.acquire()

    def record(self, name: str) -> None:
        self.meter.record(name)

    def saw_page(self, kind: str, items: int, meta: Any) -> None:
        next_page = meta.get("next_page") if isinstance(meta, dict) else None
        self.largest_page = max(self.largest_page, items)
        learned = learn_page_size(self.page_sizes.get(kind), items, next_page)
        if learned is not None and learned != self.page_sizes.get(kind):
            self.page_sizes[kind] = learned
            self.page_sizes_changed = True

    def remember_page_sizes(self, stored: dict[str, int]) -> None:
        """What an earlier run learned (store meta), until this run learns better."""
        for kind, size in stored.items():
            if isinstance(size, int) and size > 0:
                self.page_sizes.setdefault(kind, size)

    def page_size(self, kind: str) -> int | None:
        """The page size of list ``kind``: learned for it, else for any list (ControlShift
        pages its lists alike, as far as anyone knows), else the largest page seen."""
        if kind in self.page_sizes:
            return self.page_sizes[kind]
        if self.page_sizes:
            return max(self.page_sizes.values())
        return self.largest_page or None

    # -- what the poller tells

    def saw_petitions(self, petitions: list[Any], launched: Callable[[Any], bool]) -> None:
        """The petition list of a cycle: the sweep estimate's input."""
        self.listed = len(petitions)
        counts: list[int | None] = []
        for p in petitions:
            if isinstance(p, dict) and launched(p):
                c = p.get("public_signature_count")
                counts.append(int(c) if isinstance(c, int | float) else None)
        self.counts = counts

    def saw_idle_cycle(self, requests: int) -> None:
        self.idle_requests = requests

    def estimate(self) -> int | None:
        """Requests of the next sweep; None until a page size is known."""
        petitions, signatures = self.page_size("petitions"), self.page_size("signatures")
        if not self.listed or petitions is None or signatures is None:
            return None
        return sweep_estimate(self.listed, self.counts, petition_page_size=petitions,
                              signature_page_size=signatures, other=self.sweep_events)

    def plan_sweep(self, *, reconcile_interval: float, poll_interval: float,
                   asked: bool = False) -> SweepPlan:
        incremental = idle_rate(self.idle_requests or 0, poll_rate=self.poll_rate,
                                poll_interval=poll_interval)
        return plan_sweep(self.estimate(), reconcile_interval=reconcile_interval,
                          poll_rate=self.poll_rate, incremental_rate=incremental, asked=asked)

    def start_sweep(self, plan: SweepPlan) -> None:
        self.plan = plan
        self.sweep = TokenBucket(plan.rate, clock=self.clock, sleep=self._sleep)
        self.sweep_started = self.clock()

    def finish_sweep(self, *, requests: int, events: int, seconds: float, ok: bool) -> None:
        self.sweep = None
        self.sweep_started = None
        if ok:
            self.sweep_events = events
            self.last_sweep = {"requests": requests, "seconds": round(seconds, 1),
                               "finished_at": time.time()}

    # -- for csand status and /metrics

    def snapshot(self, *, reconcile_interval: float, poll_interval: float) -> dict[str, Any]:
        estimated = self.estimate()
        plan = self.plan_sweep(reconcile_interval=reconcile_interval,
                               poll_interval=poll_interval)
        return {
            "requests_per_minute": self.requests_per_minute,
            "poll_budget_share": self.share,
            "poll_budget_per_minute": round(self.poll_rate * 60, 1),
            "last_minute": self.meter.last_minute(),
            "page_size": dict(sorted(self.page_sizes.items())),
            "idle_cycle_requests": self.idle_requests,
            "sweep_running": self.sweep is not None,
            "sweep_running_for_s": round(self.clock() - self.sweep_started, 1)
            if self.sweep_started is not None else None,
            "last_sweep": self.last_sweep,
            "sweep_estimate": {
                "requests": estimated,
                "seconds": round(plan.seconds, 1) if estimated else None,
                "rate_per_minute": round(plan.rate * 60, 1),
                "fits_reconcile_interval": plan.fits if estimated else None,
            },
        }


async def publish(store: Any, budget: CSBudget, *, reconcile_interval: float,
                  poll_interval: float) -> dict[str, Any]:
    """Write the budget's figures to store meta (``cs_budget``, and ``cs_page_size`` when it
    changed) for ``csand status``, another process, and set the /metrics gauges."""
    from csand import metrics

    snap = budget.snapshot(reconcile_interval=reconcile_interval, poll_interval=poll_interval)
    values: dict[str, Any] = {"cs_budget": json.dumps(snap, separators=(",", ":"))}
    if budget.page_sizes_changed:
        values["cs_page_size"] = json.dumps(budget.page_sizes, sort_keys=True)
    await store.set_meta(**values)
    budget.page_sizes_changed = False
    for name, count in snap["last_minute"].items():
        metrics.cs_budget_requests.labels(name).set(count)
    metrics.cs_poll_budget.set(snap["poll_budget_per_minute"])
    for kind, size in budget.page_sizes.items():
        metrics.cs_page_size.labels(kind).set(size)
    metrics.cs_idle_cycle_requests.set(budget.idle_requests or 0)
    if budget.last_sweep:
        metrics.cs_sweep_requests.set(budget.last_sweep["requests"])
        metrics.cs_sweep_seconds.set(budget.last_sweep["seconds"])
    metrics.cs_sweep_estimate.set(snap["sweep_estimate"]["seconds"] or 0)
    return snap


async def restore(store: Any, budget: CSBudget) -> None:
    """The page sizes an earlier run learned (store meta ``cs_page_size``)."""
    raw = await store.get_meta("cs_page_size")
    try:
        stored = json.loads(raw) if raw else {}
    except ValueError:
        return
    if isinstance(stored, dict):
        budget.remember_page_sizes(stored)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_rows(snap: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``csand status``'s lines for the ControlShift budget (``cs_budget`` of the status)."""
    if not snap:
        return []
    minute = snap.get("last_minute") or {}
    used = sum(minute.values())
    rows = [("CS requests", f"{used} in the last minute of {snap['requests_per_minute']:g}/min "
             f"(poll {minute.get('poll', 0)}, sweep {minute.get('sweep', 0)}, webhook "
             f"{minute.get('webhook', 0)}, other {minute.get('other', 0)})"),
            ("CS poll budget", f"{snap['poll_budget_per_minute']:g}/min "
             f"({snap['poll_budget_share']:.0%} of requests_per_minute)"
             + (f"; an idle cycle costs {snap['idle_cycle_requests']} requests"
                if snap.get("idle_cycle_requests") is not None else ""))]
    sizes = snap.get("page_size") or {}
    if not sizes:
        page = "not learned yet (no list with a second page seen)"
    elif len(set(sizes.values())) == 1:
        page = f"{next(iter(sizes.values()))} items (learned from {', '.join(sizes)})"
    else:
        page = ", ".join(f"{k} {v}" for k, v in sizes.items())
    rows.append(("CS page size", page))
    last = snap.get("last_sweep")
    if snap.get("sweep_running"):
        rows.append(("sweep", f"running for {_duration(snap.get('sweep_running_for_s'))}"))
    if last:
        rows.append(("last sweep", f"{last['requests']} requests in "
                     f"{_duration(last['seconds'])}"))
    estimate = snap.get("sweep_estimate") or {}
    if estimate.get("requests"):
        note = ("fits reconcile_interval" if estimate.get("fits_reconcile_interval")
                else "[yellow]longer than reconcile_interval at this budget: sweeps run back to "
                     "back[/yellow]")
        rows.append(("next sweep", f"about {estimate['requests']} requests, "
                     f"{_duration(estimate['seconds'])} at {estimate['rate_per_minute']:g}/min "
                     f"({note})"))
    return rows
