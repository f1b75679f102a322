"""The `vllm.endpoint_plugins` entry point `spd_api`: this project's HTTP surface inside vLLM's
own OpenAI API server, paired with the `spd_kv_projection` general plugin (engine side).

- routes: modes, jobs, adapters (`server.routes_resources`), under /v1, so vLLM's API key
  guards them like its own;
- the capability fields: `capability` / `capability_strength` at the top level of a completion
  or chat request (e.g. the openai client's `extra_body`) are moved into `vllm_xargs`, where
  vLLM hands them to the engine as `SamplingParams.extra_args`. Both spellings are then one
  request: the plugin's front end validates it (400 naming the field, before scheduling) and
  salts its prefix cache per mode. Giving both with different values is a 400;
- the web console at /ui (`server/ui/`: static HTML + JS over the public API).

Loaded when `VLLM_PLUGINS` names it (`spd serve` does), in the API server process only.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from pathlib import Path

from prometheus_client import Counter

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spd_engine.paths import store_dir
from spd_engine.auto import AUTO_MODE, take_reports
from spd_engine.vllm_requests import CAPABILITY_ARG, STRENGTH_ARG, parse_extra_args

from . import model_names
from .settings import Limits

log = logging.getLogger("spd.server")

OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")
ADAPTER_USERS = (*OPENAI_ROUTES, "/v1/models", "/v1/adapters")  # routes that read the served adapters
FIELDS = (CAPABILITY_ARG, STRENGTH_ARG)
UI_DIR = Path(__file__).with_name("ui")


def move_capability_fields(body: dict) -> dict:
    """The request with its top-level capability fields moved into `vllm_xargs` (ValueError if
    they disagree with what `vllm_xargs` already says)."""
    given = {k: body.pop(k) for k in FIELDS if k in body}
    if not given:
        return body
    xargs = body.get("vllm_xargs")
    if xargs is None:
        xargs = {}
    if not isinstance(xargs, dict):
        raise ValueError("vllm_xargs must be an object")
    for k, v in given.items():
        if k in xargs and xargs[k] != v:
            raise ValueError(f"{k} is given twice with different values (top level and vllm_xargs)")
    body["vllm_xargs"] = {**xargs, **given}
    return body


def check_bounds(body: dict, limits: Limits, vocab_size: int | None = None) -> None:
    """The work one request may ask for, beyond vLLM's own checks, and two refusals of vLLM's that
    name no field (ValueError naming the field)."""
    prompt = body.get("prompt")
    if vocab_size and isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    if body.get("messages") == []:
        raise ValueError("messages: at least one message is needed")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > limits.max_prompts:
        raise ValueError(f"prompt: {len(prompt)} prompts in one request; at most {limits.max_prompts} (SPD_MAX_PROMPTS)")
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_n:
        raise ValueError(f"n: {n} completions per prompt; at most {limits.max_n} (SPD_MAX_N)")
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed: {seed} is outside the 64-bit signed range")


class OpenAIGuard:
    """ASGI middleware around vLLM's OpenAI routes. First it brings this process's adapters up to
    date with the other API-server processes' (`SPDServer.sync_adapters`). On the completion routes
    it then turns a mode model name into its capability fields (`server.model_names`), moves the
    capability fields (see above), bounds the work per request (`check_bounds`) and the requests in
    flight (429 with Retry-After beyond SPD_MAX_INFLIGHT, instead of an unbounded queue), and says
    in the response headers what was applied (`applied_headers`). On /v1/models it adds the mode
    model names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.limits, self.inflight = app, Limits.from_env(), 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send, [PROCESS_HEADER])
        spd = getattr(scope["app"].state, "spd", None)
        if spd is not None and scope["path"] in ADAPTER_USERS:
            await spd.sync_adapters()  # adapters another API-server process loaded (a stat when none did)
        if spd is not None and scope["path"] == "/v1/models" and scope.get("method") == "GET":
            return await self.app(scope, receive, _listing_modes(send, spd))
        if scope.get("method") != "POST" or scope["path"] not in OPENAI_ROUTES:
            return await self.app(scope, receive, send)
        from .errors import response

        if self.inflight >= self.limits.max_inflight:
            return await response(429, f"{self.inflight} requests are in flight (SPD_MAX_INFLIGHT); retry shortly",
                                  None, {"retry-after": "1"})(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
            if isinstance(body, dict):
                check_bounds(body, self.limits, spd.vocab_size if spd is not None else None)
                named = model_names.apply(body, {spd.model_id, *spd.adapters()}) if spd is not None else body
                if named is not body or any(k in body for k in FIELDS):
                    body = move_capability_fields(named)
                    raw = json.dumps(body).encode()
                applied = applied_headers(body)
                send = _with_auto_decisions(send, applied) if (CAPABILITY_HEADER, AUTO) in applied \
                    else _with_headers(send, applied)
        except json.JSONDecodeError:
            pass  # vLLM answers malformed JSON itself
        except ValueError as e:
            field = str(e).split(":")[0] if ":" in str(e).split()[0] else CAPABILITY_ARG
            return await response(400, str(e), field)(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        self.inflight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.inflight -= 1


PROCESS_HEADER = (b"x-spd-process", str(os.getpid()).encode())
CAPABILITY_HEADER, STRENGTH_HEADER = b"x-spd-capability", b"x-spd-capability-strength"


def applied_headers(body: dict) -> list[tuple[bytes, bytes]]:
    """What a completion request is served with: its modes (`x-spd-capability`, comma-separated,
    empty for none) and strength (`x-spd-capability-strength`, 0 for none). The engine projects
    exactly that or the request is refused before any token (the front end's 400)."""
    try:
        cap, strength = parse_extra_args(body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else None)
    except ValueError:
        return []  # refused by the front end with a 400 naming the field
    if not cap:
        strength = 0.0
    return [(CAPABILITY_HEADER, ",".join(cap).encode()), (STRENGTH_HEADER, repr(strength).encode())]


AUTO = AUTO_MODE.encode()
AUTO_CHOICES = Counter("spd_auto_choices", "capability auto: the mode chosen per request (none: no mode)",
                       ["capability"])


def _with_auto_decisions(send: Send, applied: list[tuple[bytes, bytes]]) -> Send:
    """`send` for a capability-auto request: the response headers wait for the first body chunk
    (the engine has chosen by then: it decides in the prefill step, before the first token), then
    say the chosen mode (`x-spd-capability`; empty for none; `;` between prompts) and count it."""
    start: dict = {}

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if start:
            headers = [h for h in applied if h[0] != CAPABILITY_HEADER]
            found = _RESPONSE_ID.search(message.get("body", b"")[:1024]) if start.get("status") == 200 else None
            if found:
                chosen = [d["capability"] for d in take_reports(store_dir(), found.group(1).decode())]
                for cap in chosen:
                    AUTO_CHOICES.labels(capability="+".join(cap) or "none").inc()
                headers.append((CAPABILITY_HEADER, ";".join(",".join(c) for c in chosen).encode()))
                if not any(chosen):  # no mode applied: strength 0, as for a request without one
                    headers = [(STRENGTH_HEADER, b"0.0") if h[0] == STRENGTH_HEADER else h for h in headers]
            await send({**start, "headers": [*start.get("headers", []), *headers]})
            start.clear()
        await send(message)

    return sending


_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9._~%-]{1,200})"')


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """`send` with `extra` added to the response headers (every response names the API-server
    process that answered, `x-spd-process: PID`: under `--api-server-count N` the kernel spreads
    connections over N processes)."""
    if not extra:
        return send

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


def _listing_modes(send: Send, spd) -> Send:
    """`send` for vLLM's /v1/models answer, with the mode model names added."""
    start: dict = {}
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        if start.get("status") == 200:
            modes = spd.capabilities()
            body = json.dumps(model_names.listed(json.loads(body), [*modes, AUTO_MODE] if modes else [])).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return sending


def mount_console(app) -> None:
    """The web console at /ui: static files shipped in the package (`server/ui/`), served by this
    process. They are public (outside /v1, so vLLM's API key does not guard them); every API call
    the page makes sends the key the user gave it."""
    from fastapi.responses import RedirectResponse
    from starlette.staticfiles import StaticFiles

    if not (UI_DIR / "index.html").is_file():
        log.warning("spd_api: the console's files are missing (%s): /ui is not served", UI_DIR)
        return

    @app.get("/ui", include_in_schema=False)
    async def _console_root():
        return RedirectResponse("ui/", status_code=307)  # relative: works behind a path prefix

    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="spd-console")


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}


def answer_other_methods(app, router) -> None:
    """For each path of `router`, a 405 listing in `Allow` exactly the methods the path serves
    (Starlette's own 405 names only the first route matching the path)."""
    from fastapi.routing import APIRoute

    from .errors import response

    served: dict[str, set[str]] = {}
    for route in router.routes:
        if isinstance(route, APIRoute):
            served.setdefault(route.path, set()).update(route.methods)
    def not_allowed(allow: str):
        async def handler(request: Request):
            return response(405, f"method {request.method} is not allowed here; allowed: {allow}", None,
                            {"allow": allow})

        return handler

    for path, methods in sorted(served.items(), key=lambda pm: "{" in pm[0]):  # /x/import before /x/{name}
        allow = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
        app.add_api_route(path, not_allowed(allow), methods=sorted(HTTP_METHODS - methods - {"HEAD"}),
                          include_in_schema=False)


class SPDEndpoints:
    """The endpoint plugin (vLLM instantiates it with no arguments)."""

    name = "spd_api"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from . import errors, routes_resources

        app.include_router(routes_resources.router)
        answer_other_methods(app, routes_resources.router)
        app.add_middleware(OpenAIGuard)
        errors.install(app)
        app.router.lifespan_context = _with_shutdown(app.router.lifespan_context)
        mount_console(app)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            log.warning("spd_api: no engine (render-only server): the resource routes are not served")
            return
        from .jobs import JobStore
        from .settings import Settings
        from .state import SPDServer
        from .steps import start_worker
        from .vllm_plugin import front_end

        admission = front_end()
        if admission is None:  # capability fields would reach the engine unvalidated and unprojected
            raise RuntimeError("spd_api needs the spd_kv_projection plugin in this process: name both in "
                               "VLLM_PLUGINS (spd serve does)")

        # the job system is built here, beside the server it serves: the state does not know the steps
        settings = Settings.from_env()
        jobs = JobStore(settings.db_path)
        state.spd = SPDServer(engine_client, state, args, settings, admission, jobs)
        state.spd.worker = start_worker(state.spd, jobs)
        state.spd_adapters = asyncio.get_running_loop().create_task(state.spd.follow_adapters())  # kept: not collected


ENGINE_DEAD_EXIT = 1


def _with_shutdown(inner):
    """vLLM's app lifespan, then ours: at shutdown (SIGTERM, SIGINT) the job worker stops and puts
    its running job back in the queue, while the event loop still runs. When the shutdown is
    vLLM's reaction to a dead engine (its watchdog, within 5 s), the process then exits with
    status 1: vLLM itself would exit 0, and a supervisor would not restart it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        spd = None
        async with inner(app) as value:  # vLLM's lifespan deletes app.state when it ends
            try:
                yield value
            finally:
                spd = getattr(app.state, "spd", None)
                if spd is not None:
                    await asyncio.to_thread(spd.close)
        if spd is not None and spd.engine_died:
            log.error("spd_api: the engine died; exiting with status %d (queued jobs resume at the next start)",
                      ENGINE_DEAD_EXIT)
            logging.shutdown()
            os._exit(ENGINE_DEAD_EXIT)

    return lifespan
