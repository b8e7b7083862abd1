"""``csand adopt`` (csand.adopt, csand.cli) against both simulators served on loopback, on a
SQLite and a PostgreSQL store: dry run, recording, decisions, JSON, exit codes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from csand.cli import app
from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import Scenario, populate
from csand.sim.server import ServedApp
from csand.storage import open_store
from csand.storage.sqlite import single_instance
from csand.sync.adoption import identify_key, title_key

CS_KEY = "cs-adopt-key"
AN_KEY = "an-adopt-key"


@dataclass
class World:
    cs: ControlShiftSim
    an: ActionNetworkSim
    scenario: Scenario
    cs_url: str
    an_url: str

    def config(self, tmp_path: Path, store: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(
            f'[controlshift]\nurl = "{self.cs_url}"\napi_key = "{CS_KEY}"\n\n'
            f'[action_network]\nurl = "{self.an_url}/api/v2"\napi_key = "{AN_KEY}"\n'
            f'requests_per_second = 1000.0\n\n[store]\n{store}\n', encoding="utf-8")
        return path


@pytest.fixture
def world() -> Iterator[World]:
    cs = ControlShiftSim(api_key=CS_KEY, page_size=25)
    an = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)
    # 40 launched petitions: 12 mirrored by the hosted integration, 2 of them twice.
    scenario = populate(cs, an, petitions=41, signatures=60, hosted=12, hosted_duplicates=2,
                        seed=4)
    with ServedApp(cs.app) as cs_served, ServedApp(an.app) as an_served:
        yield World(cs, an, scenario, cs_served.url, an_served.url)
    cs.close()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout


def stored(target: str) -> tuple[dict[int, str | None], dict[str, str | None]]:
    """Per CS petition id, the AN uuid recorded; and the adoption meta keys."""
    async def go() -> tuple[dict[int, str | None], dict[str, str | None]]:
        store = await open_store(target)
        try:
            uuids = {i: await store.petition_uuid(i) for i in range(1, 42)}
            meta = {k: v for k, v in (await store.status()).items() if k == "adoption_ambiguous"}
            return uuids, meta  # type: ignore[return-value]
        finally:
            await store.close()

    return anyio.run(go, backend="asyncio")


def check_adopt(world: World, config: Path, target: str) -> None:
    hosted = world.scenario.hosted
    ids = {p["slug"]: p["id"] for p in world.cs.petitions()}
    single = {slug: uuids[0] for slug, uuids in hosted.items() if len(uuids) == 1}
    doubled = sorted(slug for slug, uuids in hosted.items() if len(uuids) == 2)
    # A CS petition sharing its title with a doubled one could own either copy: ambiguous too.
    titles = {title_key(p["title"]) for p in world.cs.petitions() if p["slug"] in doubled}
    rivals = sorted(p["slug"] for p in world.cs.petitions() if p["launched"]
                    and title_key(p["title"]) in titles and p["slug"] not in hosted)
    ambiguous = sorted([*doubled, *rivals])

    code, out = run("adopt", "--dry-run", "--json", "--config", str(config))
    assert code == 1, out  # something is ambiguous
    report = json.loads(out)
    assert {v["slug"]: v["an_uuid"] for v in report["adopted"]} == single
    assert sorted(v["slug"] for v in report["ambiguous"]) == ambiguous
    for v in report["ambiguous"]:
        assert set(v["candidates"]) <= {u for uuids in hosted.values() for u in uuids}
    assert len(report["create"]) == 40 - len(hosted) - len(rivals)
    assert report["cs_petitions"] == 40 and report["an_petitions"] == 14
    # One AN request per 25 petitions listed; nothing written anywhere.
    assert report["an_requests"] == math.ceil(14 / 25)
    assert set(world.an.stats()["by_route"]) == {"GET /petitions"}
    assert all(u is None for u in stored(target)[0].values())

    human = run("adopt", "--dry-run", "--config", str(config))[1]
    assert "matched (would adopt): 10" in human and "ambiguous" in human
    assert all(slug in human for slug in ambiguous)

    # Recording before deciding: the unambiguous ones are recorded, the rest shown in status.
    code, out = run("adopt", "--json", "--config", str(config))
    assert code == 1 and len(json.loads(out)["adopted"]) == len(single)
    meta = stored(target)[1]["adoption_ambiguous"]
    assert sorted(a["slug"] for a in meta) == ambiguous  # type: ignore[union-attr]

    assert run("adopt", "--pick", "no-equals-sign", "--config", str(config))[0] == 2
    picked = hosted[ambiguous[0]][1] if ambiguous[0] in hosted else hosted[doubled[0]][1]
    creates = [arg for slug in ambiguous[1:] for arg in ("--create", slug)]
    code, out = run("adopt", "--pick", f"{ambiguous[0]}={picked}", *creates,
                    "--config", str(config))
    assert code == 0 and f"{len(ambiguous)} decision(s) recorded" in out

    assert stored(target)[1] == {"adoption_ambiguous": []}
    code, out = run("adopt", "--json", "--config", str(config))
    assert code == 0, out
    report = json.loads(out)
    assert sorted(v["slug"] for v in report["decided"]) == ambiguous
    assert report["ambiguous"] == [] and report["adopted"] == []
    assert report["mirrored"] == len(single)
    uuids, meta = stored(target)
    assert {slug: uuids[ids[slug]] for slug in single} == single
    assert meta == {"adoption_ambiguous": []}
    assert sum(1 for u in uuids.values() if u) == len(single)
    # Identifiers are left to the worker's first use: no AN write at all.
    assert set(world.an.stats()["by_route"]) == {"GET /petitions"}


def test_adopt_on_sqlite(world: World, tmp_path: Path) -> None:
    db = tmp_path / "csand.db"
    config = world.config(tmp_path, f'path = "{db}"')
    check_adopt(world, config, str(db))

    async def marks() -> list[str | None]:
        store = await open_store(db)
        try:
            return [await store.get_meta(identify_key(uuids[0]))
                    for uuids in world.scenario.hosted.values() if len(uuids) == 1]
        finally:
            await store.close()

    assert all(m and m.isdigit() for m in anyio.run(marks, backend="asyncio"))


def test_adopt_refuses_to_record_beside_a_running_daemon_on_sqlite(
        world: World, tmp_path: Path) -> None:
    db = tmp_path / "csand.db"
    config = world.config(tmp_path, f'path = "{db}"')
    with single_instance(db):
        assert run("adopt", "--dry-run", "--config", str(config))[0] == 1  # ambiguous, read only
        code, _ = run("adopt", "--config", str(config))
        assert code == 1
    assert all(u is None for u in stored(str(db))[0].values())


def test_adopt_on_postgresql(world: World, tmp_path: Path, pg_url: str) -> None:
    config = world.config(tmp_path, f'url = "{pg_url}"')
    check_adopt(world, config, pg_url)


def test_adopt_with_a_rejected_an_key_says_so_in_one_line(world: World, tmp_path: Path) -> None:
    config = world.config(tmp_path, f'path = "{tmp_path / "csand.db"}"')
    world.an.api_key = "rotated"
    result = CliRunner().invoke(app, ["adopt", "--config", str(config)])
    assert result.exit_code == 1
    assert "ANFailure" in result.stderr and "nothing was recorded" in result.stderr
    assert all(u is None for u in stored(str(tmp_path / "csand.db"))[0].values())


def test_status_names_the_ambiguous_petitions(tmp_path: Path) -> None:
    db = tmp_path / "csand.db"

    async def seed() -> None:
        store = await open_store(db)
        try:
            await store.set_meta(**{"adopt.ambiguous.save-the-pool": json.dumps(
                {"cs_id": 3, "title": "Save the pool", "candidates": ["u1", "u2"]})})
        finally:
            await store.close()

    anyio.run(seed, backend="asyncio")
    config = tmp_path / "config.toml"
    config.write_text(f'[controlshift]\nurl = "https://cs.example.org"\n\n'
                      f'[store]\npath = "{db}"\n', encoding="utf-8")
    code, out = run("status", "--config", str(config))
    assert code == 3 and "ambiguous" in out and "save-the-pool" in out
    data = json.loads(run("status", "--json", "--config", str(config))[1])
    assert data["adoption_ambiguous"] == [
        {"slug": "save-the-pool", "title": "Save the pool", "candidates": ["u1", "u2"]}]
    assert any("1 petition(s) wait" in p for p in data["problems"])
    run("adopt", "--create", "save-the-pool", "--config", str(config))
    assert json.loads(run("status", "--json", "--config", str(config))[1])[
        "adoption_ambiguous"] == []
