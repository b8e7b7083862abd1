"""Prometheus metrics (prometheus-client), on a registry of csand's own.

Counters are incremented where things happen (worker, clients, poller, webhook receiver). Figures
that live in SQLite (outbox depth, oldest pending age) are read by the daemon's heartbeat into
gauges, because a scrape must not wait on the database.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

outbox_items = Gauge(
    "csand_outbox_items", "Outbox items by state.", ["state"], registry=REGISTRY)
oldest_pending_age = Gauge(
    "csand_oldest_pending_age_seconds", "Age of the oldest item not yet done.", registry=REGISTRY)
actions = Counter(
    "csand_actions_total", "Activities applied to Action Network, by kind and outcome.",
    ["kind", "outcome"], registry=REGISTRY)
an_requests = Counter(
    "csand_an_requests_total", "Action Network requests by HTTP status ('error' for no answer).",
    ["status"], registry=REGISTRY)
an_rate_limited = Counter(
    "csand_an_rate_limited_total", "429 answers from Action Network.", registry=REGISTRY)
an_rate = Gauge(
    "csand_an_rate_per_second", "Current token-bucket rate for Action Network.", registry=REGISTRY)
an_paused = Gauge(
    "csand_an_paused", "1 while workers are paused because AN rejects the key.", registry=REGISTRY)
leader = Gauge(
    "csand_leader", "1 while this instance leads: it polls ControlShift and runs the sweeps.",
    registry=REGISTRY)
poll_cycles = Histogram(
    "csand_poll_cycle_seconds", "Duration of ControlShift poll cycles.", ["kind"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600), registry=REGISTRY)
poll_failures = Counter(
    "csand_poll_failures_total", "Poll cycles that failed.", registry=REGISTRY)
cs_requests = Counter(
    "csand_cs_requests_total", "ControlShift API requests by HTTP status.", ["status"],
    registry=REGISTRY)
cs_budget_requests = Gauge(
    "csand_cs_requests_last_minute", "ControlShift requests in the last minute by purpose (poll, "
    "sweep, webhook, other).", ["purpose"], registry=REGISTRY)
cs_poll_budget = Gauge(
    "csand_cs_poll_budget_per_minute", "ControlShift requests/minute polling may use "
    "(poll_budget_share of requests_per_minute).", registry=REGISTRY)
cs_page_size = Gauge(
    "csand_cs_page_size", "ControlShift's page size, learned from its answers, by list.",
    ["list"], registry=REGISTRY)
cs_idle_cycle_requests = Gauge(
    "csand_cs_idle_cycle_requests", "ControlShift requests of the last incremental poll cycle, "
    "besides the pages it walked.", registry=REGISTRY)
cs_sweep_requests = Gauge(
    "csand_cs_last_sweep_requests", "ControlShift requests of the last reconciliation sweep.",
    registry=REGISTRY)
cs_sweep_seconds = Gauge(
    "csand_cs_last_sweep_seconds", "Duration of the last reconciliation sweep.", registry=REGISTRY)
cs_sweep_estimate = Gauge(
    "csand_cs_sweep_estimated_seconds", "Estimated duration of one sweep at this budget.",
    registry=REGISTRY)
webhooks = Counter(
    "csand_webhooks_total", "ControlShift webhooks by result (accepted, duplicate, rejected, "
    "malformed, ignored).", ["result"], registry=REGISTRY)

bulk_files = Counter(
    "csand_bulk_files_total", "ControlShift bulk-data files by table and outcome (done, skipped, "
    "expired: its URL ran out before csand read it, failed, retried).", ["table", "outcome"],
    registry=REGISTRY)
bulk_rows = Counter(
    "csand_bulk_rows_total", "Rows of ControlShift bulk-data files handled, by table.", ["table"],
    registry=REGISTRY)
bulk_expired_files = Gauge(
    "csand_bulk_expired_files", "Bulk-data files recorded as expired (never read), all time.",
    registry=REGISTRY)
bulk_last_full_unsubscribes = Gauge(
    "csand_bulk_last_full_unsubscribes_timestamp_seconds",
    "When the last nightly full export of unsubscribes was reconciled (0: never).",
    registry=REGISTRY)

bulk_last_file_age = Gauge(
    "csand_bulk_last_file_age_seconds",
    "With controlshift.source = \"bulk\": seconds since the last signatures file of each kind "
    "(incremental, full) was announced; -1 before any.", ["kind"],
    registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
