"""A dry run's safety net (csand.dryrun.ReadOnlyTransport): nothing but reads leaves for AN."""

from __future__ import annotations

import httpx
import pytest
from structlog.testing import capture_logs

from csand.actionnetwork.client import ActionNetworkClient
from csand.config import Settings
from csand.daemon import Daemon
from csand.dryrun import DryRunActionNetworkClient, DryRunWriteRefused, ReadOnlyTransport
from csand.ratelimit import TokenBucket
from csand.sim.actionnetwork import ActionNetworkSim

AN_BASE = "http://an.test/api/v2"
AN_KEY = "an-test-key"


class Recording(httpx.AsyncBaseTransport):
    """Answers 200 to everything and remembers what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return httpx.Response(200, json={"ok": True})

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_reads_pass_through(method: str) -> None:
    inner = Recording()
    async with httpx.AsyncClient(transport=ReadOnlyTransport(inner)) as http:
        response = await http.request(method, f"{AN_BASE}/people?filter=x")
    assert response.status_code == 200
    assert inner.sent == [(method, "/api/v2/people")]
    assert inner.closed  # closing the client closes the real transport


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_writes_are_refused_before_they_leave(method: str) -> None:
    inner = Recording()
    with capture_logs() as events:
        async with httpx.AsyncClient(transport=ReadOnlyTransport(inner)) as http:
            with pytest.raises(DryRunWriteRefused, match=f"{method} /api/v2/people/abc"):
                await http.request(method, f"{AN_BASE}/people/abc?email=ann@example.org",
                                   json={"x": 1})
    assert inner.sent == []
    [refused] = [e for e in events if e["event"] == "dry_run.write_refused"]
    assert refused["log_level"] == "error"
    assert refused["method"] == method and refused["path"] == "/api/v2/people/abc"
    assert "ann@example.org" not in repr(events)  # the query string is never logged


class Forgetful(DryRunActionNetworkClient):
    """A write method added later that nobody taught the dry run about."""

    create_tag = ActionNetworkClient.create_tag


def daemon(sim: ActionNetworkSim, *, dry_run: bool) -> Daemon:
    settings = Settings(controlshift={"url": "http://cs.test", "api_key": "cs-key"},
                        action_network={"url": AN_BASE, "api_key": AN_KEY})
    return Daemon(settings, an_transport=httpx.ASGITransport(app=sim.app), dry_run=dry_run)


@pytest.mark.anyio
async def test_a_dry_run_daemon_sends_nothing_even_when_an_override_is_missing() -> None:
    sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)
    async with daemon(sim, dry_run=True)._an_http() as http:
        an = Forgetful(http, AN_BASE, AN_KEY, TokenBucket(1e6))
        assert await an.list_tags() == {}  # reads still reach AN
        assert await an.find_petition("cs-1") is None
        with pytest.raises(DryRunWriteRefused):
            await an.create_tag("forgotten")
        await an.set_status("p-1", "ann@example.org", "subscribed")  # overridden: only logged
    routes = sim.stats()["by_route"]
    assert routes and all(route.split()[0] == "GET" for route in routes), routes
    assert sim.tag_names() == set()


@pytest.mark.anyio
async def test_a_real_run_is_not_guarded() -> None:
    sim = ActionNetworkSim(api_key=AN_KEY, requests_per_second=None)
    async with daemon(sim, dry_run=False)._an_http() as http:
        an = ActionNetworkClient(http, AN_BASE, AN_KEY, TokenBucket(1e6))
        await an.create_tag("real")
    assert sim.tag_names() == {"real"}
