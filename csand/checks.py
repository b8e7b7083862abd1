"""``csand check``: can csand do its job with this config? One line per check, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from csand import __version__
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.config import Settings
from csand.controlshift.client import ControlShiftClient, CSError, OAuthToken
from csand.ratelimit import TokenBucket
from csand.storage import open_store


def _result(check: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": check, "ok": ok, "detail": detail}


async def check_controlshift(settings: Settings, http: httpx.AsyncClient) -> dict[str, Any]:
    cs = settings.controlshift
    if cs.api_key is not None:
        client = ControlShiftClient(http, cs.url, api_key=cs.api_key.get_secret_value())
    else:
        oauth = OAuthToken(http, cs.url, cs.client_id or "",
                           cs.client_secret.get_secret_value())  # type: ignore[union-attr]
        client = ControlShiftClient(http, cs.url, oauth=oauth)
    try:
        org = await client.organisation()
    except CSError as exc:
        return _result("ControlShift", False, f"{cs.url}: {exc}")
    return _result("ControlShift", True,
                   f"{cs.url}: organisation {org.get('name')!r} (slug {org.get('slug')})")


async def check_action_network(settings: Settings, http: httpx.AsyncClient) -> dict[str, Any]:
    an = settings.action_network
    client = ActionNetworkClient(http, an.url, an.api_key.get_secret_value(),  # type: ignore[union-attr]
                                 TokenBucket(an.requests_per_second))
    try:
        ok = await client.check_key()
    except ANFailure as failure:
        return _result("Action Network", False, f"{an.url}: {failure.outcome.reason}")
    if not ok:
        return _result("Action Network", False,
                       f"{an.url}: the API key is not valid for a group (the entry point "
                       "lists no osdi:tags); check action_network.api_key")
    return _result("Action Network", True, f"{an.url}: the group API key is valid")


async def check_store(settings: Settings) -> dict[str, Any]:
    path = Path(settings.store.path)
    try:
        store = await open_store(path)
        try:
            await store.set_meta(checked_at=__version__)
            version = await store.schema_version()
        finally:
            await store.close()
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return _result("store", False, f"{path}: not writable: {type(exc).__name__}: {exc}")
    return _result("store", True, f"{path}: writable (schema version {version})")


async def run_checks(settings: Settings) -> list[dict[str, Any]]:
    headers = {"User-Agent": f"csand/{__version__}"}
    async with httpx.AsyncClient(timeout=settings.controlshift.timeout, headers=headers) as http:
        results = [await check_controlshift(settings, http)]
    async with httpx.AsyncClient(timeout=settings.action_network.timeout, headers=headers) as http:
        results.append(await check_action_network(settings, http))
    results.append(await check_store(settings))
    return results
