"""Composition root: build the services from the settings and wire the HTTP edges."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.config import Settings
from server.dicomweb import routes as dicomweb_routes
from server.dicomweb import render_routes, wado_uri_routes, wsi_routes
from server.dicomweb.search import QidoService
from server.dicomweb.status import HTTP_STATUS_BY_KIND, error_body
from server.dicomweb.stow import StowService
from server.dicomweb.wado import WadoService
from server.errors import ErrorKind, ServerError
from server.fhir import outcome as fhir_outcome
from server.fhir import routes as fhir_routes
from server.fhir.delivery import DeliveryWorker
from server.fhir.setup import build_service as build_fhir_service
from server.gateway import routes as gateway_routes
from server.gateway.inbound import Inbound
from server.gateway.runtime import Gateway
from server.gateway.service import GatewayService
from server.gateway.sites import Sites
from server.gateway.tasks import task_hook
from server.security import token_routes
from server.security.tokens import load_or_create_key
from server.store.archive import Archive
from server.store.blobs import BlobStore
from server.store.db import make_engine
from server.store.migrate import upgrade
from server.store.subscriptions import DeliveryQueue

log = logging.getLogger("server")

DESCRIPTION = (
    "telerad-bridge: one site's gateway of the DRG teleradiology network. DICOMweb (PS3.18) under /dicomweb, "
    "FHIR R4 under /fhir; every request needs `Authorization: Bearer` (see `telerad token`)."
)


def prepare(settings: Settings) -> None:
    """Once per data folder, before any worker serves: create it, migrate the index, sweep temp files."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    BlobStore(settings.data_dir, fsync=settings.fsync).sweep_tmp()
    load_or_create_key(settings.data_dir)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Background work of one server process: the FHIR Subscription delivery worker (one per worker process)
    and, where ``gateway_worker`` is on, the DICOM e-mail gateway (SMTP ingress, mailbox polls, sender)."""
    settings: Settings = app.state.settings
    async with anyio.create_task_group() as tg:
        if settings.subscription_worker:
            tg.start_soon(DeliveryWorker(settings, app.state.fhir, DeliveryQueue(app.state.engine)).run)
        if settings.gateway_worker:
            app.state.gateway_runtime = build_gateway(app)
            await tg.start(_run_gateway, app.state.gateway_runtime)
        yield
        tg.cancel_scope.cancel()
    app.state.gateway_runtime = None


def build_gateway(app: FastAPI) -> Gateway:
    """The DICOM e-mail gateway's background work (SMTP ingress, polls, sender) on this app's services."""
    s = app.state
    return Gateway(s.settings, s.engine, s.blobs, s.archive, s.fhir, also=task_hook(s.fhir, "/fhir"), sites=s.sites)


async def _run_gateway(gateway, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway; report started once the SMTP ingress listens."""
    await gateway.start()
    task_status.started()
    await gateway.serve()


def worker_app() -> FastAPI:
    """The app of one worker process of ``telerad serve --workers N`` (settings from ``TELERAD_*``)."""
    return create_app(Settings(), prepared=True)


def create_app(settings: Settings, *, prepared: bool = False) -> FastAPI:
    """The ASGI application for ``settings``; prepares the data folder unless ``prepared`` already."""
    if not prepared:
        prepare(settings)
    engine = make_engine(settings.resolved_database_url)
    blobs = BlobStore(settings.data_dir, fsync=settings.fsync)
    archive = Archive(engine)

    app = FastAPI(title="telerad-bridge", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.archive = archive
    app.state.blobs = blobs
    app.state.gateway_runtime = None  # set by the lifespan when this process runs the gateway
    app.state.token_key = load_or_create_key(settings.data_dir)
    app.state.stow = StowService(settings, blobs, archive)
    app.state.wado = WadoService(blobs, archive)
    app.state.qido = QidoService(settings, engine)
    sites = Sites.load(settings.data_dir)
    app.state.sites = sites
    app.state.fhir = build_fhir_service(settings, engine, sites=sites)
    inbound = Inbound(settings, engine, blobs, archive, app.state.fhir, sites,
                      also=task_hook(app.state.fhir, "/fhir"))  # operator set import in HTTP-only workers

    def running_inbound() -> Inbound:
        runtime = app.state.gateway_runtime
        return runtime.inbound if runtime is not None else inbound

    app.state.gateway = GatewayService(
        settings, engine, archive, app.state.fhir, sites,
        wake=lambda: app.state.gateway_runtime and app.state.gateway_runtime.wake(), inbound=running_inbound)
    # the pixel services first: their paths take precedence over the archive router's catch-alls
    app.include_router(render_routes.router)
    app.include_router(wado_uri_routes.router)
    app.include_router(wsi_routes.router)
    app.include_router(dicomweb_routes.router)
    app.include_router(fhir_routes.router)
    app.include_router(fhir_routes.well_known)
    app.include_router(token_routes.router)
    app.include_router(gateway_routes.router)

    @app.get("/healthz", tags=["Operations"], description="Liveness: 200 when the index answers.")
    async def healthz() -> dict:
        await anyio.to_thread.run_sync(archive.ping)
        return {"status": "ok", "version": __version__}

    _install_error_handlers(app)
    return app


def _is_fhir(request: Request) -> bool:
    path = request.url.path
    return path == "/fhir" or path.startswith(("/fhir/", "/.well-known/"))


def _error_response(request: Request, status: int, message: str, parameter: str | None = None, *,
                    fhir_code: str | None = None) -> Response:
    """The error body of the edge the request belongs to (DICOMweb: DICOM JSON; FHIR: OperationOutcome)."""
    headers = {}
    if status == 401:
        error = ' error="invalid_token"' if request.headers.get("authorization") else ""
        headers["WWW-Authenticate"] = f'Bearer realm="telerad-bridge"{error}'
    if _is_fhir(request):
        body = fhir_outcome.operation_outcome(fhir_code or fhir_outcome.code_for_status(status), message,
                                              expression=parameter)
        return fhir_routes.outcome_response(request, body, status, headers)
    return JSONResponse(error_body(message, parameter), status_code=status, media_type="application/dicom+json",
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> Response:
        if exc.kind is ErrorKind.INTERNAL:
            return _internal(request, exc)
        if _is_fhir(request):
            status, body = fhir_outcome.error_outcome(exc)
            headers = {"WWW-Authenticate": 'Bearer realm="telerad-bridge"'} if status == 401 else {}
            if status == 401 and request.headers.get("authorization"):
                headers["WWW-Authenticate"] += ' error="invalid_token"'
            return fhir_routes.outcome_response(request, body, status, headers)
        return _error_response(request, HTTP_STATUS_BY_KIND[exc.kind], exc.message, exc.parameter)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(request, 400, "invalid request parameters")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return _internal(request, exc)


def _internal(request: Request, exc: BaseException) -> Response:
    """Log once with a correlation id; the peer sees only the id."""
    correlation = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", correlation, request.method, request.url.path, exc_info=exc)
    return _error_response(request, 500, f"internal error (correlation id {correlation})")
