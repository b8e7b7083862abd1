"""The PostgreSQL test harness itself: a real server, a fresh database per test, socket only."""

import socket
from collections.abc import Callable

import psycopg
import pytest

from tests.pgserver import socket_dir_of


def test_pg_url_is_a_real_postgresql_database(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
        assert "PostgreSQL" in version
        assert conn.execute("SELECT current_setting('server_encoding')").fetchone()[0] == "UTF8"
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()[0]
        assert tables == 0
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


@pytest.fixture
def other_pg_url(pg_new_database: Callable[[], str]) -> str:
    return pg_new_database()


def test_two_pg_url_databases_are_distinct(pg_url: str, other_pg_url: str) -> None:
    assert pg_url != other_pg_url
    with psycopg.connect(pg_url) as a, psycopg.connect(other_pg_url) as b:
        a.execute("CREATE TABLE only_in_a (x int)")
        a.commit()
        assert (
            a.execute("SELECT current_database()").fetchone()[0]
            != (b.execute("SELECT current_database()").fetchone()[0])
        )
        assert b.execute("SELECT to_regclass('only_in_a')").fetchone()[0] is None


def test_each_test_starts_from_an_empty_database(pg_url: str) -> None:
    # The previous tests created tables; this database must not have them.
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('t'), to_regclass('only_in_a')").fetchone() == (
            None,
            None,
        )


def test_server_listens_on_its_unix_socket_only(pg_url: str) -> None:
    sock_dir = socket_dir_of(pg_url)
    if sock_dir is None:
        pytest.skip("CSAND_TEST_PG_URL points at a server not started by tests/pgserver.py")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == ""
        assert conn.execute("SHOW unix_socket_directories").fetchone()[0] == sock_dir
        assert conn.execute("SHOW fsync").fetchone()[0] == "off"
        port = int(conn.execute("SHOW port").fetchone()[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
