"""Modes (the packs of the store), adapters and jobs: the resources behind the capability modes.

The mode routes were `/v1/subspaces...` before issue 23: those paths are still served, for one
release, marked deprecated in the OpenAPI schema and answering with `Deprecation: true` and a
`Link` to the new path; so is a request that uses a field's previous spelling (`schemas`)."""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import shutil
import tarfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, Response
from pydantic import ValidationError

from spd_engine.config import CalibrationConfig, ConfigError
from spd_engine.data import DataError
from spd_engine.subspace import PackError

from . import steps
from .archive import ArchiveError, export_pack, import_pack
from .errors import APIError, documented, not_found
from .jobs import FINAL
from .schemas import NAME_PATTERN, AdapterLoad, Inputs, JobBody, ModeCreate, job_record, old_job_spellings
from .state import AdapterError, SPDServer

router = APIRouter()

PackName = Annotated[str, PathParam(min_length=1, max_length=64, pattern=NAME_PATTERN)]
JobId = Annotated[str, PathParam(min_length=1, max_length=64, pattern=NAME_PATTERN)]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]



def _st(request: Request) -> SPDServer:
    return request.app.state.spd


def _validate(model, data):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


# ---------------------------------------------------------------- modes

MODES, OLD_MODES = "/v1/modes", "/v1/subspaces"  # OLD_MODES: the path before issue 23, served for one release


def _deprecation(successor: str | None = None) -> dict[str, str]:
    """The headers of an answer to a deprecated spelling (RFC 9745 `Deprecation`, RFC 8288 `Link`)."""
    return {"deprecation": "true", **({"link": f'<{successor}>; rel="successor-version"'} if successor else {})}


class _OldPath(APIRoute):
    """A mode route at its old path: it answers as the new one does, with the deprecation headers."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def deprecated(request: Request):
            headers = _deprecation(request.url.path.replace(OLD_MODES, MODES, 1))
            try:
                response = await handler(request)
            except APIError as e:
                e.headers = {**(e.headers or {}), **headers}
                raise
            response.headers.update(headers)
            return response

        return deprecated


def _mode_route(method: str, path: str, **kw):
    """Register a route at MODES + path, and at OLD_MODES + path as its deprecated spelling."""

    def register(endpoint):
        router.add_api_route(MODES + path, endpoint, methods=[method], tags=["modes"], **kw)
        router.add_api_route(OLD_MODES + path, endpoint, methods=[method], tags=["modes"], deprecated=True,
                             description=f"Deprecated: use {method} {MODES + path} (this path goes in the next release).",
                             route_class_override=_OldPath, **kw)
        return endpoint

    return register


def _summary(st, name: str) -> dict:
    try:
        m = st.store.load(name).manifest
    except (PackError, KeyError) as e:
        return {"name": name, "valid": False, "error": str(e), "loaded": False}
    return {"name": name, "valid": True, "loaded": name in st.capabilities(), "task": m.task_kind,
            "method": m.method, "layers": m.layers, "kinds": m.kinds, "granularity": m.granularity, "ranks": m.ranks,
            "rank_rule": m.rank_rule, "created": m.created}


def _known_pack(st, name: str, param: str = "name") -> None:
    try:
        st.store.path(name)
    except ValueError as e:
        raise APIError(422, str(e), param) from None
    if name not in st.store.names():
        raise not_found("mode", name, st.store.names(), param)


@_mode_route("GET", "", summary="Every pack in the store, and whether it is served")
async def list_modes(request: Request):
    st = _st(request)
    return {"object": "list", "data": [_summary(st, n) for n in st.store.names()]}


@_mode_route("GET", "/{name}", responses=documented(400, 404, 409, 422), summary="A pack's manifest and spectrum")
async def get_mode(name: PackName, request: Request):
    from spd_engine.calibrate import participation_ratio

    st = _st(request)
    _known_pack(st, name)
    try:
        pack = st.store.load(name)
    except PackError as e:
        raise APIError(409, f"mode {name!r} is invalid: {e}", "name") from None

    def ratio(s) -> float | None:  # None (JSON null) where there is no spectrum (a random pack's is zeros)
        pr = participation_ratio(s)
        return round(pr, 3) if math.isfinite(pr) else None

    spectrum = {f"{layer}.{kind}.g{g}": {"singular_values": [round(v, 6) for v in s.tolist()],
                                         "participation_ratio": ratio(s)}
                for (layer, kind), groups in pack.spectra.items() for g, s in enumerate(groups)}
    return {"name": name, "loaded": name in st.capabilities(), "manifest": pack.manifest.model_dump(),
            "spectrum": spectrum}


@_mode_route("GET", "/{name}/angles/{other}", responses=documented(400, 404, 409, 422),
             summary="Principal angles (degrees, ascending) between two packs at every site and group they share")
async def mode_angles(name: PackName, other: PackName, request: Request):
    from spd_engine.subspace import principal_angles

    st = _st(request)
    _known_pack(st, name)
    _known_pack(st, other, "other")

    def compute() -> dict[str, list[float]]:  # off the event loop: loading and SVDs take a moment
        packs = []
        for n, param in ((name, "name"), (other, "other")):
            try:
                packs.append(st.store.load(n))
            except PackError as e:
                raise APIError(409, f"mode {n!r} is invalid: {e}", param) from None
        return principal_angles(*packs)

    angles = await asyncio.to_thread(compute)
    return {"a": name, "b": other, "angles": {site: [round(x, 4) for x in v] for site, v in angles.items()},
            "mean_cos2": {site: round(sum(math.cos(math.radians(x)) ** 2 for x in v) / len(v), 6)
                          for site, v in angles.items() if v}}


@_mode_route("DELETE", "/{name}", responses=documented(400, 404, 422), summary="Stop serving a mode and delete its pack")
async def delete_mode(name: PackName, request: Request):
    st = _st(request)
    _known_pack(st, name)
    with st.lock:
        st.store.delete(name)
    await st.abort_admitted(name)
    return {"name": name, "deleted": True}


@_mode_route("GET", "/{name}/export", summary="A pack as a tar archive",
             response_class=Response, responses={200: {"content": {"application/x-tar": {}}}, **documented(400, 404, 422)})
async def export_mode(name: PackName, request: Request):
    st = _st(request)
    _known_pack(st, name)
    return Response(export_pack(st.store, name), media_type="application/x-tar",
                    headers={"content-disposition": f'attachment; filename="{name}.tar"'})


@_mode_route("POST", "/import", responses=documented(400, 409, 413, 422), status_code=201,
             summary="Install a pack from a tar archive (multipart field `file`, optional field `name`)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "additionalProperties": False,
                                                    "properties": {
                     "file": {"type": "string", "format": "binary", "description": "a pack exported as a tar archive"},
                     "name": {"type": "string", "pattern": NAME_PATTERN, "description": "install under this name"}}}},
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
async def import_mode(request: Request):
    st = _st(request)
    data, rename = await _upload(request, "file")

    def install() -> str:  # off the event loop: unpacking and validating take a while
        with st.lock:
            name = import_pack(st.store, data, st.model_info, rename)
            st.add_mode(name)
            return name

    try:
        name = await asyncio.to_thread(install)
    except FileExistsError as e:
        raise APIError(409, str(e), "name") from None
    except (ArchiveError, PackError) as e:
        raise APIError(422, f"field 'file': {e}", "file") from None
    except ValueError as e:
        raise APIError(422, str(e), "name") from None
    return _summary(st, name)


async def _read_capped(request: Request) -> None:
    """Read the body, refusing it (413) past the upload limit before reading more; later
    `request.body()` / `request.form()` calls reuse what was read."""
    limit = _st(request).settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the upload limit of {limit} bytes "
                            "(SPD_MAX_UPLOAD_BYTES)", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the upload limit of {limit} bytes (SPD_MAX_UPLOAD_BYTES)", "body")
        chunks.append(chunk)
    request._body = b"".join(chunks)


async def _upload(request: Request, field: str) -> tuple[bytes, str | None]:
    await _read_capped(request)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        f = form.get(field)
        if f is None or isinstance(f, str):
            raise APIError(422, f"field {field!r}: a file upload is required", field)
        return await f.read(), (form.get("name") or None)
    data = await request.body()
    if not data:
        raise APIError(422, f"field {field!r}: send the archive as multipart field {field!r} or as the raw body",
                       field)
    return data, request.query_params.get("name")


_FORM_LISTS = {"layers": int, "kinds": str}


def _form_schema() -> dict:
    """The multipart form of POST /v1/modes: ModeCreate's fields, lists as comma-separated text."""
    fields = ModeCreate.model_json_schema()["properties"]
    kinds = fields["kinds"]["items"]["enum"]
    props = {"file": {"type": "string", "format": "binary", "description": "calibration JSONL (project schema)"},
             **{k: v for k, v in fields.items() if k not in ("calibration", *_FORM_LISTS)},
             "layers": {"type": "string", "pattern": r"^[0-9]{1,4}(,[0-9]{1,4})*$", "description": "e.g. 15,29"},
             "kinds": {"type": "string", "enum": [",".join(p) for n in range(1, len(kinds) + 1)
                                                  for p in itertools.permutations(kinds, n)]},
             "limit": {"type": "integer", "minimum": 1}}
    for v in props.values():  # a form field is text or absent: no null branch
        if "anyOf" in v:
            v.update(next(b for b in v.pop("anyOf") if b.get("type") != "null"))
        v.pop("default", None)
    return {"type": "object", "required": ["name", "task", "file"], "additionalProperties": False, "properties": props}


@_mode_route("POST", "", responses=documented(400, 404, 409, 413, 422, 429), status_code=202,
             summary="Upload a calibration set: starts a calibrate job whose pack is served when it succeeds",
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": ModeCreate.model_json_schema(ref_template="#/components/schemas/{model}")},
                 "multipart/form-data": {"schema": _form_schema()}}}})
async def create_mode(request: Request, response: Response):
    st = _st(request)
    await _read_capped(request)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        f = form.get("file")
        if f is None or isinstance(f, str):
            raise APIError(422, "field 'file': the calibration JSONL file is required", "file")
        raw = await f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(422, f"field 'file': not UTF-8 text (byte {e.start})", "file") from None
        data: dict = {k: v for k, v in form.items() if k != "file" and isinstance(v, str) and v != ""}
        for k, conv in _FORM_LISTS.items():
            if k in data:
                try:
                    data[k] = [conv(x.strip()) for x in data[k].split(",") if x.strip()]
                except ValueError:
                    raise APIError(422, f"field {k!r}: comma-separated integers expected", k) from None
        data["calibration"] = {"data": text, **({"limit": data.pop("limit")} if "limit" in data else {})}
    else:
        try:
            data = await request.json()
        except ValueError:
            raise APIError(422, "request body is not valid JSON", "body") from None
    params = _validate(ModeCreate, data)
    if ModeCreate.old_spellings(data):
        response.headers.update(_deprecation())
    return submit(st, "calibrate", params)


# ---------------------------------------------------------------- jobs


def _check_calibration(st, name: str, cfg: CalibrationConfig, prefix: str = "", cfg_prefix: str = "") -> None:
    """The settings against each other and the served model: the same check calibration itself
    makes (a 422 naming the field: the schema cannot state these rules)."""
    if name in st.store.names():
        raise APIError(409, f"a mode named {name!r} already exists", f"{prefix}name")
    try:
        cfg.check_model(st.model_info)
    except ConfigError as e:
        raise APIError(422, f"field '{cfg_prefix}{e.field}': {e}", f"{cfg_prefix}{e.field}") from None


def _check_modes(st, names: list[str], param: str) -> None:
    known = st.capabilities()
    for n in names:
        if n not in known:
            raise not_found("capability", n, known, param)


def submit(st, job_type: str, params) -> dict:
    """Check a job's validated parameters (a request model of `schemas`) against the server and
    prepare its inputs, then queue it (202). Nothing is queued on error."""
    if st.jobs.counts().get("queued", 0) >= st.settings.max_queued_jobs:
        raise APIError(429, f"{st.settings.max_queued_jobs} jobs are queued already (SPD_MAX_QUEUED_JOBS); "
                            "retry when some have run", "type", headers={"retry-after": "30"})
    for old in st.jobs.expired(st.settings.job_retention):
        if st.jobs.delete(old):
            shutil.rmtree(st.settings.jobs_dir / old, ignore_errors=True)
    job_id = st.jobs.new_id()
    jd = st.settings.jobs_dir / job_id
    inputs = Inputs()
    task = getattr(params, "task", None)

    def prepare(role: str) -> None:
        setattr(inputs, role, steps.prepare_data(getattr(params, role), task, jd, role, st.settings.allow_client_code))

    try:
        if job_type == "calibrate":
            _check_calibration(st, params.name, params)
            prepare("calibration")
        elif job_type == "generate":
            _check_modes(st, params.capability, "params.capability")
            prepare("prompts")
            steps.check_lengths(st, jd, inputs.prompts, task, params.max_tokens, "prompts")
        elif job_type == "distill":
            src = st.jobs.get(params.corpus_job)
            if src is None:
                raise APIError(404, f"unknown job {params.corpus_job!r}", "params.corpus_job")
            if src["type"] not in ("generate", "pipeline") or src["state"] != "succeeded":
                raise APIError(409, f"job {params.corpus_job!r} is a {src['state']} {src['type']} job, not a "
                               "succeeded generate job", "params.corpus_job")
            if params.adapter_name:
                _check_adapter_name(st, params.adapter_name, "params.adapter_name")
        elif job_type == "evaluate":
            _check_modes(st, params.capability, "params.capability")
            if params.adapter and params.adapter not in st.adapters():
                raise not_found("adapter", params.adapter, st.adapters(), "params.adapter")
            prepare("data")
            steps.check_lengths(st, jd, inputs.data, task, params.max_tokens, "data")
        elif job_type == "pipeline":
            _check_calibration(st, params.name, params.calibration_params, "params.", "params.calibration_params.")
            _check_adapter_name(st, params.adapter_name, "params.adapter_name")  # a pipeline always loads one
            prepare("calibration")
            prepare("prompts")
            steps.check_lengths(st, jd, inputs.prompts, task, params.max_tokens, "prompts")
            if params.eval_data is not None:
                prepare("eval_data")
    except DataError as e:
        shutil.rmtree(jd, ignore_errors=True)
        raise APIError(422, str(e), str(e).split(":")[0]) from None
    except BaseException:
        shutil.rmtree(jd, ignore_errors=True)
        raise
    job = st.jobs.create(job_id, job_type, job_record(params, inputs))  # the parameters, serialised once
    st.worker.notify()
    return job


def _check_adapter_name(st, name: str | None, param: str) -> None:
    """A job that will load an adapter is refused before it runs when it could not load it."""
    try:
        st.check_lora_enabled()
    except AdapterError as e:
        raise APIError(e.status, str(e), param) from None
    if name and (name in st.adapters() or name == st.model_id):
        raise APIError(409, f"an adapter named {name!r} is already loaded", param)


@router.post("/v1/jobs", responses=documented(400, 404, 409, 422, 429), tags=["jobs"], status_code=202, summary="Queue a calibrate, generate, distill, evaluate or pipeline job")
async def create_job(body: JobBody, request: Request, response: Response):
    if old_job_spellings(json.loads(await request.body())):  # the body FastAPI validated, as sent
        response.headers.update(_deprecation())
    return submit(_st(request), body.type, body.params)


def _job(st, job_id: str) -> dict:
    if not isinstance(job_id, str) or len(job_id) > 64:
        raise APIError(404, "unknown job", "id")
    job = st.jobs.get(job_id)
    if job is None:
        raise APIError(404, f"unknown job {job_id!r}", "id")
    return job


@router.get("/v1/jobs", responses=documented(400, 422), tags=["jobs"], summary="Recent jobs, newest first")
async def list_jobs(request: Request, state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    return {"object": "list", "data": _st(request).jobs.list(state, limit)}


@router.get("/v1/jobs/{job_id}", responses=documented(400, 404), tags=["jobs"], summary="A job: state, progress, timings, result, error")
async def get_job(job_id: JobId, request: Request):
    return _job(_st(request), job_id)


@router.delete("/v1/jobs/{job_id}", responses=documented(400, 404, 409), tags=["jobs"],
               summary="Cancel a queued or running job; delete a finished one with its files")
async def cancel_or_delete_job(job_id: JobId, request: Request):
    st = _st(request)
    job = _job(st, job_id)
    if job["state"] not in FINAL and st.worker.cancel(job_id):
        return st.jobs.get(job_id)
    job_dir = (st.settings.jobs_dir / job_id).resolve()
    serving = [n for n, p in st.adapter_paths().items() if Path(p).resolve().is_relative_to(job_dir)]
    if serving:
        raise APIError(409, f"job {job_id!r} holds the loaded adapter {serving[0]!r}: unload it first", "id")
    if st.jobs.delete(job_id):  # finished (maybe just now: then it is deleted, as asked)
        shutil.rmtree(st.settings.jobs_dir / job_id, ignore_errors=True)
        return {"id": job_id, "deleted": True}
    raise APIError(409, f"job {job_id!r} is {st.jobs.get(job_id)['state']}", "id")


@router.get("/v1/jobs/{job_id}/artifact", responses=documented(400, 404, 409), tags=["jobs"], summary="The job's artifact: corpus JSONL, report JSON or adapter tar",
            response_class=Response)
async def job_artifact(job_id: JobId, request: Request):
    st = _st(request)
    job = _job(st, job_id)
    if job["state"] != "succeeded" or not job["artifact"]:
        raise APIError(409, f"job {job_id!r} is {job['state']} and has no artifact", "id")
    path = st.settings.jobs_dir / job_id / job["artifact"]
    if path.is_file():
        media = "application/json" if path.suffix == ".json" else "application/jsonl"
        return FileResponse(path, media_type=media, filename=path.name)
    if path.is_dir():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(path, arcname=path.name)
        return Response(buf.getvalue(), media_type="application/x-tar",
                        headers={"content-disposition": f'attachment; filename="{job_id}-{path.name}.tar"'})
    raise APIError(409, f"job {job_id!r}: its artifact is missing", "id")


# ---------------------------------------------------------------- adapters


@router.get("/v1/adapters", tags=["adapters"], summary="Loaded adapters, and adapter directories available to load")
async def list_adapters(request: Request):
    st = _st(request)
    d = st.settings.adapters_dir
    available = sorted(p.name for p in d.iterdir() if (p / "adapter_config.json").is_file()) if d.is_dir() else []
    paths = st.adapter_paths()
    return {"object": "list", "available": available,
            "data": [{"name": n, "path": paths.get(n),
                      "provenance": steps.read_provenance(Path(paths[n])) if n in paths else None} for n in st.adapters()]}


@router.post("/v1/adapters", responses=documented(400, 404, 409, 422), tags=["adapters"], status_code=201,
             summary="Hot-load a PEFT adapter from the adapters dir (`directory`) or a finished job (`job_id`)")
async def load_adapter(body: AdapterLoad, request: Request):
    st = _st(request)
    _check_adapter_name(st, body.name, "name")
    if body.directory is not None:
        path = st.adapter_dir(body.directory)
        if not path.is_dir():
            raise APIError(404, f"no adapter directory {body.directory!r} in the adapters dir", "directory")
        param = "directory"
    else:
        job = _job(st, body.job_id)
        if job["type"] not in ("distill", "pipeline") or job["state"] != "succeeded":
            raise APIError(409, f"job {body.job_id!r} is a {job['state']} {job['type']} job, not a succeeded distill job",
                           "job_id")
        path = st.settings.jobs_dir / job["id"] / "adapter"
        param = "job_id"
    if not (path / "adapter_config.json").is_file():
        raise APIError(422, f"field {param!r}: {path.name} is not a PEFT adapter (no adapter_config.json)", param)
    await st.load_adapter(body.name, path)  # AdapterError: 409 without --enable-lora, 422 if vLLM refuses it
    return {"name": body.name, "loaded": True}


@router.delete("/v1/adapters/{name}", responses=documented(400, 404, 422), tags=["adapters"], summary="Unload an adapter (requests already running keep it)")
async def unload_adapter(name: PackName, request: Request):
    st = _st(request)
    if name not in st.adapters():
        raise not_found("adapter", name, st.adapters(), "name")
    await st.unload_adapter(name)
    return {"name": name, "loaded": False}
