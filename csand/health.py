"""Is csand healthy? One pure judgement of the store's status figures, shared by ``/healthz`` and
``csand status`` (whose exit code a monitoring check can use)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

HEARTBEAT_STALE_SECONDS = 60.0
INSTANCE_STALE_SECONDS = 30.0  # an instance heartbeats every 5 s
# ControlShift exports every table in full each night: a day and a half without a nightly copy
# of unsubscribes reconciled, once csand has seen bulk-data files, means they stopped coming.
FULL_EXPORT_STALE_SECONDS = 36 * 3600.0


def _age(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    return now - datetime.fromisoformat(iso).timestamp()


def reasons(status: dict[str, Any], *, poll_interval: float, now: float,
            daemon_expected: bool = True, dead_growth: bool = True) -> list[str]:
    """What is wrong, in words an operator can act on; empty when all is well."""
    found: list[str] = []
    stale_after = 3 * poll_interval + 120
    heartbeat = _age(status.get("daemon_heartbeat_at"), now)
    if daemon_expected and (heartbeat is None or heartbeat > HEARTBEAT_STALE_SECONDS):
        found.append("the daemon is not running (no heartbeat)")
    poll = _age(status.get("last_poll_at"), now)
    if poll is not None and poll > stale_after:
        found.append(f"last successful ControlShift poll was {poll:.0f} s ago")
    elif poll is None and heartbeat is not None and status.get("daemon_started_at"):
        started = _age(status["daemon_started_at"], now)
        if started is not None and started > stale_after:
            found.append("no successful ControlShift poll since the daemon started")
    if status.get("an_paused"):
        found.append(f"workers paused: {status['an_paused']}")
    if dead_growth and status.get("dead_last_hour"):
        found.append(f"{status['dead_last_hour']} items went to the dead letters in the last hour")
    ambiguous = status.get("adoption_ambiguous") or []
    if ambiguous:
        found.append(f"{len(ambiguous)} petition(s) wait for a person to choose their Action "
                     "Network twin (csand adopt --pick / --create): "
                     + ", ".join(a["slug"] for a in ambiguous[:5])
                     + (" ..." if len(ambiguous) > 5 else ""))
    endpoint = status.get("webhook_endpoint") or {}
    if endpoint.get("disabled_at"):
        found.append(f"ControlShift disabled csand's webhook endpoint at {endpoint['disabled_at']}")
    found.extend(cluster_reasons(status.get("cluster")))
    found.extend(bulk_reasons(status.get("bulk"), now))
    found.extend((status.get("bulk_source") or {}).get("stale") or [])
    return found


def bulk_reasons(bulk: dict[str, Any] | None, now: float) -> list[str]:
    """Bulk-data exports are on (csand has seen files) but no nightly full export of
    unsubscribes was reconciled for :data:`FULL_EXPORT_STALE_SECONDS`."""
    if not bulk or not bulk.get("first_seen_at"):
        return []
    last = (bulk.get("last_full_unsubscribes") or {}).get("reconciled_at")
    since = _age(last or bulk["first_seen_at"], now)
    if since is None or since <= FULL_EXPORT_STALE_SECONDS:
        return []
    if last:
        return [f"no nightly full export of unsubscribes reconciled for {since / 3600:.0f} h "
                "(the last at " + last + "): org-wide unsubscribes whose webhook and "
                "incremental file were both missed wait for it"]
    return [f"no nightly full export of unsubscribes reconciled in the {since / 3600:.0f} h "
            "since csand first saw a bulk-data file: check the bulk data exports in "
            "ControlShift"]


def cluster_reasons(cluster: dict[str, Any] | None) -> list[str]:
    """Several instances on one PostgreSQL database: nobody polls, or an instance went silent."""
    if not cluster or not cluster.get("shared"):
        return []
    found: list[str] = []
    alive = [i for i in cluster.get("instances", [])
             if i.get("heartbeat_age_s", 1e9) <= INSTANCE_STALE_SECONDS]
    if alive and cluster.get("leader") is None:
        found.append("no instance leads: nobody polls ControlShift (an instance takes over "
                     "within 20 s of the leader's death; longer means they cannot renew)")
    for instance in cluster.get("instances", []):
        if instance.get("heartbeat_age_s", 0) > INSTANCE_STALE_SECONDS:
            found.append(f"instance {instance['instance']} has sent no heartbeat for "
                         f"{instance['heartbeat_age_s']:.0f} s (down, or cannot reach the "
                         "database; a clean stop removes it)")
    return found
