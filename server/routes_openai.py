"""OpenAI-compatible completions, chat completions and models, with a capability mode per request."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from spd_engine.backend import Completion, Delta, GenerationRequest

from .errors import APIError, not_found
from .schemas import ChatRequest, CompletionRequest

router = APIRouter(tags=["openai"])

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _state(request: Request):
    return request.app.state


def resolve_model(st, model: str) -> str | None:
    """None for the base model, else the adapter's name; 404 for anything else."""
    if model == st.engine.model_id:
        return None
    if model in st.engine.backend.adapters():
        return model
    raise not_found("model", model, [st.engine.model_id, *st.engine.backend.adapters()], "model")


def resolve_capability(st, names: list[str]) -> tuple[str, ...]:
    known = st.engine.backend.capabilities()
    for n in names:
        if n not in known:
            raise not_found("capability", n, known, "capability")
    return tuple(sorted(set(names)))


def _check_limits(st, n_prompt: int, max_tokens: int, param: str) -> None:
    s = st.settings
    if n_prompt > s.max_prompt_tokens:
        raise APIError(400, f"{param} has {n_prompt} tokens; the limit is {s.max_prompt_tokens}", param,
                       "context_length_exceeded")
    if max_tokens > s.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} exceeds the limit of {s.max_tokens_limit}", "max_tokens",
                       "max_tokens_exceeded")


def _gen_request(body, ids: list[int], capability, adapter, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt_ids=ids, capability=capability, strength=body.capability_strength if capability else 1.0,
                             adapter=adapter, max_tokens=max_tokens, temperature=body.temperature,
                             top_p=body.top_p, seed=body.seed, stop=body.stops(), ignore_eos=body.ignore_eos)


def _mode_label(req: GenerationRequest) -> str:
    """The request's modes as a metrics label."""
    return "+".join(req.capability) or "none"


def _gone(st, endpoint: str, req: GenerationRequest, e: KeyError) -> APIError:
    """A mode or adapter removed while the request waited."""
    st.metrics.requests.labels(endpoint, _mode_label(req), "404").inc()
    return APIError(404, str(e.args[0]) if e.args else str(e), "capability" if "capability" in str(e) else "model",
                    "not_found")


def _count(st, endpoint: str, reqs: list[GenerationRequest], out: list[Completion], started: float) -> None:
    cap = _mode_label(reqs[0])
    st.metrics.requests.labels(endpoint, cap, "200").inc()
    st.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    st.metrics.tokens.labels(cap, "prompt").inc(sum(len(r.prompt_ids) for r in reqs))
    st.metrics.tokens.labels(cap, "completion").inc(sum(len(c.token_ids) for c in out))


async def _run(st, endpoint: str, reqs: list[GenerationRequest]) -> list[Completion]:
    started = time.perf_counter()
    try:
        out = await st.batcher.submit(reqs)
    except KeyError as e:
        raise _gone(st, endpoint, reqs[0], e) from None
    _count(st, endpoint, reqs, out, started)
    return out


def _streams(st, reqs: list[GenerationRequest]) -> bool:
    """Stream token by token: one prompt, on a backend that produces text incrementally (vLLM). Otherwise
    the completion goes through the batcher and is sent in pieces once it is done."""
    return len(reqs) == 1 and st.engine.backend.streams_incrementally


async def _backend_deltas(st, req: GenerationRequest) -> AsyncIterator[Delta]:
    """`Backend.stream` driven from a thread of its own, its pieces handed to the event loop as they come;
    when the consumer stops early (client gone), the backend's iterator is closed, which cancels the request."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def hand(item) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the loop is closed (shutdown)
            stop.set()

    def pump() -> None:
        it = st.engine.backend.stream(req)
        try:
            for d in it:
                hand(d)
                if stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            hand(e)
        finally:
            it.close()

    threading.Thread(target=pump, name="spd-stream", daemon=True).start()
    try:
        while True:
            d = await pieces.get()
            if isinstance(d, BaseException):
                raise d
            yield d
            if d.completion is not None:
                return
    finally:
        stop.set()


async def _open_stream(st, endpoint: str, req: GenerationRequest) -> tuple[Delta, AsyncIterator[Delta]]:
    """Start a streamed request and wait for its first piece, so a refused request still gets its 4xx."""
    deltas = _backend_deltas(st, req)
    try:
        return await deltas.__anext__(), deltas
    except KeyError as e:
        raise _gone(st, endpoint, req, e) from None


async def _pieces(st, endpoint: str, req: GenerationRequest, first: Delta, rest: AsyncIterator[Delta],
                  started: float) -> AsyncIterator[tuple[int, Delta]]:
    """The pieces of a streamed request (choice 0), counted in the metrics once it completes."""
    d = first
    try:
        while True:
            yield 0, d
            if d.completion is not None:
                _count(st, endpoint, [req], [d.completion], started)
                return
            d = await rest.__anext__()
    finally:
        await rest.aclose()  # a client that went away cancels its request in the engine


async def _replay(tok, outs: list[Completion]) -> AsyncIterator[tuple[int, Delta]]:
    """Finished completions cut into the pieces a stream would have sent."""
    for i, o in enumerate(outs):
        for text in _deltas(tok, o):
            yield i, Delta(text)
        yield i, Delta("", o)


async def _start(st, endpoint: str, reqs: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
    """Start the requests of a streamed response and return their (choice index, piece) stream. Awaits the
    first piece (incremental) or the whole batch before returning, so a refused request still gets its 4xx."""
    if _streams(st, reqs):
        started = time.perf_counter()
        first, rest = await _open_stream(st, endpoint, reqs[0])
        return _pieces(st, endpoint, reqs[0], first, rest, started)
    return _replay(st.engine.backend.tokenizer, await _run(st, endpoint, reqs))


Choice = Callable[..., dict | None]


async def _events(pieces: AsyncIterator[tuple[int, Delta]], base: dict, reqs: list[GenerationRequest],
                  include_usage: bool, opening: Choice, text: Choice, finish: Choice) -> AsyncIterator[str]:
    """Server-sent events of a streamed response; the endpoint says how a choice's opening, text and
    finish chunks look."""
    opened, outs = set(), []
    try:
        async for i, d in pieces:
            if i not in opened:
                opened.add(i)
                if (c := opening(i)) is not None:
                    yield _sse({**base, "choices": [c]})
            if d.text:
                yield _sse({**base, "choices": [text(i, d.text)]})
            if d.completion is not None:
                outs.append(d.completion)
                yield _sse({**base, "choices": [finish(i, d.completion.finish_reason)]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(reqs, outs)})
        yield "data: [DONE]\n\n"
    finally:
        await pieces.aclose()


def _spd(st, capability, strength, adapter) -> dict:
    return {"capability": list(capability), "capability_strength": strength if capability else 0.0,
            "adapter": adapter, "backend": st.engine.backend.name}


def _usage(reqs, outs) -> dict:
    p, c = sum(len(r.prompt_ids) for r in reqs), sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _deltas(tok, c: Completion) -> list[str]:
    """The completion's text cut at token boundaries (streaming granularity)."""
    out, prev = [], ""
    for i in range(1, len(c.token_ids) + 1):
        cur = tok.decode(c.token_ids[:i], skip_special_tokens=True)[: len(c.text)]
        if cur.startswith(prev) and len(cur) > len(prev):
            out.append(cur[len(prev):])
            prev = cur
    if prev != c.text:
        out.append(c.text[len(prev):] if c.text.startswith(prev) else c.text)
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@router.post("/v1/completions", summary="OpenAI-compatible text completion (raw prompt, no chat template)")
async def completions(body: CompletionRequest, request: Request):
    st = _state(request)
    adapter = resolve_model(st, body.model)
    capability = resolve_capability(st, body.capability_names())
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    tok = st.engine.backend.tokenizer
    reqs = []
    for p in prompts:
        ids = tok(p).input_ids
        if not ids:
            raise APIError(422, "field 'prompt': must not be empty", "prompt", "invalid_field")
        _check_limits(st, len(ids), max_tokens, "prompt")
        reqs.append(_gen_request(body, ids, capability, adapter, max_tokens))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    spd = _spd(st, capability, body.capability_strength, adapter)
    if body.stream:
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model, "spd": spd}
        events = _events(
            await _start(st, "completions", reqs), base, reqs, body.include_usage(),
            opening=lambda i: {"index": i, "text": prompts[i], "logprobs": None, "finish_reason": None} if body.echo else None,
            text=lambda i, t: {"index": i, "text": t, "logprobs": None, "finish_reason": None},
            finish=lambda i, r: {"index": i, "text": "", "logprobs": None, "finish_reason": r})
        return StreamingResponse(events, media_type="text/event-stream")
    outs = await _run(st, "completions", reqs)
    choices = [{"index": i, "text": (prompts[i] if body.echo else "") + o.text, "logprobs": None,
                "finish_reason": o.finish_reason} for i, o in enumerate(outs)]
    return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
            "usage": _usage(reqs, outs), "spd": spd}


def chat_prompt_ids(tok, messages) -> list[int]:
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids
    return tok("\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:").input_ids


@router.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (the model's chat template)")
async def chat_completions(body: ChatRequest, request: Request):
    st = _state(request)
    adapter = resolve_model(st, body.model)
    capability = resolve_capability(st, body.capability_names())
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    tok = st.engine.backend.tokenizer
    ids = chat_prompt_ids(tok, body.messages)
    _check_limits(st, len(ids), max_tokens, "messages")
    reqs = [_gen_request(body, ids, capability, adapter, max_tokens)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    spd = _spd(st, capability, body.capability_strength, adapter)
    if body.stream:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model, "spd": spd}
        events = _events(
            await _start(st, "chat", reqs), base, reqs, body.include_usage(),
            opening=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            text=lambda i, t: {"index": i, "delta": {"content": t}, "finish_reason": None},
            finish=lambda i, r: {"index": i, "delta": {}, "finish_reason": r})
        return StreamingResponse(events, media_type="text/event-stream")
    (out,) = await _run(st, "chat", reqs)
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": _usage(reqs, [out]), "spd": spd}


@router.get("/v1/models", summary="The base model and every loaded adapter")
async def models(request: Request):
    st = _state(request)
    created = int(st.started)
    data = [{"id": st.engine.model_id, "object": "model", "created": created, "owned_by": "spd", "root": None,
             "parent": None, "capabilities": st.engine.backend.capabilities()}]
    for a in st.engine.backend.adapters():
        data.append({"id": a, "object": "model", "created": created, "owned_by": "spd", "root": st.engine.model_id,
                     "parent": st.engine.model_id})
    return {"object": "list", "data": data}
