"""The FastAPI app factory: wires the engine, the batcher, the job store and worker, the routes,
errors, metrics and the API-key/body-limit guard."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from spd_engine import __version__
from spd_engine.backend import Backend

from . import errors, routes_openai, routes_resources, steps
from .batcher import Batcher
from .engine import Engine, make_backend
from .jobs import JobStore, Worker
from .observability import Guard, Metrics
from .settings import Settings

log = logging.getLogger("spd.server")


def create_app(settings: Settings, backend: Backend | None = None) -> FastAPI:
    """The app. The backend is built at startup unless one is given (tests, embedding)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = app.state
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        settings.adapters_dir.mkdir(parents=True, exist_ok=True)
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        be = backend or make_backend(settings)
        st.engine = Engine(settings, be)
        st.engine.load_store()
        st.batcher = Batcher(be, settings.max_batch, settings.batch_window_ms)
        st.batcher.start()
        _wrap_batches(be, metrics)
        st.jobs = JobStore(settings.db_path)
        st.worker = Worker(st.jobs, settings.jobs_dir, steps.make_runners(st.engine, st.jobs))
        if settings.run_worker:
            st.worker.start()
        else:
            st.worker.recover()
        st.ready = True
        log.info("serving", extra={"fields": {"model": settings.model, "backend": be.name,
                                              "modes": be.capabilities(), "host": settings.host, "port": settings.port}})
        try:
            yield
        finally:
            st.ready = False
            st.worker.stop()
            await st.batcher.stop()
            be.close()

    app = FastAPI(title="SPD server", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions with per-request capability modes (K/V subspace "
                              "projection), subspace packs, durable jobs and hot-loaded LoRA adapters.")
    app.state.settings, app.state.metrics, app.state.started, app.state.ready = settings, metrics, time.time(), False
    errors.install(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_resources.router)

    @app.get("/health", tags=["ops"], summary="Liveness (no API key needed)")
    async def health(request: Request):
        st = request.app.state
        if not st.ready:
            return errors.response(503, "starting", None, "not_ready")
        return {"status": "ok", "model": settings.model, "backend": st.engine.backend.name,
                "capabilities": st.engine.backend.capabilities(), "adapters": st.engine.backend.adapters()}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prom(request: Request):
        st = request.app.state
        metrics.queue_depth.set(st.batcher.depth)
        counts = st.jobs.counts()
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            metrics.jobs.labels(state).set(counts.get(state, 0))
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, api_key=settings.api_key, max_body=settings.max_body_bytes, metrics=metrics)
    return app


def _wrap_batches(backend: Backend, metrics: Metrics) -> None:
    """Count requests per backend call (the batcher's effectiveness), without touching the class."""
    inner = backend.generate

    def generate(requests, progress=None):
        metrics.batch_size.observe(len(requests))
        return inner(requests, progress)

    backend.generate = generate  # type: ignore[method-assign]
