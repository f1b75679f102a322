"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Every handler answers 4xx for bad input; a 5xx means a bug or an engine failure, never a
malformed request.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("spd.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code}}


def response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, param, code), status_code=status)


def not_found(what: str, name: str, known: list[str], param: str) -> APIError:
    return APIError(404, f"unknown {what} {name!r}; known: {', '.join(known) or '(none)'}", param, f"{what.replace(' ', '_')}_not_found")


_TAGS = {"calibrate", "generate", "distill", "evaluate", "pipeline"}  # POST /v1/jobs union tags


def _loc(loc, err: dict | None = None) -> str:
    loc = list(loc)
    if len(loc) > 1 and loc[0] == "body" and loc[1] in _TAGS:
        loc = loc[:1] + loc[2:]
    if err and err.get("type", "").startswith("union_tag") and err.get("ctx", {}).get("discriminator"):
        loc = loc + [str(err["ctx"]["discriminator"]).strip("'\"")]
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # tagged unions and str|list alternatives add type names to the location; drop them
    return ".".join(p for p in parts if not p.startswith(("function-", "list[", "str", "int", "float", "tagged"))) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        field = _loc(first.get("loc", ()), first)
        if first.get("type") == "json_invalid":
            return response(422, f"request body is not valid JSON: {first.get('msg')}", "body", "invalid_json")
        msg = f"field {field!r}: {first.get('msg')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more: {', '.join(repr(_loc(x.get('loc', ()), x)) for x in errs[1:4])})"
        return response(422, msg, field, "invalid_field")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return response(e.status_code, str(e.detail), None, None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return response(500, f"internal error: {type(e).__name__}", None, "internal_error")
