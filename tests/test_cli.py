"""Operator commands (csand.cli) on a seeded database, through typer's test runner."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from typer.testing import CliRunner

from csand import logs
from csand.cli import app
from csand.model import signature_activity
from csand.storage import open_store

ORG = "test-org"
SIGNER = "ann@example"  # invalid (no TLD), as CS sent it: the reason quotes it
POLLED = "bob@example.org"


def _config(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[controlshift]\nurl = "https://cs.example.org"\n\n'
                    f'[store]\npath = "{db}"\n', encoding="utf-8")
    return path


def _seed(db: Path) -> int:
    async def go() -> int:
        store = await open_store(db)
        try:
            petition = {"id": 1, "slug": "p-1", "title": "P", "url": "https://cs.example.org/p-1",
                        "launched": True, "creator": {"email": "cleo@example.org"}}
            activity = signature_activity(
                {"id": 7, "email": SIGNER, "created_at": "2024-01-02T00:00:00Z",
                 "updated_at": "2024-01-02T00:00:00Z"}, petition, ORG)
            await store.enqueue([activity])
            [item] = await store.lease(1, 60)
            await store.finish(item.id, "dead", error=f"invalid email address '{SIGNER}'")
            await store.set_meta(last_poll_result=f"failed: CS answered 422 for {POLLED}")
            return item.id
        finally:
            await store.close()

    return anyio.run(go, backend="asyncio")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each command points the logs at the runner's stderr, which is closed afterwards."""
    root = logging.getLogger()
    handlers, level, secrets = list(root.handlers), root.level, list(logs.redactor.secrets)
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers, logs.redactor.secrets = handlers, secrets
        root.setLevel(level)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    db = tmp_path / "csand.db"
    _seed(db)
    return _config(tmp_path, db)


def invoke(*args: str) -> str:
    # Wide enough that rich never wraps an address across lines.
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.output


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["dead", "list"],
                                     ["dead", "list", "--json"]])
def test_operator_output_masks_emails_unless_revealed(config: Path, command: list[str]) -> None:
    masked = invoke(*command, "--config", str(config))
    assert SIGNER not in masked and "a***@example" in masked
    if command[0] == "status":
        assert POLLED not in masked and "b***@example.org" in masked
    revealed = invoke(*command, "--reveal", "--config", str(config))
    assert SIGNER in revealed
    if command[0] == "status":
        assert POLLED in revealed


def test_status_json_stays_machine_readable_when_masked(config: Path) -> None:
    data = json.loads(invoke("status", "--json", "--config", str(config)))
    assert data["dead"] == 1
    assert data["last_poll_result"] == "failed: CS answered 422 for b***@example.org"
    assert data["dead_reasons"] == [{"reason": "invalid email address 'a***@example'",
                                     "count": 1}]


def test_dead_show_masks_unless_revealed(config: Path) -> None:
    shown = invoke("dead", "show", "1", "--config", str(config))
    assert SIGNER not in shown and json.loads(shown)["last_error"]
    assert SIGNER in invoke("dead", "show", "1", "--reveal", "--config", str(config))


def test_status_tells_how_long_personal_data_is_kept(config: Path) -> None:
    assert json.loads(invoke("status", "--json", "--config", str(config)))["retention_days"] == 30
    assert "kept 30 days" in invoke("status", "--config", str(config))
