"""The daemon: one anyio task group running the poller and the dispatcher, until a signal.

Shutdown (SIGTERM/SIGINT): the poller stops at once (what it enqueued is committed, what it had
not is re-read next time), the dispatcher stops leasing, items in flight get
``sync.shutdown_grace`` seconds to finish, and whatever is still running is handed back to the
queue without using up an attempt. Exit code 0, well within systemd's 15 s default.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from contextlib import AsyncExitStack, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

from csand import __version__, health, logs, metrics
from csand import config as config_mod
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.config import Settings
from csand.controlshift import budget as cs_budget
from csand.controlshift.bulksource import BulkSource
from csand.controlshift.client import ControlShiftClient, CSError, configured_client
from csand.controlshift.ingest import BulkIngest, default_handlers
from csand.controlshift.poller import Poller
from csand.controlshift.webhooks import WebhookProcessor
from csand.dryrun import DryRunActionNetworkClient, ReadOnlyTransport, copy_database
from csand.logs import get_logger
from csand.model import history_start, parse_time
from csand.ratelimit import (
    HONOURED_KEY,
    RESERVATION_KEY,
    Reservation,
    SharedTokenBucket,
    TokenBucket,
)
from csand.retry import RetryPolicy
from csand.storage import STATUSES, NotLeader, Storage, StoreError, open_store, redact_url
from csand.storage.sqlite import single_instance
from csand.sync.worker import Dispatcher
from csand.systemd import Notifier
from csand.web import Listener, build_app

log = get_logger("daemon")

HEARTBEAT_SECONDS = 5.0
# Leadership of a cluster (PostgreSQL): a lease of LEAD_TTL seconds, renewed every LEAD_RENEW.
# A leader that dies is replaced within LEAD_TTL + LEAD_RENEW (20 s); one that cannot renew
# stops polling LEAD_MARGIN seconds before its lease can run out in the database.
LEAD_TTL = 15.0
LEAD_RENEW = 5.0
LEAD_MARGIN = 3.0
PRUNE_SECONDS = 3600.0  # personal data past store.retention_days is pruned this often
BULK_HTTP_TIMEOUT = 60.0  # seconds without a byte from S3 before a download counts as failed
AN_HEADROOM = 0.97  # 3% under AN's limit: arrival jitter must not cost 429s


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        an_transport: httpx.AsyncBaseTransport | None = None,
        cs_transport: httpx.AsyncBaseTransport | None = None,
        bulk_transport: httpx.AsyncBaseTransport | None = None,
        config_path: Path | None = None,
        dry_run: bool = False,
    ) -> None:
        self.settings = settings
        self._an_transport = an_transport
        self._cs_transport = cs_transport
        self._bulk_transport = bulk_transport
        self.store: Storage | None = None
        self.poller: Poller | None = None
        self.dispatcher: Dispatcher | None = None
        self.webhooks: WebhookProcessor | None = None
        self.bulk: BulkIngest | None = None
        self.listener: Listener | None = None
        self.started = anyio.Event()
        self._stop = anyio.Event()
        self.last_status: dict = {}
        self.notifier = Notifier()
        self.is_leader = False
        self.dry_run = dry_run
        self.config_path = config_path

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT when ``handle_signals``)."""
        async with anyio.create_task_group() as signals:
            if handle_signals:  # before any start-up work: a signal must never kill csand
                await signals.start(self._watch_signals)
            await self._run()
            signals.cancel_scope.cancel()

    async def _run(self) -> None:
        s = self.settings
        url = _store_url(s)
        if url and self.dry_run:
            raise StoreError("csand run --dry-run decides on a copy of a SQLite store; with "
                             "PostgreSQL (store.url) there is no copy to work on: run the dry "
                             "run with a SQLite store")
        # One process per SQLite file; with PostgreSQL any number share the database. A dry run
        # works on its own copy, so it may run beside the real daemon.
        lock = nullcontext() if self.dry_run or url else single_instance(Path(s.store.path))
        with lock, tempfile.TemporaryDirectory(prefix="csand-dry-run-") as scratch:
            target: Any = s.store
            if self.dry_run:  # decisions on a copy: the real queue and knowledge stay as they are
                target = Path(scratch) / "csand.db"
                copy_database(Path(s.store.path), target)
            async with AsyncExitStack() as stack:
                # Each worker may hold one connection (a petition's mirror lock) while it needs
                # another: the pool must outnumber the workers.
                store = await open_store(target, instance=_instance_name(s),
                                         pool_size=max(s.store.pool_size, s.sync.workers + 4))
                stack.push_async_callback(store.close)
                self.store = store
                if store.shared:
                    await self._check_instance_name(store)
                store.history_start = await resolve_history_start(store, s.sync.history_start)
                released = await store.release_all_in_flight()
                an_http = await stack.enter_async_context(self._an_http())
                cs_http = await stack.enter_async_context(httpx.AsyncClient(
                    transport=self._cs_transport, timeout=s.controlshift.timeout,
                    headers={"User-Agent": f"csand/{__version__}"},
                ))
                # AN's limit is per API key: instances on one database share one bucket.
                limiter = (SharedTokenBucket(store, s.action_network.requests_per_second,
                                             headroom=AN_HEADROOM) if store.shared
                           else TokenBucket(s.action_network.requests_per_second,
                                            headroom=AN_HEADROOM))
                an = (DryRunActionNetworkClient if self.dry_run else ActionNetworkClient)(
                    an_http, s.action_network.url, s.action_network.api_key.get_secret_value(),  # type: ignore[union-attr]
                    limiter,
                )
                cs = self._cs_client(cs_http)
                await cs_budget.restore(store, cs.budget)
                self.poller = Poller(
                    cs, store, poll_interval=s.controlshift.poll_interval,
                    reconcile_interval=s.controlshift.reconcile_interval,
                    org_slug=s.controlshift.org_slug, sync_events=s.sync.events,
                    source=s.controlshift.source,
                    bulk_stale=(s.controlshift.bulk_stale_incremental,
                                s.controlshift.bulk_stale_full),
                )
                self.dispatcher = Dispatcher(
                    store, an, workers=s.sync.workers, origin_system=s.sync.origin_system,
                    event_origin_system=s.sync.event_origin_system,
                    policy=RetryPolicy(base=s.sync.retry_base, cap=s.sync.retry_cap,
                                       max_attempts=s.sync.max_attempts),
                    lease_seconds=s.sync.lease_seconds,
                    auth_recheck_interval=s.sync.auth_recheck_interval,
                    options=s.sync.options(),
                )
                # A dry run must not acknowledge webhooks it would only keep in a scratch copy.
                if s.controlshift.webhook_secret is not None and not self.dry_run:
                    self.webhooks = WebhookProcessor(
                        store, self.poller.directory, self.poller.org_slug, self.poller.poke,
                        global_unsubscribes=s.controlshift.global_unsubscribes,
                        events=self.poller.events if s.sync.events else None,
                    )
                    # Bulk-data files come announced by webhook too. Their own client: S3 must
                    # never see ControlShift's credentials.
                    bulk_http = await stack.enter_async_context(httpx.AsyncClient(
                        transport=self._bulk_transport, timeout=BULK_HTTP_TIMEOUT,
                        headers={"User-Agent": f"csand/{__version__}"}))
                    handlers = default_handlers(
                        global_unsubscribes=s.controlshift.global_unsubscribes)
                    if s.controlshift.source == "bulk":
                        BulkSource(store, self.poller.org_slug,
                                   self.poller.org_url).register(handlers)
                    self.bulk = BulkIngest(store, bulk_http, handlers)
                    await store.release_bulk_files()
                if s.http.listen and not self.dry_run:
                    self.listener = Listener(self._http_app(), s.http.listen)
                await store.set_meta(an_paused=None, pid=os.getpid(), started_at=time.time())
                log.info("daemon.start", version=__version__,
                         db=redact_url(url) if url else str(s.store.path),
                         instance=store.instance, cluster=store.shared, dry_run=self.dry_run,
                         workers=s.sync.workers, an_rate=s.action_network.requests_per_second,
                         poll_interval=s.controlshift.poll_interval,
                         source=s.controlshift.source,
                         reconcile_interval=s.controlshift.reconcile_interval,
                         http=s.http.listen, webhooks=self.webhooks is not None,
                         history_start=store.history_start.isoformat()
                         if store.history_start else None,
                         released_in_flight=released)
                if self.webhooks is None and not self.dry_run:
                    log.warning("webhooks.off", msg="no controlshift.webhook_secret: new activity "
                                "arrives by polling only, and org-wide unsubscribes, which the "
                                "ControlShift API does not list, are not synced to AN")
                await self._check_an_key(an)
                await self._check_cs()
                await self._supervise()

    def _an_http(self) -> httpx.AsyncClient:
        """HTTP for the AN client; a dry run's can only read, whatever the client's methods do."""
        s = self.settings
        limits = httpx.Limits(max_connections=s.sync.workers + 2)
        transport = self._an_transport
        if self.dry_run:
            transport = ReadOnlyTransport(transport or httpx.AsyncHTTPTransport(limits=limits))
        return httpx.AsyncClient(
            transport=transport, timeout=s.action_network.timeout,
            headers={"User-Agent": f"csand/{__version__}"}, limits=limits,
        )

    def _cs_client(self, http: httpx.AsyncClient) -> ControlShiftClient:
        cs = self.settings.controlshift
        # Polling within poll_budget_share of it; webhooks and commands have the rest.
        return configured_client(cs, http, budget=cs_budget.CSBudget(cs.requests_per_minute,
                                                                     cs.poll_budget_share))

    async def _check_an_key(self, an: ActionNetworkClient) -> None:
        assert self.dispatcher is not None and self.store is not None
        try:
            ok = await an.check_key()
        except ANFailure as failure:
            log.warning("an.unreachable", reason=failure.outcome.reason,
                        msg="could not check the Action Network key; workers will retry")
            return
        if not ok:
            reason = "Action Network rejected the API key (no osdi:tags link at the entry point)"
            self.dispatcher.auth_paused = reason
            await self.store.set_meta(an_paused=reason)
            log.error("an.auth_failed", reason=reason,
                      msg="workers paused until the key works; polling continues")

    async def _check_cs(self) -> None:
        assert self.poller is not None
        try:
            org = await self.poller.org_slug()
        except CSError as exc:
            log.error("cs.check_failed", error=str(exc),
                      msg="ControlShift could not be read at start-up; polling keeps trying")
        else:
            log.info("cs.connected", org=org)

    async def _supervise(self) -> None:
        assert self.poller and self.dispatcher and self.store
        dispatcher = self.dispatcher
        async with anyio.create_task_group() as tg:
            poll_scope = anyio.CancelScope()

            async def poll() -> None:
                with poll_scope:
                    await self._lead()

            tg.start_soon(poll)
            tg.start_soon(self._heartbeat)
            work_scope = anyio.CancelScope()
            work_done = anyio.Event()

            async def work() -> None:
                with work_scope:
                    await dispatcher.run()  # returns once intake stopped and nothing is in flight
                work_done.set()

            tg.start_soon(work)
            if self.webhooks is not None:
                tg.start_soon(self.webhooks.run)
            if self.bulk is not None:
                tg.start_soon(self.bulk.run)
            if self.listener is not None:
                await tg.start(self.listener.run)
                log.info("http.listening", listen=self.settings.http.listen)
            if self.notifier.watchdog_seconds:
                tg.start_soon(self._watchdog)
            self.started.set()
            self.notifier.ready("started: store migrated, connections checked")
            await self._stop.wait()
            t0 = time.monotonic()
            log.info("daemon.stopping", in_flight=len(dispatcher.in_flight))
            self.notifier.stopping()
            if self.listener is not None:
                self.listener.stop()  # webhooks in flight finish; nothing acknowledged is lost
            poll_scope.cancel()
            dispatcher.stop_intake()
            with anyio.move_on_after(self.settings.sync.shutdown_grace):
                await work_done.wait()
            work_scope.cancel()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            unfinished = len(dispatcher.in_flight)
            await dispatcher.release_in_flight()
            if self.store.shared:  # another instance takes over polling now, not in 20 s
                await self.store.resign()
                await self.store.forget_instance()
            else:
                await self.store.set_meta(heartbeat_at=None)
        log.info("daemon.stopped", released=unfinished, ms=round((time.monotonic() - t0) * 1000))

    async def _lead(self) -> None:
        """Poll ControlShift, run the sweeps, the prune and the endpoint check while this
        instance leads; a SQLite store has one process, which always leads.

        Leadership is renewed every ``LEAD_RENEW`` seconds. When the store cannot be reached,
        polling stops ``LEAD_MARGIN`` seconds before the lease could run out, so two instances
        never poll at once; a late commit of a deposed leader is refused by the fence anyway.
        """
        assert self.store is not None and self.poller is not None
        store = self.store
        while True:
            term: int | None = None
            asked = time.monotonic()
            with anyio.move_on_after(LEAD_RENEW):
                try:
                    term = await store.lead(LEAD_TTL)
                except Exception as exc:  # noqa: BLE001 - the database is unreachable: retry
                    log.warning("cluster.lead_failed", error=str(exc))
            if term is None:
                await anyio.sleep(LEAD_RENEW - min(LEAD_RENEW, time.monotonic() - asked))
                continue
            await self._while_leading(term, asked)

    async def _while_leading(self, term: int, asked: float) -> None:
        """Run the leader's work in term ``term`` until leadership is lost or cannot be renewed
        in time (``asked``: when the lease just granted was asked for, on this machine)."""
        assert self.store is not None and self.poller is not None
        store, instance = self.store, self.store.instance
        self.poller.fence = (instance, term) if store.shared else None
        deadline = asked + LEAD_TTL - LEAD_MARGIN
        self.is_leader = True
        metrics.leader.set(1)
        log.info("cluster.leading", instance=instance, term=term, cluster=store.shared)
        reason = "another instance leads"
        try:
            async with anyio.create_task_group() as tg:
                async def leader_work() -> None:
                    try:
                        await self.poller.run()  # type: ignore[union-attr]
                    except* NotLeader:  # a commit found the term over: stop at once
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(leader_work)
                if not self.dry_run:  # a dry run's copy of the database is thrown away anyway
                    tg.start_soon(self._prune)
                if self.webhooks is not None:
                    tg.start_soon(self._watch_webhook_endpoint)
                while True:
                    await anyio.sleep(max(0.0, min(LEAD_RENEW, deadline - time.monotonic())))
                    if time.monotonic() >= deadline:
                        reason = "the lease could not be renewed in time"
                        break
                    asked = time.monotonic()
                    answer: int | None | str = "no answer"
                    with anyio.move_on_after(deadline - asked):
                        try:
                            answer = await store.lead(LEAD_TTL)
                        except Exception as exc:  # noqa: BLE001 - retried until the deadline
                            log.warning("cluster.renew_failed", error=str(exc))
                    if answer == term:
                        deadline = asked + LEAD_TTL - LEAD_MARGIN
                    elif answer != "no answer":  # None, or a later term of this instance
                        break
                tg.cancel_scope.cancel()
        finally:
            self.poller.fence = None
            self.is_leader = False
            metrics.leader.set(0)
        log.warning("cluster.not_leading", instance=instance, term=term, reason=reason,
                    msg="polling stopped here; this instance keeps draining the outbox")

    async def _check_instance_name(self, store: Storage) -> None:
        """Two live instances with one name would release each other's leases at start-up."""
        me = store.instance
        for other in (await store.cluster())["instances"]:
            if other["instance"] != me or other.get("heartbeat_age_s", 1e9) > 3 * HEARTBEAT_SECONDS:
                continue
            if other.get("host") == socket.gethostname() and not _alive(other.get("pid")):
                continue  # this machine's previous process, gone (a kill -9 and a restart)
            raise StoreError(
                f"another csand instance named {me!r} is running (host {other.get('host')}, "
                f"pid {other.get('pid')}, heartbeat {other.get('heartbeat_age_s')} s ago): "
                "give each instance its own name ([store] instance)")

    async def _heartbeat(self) -> None:
        """Every few seconds: liveness for ``csand status``, and the gauges for /metrics."""
        assert self.store and self.dispatcher
        started = time.time()
        while True:
            await self._leave_audit_share()
            rate = self.dispatcher.an.limiter.current_rate()
            await self.store.set_meta(
                heartbeat_at=time.time(), an_rate=round(rate, 3),
                an_rate_limited=self.dispatcher.an.limiter.rate_limited_count,
            )
            await self.store.heartbeat({
                "host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
                "started_at": started, "workers": self.settings.sync.workers,
                "in_flight": len(self.dispatcher.in_flight),
                "leading": self.is_leader,
                "an_rate": round(rate, 3),
                "an_429s": self.dispatcher.an.limiter.rate_limited_count,
            })
            snapshot = await self.store.status()
            for state in STATUSES:
                metrics.outbox_items.labels(state).set(snapshot[state])
            metrics.oldest_pending_age.set(snapshot["oldest_pending_age_s"] or 0)
            metrics.an_rate.set(rate)
            metrics.an_paused.set(1 if self.dispatcher.auth_paused else 0)
            bulk = snapshot.get("bulk") or {}
            metrics.bulk_expired_files.set(bulk.get("expired") or 0)
            reconciled = (bulk.get("last_full_unsubscribes") or {}).get("reconciled_at")
            metrics.bulk_last_full_unsubscribes.set(
                datetime.fromisoformat(reconciled).timestamp() if reconciled else 0)
            self.last_status = snapshot
            if self.is_leader or not self.store.shared:  # the leader's polling is the story
                await cs_budget.publish(
                    self.store, self.poller.cs.budget,  # type: ignore[union-attr]
                    reconcile_interval=self.settings.controlshift.reconcile_interval,
                    poll_interval=self.settings.controlshift.poll_interval)
            self.notifier.status(_status_line(snapshot, self.dispatcher.auth_paused))
            await anyio.sleep(HEARTBEAT_SECONDS)

    async def _leave_audit_share(self) -> None:
        """``csand audit`` beside this daemon on a SQLite store announces the share of AN's
        rate it takes (:class:`Reservation`): the daemon leaves it while the announcement is
        fresh, and says so. (PostgreSQL: the audit takes slots of the shared bucket instead.)"""
        assert self.store and self.dispatcher
        if self.store.shared:
            return
        reservation = Reservation.from_meta(await self.store.get_meta(RESERVATION_KEY))
        if reservation is not None and reservation.fresh(time.time()):
            self.dispatcher.an.limiter.leave(reservation.rate)
            await self.store.set_meta(**{HONOURED_KEY: reservation.until})
        else:
            self.dispatcher.an.limiter.leave(0.0)

    async def _prune(self) -> None:
        """At start-up and every hour: personal data kept past ``store.retention_days`` goes."""
        assert self.store is not None
        days = self.settings.store.retention_days
        while True:
            try:
                pruned = await self.store.prune(days * 86400)
            except Exception as exc:  # noqa: BLE001 - the store is busy or broken: next time
                log.warning("store.prune_failed", error=str(exc))
            else:
                if any(pruned.values()):
                    log.info("store.pruned", retention_days=days, **pruned)
            await anyio.sleep(PRUNE_SECONDS)

    def _http_app(self) -> Any:
        secret = self.settings.controlshift.webhook_secret
        assert self.store is not None

        def woke() -> None:
            if self.webhooks is not None:
                self.webhooks.wake()

        bulk = self.bulk
        return build_app(
            receive=self.store.receive_event if secret is not None else None,
            secret=secret.get_secret_value() if secret is not None else None,
            health=self.health, on_event=woke,
            receive_export=bulk.announce if bulk is not None else None,
            on_export=bulk.wake if bulk is not None else (lambda: None),
        )

    async def health(self) -> list[str]:
        """Reasons csand is unhealthy; empty when it is fine (``/healthz``)."""
        assert self.store is not None and self.dispatcher is not None
        reasons: list[str] = []
        try:
            with anyio.fail_after(5):
                await self.store.set_meta(healthz_at=time.time())
        except Exception as exc:  # noqa: BLE001 - any failure means "not writable"
            reasons.append(f"store not writable: {type(exc).__name__}: {exc}")
        status = await self.store.status()
        if self.store.shared:
            status["cluster"] = {**await self.store.cluster(), "shared": True}
        found = health.reasons(
            status, poll_interval=self.settings.controlshift.poll_interval,
            now=time.time(), daemon_expected=False, dead_growth=False,
        )
        if self.dispatcher.auth_paused and not any("paused" in r for r in found):
            found.append(f"workers paused: {self.dispatcher.auth_paused}")
        reasons.extend(found)
        return reasons

    async def _watch_webhook_endpoint(self) -> None:
        """Now and then, ask CS whether it still delivers to csand (``disabled_at``, failures)."""
        assert self.poller is not None and self.store is not None
        cs = self.settings.controlshift
        while True:
            try:
                endpoints = await self.poller.directory.webhook_endpoints()
            except CSError as exc:
                log.warning("webhook.endpoint_check_failed", error=str(exc))
            else:
                mine = [e for e in endpoints if isinstance(e, dict) and (
                    e.get("url") == cs.webhook_url if cs.webhook_url
                    else str(e.get("url", "")).rstrip("/").endswith("/webhooks/controlshift"))]
                state = mine[0] if mine else {"url": cs.webhook_url, "missing": True}
                await self.store.set_meta(webhook_endpoint=json.dumps(state))
                if state.get("disabled_at") or state.get("last_failure") or state.get("missing"):
                    log.warning("webhook.endpoint_unhealthy", endpoint=state.get("url"),
                                disabled_at=state.get("disabled_at"),
                                last_failure=state.get("last_failure"),
                                missing=state.get("missing", False),
                                msg="ControlShift reports problems delivering to csand: polling "
                                "catches up petitions and signatures, but org-wide unsubscribes "
                                "arrive only by webhook. Re-enable the endpoint in ControlShift")
            await anyio.sleep(cs.webhook_check_interval)

    async def _watchdog(self) -> None:
        """Pets systemd's watchdog from the event loop: a blocked loop stops the petting."""
        assert self.notifier.watchdog_seconds
        while True:
            self.notifier.watchdog()
            await anyio.sleep(self.notifier.watchdog_seconds / 2)

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
                self.request_stop()
                return

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply what can change without a restart (logging)."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            fresh = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            log.error("daemon.reload_failed", error=str(exc), msg="keeping the running config")
        else:
            logs.configure(fresh.log.level, fresh.log.format, secrets=fresh.secrets())
            log.info("daemon.reloaded", log_level=fresh.log.level, log_format=fresh.log.format)
        self.notifier.ready("reloaded")


def _store_url(settings: Settings) -> str | None:
    url = getattr(settings.store, "url", None)
    return url.get_secret_value() if hasattr(url, "get_secret_value") else url


def _instance_name(settings: Settings) -> str:
    return getattr(settings.store, "instance", None) or socket.gethostname() or "csand"


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _status_line(snapshot: dict[str, Any], paused: str | None) -> str:
    text = (f"pending {snapshot['pending']}, in flight {snapshot['in_flight']}, "
            f"done {snapshot['done']}, dead {snapshot['dead']}; "
            f"last poll {snapshot['last_poll_at'] or 'never'}")
    return f"PAUSED ({paused}); {text}" if paused else text


async def resolve_history_start(store: Storage, configured: str | None) -> datetime | None:
    """``sync.history_start`` as a time, remembered in the store's meta (``csand status``).

    ``"now"`` means the first start that had it: a restart must not move it forward, or what
    happened while csand was down would never be synced. Any other setting is used as it is.
    """
    setting = configured.strip() if configured is not None else None
    if setting is not None and setting.lower() == "now":
        setting = "now"
        if await store.get_meta("history_start_setting") == "now":
            remembered = parse_time(await store.get_meta("history_start"))
            if remembered is not None:
                return remembered
    start = history_start(setting, datetime.now(UTC))
    await store.set_meta(history_start=start.isoformat() if start else None,
                         history_start_setting=setting)
    return start
