import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pgserver import PostgresServer, create_database, drop_database, find_bin_dir


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- PostgreSQL ---------------------------------------------------------------------------------
# A real, throwaway server: the one .ci/run started (CSAND_TEST_PG_URL), else one started here
# for the session. Each test asking for `pg_url` gets a fresh empty database on it.


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """Superuser URL of the session's PostgreSQL server (database `postgres`)."""
    url = os.environ.get("CSAND_TEST_PG_URL")
    if url:
        yield url
        return
    if find_bin_dir() is None:
        if os.environ.get("CSAND_TEST_PG_REQUIRED") == "1":
            pytest.fail(
                "CSAND_TEST_PG_REQUIRED=1 but PostgreSQL binaries (initdb, pg_ctl) were not found "
                "and CSAND_TEST_PG_URL is not set: install postgresql (apt-get install postgresql)",
                pytrace=False,
            )
        pytest.skip("PostgreSQL not found: install postgresql to run the PostgreSQL tests")
    # Not under pytest's basetemp: its directories are 0700 root-owned, which the postgres user
    # (the server's user when running as root) cannot traverse; and socket paths must be short.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="csand-pg-")))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _pg_admin_conn(pg_admin_url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        yield conn


_db_numbers = itertools.count(1)


@pytest.fixture
def pg_new_database(pg_admin_url: str, _pg_admin_conn: Any) -> Iterator[Callable[[], str]]:
    """A function making a fresh, empty database per call and returning its URL; all of them are
    dropped after the test (connections or not)."""
    names: list[str] = []

    def new() -> str:
        name = f"csand_test_{os.getpid()}_{next(_db_numbers)}"
        url = create_database(pg_admin_url, name, conn=_pg_admin_conn)
        names.append(name)
        return url

    yield new
    for name in names:
        drop_database(pg_admin_url, name, conn=_pg_admin_conn)


@pytest.fixture
def pg_url(pg_new_database: Callable[[], str]) -> str:
    """URL of a fresh, empty database (dropped after the test)."""
    return pg_new_database()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """A command run in-process (typer's CliRunner) points the logs at the runner's stderr,
    which is closed afterwards: every test starts and ends with the logging it found."""
    import logging

    import structlog

    from csand import logs

    root = logging.getLogger()
    handlers, level, secrets = list(root.handlers), root.level, list(logs.redactor.secrets)
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers, logs.redactor.secrets = handlers, secrets
        root.setLevel(level)
