"""``csand audit`` on the command line: JSON, exit codes (0 clean, 1 drift, 2 could not audit),
``--sample``, ``--petition``, ``--repair`` queued once, emails masked unless ``--reveal``."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from csand.cli import app
from csand.sim.server import ServedApp
from tests.audit_world import AN_KEY, CS_KEY, Org, make_org, sync

runner = CliRunner()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Org, str, str]]:
    """One organisation synced once, its simulators served on loopback for the CLI."""
    org = make_org(tmp_path_factory.mktemp("audit-cli"), petitions=4, signatures=40, seed=9)
    anyio.run(sync, org, backend="asyncio")
    with ServedApp(org.cs.app) as cs, ServedApp(org.an.app) as an:
        yield org, cs.url, an.url
    org.cs.close()


def _config(tmp: Path, org: Org, cs_url: str, an_url: str, **changes: Any) -> Path:
    values = {"cs_url": cs_url, "an_url": f"{an_url}/api/v2", "an_key": AN_KEY,
              "db": str(org.db)} | changes
    path = tmp / "config.toml"
    path.write_text(
        f'[controlshift]\nurl = "{values["cs_url"]}"\napi_key = "{CS_KEY}"\n'
        "requests_per_minute = 60000\n\n"
        f'[action_network]\nurl = "{values["an_url"]}"\napi_key = "{values["an_key"]}"\n'
        "requests_per_second = 400\n\n"
        f'[store]\npath = "{values["db"]}"\n\n[audit]\nan_share = 1.0\n', encoding="utf-8")
    return path


def _audit(config: Path, *args: str) -> tuple[int, Any]:
    result = runner.invoke(app, ["audit", "--config", str(config), "--json", *args])
    try:
        return result.exit_code, json.loads(result.stdout)
    except ValueError:
        return result.exit_code, result.output


def test_clean_then_drift_then_repaired_once(served: tuple[Org, str, str],
                                             tmp_path: Path) -> None:
    org, cs_url, an_url = served
    config = _config(tmp_path, org, cs_url, an_url)
    code, report = _audit(config, "--sample", "15")
    assert code == 0, report
    assert report["checked"] == 15 and report["drift"] is False
    assert report["mode"] == "sample" and report["an_requests_per_activity"] > 0

    email = org.query("SELECT person_key FROM outbox WHERE kind = 'signature' "
                      "AND status = 'done' ORDER BY id LIMIT 1")[0][0]
    org.an.remove_tagging(email, "controlshift-petition-signer")
    code, report = _audit(config, "--sample", "1000")
    assert code == 1
    [finding] = report["findings"]
    assert finding["kind"] == "tag_missing" and finding["repairable"] is True
    assert finding["email"] != email and "***" in finding["email"]  # masked
    code, revealed = _audit(config, "--sample", "1000", "--reveal")
    assert revealed["findings"][0]["email"] == email

    code, first = _audit(config, "--repair")
    assert code == 1 and first["repair"]["queued"] == 1
    code, second = _audit(config, "--repair")
    assert code == 1 and second["repair"] == {"items": 1, "queued": 0, "already_queued": 1,
                                              "skipped_deleted": 0, "skipped_pruned": 0}
    anyio.run(sync, org, backend="asyncio")  # the daemon syncs the repair
    code, report = _audit(config)
    assert code == 0, report

    slug = org.cs.petitions()[0]["slug"]
    code, report = _audit(config, "--petition", slug)
    assert code == 0 and report["mode"] == "petition" and report["petition"] == slug

    text = runner.invoke(app, ["audit", "--config", str(config), "--sample", "5"])
    assert text.exit_code == 0 and "no drift" in text.stdout


def test_could_not_audit_is_exit_2(served: tuple[Org, str, str], tmp_path: Path) -> None:
    org, cs_url, an_url = served
    code, out = _audit(_config(tmp_path, org, cs_url, an_url, an_key="wrong"))
    assert code == 2 and "rejected the API key" in out
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, out = _audit(_config(tmp_path, org, cs_url, closed))
    assert code == 2 and "could not audit" in out
    code, out = _audit(_config(tmp_path, org, cs_url, an_url), "--petition", "no-such")
    assert code == 2 and "no petition" in out
    code, out = _audit(_config(tmp_path, org, cs_url, an_url, db=str(tmp_path / "none.db")))
    assert code == 2 and "no database" in out
    code, out = _audit(_config(tmp_path, org, cs_url, an_url), "--sample", "3",
                       "--petition", "x")
    assert code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[controlshift]\n", encoding="utf-8")
    assert _audit(bad)[0] == 2
