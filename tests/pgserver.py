"""A throwaway PostgreSQL server for the test suite: initdb into a directory, serve on a unix
socket only, drop it all afterwards.

    python tests/pgserver.py start DIR   # prints the admin URL (also written to DIR/url)
    python tests/pgserver.py stop DIR    # stops the server and removes DIR
    python tests/pgserver.py bindir      # prints the PostgreSQL bin directory; exit 1 if none

Starting and stopping need only the standard library (so any python3 can run them);
`create_database` needs psycopg. When run as root, the server runs as the `postgres` user
(initdb refuses root) and DIR is chowned to it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit, urlunsplit

ADMIN_USER = "csand_admin"
_NEEDED = ("initdb", "pg_ctl", "postgres")
# Speed over durability: the data is thrown away with the server.
_SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "'32MB'",
    "logging_collector": "off",
}
# Socket file path limit (sun_path is 108 bytes, including "/.s.PGSQL.NNNNN").
_MAX_SOCKET_DIR = 90


def _has_tools(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _NEEDED)


def find_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: /usr/lib/postgresql/<newest>/bin, else PATH."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for directory in candidates:
        if _has_tools(directory):
            return directory
    initdb = shutil.which("initdb")
    if initdb is not None and _has_tools(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    # The server listens on no TCP port; the number only names the socket file. A port nothing
    # else listens on lets tests check that TCP on it is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_url(user: str, dbname: str, socket_dir: str | Path, port: int) -> str:
    query = urlencode({"host": str(socket_dir), "port": port}, quote_via=quote, safe="/")
    return f"postgresql://{quote(user)}@/{quote(dbname)}?{query}"


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname)))


class PostgresServer:
    """A PostgreSQL cluster in base_dir (data/, server.log, url), served on a socket in base_dir/s.

    start() returns the admin URL; stop() stops the server and removes base_dir.
    """

    def __init__(self, base_dir: Path | str, bin_dir: Path | None = None) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.bin_dir = bin_dir
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "server.log"
        self.url_file = self.base_dir / "url"
        self.url: str | None = None
        self._as_postgres = os.geteuid() == 0

    # -- helpers ---------------------------------------------------------------------------
    def _socket_dir(self) -> Path:
        saved = self.base_dir / "socket_dir"
        if saved.exists():
            return Path(saved.read_text().strip())
        return self.base_dir / "s"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.bin_dir is not None
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(
            cmd,
            cwd=self.base_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            log = ""
            if self.log_file.exists():
                log = "\n--- server.log ---\n" + self.log_file.read_text(errors="replace")[-4000:]
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}"
            )
        return proc

    def _give_to_postgres(self, *paths: Path) -> None:
        if not self._as_postgres:
            return
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root, but there is no `postgres` user to run the server"
            ) from None
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> str:
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir()
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        socket_dir = self.base_dir / "s"
        if len(str(socket_dir)) > _MAX_SOCKET_DIR:
            socket_dir = Path(tempfile.mkdtemp(prefix="csand-pgs-"))
            (self.base_dir / "socket_dir").write_text(f"{socket_dir}\n")
        else:
            socket_dir.mkdir(exist_ok=True)
        self._give_to_postgres(self.base_dir, socket_dir)
        if self._as_postgres:
            # The postgres user must be able to reach base_dir through its parents.
            probe = subprocess.run(
                ["runuser", "-u", "postgres", "--", "test", "-w", str(self.base_dir)],
                cwd="/",
                check=False,
            )
            if probe.returncode != 0:
                raise RuntimeError(
                    f"the postgres user cannot write {self.base_dir}; use a directory whose "
                    "parents it can traverse (e.g. one made by tempfile.mkdtemp under /tmp)"
                )
        port = _free_port()
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                ADMIN_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            )
            settings = dict(_SETTINGS, port=str(port), unix_socket_directories=f"'{socket_dir}'")
            with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write("\n# csand test server\n")
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
                timeout=timeout + 10,
            )
            self._wait_ready(socket_dir, port, timeout)
        except BaseException:
            self.stop()
            raise
        self.url = make_url(ADMIN_USER, "postgres", socket_dir, port)
        self.url_file.write_text(self.url + "\n")
        return self.url

    def _wait_ready(self, socket_dir: Path, port: int, timeout: float) -> None:
        assert self.bin_dir is not None
        isready = self.bin_dir / "pg_isready"
        if not os.access(isready, os.X_OK):
            return  # pg_ctl -w already waited
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                [str(isready), "-q", "-h", str(socket_dir), "-p", str(port), "-U", ADMIN_USER],
                check=False,
            )
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL in {self.base_dir} not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (immediate: nothing is kept) and remove base_dir. Never raises for a
        server that is not running."""
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir()
        socket_dir = self._socket_dir()
        if self.bin_dir is not None and (self.data_dir / "postmaster.pid").exists():
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", timeout=60
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"pgserver: stop: {exc}", file=sys.stderr)
        if socket_dir.parent != self.base_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.url = None


def create_database(admin_url: str, name: str, conn: Any = None) -> str:
    """Create an empty database `name` (from template0) and return its URL.

    `conn`, an open autocommit psycopg connection to the server, saves a connection per call.
    """
    from psycopg import sql

    with _admin(admin_url, conn) as c:
        # file_copy (PostgreSQL 15+) is about twice as fast as the default for a tiny template.
        strategy = " STRATEGY file_copy" if c.info.server_version >= 150000 else ""
        query = sql.SQL("CREATE DATABASE {} TEMPLATE template0" + strategy)
        c.execute(query.format(sql.Identifier(name)))
    return _with_dbname(admin_url, name)


def drop_database(admin_url: str, name: str, conn: Any = None) -> None:
    """Drop database `name`, disconnecting whoever is still connected to it."""
    from psycopg import sql

    with _admin(admin_url, conn) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def _admin(admin_url: str, conn: Any) -> Iterator[Any]:
    if conn is not None:
        yield conn
        return
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as own:
        yield own


def socket_dir_of(url: str) -> str | None:
    """The unix-socket directory a URL made by this module points at, or None."""
    host = parse_qs(urlsplit(url).query).get("host", [None])[0]
    return unquote(host) if host and host.startswith("/") else None


def main(argv: list[str]) -> int:
    usage = "usage: pgserver.py start DIR | stop DIR | bindir"
    if argv[:1] == ["bindir"] and len(argv) == 1:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            print("PostgreSQL binaries not found", file=sys.stderr)
            return 1
        print(bin_dir)
        return 0
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(usage, file=sys.stderr)
        return 2
    server = PostgresServer(Path(argv[1]))
    if argv[0] == "start":
        try:
            print(server.start(), flush=True)
        except RuntimeError as exc:
            print(f"pgserver: {exc}", file=sys.stderr)
            return 1
    else:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
