"""The daemon: one anyio task group running the poller and the dispatcher, until a signal.

Shutdown (SIGTERM/SIGINT): the poller stops at once (what it enqueued is committed, what it had
not is re-read next time), the dispatcher stops leasing, items in flight get
``sync.shutdown_grace`` seconds to finish, and whatever is still running is handed back to the
queue without using up an attempt. Exit code 0, well within systemd's 15 s default.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import anyio
import httpx

from csand import __version__, metrics
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.config import Settings
from csand.controlshift.client import ControlShiftClient, OAuthToken
from csand.controlshift.poller import Poller
from csand.logs import get_logger
from csand.ratelimit import TokenBucket
from csand.store import STATUSES, Store
from csand.sync.outcome import RetryPolicy
from csand.sync.worker import Dispatcher

log = get_logger("daemon")

HEARTBEAT_SECONDS = 5.0


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
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
    ) -> None:
        self.settings = settings
        self._an_transport = an_transport
        self._cs_transport = cs_transport
        self.store: Store | None = None
        self.poller: Poller | None = None
        self.dispatcher: Dispatcher | None = None
        self.started = anyio.Event()
        self._stop = anyio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        s = self.settings
        with single_instance(Path(s.store.path)):
            async with AsyncExitStack() as stack:
                store = await Store.open(s.store.path)
                stack.push_async_callback(store.close)
                self.store = store
                released = await store.release_all_in_flight()
                an_http = await stack.enter_async_context(httpx.AsyncClient(
                    transport=self._an_transport, timeout=s.action_network.timeout,
                    headers={"User-Agent": f"csand/{__version__}"},
                    limits=httpx.Limits(max_connections=s.sync.workers + 2),
                ))
                cs_http = await stack.enter_async_context(httpx.AsyncClient(
                    transport=self._cs_transport, timeout=s.controlshift.timeout,
                    headers={"User-Agent": f"csand/{__version__}"},
                ))
                an = ActionNetworkClient(
                    an_http, s.action_network.url, s.action_network.api_key.get_secret_value(),  # type: ignore[union-attr]
                    TokenBucket(s.action_network.requests_per_second),
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
                await store.set_meta(an_paused=None, pid=os.getpid())
                log.info("daemon.start", version=__version__, db=str(s.store.path),
                         workers=s.sync.workers, an_rate=s.action_network.requests_per_second,
                         poll_interval=s.controlshift.poll_interval,
                         reconcile_interval=s.controlshift.reconcile_interval,
                         released_in_flight=released)
                await self._check_an_key(an)
                await self._supervise(handle_signals)

    def _cs_client(self, http: httpx.AsyncClient) -> ControlShiftClient:
        cs = self.settings.controlshift
        limiter = TokenBucket(cs.requests_per_minute / 60.0, burst=5)
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

    async def _supervise(self, handle_signals: bool) -> None:
        assert self.poller and self.dispatcher and self.store
        dispatcher = self.dispatcher
        async with anyio.create_task_group() as tg:
            if handle_signals:
                tg.start_soon(self._watch_signals)
            poll_scope = anyio.CancelScope()

            async def poll() -> None:
                with poll_scope:
                    await self.poller.run()  # type: ignore[union-attr]

            tg.start_soon(poll)
            tg.start_soon(self._heartbeat)
            work_scope = anyio.CancelScope()
            work_done = anyio.Event()

            async def work() -> None:
                with work_scope:
                    await dispatcher.run()  # returns once intake stopped and nothing is in flight
                work_done.set()

            tg.start_soon(work)
            self.started.set()
            await self._stop.wait()
            t0 = time.monotonic()
            log.info("daemon.stopping", in_flight=len(dispatcher.in_flight))
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
            await self.store.set_meta(heartbeat_at=time.time(), an_rate=round(rate, 3))
            snapshot = await self.store.status()
            for state in STATUSES:
                metrics.outbox_items.labels(state).set(snapshot[state])
            metrics.oldest_pending_age.set(snapshot["oldest_pending_age_s"] or 0)
            metrics.an_rate.set(rate)
            metrics.an_paused.set(1 if self.dispatcher.auth_paused else 0)
            self.last_status = snapshot
            await anyio.sleep(HEARTBEAT_SECONDS)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                self.request_stop()
                return


def run(settings: Settings) -> None:
    anyio.run(Daemon(settings).run, backend="asyncio")
