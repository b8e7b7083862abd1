"""The daemon's optional HTTP listener: ControlShift webhooks, /healthz and /metrics.

Bound to loopback by default: put a TLS reverse proxy (nginx, Caddy) in front to receive
webhooks from ControlShift. Runs inside the daemon's task group on the same event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from csand import metrics
from csand.controlshift import bulk, webhooks
from csand.logs import get_logger

log = get_logger("web")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn versions
        return None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def build_app(
    *,
    receive: Callable[[str, str, str], Awaitable[bool]] | None,
    secret: str | None,
    health: Callable[[], Awaitable[list[str]]],
    on_event: Callable[[], None] = lambda: None,
    receive_export: Callable[[bytes], Awaitable[bool]] | None = None,
    on_export: Callable[[], None] = lambda: None,
) -> Starlette:
    """``receive(dedupe, type, body) -> is_new`` stores an event durably; ``health()`` lists
    the reasons csand is unhealthy (empty when healthy). ``receive_export(body) -> is_new``
    records the file a bulk-data webhook announces (``data.*_table_exported``; without it
    those are answered "ignored")."""

    async def controlshift_webhook(request: Request) -> Response:
        if secret is None or receive is None:
            return JSONResponse({"error": "webhooks are not enabled"}, status_code=404)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > webhooks.MAX_BODY_BYTES:
            metrics.webhooks.labels("rejected").inc()
            return JSONResponse({"error": "body too large"}, status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > webhooks.MAX_BODY_BYTES:
                metrics.webhooks.labels("rejected").inc()
                return JSONResponse({"error": "body too large"}, status_code=413)
        raw = bytes(body)
        if not webhooks.verify(raw, request.headers.get(webhooks.SIGNATURE_HEADER), secret):
            metrics.webhooks.labels("rejected").inc()
            log.warning("webhook.rejected", reason="missing or wrong signature",
                        client=request.client.host if request.client else None)
            return JSONResponse({"error": "invalid signature"}, status_code=401)
        try:
            event = webhooks.parse(raw)
        except ValueError as exc:
            metrics.webhooks.labels("malformed").inc()
            return JSONResponse({"error": f"malformed event: {exc}"}, status_code=400)
        if receive_export is not None and event.type in bulk.EXPORT_TYPES:
            return await _export(raw, event.type)
        if event.type not in webhooks.HANDLED:
            metrics.webhooks.labels("ignored").inc()
            return JSONResponse({"status": "ignored", "type": event.type})
        try:
            new = await receive(event.dedupe, event.type, raw.decode("utf-8", "replace"))
        except Exception:  # not stored: a non-2xx makes ControlShift deliver it again
            log.exception("webhook.store_failed", type=event.type)
            return JSONResponse({"error": "could not store the event"}, status_code=503)
        metrics.webhooks.labels("accepted" if new else "duplicate").inc()
        if new:
            on_event()
        return JSONResponse({"status": "accepted" if new else "duplicate"})

    async def _export(raw: bytes, type_: str) -> Response:
        """Record the announced file before the 200: an acknowledged file is never lost."""
        assert receive_export is not None
        try:
            new = await receive_export(raw)
        except bulk.BadExport as exc:
            metrics.webhooks.labels("malformed").inc()
            log.error("bulk.bad_announcement", type=type_, error=str(exc))
            return JSONResponse({"error": f"malformed event: {exc}"}, status_code=400)
        except Exception:  # not stored: a non-2xx makes ControlShift deliver it again
            log.exception("bulk.store_failed", type=type_)
            return JSONResponse({"error": "could not store the event"}, status_code=503)
        metrics.webhooks.labels("accepted" if new else "duplicate").inc()
        if new:
            on_export()
        return JSONResponse({"status": "accepted" if new else "duplicate"})

    async def healthz(_: Request) -> Response:
        reasons = await health()
        body: dict[str, Any] = {"status": "ok" if not reasons else "unhealthy",
                                "time": time.time()}
        if reasons:
            body["reasons"] = reasons
        return JSONResponse(body, status_code=200 if not reasons else 503)

    async def prometheus(_: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[
        Route("/webhooks/controlshift", controlshift_webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ])


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class Listener:
    """uvicorn on the daemon's loop; :meth:`stop` lets in-flight requests finish."""

    def __init__(self, app: Starlette, listen: str) -> None:
        host, port = parse_listen(listen)
        self.listen = listen
        self.server = _Server(uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=2,
        ))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until :meth:`stop`; reports started once the socket is listening."""
        self.server.ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve)
            await self.server.ready.wait()
            task_status.started()

    async def _serve(self) -> None:
        await self.server.serve()
        if not self.server.started:
            raise OSError(f"the HTTP listener could not start on {self.listen} "
                          "(address in use or not allowed?)")

    def stop(self) -> None:
        self.server.should_exit = True
