"""systemd's notify protocol: READY, STATUS and the watchdog, as datagrams to ``$NOTIFY_SOCKET``.

A few lines of standard library instead of a dependency. Everything is a no-op when csand is not
started by systemd (no ``NOTIFY_SOCKET``), so the same code runs in a terminal and in tests.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self.address = address
        watchdog_usec = env.get("WATCHDOG_USEC")
        watchdog_pid = env.get("WATCHDOG_PID")
        pid_ok = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_seconds: float | None = (
            int(watchdog_usec) / 1_000_000 if watchdog_usec and watchdog_usec.isdigit()
            and pid_ok else None
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; False (and nothing raised) when it cannot be delivered."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # called from the event loop: never wait on systemd
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode())
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")
