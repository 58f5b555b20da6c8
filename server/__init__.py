"""The tinymlaas server: a Flask app (REST API, OpenAPI, the dashboard under /ui) over the core, plus the MQTT
coordinator.

`create_app(settings)` builds the app; `server.runtime.Server` adds the broker, the coordinator
and build workers around it (`tinymlaas serve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from werkzeug.routing import IntegerConverter

from tinymlaas.ota.store import ArtifactStore

from .config import Settings
from .db import MAX_ID, make_engine, make_sessionmaker, upgrade


class BoundedInt(IntegerConverter):
    """`<int:...>` in routes, at most MAX_ID: larger ids do not match (404) instead of overflowing the database."""

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", MAX_ID)
        super().__init__(url_map, *args, **kwargs)


@dataclass
class ServerContext:
    settings: Settings
    sessions: object
    store: ArtifactStore
    coordinator: object | None = None  # set when MQTT runs; deployments wait for it otherwise
    health: object | None = None  # set by `serve`: () -> ({part: problem or None}, {part: restarts})

    def deployment_started(self, deployment_id: int) -> None:
        """Notify the first stage's devices now (without MQTT running, the coordinator does when it starts)."""
        if self.coordinator is not None:
            self.coordinator.kick(deployment_id)

    def enqueue_build(self, build_id: int) -> None:
        from .jobs import enqueue_build

        enqueue_build(self.settings.queue_url, build_id)

    def close(self) -> None:
        """Give back the database connections and the queue's (a process may make another app after this one)."""
        from .jobs import release_queue

        self.sessions.kw["bind"].dispose()
        release_queue(self.settings.queue_url)


def data_folder_problem(folder: Path) -> str | None:
    """Why the data folder cannot take writes (the database, artifacts and keys live there), or None."""
    import errno
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return {errno.EROFS: "it is on a read-only file system", errno.ENOSPC: "its file system is full",
                errno.EACCES: "this user may not write there"}.get(e.errno, e.strerror or str(e))
    return None


def check_data_folder(folder: Path) -> None:
    """One line naming the folder when it cannot take writes (a read-only folder was "internal error ... unable
    to open database file")."""
    from tinymlaas.errors import TinyMLaaSError

    why = data_folder_problem(folder)
    if why is not None:
        raise TinyMLaaSError(f"the data folder {folder} cannot be written: {why}")


def create_app(settings: Settings | None = None, migrate: bool = True) -> Flask:
    from .api import register_api
    from .ui import register_ui

    settings = settings or Settings.from_env()
    check_data_folder(settings.data_dir)
    if migrate:
        upgrade(settings.database_url)
    app = Flask("tinymlaas")
    app.url_map.converters["int"] = BoundedInt  # before any route: ids past the database's integers are 404
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        API_TITLE="tinymlaas",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
    )
    engine = make_engine(settings.database_url)
    app.extensions["tinymlaas"] = ServerContext(settings, make_sessionmaker(engine), ArtifactStore(settings.artifacts_dir))
    register_api(app)
    register_ui(app)
    return app
