"""The daemon: one anyio task group running the poller and the dispatcher, until a signal.

Shutdown (SIGTERM/SIGINT): the poller stops at once (what it enqueued is committed, what it had
not is re-read next time), the dispatcher stops leasing, items in flight get
``sync.shutdown_grace`` seconds to finish, and whatever is still running is handed back to the
queue without using up an attempt. Exit code 0, well within systemd's 15 s default.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

from csand import __version__, health, logs, metrics
from csand import config as config_mod
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.config import Settings
from csand.controlshift.client import ControlShiftClient, CSError, OAuthToken
from csand.controlshift.poller import Poller
from csand.controlshift.webhooks import WebhookProcessor
from csand.dryrun import DryRunActionNetworkClient, ReadOnlyTransport, copy_database
from csand.logs import get_logger
from csand.ratelimit import TokenBucket
from csand.retry import RetryPolicy
from csand.storage import STATUSES, Storage, open_store
from csand.sync.worker import Dispatcher
from csand.systemd import Notifier
from csand.web import Listener, build_app

log = get_logger("daemon")

HEARTBEAT_SECONDS = 5.0
PRUNE_SECONDS = 3600.0  # personal data past store.retention_days is pruned this often
AN_HEADROOM = 0.97  # 3% under AN's limit: arrival jitter must not cost 429s


class AlreadyRunning(Exception):
    pass


@contextmanager
def single_instance(db_path: Path) -> Iterator[None]:
    """Two daemons on one database would each think they own the in-flight items."""
    if str(db_path) == ":memory:":
        yield
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(
                f"another csand is already running on {db_path} (lock {lock_path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        an_transport: httpx.AsyncBaseTransport | None = None,
        cs_transport: httpx.AsyncBaseTransport | None = None,
        config_path: Path | None = None,
        dry_run: bool = False,
    ) -> None:
        self.settings = settings
        self._an_transport = an_transport
        self._cs_transport = cs_transport
        self.store: Storage | None = None
        self.poller: Poller | None = None
        self.dispatcher: Dispatcher | None = None
        self.webhooks: WebhookProcessor | None = None
        self.listener: Listener | None = None
        self.started = anyio.Event()
        self._stop = anyio.Event()
        self.last_status: dict = {}
        self.notifier = Notifier()
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
        # A dry run works on its own copy, so it may run beside the real daemon.
        lock = nullcontext() if self.dry_run else single_instance(Path(s.store.path))
        with lock, tempfile.TemporaryDirectory(prefix="csand-dry-run-") as scratch:
            db_path = Path(s.store.path)
            if self.dry_run:  # decisions on a copy: the real queue and knowledge stay as they are
                db_path = Path(scratch) / "csand.db"
                copy_database(Path(s.store.path), db_path)
            async with AsyncExitStack() as stack:
                store = await open_store(db_path)
                stack.push_async_callback(store.close)
                self.store = store
                released = await store.release_all_in_flight()
                an_http = await stack.enter_async_context(self._an_http())
                cs_http = await stack.enter_async_context(httpx.AsyncClient(
                    transport=self._cs_transport, timeout=s.controlshift.timeout,
                    headers={"User-Agent": f"csand/{__version__}"},
                ))
                an = (DryRunActionNetworkClient if self.dry_run else ActionNetworkClient)(
                    an_http, s.action_network.url, s.action_network.api_key.get_secret_value(),  # type: ignore[union-attr]
                    TokenBucket(s.action_network.requests_per_second, headroom=AN_HEADROOM),
                )
                cs = self._cs_client(cs_http)
                self.poller = Poller(
                    cs, store, poll_interval=s.controlshift.poll_interval,
                    reconcile_interval=s.controlshift.reconcile_interval,
                    org_slug=s.controlshift.org_slug,
                )
                self.dispatcher = Dispatcher(
                    store, an, workers=s.sync.workers, origin_system=s.sync.origin_system,
                    policy=RetryPolicy(base=s.sync.retry_base, cap=s.sync.retry_cap,
                                       max_attempts=s.sync.max_attempts),
                    lease_seconds=s.sync.lease_seconds,
                    auth_recheck_interval=s.sync.auth_recheck_interval,
                )
                # A dry run must not acknowledge webhooks it would only keep in a scratch copy.
                if s.controlshift.webhook_secret is not None and not self.dry_run:
                    self.webhooks = WebhookProcessor(
                        store, self.poller.directory, self.poller.org_slug, self.poller.poke,
                        global_unsubscribes=s.controlshift.global_unsubscribes,
                    )
                if s.http.listen and not self.dry_run:
                    self.listener = Listener(self._http_app(), s.http.listen)
                await store.set_meta(an_paused=None, pid=os.getpid(), started_at=time.time())
                log.info("daemon.start", version=__version__, db=str(s.store.path),
                         dry_run=self.dry_run,
                         workers=s.sync.workers, an_rate=s.action_network.requests_per_second,
                         poll_interval=s.controlshift.poll_interval,
                         reconcile_interval=s.controlshift.reconcile_interval,
                         http=s.http.listen, webhooks=self.webhooks is not None,
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
        # 5% under the per-minute budget: a small burst on top must still fit in any minute.
        limiter = TokenBucket(cs.requests_per_minute / 60.0, burst=5, headroom=0.95)
        if cs.api_key is not None:
            return ControlShiftClient(http, cs.url, api_key=cs.api_key.get_secret_value(),
                                      limiter=limiter)
        oauth = OAuthToken(http, cs.url, cs.client_id or "",
                           cs.client_secret.get_secret_value())  # type: ignore[union-attr]
        return ControlShiftClient(http, cs.url, oauth=oauth, limiter=limiter)

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
                    await self.poller.run()  # type: ignore[union-attr]

            tg.start_soon(poll)
            tg.start_soon(self._heartbeat)
            if not self.dry_run:  # a dry run's copy of the database is thrown away anyway
                tg.start_soon(self._prune)
            work_scope = anyio.CancelScope()
            work_done = anyio.Event()

            async def work() -> None:
                with work_scope:
                    await dispatcher.run()  # returns once intake stopped and nothing is in flight
                work_done.set()

            tg.start_soon(work)
            if self.webhooks is not None:
                tg.start_soon(self.webhooks.run)
                tg.start_soon(self._watch_webhook_endpoint)
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
            await self.store.set_meta(heartbeat_at=None)
        log.info("daemon.stopped", released=unfinished, ms=round((time.monotonic() - t0) * 1000))

    async def _heartbeat(self) -> None:
        """Every few seconds: liveness for ``csand status``, and the gauges for /metrics."""
        assert self.store and self.dispatcher
        while True:
            rate = self.dispatcher.an.limiter.current_rate()
            await self.store.set_meta(
                heartbeat_at=time.time(), an_rate=round(rate, 3),
                an_rate_limited=self.dispatcher.an.limiter.rate_limited_count,
            )
            snapshot = await self.store.status()
            for state in STATUSES:
                metrics.outbox_items.labels(state).set(snapshot[state])
            metrics.oldest_pending_age.set(snapshot["oldest_pending_age_s"] or 0)
            metrics.an_rate.set(rate)
            metrics.an_paused.set(1 if self.dispatcher.auth_paused else 0)
            self.last_status = snapshot
            self.notifier.status(_status_line(snapshot, self.dispatcher.auth_paused))
            await anyio.sleep(HEARTBEAT_SECONDS)

    async def _prune(self) -> None:
        """At start-up and every hour: personal data kept past ``store.retention_days`` goes."""
        assert self.store is not None
        days = self.settings.store.retention_days
        while True:
            try:
                pruned = await self.store.prune(days * 86400)
            except sqlite3.Error as exc:  # the store is busy or broken: try again next time
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

        return build_app(
            receive=self.store.receive_event if secret is not None else None,
            secret=secret.get_secret_value() if secret is not None else None,
            health=self.health, on_event=woke,
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
        found = health.reasons(
            await self.store.status(), poll_interval=self.settings.controlshift.poll_interval,
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


def _status_line(snapshot: dict[str, Any], paused: str | None) -> str:
    text = (f"pending {snapshot['pending']}, in flight {snapshot['in_flight']}, "
            f"done {snapshot['done']}, dead {snapshot['dead']}; "
            f"last poll {snapshot['last_poll_at'] or 'never'}")
    return f"PAUSED ({paused}); {text}" if paused else text
