"""``sync.history_start``: activities older than it are recorded as seen, not synced."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csand import config
from csand.config import ConfigError
from csand.daemon import resolve_history_start
from csand.model import ActivityKind, before_history, global_unsubscribe_activity, history_start
from csand.storage import open_store
from tests.fakes import ManualClock
from tests.storage import sig
from tests.test_poller import T0, creator, make_env

START = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    (None, None),
    ("now", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    (" NOW ", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2024-03-01", START),
    ("2024-03-01T09:30:00Z", START.replace(hour=9, minute=30)),
    ("2024-03-01T09:30:00", START.replace(hour=9, minute=30)),  # naive: UTC
    ("2024-03-01T10:30:00+01:00", START.replace(hour=9, minute=30)),
])
def test_history_start_values(text: str | None, expected: datetime | None) -> None:
    assert history_start(text, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "2024-13-01", "1 March 2024"])
def test_history_start_rejects_what_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError, match="neither"):
        history_start(text, datetime.now(UTC))


def test_config_rejects_a_bad_history_start_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[controlshift]\nurl = "https://x.controlshiftlabs.com"\napi_key = "k"\n'
                    '[action_network]\napi_key = "k"\n[sync]\nhistory_start = "last week"\n')
    with pytest.raises(ConfigError, match="history_start") as info:
        config.load(path, env=False)
    assert "neither" in str(info.value)
    path.write_text(path.read_text().replace('"last week"', '"2024-03-01"'))
    assert config.load(path, env=False).sync.history_start == "2024-03-01"


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_only_activities_before_the_start_are_held_back(at: datetime, start: datetime) -> None:
    signature = sig(1, "ann@example.org", at.isoformat())
    assert before_history(signature, start) == (at < start)
    assert not before_history(signature, None)
    # An org-wide unsubscribe is applied whatever its age.
    unsub = global_unsubscribe_activity(1, "ann@example.org", at)
    assert unsub.kind is ActivityKind.GLOBAL_UNSUBSCRIBE
    assert not before_history(unsub, start)


@pytest.mark.anyio
async def test_now_is_the_first_start_with_it_not_every_restart(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "csand.db", clock=ManualClock())
    try:
        first = await resolve_history_start(store, "now")
        assert first is not None
        assert await resolve_history_start(store, "now") == first  # a restart keeps it
        assert await resolve_history_start(store, "2024-03-01") == START
        assert (await store.status())["history_start"] == START.isoformat()
        later = await resolve_history_start(store, "now")  # "now" again: a new first start
        assert later is not None and later > first
        assert await resolve_history_start(store, None) is None
        assert (await store.status())["history_start"] is None
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_backfill_from_a_history_start_enqueues_only_newer_activity(
    tmp_path: Path,
) -> None:
    async with make_env(tmp_path) as env:
        sim = env.sim
        petition = sim.add_petition(title="Old", creator=creator(1))
        for i in range(6):
            sim.add_signature(petition["slug"], email=f"s{i}@example.org")
        # The fourth signature's time: it and the later ones sync (not before the start).
        fourth = sim.signatures(petition["slug"])[3]
        env.store.history_start = datetime.fromisoformat(
            fourth["created_at"].replace("Z", "+00:00"))
        assert env.store.history_start > T0
        report = await env.poller.cycle()
        queued = [i for i in env.outbox() if i["status"] == "pending"]
        held = [i for i in env.outbox() if i["status"] == "cancelled"]
        assert report.enqueued == len(queued)
        assert sorted(i["payload"]["email"] for i in queued) == [
            "s3@example.org", "s4@example.org", "s5@example.org"]
        # The creator (the petition was made before the start) and the older signers are
        # recorded, so the next sweep does not queue them either.
        assert len(held) == 4 and all("history_start" in i["note"] for i in held)
        await env.poller.cycle(full=True)
        assert len([i for i in env.outbox() if i["status"] == "pending"]) == 3
        assert (await env.store.status())["history_skipped"] == 4
