"""Human-readable output for the CLI (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from csand.controlshift.budget import status_rows


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="csand", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("pending", "in_flight", "done", "dead", "cancelled", "retrying"):
        table.add_row(key.replace("_", " "), str(data.get(key, 0)))
    age = data.get("oldest_pending_age_s")
    table.add_row("oldest waiting", f"{age:.0f} s" if age is not None else "-")
    table.add_row("last poll", f"{data.get('last_poll_at') or 'never'}"
                  + (f" ({data['last_poll_result']})" if data.get("last_poll_result") else ""))
    table.add_row("last reconciliation", data.get("last_reconcile_at") or "never")
    table.add_row("backfill", "done" if data.get("backfill_done") else "not finished")
    if data.get("history_start"):
        table.add_row("history start", f"{data['history_start']}: "
                      f"{data.get('history_skipped', 0)} older activities recorded, not synced "
                      "(csand backfill --since DATE syncs them)")
    table.add_row("petitions", f"{data.get('petitions_seen', 0)} seen, "
                  f"{data.get('petitions_mirrored', 0)} mirrored in Action Network")
    table.add_row("signatures", f"{data.get('signatures_seen', 0)} seen, "
                  f"{data.get('signatures_deleted', 0)} deleted on ControlShift")
    table.add_row("events", f"{data.get('events_seen', 0)} seen, "
                  f"{data.get('events_mirrored', 0)} mirrored in Action Network")
    table.add_row("attendees", f"{data.get('attendees_seen', 0)} seen, "
                  f"{data.get('attendees_deleted', 0)} gone or not attending")
    rate = data.get("an_rate")
    table.add_row("AN rate", (f"{rate:g} req/s, {data.get('an_429s_since_start', 0)} 429s "
                              "since start") if rate else "-")
    for label, text in status_rows(data.get("cs_budget")):
        table.add_row(label, text)
    table.add_row("daemon", f"alive (heartbeat {data['daemon_heartbeat_at']})"
                  if data.get("daemon_heartbeat_at") else "not running")
    if data.get("webhooks_received"):
        table.add_row("webhooks", f"{data['webhooks_received']} received, "
                      f"{data.get('webhooks_waiting', 0)} waiting, "
                      f"{data.get('webhooks_failed', 0)} malformed")
    endpoint = data.get("webhook_endpoint")
    if endpoint:
        if endpoint.get("disabled_at"):
            health = f"[red]DISABLED by ControlShift since {endpoint['disabled_at']}[/red]"
        elif endpoint.get("missing"):
            health = "[yellow]not registered in ControlShift[/yellow]"
        elif endpoint.get("last_failure"):
            health = f"[yellow]ok, last failure {endpoint['last_failure']}[/yellow]"
        else:
            health = "ok"
        table.add_row("webhook endpoint", health)
    _bulk_rows(table, data.get("bulk"))
    if data.get("retention_days"):
        table.add_row("personal data", f"kept {data['retention_days']:g} days after an item is "
                      "synced or dropped (dead letters: until retried or dropped)")
    ambiguous = data.get("adoption_ambiguous") or []
    if ambiguous:
        table.add_row("[yellow]ambiguous[/yellow]", f"[yellow]{len(ambiguous)} petition(s) "
                      "without a chosen Action Network twin: "
                      + ", ".join(a["slug"] for a in ambiguous) + "[/yellow]")
    if data.get("an_paused"):
        table.add_row("[red]PAUSED[/red]", f"[red]{data['an_paused']}[/red]")
    console.print(table)
    for problem in data.get("problems") or ():
        console.print(f"[red]✗ {problem}[/red]")
    if data.get("dead_reasons"):
        dead = Table(title="dead letters by reason")
        dead.add_column("count", justify="right")
        dead.add_column("reason")
        for row in data["dead_reasons"]:
            dead.add_row(str(row["count"]), row["reason"] or "")
        console.print(dead)


def print_audit(data: dict[str, Any], console: Console | None = None, limit: int = 50) -> None:
    """``csand audit``: drift by kind, the findings (the first ``limit``), and its cost."""
    console = console or Console()
    what = f"petition {data['petition']}" if data.get("petition") else "a sample"
    table = Table(title=f"audit of {what}: {data['checked']} activities checked")
    table.add_column("drift")
    table.add_column("found", justify="right")
    for kind, count in data["by_kind"].items():
        table.add_row(kind.replace("_", " "), f"[red]{count}[/red]" if count else "0")
    console.print(table)
    for reason, count in sorted(data["skipped"].items()):
        console.print(f"not judged: {count} {reason}")
    findings = data["findings"]
    if findings:
        shown = Table(title=f"findings ({min(limit, len(findings))} of {len(findings)})")
        for column in ("kind", "record", "person", "detail", "repair"):
            shown.add_column(column)
        for f in findings[:limit]:
            shown.add_row(f["kind"], f["source_key"] or f"petition {f['petition_id']}",
                          f["email"] or "", f["detail"], "yes" if f["repairable"] else "no")
        console.print(shown)
    console.print(f"{data['an_requests']} Action Network requests "
                  f"({data['an_requests_per_activity']} per activity, at most "
                  f"{data['an_rate']} /s), {data['cs_requests']} ControlShift requests, "
                  f"{data['seconds']} s")
    repair = data.get("repair")
    if repair is not None:
        console.print(f"repair: {repair['queued']} activities queued again"
                      + (f", {repair['already_queued']} already queued" if
                         repair["already_queued"] else "")
                      + "; the running daemon syncs them (csand status shows the queue)")
    elif any(f["repairable"] for f in findings):
        console.print("csand audit --repair queues the repairable ones again")
    if not findings:
        console.print("[green]no drift[/green]")


def _bulk_rows(table: Table, bulk: dict[str, Any] | None) -> None:
    """Bulk-data files: how many, the expired ones, the last nightly unsubscribes reconciled."""
    if not bulk or not bulk.get("first_seen_at"):
        return
    files = bulk.get("files") or {}
    table.add_row("bulk data files", f"{files.get('done', 0)} read, "
                  f"{files.get('skipped', 0)} skipped (table not used), "
                  f"{bulk.get('waiting', 0)} waiting, {bulk.get('failed', 0)} failed; "
                  f"last announced {bulk.get('last_announced_at')}")
    newest = bulk.get("newest_expired")
    if bulk.get("expired") and newest:
        table.add_row("[yellow]bulk files expired[/yellow]", (
            f"[yellow]{bulk['expired']} never read; the newest: {newest['table']} "
            f"({newest['kind']}, {newest['file']}, announced {newest['announced_at']}); the "
            "next nightly full export covers them[/yellow]"))
    last = bulk.get("last_full_unsubscribes")
    table.add_row("unsubscribes reconciled",
                  f"{last['reconciled_at']} (nightly full export, {last['rows']} rows"
                  + (", not applied: controlshift.global_unsubscribes = false"
                     if last.get("status") == "skipped" else "") + ")"
                  if last else "never (no nightly full export of unsubscribes read yet)")
