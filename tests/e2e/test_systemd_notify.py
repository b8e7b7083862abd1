"""End-to-end: the real ``csand run`` process speaking systemd's notify protocol.

A bound ``AF_UNIX`` datagram socket stands in for systemd's ``$NOTIFY_SOCKET``. A thread drains it
all the time (as systemd does: a full socket queue would block csand's sends) and the test waits
on what arrived, with timeouts.
"""

from __future__ import annotations

import queue
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import DEADLINE, Csand, World, make_world

pytestmark = pytest.mark.e2e

WATCHDOG_USEC = 400_000
STATUS = re.compile(r"^STATUS=(?:PAUSED \(.*\); )?pending (\d+), in flight (\d+), done (\d+), "
                    r"dead (\d+); last poll ")


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when it arrived
    fields: tuple[str, ...]

    def has(self, field: str) -> bool:
        return field in self.fields

    def status(self) -> dict[str, int] | None:
        for field in self.fields:
            match = STATUS.match(field)
            if match:
                return dict(zip(("pending", "in_flight", "done", "dead"),
                                map(int, match.groups()), strict=True))
        return None


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.seen: list[Message] = []  # everything taken off the queue, in order
        self._queue: queue.Queue[Message] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="notify-socket", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._queue.put(Message(time.monotonic(), tuple(data.decode().split("\n"))))

    def expect(self, condition: Callable[[Message], bool], what: str, daemon: Csand,
               timeout: float = DEADLINE) -> Message:
        """The next message that satisfies ``condition``; the ones before it go to ``seen``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise AssertionError(f"csand exited ({daemon.proc.returncode}) waiting for "
                                         f"{what}:\n{daemon.log_tail()}") from None
                continue
            self.seen.append(message)
            if condition(message):
                return message
        raise AssertionError(f"timed out waiting for {what}; got {self.seen[-5:]}\n"
                             + daemon.log_tail())

    def rest(self) -> list[Message]:
        """What is still queued (call once csand has exited)."""
        self._closed.set()
        self._thread.join(5)
        while not self._queue.empty():
            self.seen.append(self._queue.get_nowait())
        return self.seen

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """The socket, announced to csand the way systemd does it (the harness passes os.environ)."""
    sock = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_ready_status_watchdog_then_stopping(world: World, notify: NotifySocket) -> None:
    world.populate(petitions=3, signatures=40, seed=7)
    daemon = world.csand().start()

    ready = notify.expect(lambda m: m.has("READY=1"), "READY=1", daemon)
    assert "STATUS=started: store migrated, connections checked" in ready.fields
    assert not any(m.has("STOPPING=1") or m.has("RELOADING=1") for m in notify.seen)

    # The heartbeat reports the queue every 5 s; wait for one that shows synced work.
    notify.expect(lambda m: (m.status() or {}).get("done", 0) > 0,
                  "a STATUS= line with items done", daemon)
    statuses = [m.status() for m in notify.seen if m.status() is not None]
    assert all(set(s) == {"pending", "in_flight", "done", "dead"} for s in statuses)

    def pinged(count: int) -> Callable[[Message], bool]:
        return lambda _m: sum(m.has("WATCHDOG=1") for m in notify.seen) >= count

    notify.expect(pinged(10), "10 WATCHDOG=1", daemon, timeout=30)
    pings = [m.at for m in notify.seen if m.has("WATCHDOG=1")]
    assert min(pings) > ready.at  # the watchdog starts with the service
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    # Half of WATCHDOG_USEC, and never as late as WATCHDOG_USEC (systemd would kill csand).
    assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

    assert daemon.proc is not None
    sent_at = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    stopping = notify.expect(lambda m: m.has("STOPPING=1"), "STOPPING=1", daemon, timeout=15)
    assert stopping.at >= sent_at
    assert daemon.proc.wait(15) == 0
    after = notify.rest()[notify.seen.index(stopping) + 1:]
    assert not any(m.has("READY=1") for m in after)
    assert daemon.counts()["in_flight"] == 0


def test_sighup_reloads_logging_and_keeps_syncing(world: World, notify: NotifySocket) -> None:
    world.populate(petitions=2, signatures=20, seed=8)
    daemon = world.csand(log={"level": "info"}).start()
    notify.expect(lambda m: m.has("READY=1"), "READY=1", daemon)
    # A ping means the event loop has run the tasks started before READY=1, signal handling
    # included (see test_signal_right_after_ready_is_handled).
    notify.expect(lambda m: m.has("WATCHDOG=1"), "WATCHDOG=1", daemon)
    daemon.wait_drained()
    assert not any(e.get("level") == "debug" for e in daemon.log_events())

    config = daemon.config.read_text(encoding="utf-8")
    assert 'level = "info"' in config
    daemon.config.write_text(config.replace('level = "info"', 'level = "debug"'),
                             encoding="utf-8")
    assert daemon.proc is not None
    reload_at = time.time()
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.expect(lambda m: m.has("RELOADING=1"), "RELOADING=1", daemon, timeout=15)
    ready = notify.expect(lambda m: m.has("READY=1"), "READY=1 after RELOADING=1", daemon,
                          timeout=15)
    assert ready.at >= reloading.at

    def reloaded() -> list[dict]:
        return [e for e in daemon.log_events() if e.get("event") == "daemon.reloaded"]

    daemon.wait_for(lambda: bool(reloaded()), "a daemon.reloaded log event", timeout=15)
    assert reloaded()[0]["log_level"] == "debug"
    assert daemon.alive()

    # Still syncing, now with debug logging.
    slug = next(p["slug"] for p in world.cs.petitions() if p["launched"])
    world.cs.add_signature(slug, email="after.reload@example.org", first_name="Robin",
                           join_organisation=True)
    daemon.wait_drained(after=reload_at)
    assert world.an.person("after.reload@example.org")["status"] == "subscribed"
    assert any(e.get("level") == "debug" for e in daemon.log_events())
    assert notify.expect(lambda m: m.has("WATCHDOG=1"), "WATCHDOG=1 after the reload", daemon,
                         timeout=5)
    assert daemon.terminate()[0] == 0


def test_signal_right_after_ready_is_handled(world: World, notify: NotifySocket) -> None:
    """What `systemctl start csand && systemctl stop csand` does.

    The signal handlers are installed before any start-up work, so there is no window.
    """
    world.populate(petitions=2, signatures=5, seed=9)
    daemon = world.csand().start()
    notify.expect(lambda m: m.has("READY=1"), "READY=1", daemon)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert any(m.has("STOPPING=1") for m in notify.rest())
