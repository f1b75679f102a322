"""Metrics (Prometheus), structured JSON logs, the API-key check and the body-size limit."""
from __future__ import annotations

import hmac
import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import errors


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("spd_requests", "Completion requests", ["endpoint", "capability", "status"],
                                registry=self.registry)
        self.tokens = Counter("spd_tokens", "Tokens processed", ["capability", "type"], registry=self.registry)
        self.latency = Histogram("spd_request_latency_seconds", "Completion request latency", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.http = Counter("spd_http_requests", "HTTP requests", ["method", "status"], registry=self.registry)
        self.queue_depth = Gauge("spd_queue_depth", "Requests waiting for the batcher", registry=self.registry)
        self.batch_size = Histogram("spd_batch_size", "Requests per backend batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.jobs = Gauge("spd_jobs", "Jobs by state", ["state"], registry=self.registry)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


access_log = logging.getLogger("spd.access")

OPEN_PATHS = {"/health"}


class Guard:
    """ASGI middleware: API key, body-size limit, access log and HTTP metrics."""

    def __init__(self, app, api_key: str | None, max_body: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def _reply(self, send, status: int, message: str, param=None, code=None) -> None:
        payload = json.dumps(errors.body(status, message, param, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if self.api_key and path not in OPEN_PATHS:
                auth = headers.get("authorization", "")
                token = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    return await self._reply(send_wrapped, 401, "missing or invalid API key (Authorization: Bearer ...)",
                                             "authorization", "invalid_api_key")
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return await self._reply(send_wrapped, 400, "invalid Content-Length", "content-length")
                if int(length) > self.max_body:
                    return await self._reply(send_wrapped, 413, f"request body of {length} bytes exceeds the limit of "
                                             f"{self.max_body} bytes", "body", "request_too_large")
                return await self.app(scope, receive, send_wrapped)
            # no length (chunked): buffer up to the limit, then replay
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                more = msg.get("more_body", False)
                if size > self.max_body:
                    return await self._reply(send_wrapped, 413, f"request body exceeds the limit of {self.max_body} bytes",
                                             "body", "request_too_large")
            body, replayed = b"".join(chunks), [False]

            async def replay():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send_wrapped)
        finally:
            ms = round((time.perf_counter() - started) * 1000, 2)
            self.metrics.http.labels(method, str(status[0])).inc()
            access_log.info("%s %s %s", method, path, status[0],
                            extra={"fields": {"method": method, "path": path, "status": status[0], "ms": ms}})
