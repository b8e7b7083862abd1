"""``csand check``: can csand do its job with this config? One line per check, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from csand import __version__
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.config import Settings
from csand.controlshift.client import CSError, configured_client
from csand.ratelimit import TokenBucket
from csand.storage import Storage, StoreError, open_store
from csand.storage.postgres import redact_url

# An instance whose last heartbeat is older than this is shown as stale (probably down).
STALE_AFTER_S = 30.0


def _result(check: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": check, "ok": ok, "detail": detail}


async def check_controlshift(settings: Settings, http: httpx.AsyncClient) -> dict[str, Any]:
    cs = settings.controlshift
    client = configured_client(cs, http)
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


def store_location(settings: Settings) -> str:
    """Where the store is, fit to show: the SQLite path, or the PostgreSQL URL without password."""
    url = settings.store.postgres_url
    return redact_url(url) if url is not None else str(Path(settings.store.path))


async def open_configured_store(settings: Settings) -> Storage:
    """The store ``[store]`` names (url, else path), opened as ``[store] instance``.

    :class:`StoreError` (one line, password masked) when PostgreSQL cannot be reached.
    """
    return await open_store(settings.store, instance=settings.store.instance)


async def check_store(settings: Settings) -> dict[str, Any]:
    where = store_location(settings)
    try:
        store = await open_configured_store(settings)
        try:
            await store.set_meta(checked_at=__version__)
            version = await store.schema_version()
        finally:
            await store.close()
    except StoreError as exc:  # already names the store, phrased for the operator
        return _result("store", False, _redact(str(exc), settings))
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return _result("store", False, _redact(
            f"{where}: not writable: {type(exc).__name__}: {exc}", settings))
    kind = "PostgreSQL" if settings.store.url is not None else "SQLite"
    return _result("store", True, f"{where}: writable ({kind}, schema version {version})")


def _redact(text: str, settings: Settings) -> str:
    for secret in sorted(settings.secrets(), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


async def run_checks(settings: Settings) -> list[dict[str, Any]]:
    headers = {"User-Agent": f"csand/{__version__}"}
    async with httpx.AsyncClient(timeout=settings.controlshift.timeout, headers=headers) as http:
        results = [await check_controlshift(settings, http)]
    async with httpx.AsyncClient(timeout=settings.action_network.timeout, headers=headers) as http:
        results.append(await check_action_network(settings, http))
    results.append(await check_store(settings))
    return results
