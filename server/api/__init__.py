"""The REST API: one blueprint per resource, errors as JSON problem bodies (RFC 9457)."""

from __future__ import annotations

import errno

from flask import current_app, g, jsonify, request
from flask_smorest import Api
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from ..services.common import Principal, ServiceError, owned
from ..services.tenants import principal_for_token
from .schemas import Problem


class ProblemApi(Api):
    """flask-smorest with every error as application/problem+json naming the field at fault, and documented so."""

    ERROR_SCHEMA = Problem

    def _register_responses(self):
        self.DEFAULT_RESPONSE_CONTENT_TYPE = "application/problem+json"  # only the error responses registered here
        try:
            super()._register_responses()
        finally:
            del self.DEFAULT_RESPONSE_CONTENT_TYPE

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        errors = data.get("messages") or data.get("errors")
        field = data.get("field")
        detail = data.get("message") or error.description
        if errors and not field:
            # webargs: {"json": {"target": ["Missing data for required field."]}}
            for where in errors.values():
                if isinstance(where, dict) and where:
                    field, msgs = next(iter(where.items()))
                    detail = f"{field}: {msgs[0] if isinstance(msgs, list) else msgs}"
                    break
        if error.code == 413:
            limit = current_app.config["MAX_CONTENT_LENGTH"]
            detail, field = f"the upload is larger than the server's limit of {limit:,} bytes", "file"
        resp = problem(error.code or 500, detail, field, errors)
        for name, value in error.get_headers():  # Allow on a 405, Retry-After, ...
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp


def problem(status: int, detail: str, field: str | None = None, errors=None):
    from http import HTTPStatus

    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    resp = jsonify(body)
    resp.status_code = status
    resp.mimetype = "application/problem+json"
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="tinymlaas"'
    if status == 429:
        resp.headers["Retry-After"] = "30"
    return resp


def storage_problem(code: int | None):
    """507 for a full file system, 503 for a read-only one, naming the server's data folder; None for other
    errors. Nothing was stored: the artifact store writes through temporary files, the database rolls back."""
    folder = current_app.extensions["tinymlaas"].settings.data_dir
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return problem(507, f"the server's storage ({folder}) is full: no space left on device; nothing was stored")
    if code in (errno.EROFS,):
        return problem(503, f"the server's storage ({folder}) is read-only; nothing was stored")
    return None


MIN_FREE_BYTES = 64 << 20  # below this a build's artifacts or a model upload may no longer fit


def storage_health(folder) -> str | None:
    """What is wrong with the data folder's storage, for /health: not writable, or almost full."""
    import shutil

    from .. import data_folder_problem

    why = data_folder_problem(folder)
    if why is not None:
        return f"the data folder {folder} cannot be written: {why}"
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        return f"the data folder {folder} has {free / 2**20:.1f} MiB free"
    return None


def ctx():
    return current_app.extensions["tinymlaas"]


def session():
    if "db" not in g:
        g.db = ctx().sessions()
    return g.db


def get_or_404(model, key, what: str, who: Principal):
    """A row of the caller's organisation; another tenant's is as absent as one that never was."""
    row = owned(session(), who, model, key)
    if row is None:
        raise ServiceError(404, f"no {what} {key!r}" if isinstance(key, str) else f"no {what} {key}")
    return row


def require(scope: str = "read") -> Principal:
    """The caller, from its bearer token, allowed `scope` (401 without a usable token, 403 without the scope)."""
    auth = request.authorization  # the scheme is case-insensitive (RFC 9110): "bearer" and "BEARER" are Bearer
    token = (auth.token or "").strip() if auth is not None and auth.type == "bearer" else ""
    who = principal_for_token(session(), token)
    who.need(scope)
    return who


def register_api(app) -> None:
    from . import artifacts, builds, deployments, devices, models, tenants

    api = ProblemApi(app, spec_kwargs={"components": {"securitySchemes": {
        "token": {"type": "http", "scheme": "bearer"}, "device": {"type": "http", "scheme": "basic"}}},
        "security": [{"token": []}]})
    for module in (devices, models, builds, deployments, artifacts, tenants):
        api.register_blueprint(module.blp, url_prefix="/api/v1")

    @app.errorhandler(ServiceError)
    def _service_error(e: ServiceError):
        return problem(e.status, str(e), e.field)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return api.handle_http_exception(e)

    @app.errorhandler(RecursionError)
    def _too_deep(_e):  # the JSON parser's answer to thousands of nested brackets
        return problem(400, "the JSON body is nested too deeply")

    @app.errorhandler(OSError)
    def _storage(e: OSError):
        answer = storage_problem(e.errno)
        if answer is None:
            raise e
        return answer

    @app.errorhandler(OperationalError)
    def _database_storage(e: OperationalError):  # SQLite's file system full or read-only
        if "db" in g:
            g.db.rollback()
        text = str(e.orig).lower()
        unwritable = "readonly" in text or ("unable to open" in text and storage_health(ctx().settings.data_dir))
        answer = storage_problem(errno.ENOSPC if "full" in text else errno.EROFS if unwritable else None)
        if answer is None:
            raise e
        return answer

    @app.errorhandler(IntegrityError)
    def _conflict(_e):  # two requests racing to create the same key: the first one won
        if "db" in g:
            g.db.rollback()
        return problem(409, "a concurrent request created or changed the same resource first; fetch it or retry")

    @app.teardown_appcontext
    def _close_session(_exc):
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.get("/api/v1/health")
    def health():
        """ok, or 503 naming every part that is not (broker, the coordinator's MQTT session, build workers), and
        how often `serve` restarted the broker and workers."""
        parts, restarts = ctx().health() if ctx().health is not None else ({}, {})
        parts = {**parts, "storage": storage_health(ctx().settings.data_dir)}
        problems = {k: v for k, v in parts.items() if v}
        body = {"status": "degraded" if problems else "ok", "checks": {k: v or "ok" for k, v in parts.items()},
                "restarts": restarts}
        return body, (503 if problems else 200)
