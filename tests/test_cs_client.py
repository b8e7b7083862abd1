"""The ControlShift client (csand.controlshift.client) against mocked HTTP (respx), on fake time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from csand.controlshift import client as client_module
from csand.controlshift.client import (
    ControlShiftClient,
    CSAuthError,
    CSBadPage,
    CSError,
    OAuthToken,
    pagination,
)
from csand.ratelimit import TokenBucket
from tests.fakes import FakeClock

BASE = "https://org.cs.test"
API = f"{BASE}/api/v1"
TOKEN_URL = f"{BASE}/oauth/token"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(5000.0)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def mock() -> respx.MockRouter:
    with respx.mock(assert_all_called=False) as router:
        yield router


def limiter(clock: FakeClock) -> TokenBucket:
    return TokenBucket(1000 / 60, clock=clock, sleep=clock.sleep)


def api_client(http: httpx.AsyncClient, clock: FakeClock, **kw: Any) -> ControlShiftClient:
    kw.setdefault("api_key", "cs_live_key")
    return ControlShiftClient(http, BASE + "/", limiter=limiter(clock), sleep=clock.sleep, **kw)


def oauth(http: httpx.AsyncClient, clock: FakeClock) -> OAuthToken:
    token = OAuthToken(http, BASE, "client-1", "secret-1", clock=clock)
    token._limiter._sleep = clock.sleep  # the endpoint limiter, on the same fake time
    return token


def meta(page: int, total: int) -> dict[str, Any]:
    return {"current_page": page, "total_pages": total,
            "previous_page": page - 1 if page > 1 else None,
            "next_page": page + 1 if page < total else None}


def token_responder(clock: FakeClock, times: list[float], ttl: int = 7200):
    def respond(request: httpx.Request) -> httpx.Response:
        times.append(clock())
        return httpx.Response(200, json={"access_token": f"tok{len(times)}", "token_type": "bearer",
                                         "expires_in": ttl})
    return respond


# ---------------------------------------------------------------- API key, paging


@pytest.mark.anyio
async def test_api_key_sent_as_bearer(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    route = mock.get(f"{API}/organisation").respond(200, json={"organisation": {"slug": "org"}})
    cs = api_client(http, clock)
    assert await cs.organisation() == {"slug": "org"}
    assert route.calls.last.request.headers["Authorization"] == "Bearer cs_live_key"
    assert cs.requests == 1


@pytest.mark.anyio
async def test_credentials_are_required(http: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError):
        ControlShiftClient(http, BASE)


@pytest.mark.anyio
async def test_pagination_follows_next_page_until_null(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json={"petitions": [{"id": page * 10}, {"id": page * 10 + 1}],
                                         "meta": meta(page, 3)})

    route = mock.get(f"{API}/petitions").mock(side_effect=respond)
    petitions = await api_client(http, clock).petitions()
    assert [p["id"] for p in petitions] == [10, 11, 20, 21, 30, 31]
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2", "3"]


@pytest.mark.anyio
async def test_pagination_stops_on_a_repeated_page(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/petitions").respond(
        200, json={"petitions": [{"id": 1}], "meta": {"current_page": 1, "next_page": 1}})
    assert len(await api_client(http, clock).petitions()) == 1
    assert route.call_count == 1


@pytest.mark.anyio
async def test_signatures_page(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    route = mock.get(url__startswith=f"{API}/petitions/").respond(
        200, json={"petition": {"slug": "a b"}, "signatures": [{"id": 1}], "meta": meta(2, 4)})
    items, page_meta = await api_client(http, clock).signatures_page("save/the whales", 2)
    assert items == [{"id": 1}] and page_meta["total_pages"] == 4
    assert route.calls.last.request.url.raw_path == b"/api/v1/petitions/save%2Fthe%20whales/signatures?page=2"


# ---------------------------------------------------------------- limits and failures


@pytest.mark.anyio
async def test_429_honours_ratelimit_reset(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    route = mock.get(f"{API}/organisation").mock(side_effect=[
        httpx.Response(429, json={"error": "rate limit exceeded"},
                       headers={"RateLimit-Limit": "1000", "RateLimit-Remaining": "0",
                                "RateLimit-Reset": "17"}),
        httpx.Response(200, json={"organisation": {"slug": "org"}}),
    ])
    cs = api_client(http, clock)
    start = clock()
    assert await cs.organisation() == {"slug": "org"}
    assert route.call_count == 2
    assert cs.rate_limited == 1
    assert cs.limiter.rate_limited_count == 1
    assert clock.slept and clock.slept[-1] == pytest.approx(17.0)
    assert clock() - start == pytest.approx(17.0)


@pytest.mark.anyio
@pytest.mark.parametrize("headers", [{}, {"RateLimit-Reset": "soon"}])
async def test_429_without_a_readable_reset_pauses_five_seconds_each_time(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, headers: dict[str, str]
) -> None:
    route = mock.get(f"{API}/organisation").mock(side_effect=[
        httpx.Response(429, headers=headers),
        httpx.Response(429, headers=headers),
        httpx.Response(200, json={"organisation": {"slug": "org"}}),
    ])
    cs = api_client(http, clock)
    start = clock()
    assert await cs.organisation() == {"slug": "org"}
    assert route.call_count == 3 and cs.rate_limited == 2
    assert clock() - start == pytest.approx(10.0)


@pytest.mark.anyio
async def test_5xx_retried_with_backoff_then_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/organisation").respond(503, json={"error": "unavailable"})
    cs = api_client(http, clock)
    with pytest.raises(CSError) as info:
        await cs.organisation()
    assert not isinstance(info.value, CSAuthError)
    assert "503" in str(info.value)
    assert route.call_count == 5
    backoffs = [s for s in clock.slept if s >= 0.5]
    assert backoffs == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.anyio
async def test_connection_errors_retried_with_backoff_then_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/organisation").mock(side_effect=httpx.ConnectError("refused"))
    cs = api_client(http, clock)
    with pytest.raises(CSError, match="unreachable"):
        await cs.organisation()
    assert route.call_count == 5
    assert [s for s in clock.slept if s >= 0.5] == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.anyio
async def test_5xx_then_success(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    route = mock.get(f"{API}/organisation").mock(side_effect=[
        httpx.Response(502), httpx.ConnectError("refused"),
        httpx.Response(200, json={"organisation": {"slug": "org"}}),
    ])
    assert await api_client(http, clock).organisation() == {"slug": "org"}
    assert route.call_count == 3


@pytest.mark.anyio
async def test_transport_errors_exhausted_raise_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    mock.get(f"{API}/organisation").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(CSError, match="unreachable"):
        await api_client(http, clock).organisation()


@pytest.mark.anyio
async def test_401_with_api_key_is_auth_error(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    route = mock.get(f"{API}/organisation").respond(401, json={"error": "unauthorized"})
    with pytest.raises(CSAuthError):
        await api_client(http, clock).organisation()
    assert route.call_count == 1


@pytest.mark.anyio
async def test_other_4xx_is_cs_error(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    mock.get(f"{API}/petitions/x").respond(404, json={"error": "not found"})
    mock.get(f"{API}/organisation").respond(422, text="nope")
    cs = api_client(http, clock)
    with pytest.raises(CSError, match="404"):
        await cs.get("/petitions/x")
    with pytest.raises(CSError, match="422"):
        await cs.organisation()


# ---------------------------------------------------------------- OAuth


@pytest.mark.anyio
async def test_oauth_token_fetched_once_and_cached(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    times: list[float] = []
    token_route = mock.post(TOKEN_URL).mock(side_effect=token_responder(clock, times))
    api = mock.get(f"{API}/organisation").respond(200, json={"organisation": {"slug": "org"}})
    token = oauth(http, clock)
    cs = api_client(http, clock, api_key=None, oauth=token)
    for _ in range(3):
        await cs.organisation()
    assert token_route.call_count == 1
    form = parse_qs(token_route.calls.last.request.content.decode())
    assert form == {"grant_type": ["client_credentials"], "client_id": ["client-1"],
                    "client_secret": ["secret-1"]}
    assert {c.request.headers["Authorization"] for c in api.calls} == {"Bearer tok1"}


@pytest.mark.anyio
async def test_oauth_token_refreshed_when_expired(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    times: list[float] = []
    token_route = mock.post(TOKEN_URL).mock(side_effect=token_responder(clock, times, ttl=7200))
    api = mock.get(f"{API}/organisation").respond(200, json={"organisation": {}})
    cs = api_client(http, clock, api_key=None, oauth=oauth(http, clock))
    await cs.organisation()
    clock.now += 7200 - 61  # still more than a minute of validity left
    await cs.organisation()
    assert token_route.call_count == 1
    clock.now += 2  # within the last minute: refreshed before it expires
    await cs.organisation()
    assert token_route.call_count == 2
    assert api.calls.last.request.headers["Authorization"] == "Bearer tok2"


@pytest.mark.anyio
async def test_oauth_token_refreshed_on_401(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    times: list[float] = []
    token_route = mock.post(TOKEN_URL).mock(side_effect=token_responder(clock, times))
    api = mock.get(f"{API}/organisation").mock(side_effect=[
        httpx.Response(200, json={"organisation": {}}),
        httpx.Response(401, json={"error": "unauthorized"}),
        httpx.Response(200, json={"organisation": {"slug": "org"}}),
    ])
    cs = api_client(http, clock, api_key=None, oauth=oauth(http, clock))
    await cs.organisation()
    assert await cs.organisation() == {"slug": "org"}
    assert token_route.call_count == 2
    assert [c.request.headers["Authorization"] for c in api.calls] == [
        "Bearer tok1", "Bearer tok1", "Bearer tok2"]


@pytest.mark.anyio
async def test_oauth_persistent_401_is_auth_error_after_one_refresh(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    times: list[float] = []
    token_route = mock.post(TOKEN_URL).mock(side_effect=token_responder(clock, times))
    api = mock.get(f"{API}/organisation").respond(401, json={"error": "unauthorized"})
    cs = api_client(http, clock, api_key=None, oauth=oauth(http, clock))
    with pytest.raises(CSAuthError):
        await cs.organisation()
    assert token_route.call_count == 2
    assert api.call_count == 2


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403])
async def test_oauth_rejected_credentials(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, status: int
) -> None:
    mock.post(TOKEN_URL).respond(status, json={"error": "invalid_client"})
    with pytest.raises(CSAuthError, match="client_id"):
        await oauth(http, clock).get()


def _max_in_any_minute(times: list[float]) -> int:
    return max(sum(1 for t in times if start <= t < start + 60) for start in times)


@pytest.mark.anyio
async def test_oauth_token_endpoint_spaced_out(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    times: list[float] = []
    mock.post(TOKEN_URL).mock(side_effect=token_responder(clock, times))
    token = oauth(http, clock)
    for _ in range(15):
        token.invalidate()
        await token.get()
    assert len(times) == 15
    assert _max_in_any_minute(times) <= 10
    assert times[-1] - times[0] >= 60


@pytest.mark.anyio
async def test_oauth_token_endpoint_at_most_10_per_minute_after_idle(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter
) -> None:
    times: list[float] = []
    mock.post(TOKEN_URL).mock(side_effect=token_responder(clock, times))
    token = oauth(http, clock)
    await token.get()
    clock.now += 600  # idle, e.g. while the token was valid
    for _ in range(14):
        token.invalidate()  # e.g. a 401 for every fresh token
        await token.get()
    assert _max_in_any_minute(times) <= 10


@pytest.mark.anyio
@pytest.mark.parametrize("answer", [
    httpx.Response(200, text="<html>down for maintenance</html>"),
    httpx.Response(200, json={"error": "temporarily_unavailable"}),
])
async def test_oauth_malformed_token_answer_is_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, answer: httpx.Response
) -> None:
    mock.post(TOKEN_URL).mock(return_value=answer)
    with pytest.raises(CSError):
        await oauth(http, clock).get()


@pytest.mark.anyio
async def test_non_json_200_is_cs_error(http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter) -> None:
    mock.get(f"{API}/organisation").respond(200, text="<html>hello</html>")
    with pytest.raises(CSError, match="non-JSON"):
        await api_client(http, clock).organisation()


@pytest.mark.anyio
@pytest.mark.parametrize("content", [b"[]", b"null"])
async def test_non_object_json_is_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, content: bytes
) -> None:
    mock.get(f"{API}/petitions").respond(200, content=content, headers={"Content-Type": "application/json"})
    with pytest.raises(CSError):
        await api_client(http, clock).petitions()


# ---------------------------------------------------------------- pagination it cannot follow


@pytest.mark.parametrize(("bad", "words"), [
    ({"current_page": 1, "total_pages": 3, "next_page": "2"}, "meta.next_page"),
    ({"current_page": 1, "total_pages": 3, "next_page": "abc"}, "meta.next_page"),
    ({"current_page": 1, "total_pages": 3, "next_page": 2.5}, "meta.next_page"),
    ({"current_page": 1, "total_pages": 3, "next_page": {"page": 2}}, "meta.next_page"),
    ({"current_page": 1, "total_pages": 3, "next_page": True}, "meta.next_page"),
    ({"current_page": 1, "total_pages": 3, "next_page": 0}, "meta.next_page"),
    ({"current_page": 1, "total_pages": 3, "next_page": -2}, "meta.next_page"),
    ({"current_page": 1, "total_pages": "3", "next_page": 2}, "meta.total_pages"),
    ({"current_page": 1, "total_pages": -1, "next_page": None}, "meta.total_pages"),
    ({"current_page": 1, "next_page": 10_001}, "10000"),
    ({"current_page": 1, "total_pages": 20_000, "next_page": 2}, "10000"),
    ([1, 2], "meta is not an object"),
])
def test_pagination_rejects_what_it_cannot_follow(bad: Any, words: str) -> None:
    with pytest.raises(CSBadPage) as info:
        pagination(bad, 1, "/petitions")
    assert words in str(info.value) and "/petitions" in str(info.value)


@pytest.mark.parametrize(("good", "parsed"), [
    (meta(1, 3), (3, 2)),
    (meta(3, 3), (3, None)),
    ({"current_page": 1, "total_pages": 0, "next_page": None}, (0, None)),  # an empty list
    ({}, (None, None)),
    (None, (None, None)),
    ({"next_page": 2}, (None, 2)),
    ({"current_page": 1, "next_page": 1}, (None, 1)),  # a repeat: the caller stops there
])
def test_pagination_accepts_the_documented_shapes(good: Any, parsed: tuple[Any, Any]) -> None:
    assert pagination(good, 1, "/petitions") == parsed


def test_a_next_page_beyond_total_pages_is_not_followed() -> None:
    with capture_logs() as logs:
        assert pagination({"total_pages": 3, "next_page": 4}, 3, "/petitions") == (3, None)
    (event,) = logs
    assert event["event"] == "cs.bad_pagination" and event["log_level"] == "error"
    assert "beyond meta.total_pages 3" in event["error"] and event["path"] == "/petitions"


@pytest.mark.anyio
async def test_petition_list_stops_at_total_pages(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter,
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json={"petitions": [{"id": page}], "meta": {
            "current_page": page, "total_pages": 3, "next_page": page + 1}})

    route = mock.get(f"{API}/petitions").mock(side_effect=respond)
    assert [p["id"] for p in await api_client(http, clock).petitions()] == [1, 2, 3]
    assert route.call_count == 3


@pytest.mark.anyio
@pytest.mark.parametrize("next_page", ["2", "abc", 2.5, {"page": 2}, -1])
async def test_petition_list_with_a_bad_next_page_is_a_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, next_page: Any,
) -> None:
    mock.get(f"{API}/petitions").respond(200, json={
        "petitions": [{"id": 1}], "meta": {"current_page": 1, "total_pages": 3,
                                           "next_page": next_page}})
    with pytest.raises(CSBadPage, match="meta.next_page"):
        await api_client(http, clock).petitions()


@pytest.mark.anyio
async def test_petition_list_that_never_ends_stops_at_the_ceiling(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "MAX_PAGES", 25)

    def respond(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        if page > 1000:  # the guard of this test, not of the client
            return httpx.Response(200, json={"petitions": [], "meta": {"next_page": None}})
        return httpx.Response(200, json={"petitions": [{"id": page}],
                                         "meta": {"current_page": page, "next_page": page + 1}})

    route = mock.get(f"{API}/petitions").mock(side_effect=respond)
    with pytest.raises(CSBadPage, match="25"):
        await api_client(http, clock).petitions()
    assert route.call_count == 25


@pytest.mark.anyio
@pytest.mark.parametrize("items", [{"id": 1}, "abc", 7])
async def test_a_list_that_is_not_a_list_is_a_cs_error(
    http: httpx.AsyncClient, clock: FakeClock, mock: respx.MockRouter, items: Any,
) -> None:
    mock.get(url__startswith=f"{API}/petitions").respond(
        200, json={"petitions": items, "signatures": items, "meta": meta(1, 1)})
    cs = api_client(http, clock)
    with pytest.raises(CSBadPage, match="petitions is not a list"):
        await cs.petitions()
    with pytest.raises(CSBadPage, match="signatures is not a list"):
        await cs.signatures_page("p", 1)


@pytest.mark.anyio
async def test_configured_client_takes_the_key_or_oauth_and_its_share_of_the_budget(
    http: httpx.AsyncClient, mock: respx.MockRouter,
) -> None:
    from csand.config import ControlShiftSettings
    from csand.controlshift.client import configured_client

    with_key = configured_client(
        ControlShiftSettings(url=BASE, api_key="cs_live_key", requests_per_minute=600), http,
        share=0.25)
    assert with_key.limiter.target_rate == pytest.approx(600 * 0.25 / 60 * 0.95)
    mock.get(f"{BASE}/api/v1/organisation").respond(200, json={"organisation": {"slug": "o"}})
    assert (await with_key.organisation())["slug"] == "o"
    assert mock.calls.last.request.headers["Authorization"] == "Bearer cs_live_key"

    mock.post(f"{BASE}/oauth/token").respond(
        200, json={"access_token": "tok-1", "token_type": "bearer", "expires_in": 7200})
    with_oauth = configured_client(
        ControlShiftSettings(url=BASE, client_id="c", client_secret="s"), http)
    assert with_oauth.limiter.target_rate == pytest.approx(1000 / 60 * 0.95)
    assert (await with_oauth.organisation())["slug"] == "o"
    assert mock.calls.last.request.headers["Authorization"] == "Bearer tok-1"
