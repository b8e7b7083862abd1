"""The command line. Exit codes a monitoring check can use:

0 all good · 1 the thing asked for failed (a check, a missing database, an unknown item) ·
2 bad configuration or usage · 3 ``status``: csand is unhealthy. ``audit``: 1 drift found,
2 could not audit (also a service unreachable or a key refused).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import typer

from csand import __version__, logs
from csand import config as config_mod

T = TypeVar("T")

app = typer.Typer(
    help="Keep Action Network in sync with ControlShift petitions.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
dead_app = typer.Typer(help="See why items died; put them back after fixing the cause.",
                       no_args_is_help=True)
app.add_typer(dead_app, name="dead")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="TOML config file.", envvar="CSAND_CONFIG")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RevealOption = Annotated[bool, typer.Option(
    "--reveal", help="Show email addresses unmasked (they are masked as a***@example.org).")]

UNHEALTHY = 3


def _version(value: bool) -> None:
    if value:
        typer.echo(f"csand {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """csand: ControlShift → Action Network sync daemon."""
    # Commands print their results on stdout; stray library warnings go to stderr, redacted.
    logs.configure("warning", "auto", stream=sys.stderr)


def _load(path: Path, *, secrets: bool = True) -> config_mod.Settings:
    try:
        return config_mod.load(path, secrets=secrets)
    except config_mod.ConfigError as exc:
        typer.echo(f"csand: {exc}", err=True)
        raise typer.Exit(2) from None


def _with_store(settings: config_mod.Settings, fn: Callable[[Any], Awaitable[T]],
                *, must_exist: bool = True) -> T:
    from csand.checks import open_configured_store
    from csand.storage import StoreError

    if settings.store.url is None:  # SQLite: a command that reads must not create an empty one
        path = Path(settings.store.path)
        if must_exist and not path.exists():
            typer.echo(f"csand: no database at {path} yet (has csand run started?)", err=True)
            raise typer.Exit(1)

    async def go() -> T:
        store = await open_configured_store(settings)
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return anyio.run(go, backend="asyncio")
    except StoreError as exc:  # unreachable, newer schema: one line, the password masked
        typer.echo(f"csand: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def run(
    config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Poll and decide, log every AN write it would make, write nothing "
        "to Action Network (works on a copy of the database).")] = False,
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT (SIGHUP reloads logging)."""
    from csand.daemon import Daemon
    from csand.storage import StoreError
    from csand.storage.sqlite import AlreadyRunning

    settings = _load(config)
    logs.configure(settings.log.level, settings.log.format, secrets=settings.secrets())
    try:
        try:
            anyio.run(Daemon(settings, config_path=config, dry_run=dry_run).run,
                      backend="asyncio")
        except BaseExceptionGroup as group:  # raised inside the daemon's task group
            raise _only(group) from None
    except (AlreadyRunning, StoreError) as exc:
        typer.echo(f"csand: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        if not type(exc).__module__.startswith("psycopg"):
            raise
        # The database went away mid-run (a restart, a failover): exit and let systemd start
        # csand again; what was in flight is released at start-up or its lease expires.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        typer.echo(f"csand: lost the PostgreSQL connection ({first}); exiting so that it is "
                   "restarted (nothing is lost: unfinished items go back to the queue)", err=True)
        raise typer.Exit(1) from None


def _only(group: BaseExceptionGroup) -> BaseException:
    """The one exception a task group wrapped (the group itself when there are several)."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]  # type: ignore[assignment]
    return group


@app.command()
def status(config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH, as_json: JsonOption = False,
           reveal: RevealOption = False) -> None:
    """The queue, the last poll, AN's rate, dead letters and webhook health; exit 3 if unhealthy.

    Safe to run while ``csand run`` is running.
    """
    from csand import health

    settings = _load(config, secrets=False)
    data = _with_store(settings, _status_with_cluster)
    problems = health.reasons(data, poll_interval=settings.controlshift.poll_interval,
                              now=time.time())
    data["healthy"] = not problems
    data["problems"] = problems
    data["retention_days"] = settings.store.retention_days
    if not reveal:  # poll errors and dead-letter reasons may quote a record
        data = logs.mask_data(data)
    if as_json:
        typer.echo(json.dumps(data))
    else:
        from rich.console import Console

        from csand.report import print_status

        console = Console()
        print_status(data, console)
        _print_cluster(data["cluster"], console)
    if problems:
        raise typer.Exit(UNHEALTHY)


async def _status_with_cluster(store: Any) -> dict[str, Any]:
    """``store.status()`` plus ``"cluster"``: ``store.cluster()`` with ``backend``, ``shared``,
    ``stale_after_s`` and, per instance, ``stale`` (its heartbeat is older than that)."""
    from csand.checks import STALE_AFTER_S

    data = await store.status()
    cluster = dict(await store.cluster())
    cluster["backend"] = "postgresql" if store.shared else "sqlite"
    cluster["shared"] = bool(store.shared)
    cluster["stale_after_s"] = STALE_AFTER_S
    cluster["instances"] = [
        {**i, "stale": i.get("heartbeat_age_s") is None or i["heartbeat_age_s"] > STALE_AFTER_S}
        for i in cluster.get("instances") or ()]
    data["cluster"] = cluster
    return data


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def _print_cluster(cluster: dict[str, Any], console: Any) -> None:
    """Who leads and each instance's last heartbeat. SQLite has one instance: one line."""
    from rich.table import Table

    instances = cluster.get("instances") or []
    leader = cluster.get("leader")
    if not cluster.get("shared"):
        for i in instances:  # none before the daemon's first heartbeat
            state = " [red](stale: not running?)[/red]" if i["stale"] else ""
            console.print(f"[bold]instance[/bold] {i['instance']} (SQLite, single instance), "
                          f"heartbeat {_ago(i.get('heartbeat_age_s'))}{state}")
        return
    if leader:
        lead = (f"[bold]leader[/bold] {leader} (term {cluster.get('term')}, lease runs "
                f"{cluster.get('leader_for_s') or 0:.0f} s more)")
    else:
        lead = ("[yellow]no leader: no instance polls ControlShift now"
                + (" (one takes over within a lease)" if any(not i["stale"] for i in instances)
                   else "") + "[/yellow]")
    table = Table(title=f"cluster (PostgreSQL, {len(instances)} instance(s))")
    for column in ("instance", "role", "heartbeat", "host", "pid", "workers", "version"):
        table.add_column(column)
    for i in instances:
        heartbeat = _ago(i.get("heartbeat_age_s"))
        if i["stale"]:
            heartbeat = f"[red]{heartbeat}: stale, down?[/red]"
        table.add_row(i["instance"], "leader" if i["instance"] == leader else "follower",
                      heartbeat, *(str(i.get(k, "")) for k in ("host", "pid", "workers",
                                                                   "version")))
    console.print(table)
    console.print(lead)


@app.command()
def check(config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH, as_json: JsonOption = False
          ) -> None:
    """Validate the config, reach ControlShift and Action Network, and check the store."""
    from csand.checks import run_checks

    try:
        settings = config_mod.load(config)
    except config_mod.ConfigError as exc:
        results = [{"check": "config", "ok": False, "detail": str(exc)}]
    else:
        results = [{"check": "config", "ok": True, "detail": f"{config} is valid"}]
        results += anyio.run(run_checks, settings, backend="asyncio")
    if as_json:
        typer.echo(json.dumps(results))
    else:
        for r in results:
            typer.echo(f"{'✓' if r['ok'] else '✗'} {r['check']}: {r['detail']}")
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)


@dead_app.command("list")
def dead_list(config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH, as_json: JsonOption = False,
              limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
              reveal: RevealOption = False) -> None:
    """Dead items, oldest first, with the reason."""
    settings = _load(config, secrets=False)
    items = _with_store(settings, lambda store: store.dead_items(limit))
    if not reveal:  # a reason may quote the record ("invalid email address ...")
        items = logs.mask_data(items)
    if as_json:
        typer.echo(json.dumps(items))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(items)} dead item(s)")
    for column in ("id", "record", "attempts", "died", "reason"):
        table.add_column(column)
    for item in items:
        table.add_row(str(item["id"]), item["source_key"], str(item["attempts"]),
                      item["finished_at"] or "", item["last_error"] or "")
    Console().print(table)


@dead_app.command("show")
def dead_show(item_id: int, config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
              reveal: Annotated[bool, typer.Option(help="Show the email address unmasked.")]
              = False) -> None:
    """One item in full: the activity, its attempts and why it died (as JSON)."""
    settings = _load(config, secrets=False)
    item = _with_store(settings, lambda store: store.dead_item(item_id))
    if item is None:
        typer.echo(f"csand: no item {item_id}", err=True)
        raise typer.Exit(1)
    text = json.dumps(item, indent=2, ensure_ascii=False)
    typer.echo(text if reveal else logs.mask_email(text))


@dead_app.command("retry")
def dead_retry(item_id: Annotated[int | None, typer.Argument()] = None,
               all_: Annotated[bool, typer.Option("--all", help="Every dead item.")] = False,
               config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH) -> None:
    """Put dead items back in the queue (attempts reset); the running daemon picks them up.

    Items whose record ControlShift deleted since they died stay dead: that data must not
    reach Action Network (drop them with ``csand dead drop``). So do malformed ControlShift
    records: there is nothing to retry until ControlShift corrects them, and then the next
    poll syncs them by itself.
    """
    ids = _ids(item_id, all_)
    settings = _load(config, secrets=False)
    result = _with_store(settings, lambda store: store.requeue_dead(ids))
    typer.echo(f"{result.queued} item(s) queued again")
    if result.skipped_deleted:
        typer.echo(f"{result.skipped_deleted} item(s) not queued: their record was deleted on "
                   "ControlShift since (csand dead drop gives up on them)")
    if result.skipped_malformed:
        typer.echo(f"{result.skipped_malformed} malformed ControlShift record(s) not queued: "
                   "they hold nothing to sync; once corrected on ControlShift the next poll "
                   "syncs them (csand dead drop clears them)")
    if ids and result.queued == 0:
        raise typer.Exit(1)


@dead_app.command("drop")
def dead_drop(item_id: Annotated[int | None, typer.Argument()] = None,
              all_: Annotated[bool, typer.Option("--all", help="Every dead item.")] = False,
              config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH) -> None:
    """Give up on dead items: they are marked cancelled (kept for the record)."""
    _change_dead(item_id, all_, config, lambda store, ids: store.drop_dead(ids), "dropped")


def _change_dead(item_id: int | None, all_: bool, config: Path,
                 change: Callable[[Any, list[int] | None], Awaitable[int]], done: str) -> None:
    ids = _ids(item_id, all_)
    settings = _load(config, secrets=False)
    count = _with_store(settings, lambda store: change(store, ids))
    typer.echo(f"{count} item(s) {done}")
    if ids and count == 0:
        raise typer.Exit(1)


def _ids(item_id: int | None, all_: bool) -> list[int] | None:
    if (item_id is None) == (not all_):
        typer.echo("csand: give an item ID or --all", err=True)
        raise typer.Exit(2)
    return None if all_ else [item_id]  # type: ignore[list-item]


@app.command()
def backfill(
    config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
    since: Annotated[str | None, typer.Option(
        help="Also re-sync activities since this date (YYYY-MM-DD or ISO time) that were "
        "synced already.")] = None,
) -> None:
    """Sync all history now, with progress and an ETA. Safe to interrupt and run again."""
    from csand.backfill import run_backfill
    from csand.model import parse_time

    settings = _load(config)
    since_iso = None
    if since is not None:
        parsed = parse_time(since)
        if parsed is None:
            typer.echo(f"csand: --since {since!r} is not a date", err=True)
            raise typer.Exit(2)
        since_iso = parsed.isoformat()
    from csand.storage import StoreError

    logs.configure("warning", "json", stream=logs.open_private(  # lives as long as the process
        _backfill_log(settings)), secrets=settings.secrets())
    try:
        code = anyio.run(run_backfill, settings, since_iso, backend="asyncio")
    except StoreError as exc:
        typer.echo(f"csand: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _backfill_log(settings: config_mod.Settings) -> Path:
    """Where ``csand backfill`` logs: beside the SQLite database. With PostgreSQL there is no
    database file to sit beside, so ./csand.backfill.log: the current directory is one the
    operator running the backfill chose and can write (unlike /var/lib/csand, the service's)."""
    if settings.store.url is None:
        return Path(settings.store.path).with_suffix(".backfill.log")
    return Path.cwd() / "csand.backfill.log"


@app.command()
def adopt(
    config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Match and report; record nothing.")] = False,
    pick: Annotated[list[str] | None, typer.Option(
        "--pick", help="SLUG=AN_UUID: adopt that AN petition for an ambiguous CS petition "
        "(repeatable).", show_default=False)] = None,
    create: Annotated[list[str] | None, typer.Option(
        "--create", help="SLUG: give an ambiguous CS petition a fresh AN twin (repeatable).",
        show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Adopt the AN petitions ControlShift's hosted integration made, before csand creates any.

    Exit 1 when some petitions are ambiguous (choose with --pick or --create, then
    `csand dead retry --all` for items that died waiting). See docs/switching.md.
    """
    from csand.adopt import decide, parse_pick, print_result, run_adopt
    from csand.storage import StoreError
    from csand.storage.sqlite import AlreadyRunning

    settings = _load(config, secrets=not (pick or create))  # deciding needs only the store
    if pick or create:
        try:
            picks = [parse_pick(p) for p in pick or ()]
        except ValueError as exc:
            typer.echo(f"csand: {exc}", err=True)
            raise typer.Exit(2) from None
        count = _with_store(settings, lambda store: decide(store, picks, create or []),
                            must_exist=False)
        typer.echo(f"{count} decision(s) recorded; csand follows them the next time it mirrors "
                   "those petitions (`csand dead retry --all` puts items that died waiting back)")
        return
    logs.configure("warning", "auto", stream=sys.stderr, secrets=settings.secrets())
    from rich.console import Console

    from csand.actionnetwork.client import ANFailure
    from csand.controlshift.client import CSError

    try:
        try:
            result = anyio.run(lambda: run_adopt(settings, dry_run=dry_run), backend="asyncio")
        except BaseExceptionGroup as group:  # the two listings run side by side
            raise _only(group) from None
    except (AlreadyRunning, StoreError) as exc:
        typer.echo(f"csand: {exc}" + (" (stop csand while csand adopt records twins)"
                                      if isinstance(exc, AlreadyRunning) else ""), err=True)
        raise typer.Exit(1) from None
    except (ANFailure, CSError) as exc:
        typer.echo(f"csand: {type(exc).__name__}: {exc} (nothing was recorded; run csand adopt "
                   "again)", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.as_json()))
    else:
        print_result(result, Console())
    if result.ambiguous:
        raise typer.Exit(1)


@app.command("store-copy")
def store_copy(
    config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
    to: Annotated[str | None, typer.Option(
        "--to", help="The empty PostgreSQL database: postgresql://user:password@host/db.",
        show_default=False)] = None,
    to_file: Annotated[Path | None, typer.Option(
        "--to-file", help="A file holding that URL (keeps the password off the command line).",
        show_default=False)] = None,
) -> None:
    """Copy the SQLite store ([store] path) into an empty PostgreSQL database (stop csand first).

    Keeps what ControlShift cannot tell again (org-wide unsubscribes received by webhook) and
    what Action Network acknowledged (opt-ins), so the move needs no re-sync of all history.
    """
    from csand.storage import StoreError, is_url, redact_url
    from csand.storage.copy import TABLES, copy_sqlite_to_postgres

    settings = _load(config, secrets=False)
    if settings.store.url is not None:
        typer.echo(f"csand: {config} already names a PostgreSQL store ([store] url): "
                   "store-copy reads the SQLite one ([store] path)", err=True)
        raise typer.Exit(2)
    if (to is None) == (to_file is None):
        typer.echo("csand: give the PostgreSQL URL with --to or --to-file", err=True)
        raise typer.Exit(2)
    if to_file is not None:
        try:
            to = to_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            typer.echo(f"csand: cannot read {to_file}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
    assert to is not None
    if not is_url(to):
        typer.echo(f"csand: {redact_url(to)!r} is not a postgresql:// URL", err=True)
        raise typer.Exit(2)
    logs.configure("warning", "auto", stream=sys.stderr,
                   secrets=config_mod.url_passwords(to))  # stray library warnings, redacted
    source = Path(settings.store.path)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    console = Console()
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description:<15}"), BarColumn(), MofNCompleteColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks = {table: bar.add_task(table, total=None) for table in TABLES}

        def progress(table: str, done: int, total: int) -> None:
            bar.update(tasks[table], completed=done, total=total)

        try:
            copied = anyio.run(lambda: copy_sqlite_to_postgres(source, to, progress=progress),
                               backend="asyncio")
        except StoreError as exc:
            failed: StoreError | None = exc
        else:
            failed = None
    if failed is not None:  # once the progress bar is gone: one line
        typer.echo(f"csand: {failed}", err=True)
        raise typer.Exit(1)
    console.print(f"Copied {source} to {redact_url(to)}:", soft_wrap=True, markup=False,
                  highlight=False)
    table = Table()
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in copied.items():
        table.add_row(name, f"{rows:,}")
    console.print(table)
    console.print(
        "Next: in the config, replace [store] path with the URL (url, url_file or the systemd "
        "credential store_url), then start csand on one machine, check csand status, and start "
        f"the other instances. Keep {source} until then, in case you go back.",
        soft_wrap=True, markup=False, highlight=False)


@app.command()
def audit(
    config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
    sample: Annotated[int | None, typer.Option(
        "--sample", min=1, help="Check this many synced activities, picked at random "
        "(default audit.sample, 300).", show_default=False)] = None,
    petition: Annotated[str | None, typer.Option(
        "--petition", help="Check one petition fully: its ControlShift slug.",
        show_default=False)] = None,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Queue the drifted activities again: the running daemon syncs them "
        "by the usual rules.")] = False,
    duplicates: Annotated[bool, typer.Option(
        "--duplicates", help="Also look for copies of mirrored petitions (reads every AN "
        "petition, 25 a page).")] = False,
    an_rate: Annotated[float | None, typer.Option(
        "--an-rate", min=0.01, help="AN requests/second for the audit (default audit.an_share "
        "of the limit). More only while the daemon is stopped.", show_default=False)] = None,
    as_json: JsonOption = False,
    reveal: RevealOption = False,
) -> None:
    """Compare what csand synced with what Action Network holds now, and report the drift.

    Exit 0: no drift; 1: drift found; 2: could not audit (configuration, credentials, a
    service unreachable). Safe to run while ``csand run`` is running: it takes only its share of
    each service's budget.
    """
    from csand.audit import AuditFailed, emails_masked, run_audit
    from csand.checks import open_configured_store
    from csand.storage import StoreError

    settings = _load(config)
    if sample is not None and petition is not None:
        typer.echo("csand: give --sample or --petition, not both", err=True)
        raise typer.Exit(2)
    if settings.store.url is None and not Path(settings.store.path).exists():
        typer.echo(f"csand: no database at {settings.store.path}: nothing synced to audit",
                   err=True)
        raise typer.Exit(2)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    err = Console(stderr=True)
    with Progress(TextColumn("audit"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("audit", total=None)

        async def go() -> Any:
            store = await open_configured_store(settings)
            try:
                return await run_audit(
                    settings, store, sample=sample, petition=petition, repair=repair,
                    duplicates=duplicates, an_rate=an_rate,
                    progress=lambda done, total: bar.update(task, completed=done, total=total))
            finally:
                await store.close()

        try:
            report = anyio.run(go, backend="asyncio")
        except (AuditFailed, StoreError, LookupError) as exc:
            failed: Exception | None = exc
        else:
            failed = None
    if failed is not None:
        typer.echo(f"csand: could not audit: {failed}", err=True)
        raise typer.Exit(2)
    data = report.to_json()
    if not reveal:
        data = emails_masked(data)
    if as_json:
        typer.echo(json.dumps(data))
    else:
        from csand.report import print_audit

        print_audit(data, Console())
    raise typer.Exit(1 if report.drift else 0)


@app.command()
def demo(
    petitions: Annotated[int, typer.Option(help="Petitions to generate.")] = 12,
    signatures: Annotated[int, typer.Option(help="Signatures to generate.")] = 400,
    rate: Annotated[float, typer.Option(help="AN requests/second (the real limit is 4).")] = 20.0,
    faults: Annotated[bool, typer.Option(help="Inject AN faults (5xx, 200 {}, drops).")] = True,
    seed: Annotated[int, typer.Option(help="Random seed for the generated data.")] = 7,
    source: Annotated[str, typer.Option(
        help="Where petitions and signatures come from: rest (polling) or bulk (the "
             "bulk-data exports).")] = "rest",
) -> None:
    """Run csand against built-in simulators of both services, with generated data."""
    from csand.demo import run_demo

    if source not in ("rest", "bulk"):
        raise typer.BadParameter("must be rest or bulk", param_hint="--source")
    code = run_demo(petitions=petitions, signatures=signatures, rate=rate, faults=faults,
                    seed=seed, source=source)
    raise typer.Exit(code)
