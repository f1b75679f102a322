"""Errors of the resource routes in the shape vLLM's server uses for its own:
{"error": {"message", "type", "param", "code": <HTTP status>}}. Validation errors of request
bodies are vLLM's handler's (400, naming the field)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from .state import AdapterError

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
          409: "ConflictError",
          413: "RequestTooLargeError", 422: "UnprocessableEntityError", 429: "TooManyRequestsError"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorInfo


class UnparsableBody(BaseModel):
    """What FastAPI answers (through vLLM's handler) to a body it cannot parse at all."""

    detail: str


_WHY = {400: "malformed request (the field is named)", 404: "no such resource", 409: "conflicts with the current state",
        413: "upload too large", 422: "well-formed but unusable input (the field is named)",
        429: "too many queued jobs (see Retry-After)"}


def documented(*codes: int) -> dict:
    """The error responses a route can give, for its OpenAPI entry."""
    return {c: {"model": ErrorBody | UnparsableBody if c == 400 else ErrorBody, "description": _WHY[c]} for c in codes}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "InternalServerError"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def not_found(what: str, name: str, known: list[str], param: str) -> APIError:
    return APIError(404, f"unknown {what} {name!r}; known: {', '.join(known) or '(none)'}", param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(AdapterError)
    async def _adapter(request: Request, e: AdapterError):
        return response(e.status, str(e), "name")
