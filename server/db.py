"""Storage: SQLAlchemy models, engine set-up (SQLite in WAL mode, or PostgreSQL) and migrations (Alembic)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

from tinymlaas.build.request import OPTIONS, BuildRequest
from tinymlaas.private import create_private

MIGRATIONS = Path(__file__).parent / "migrations"
MAX_ID = 2**63 - 1  # the largest BIGINT: an id past it cannot exist (and would overflow a query)


def device_key(org_id: int, name: str) -> str:
    return f"{org_id}.{name}"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class RequestColumn(TypeDecorator):
    """A BuildRequest, stored as the JSON of its options by name: what the API accepted is what the worker reads."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return (value or BuildRequest()).to_dict()

    def process_result_value(self, value, dialect):
        # an option a later version no longer has is dropped, so old builds still read (and show what remains)
        return BuildRequest.from_dict({k: v for k, v in (value or {}).items() if k in OPTIONS})


class Organization(Base):
    """A tenant: every device, model, build and deployment belongs to one; no request sees another's."""

    __tablename__ = "organizations"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


# what a token may do: read anything of its organisation; models and builds; devices and rollouts; users and tokens
SCOPES = ("read", "build", "deploy", "admin")
ROLES = {"admin": SCOPES, "developer": ("read", "build", "deploy"), "viewer": ("read",)}  # role -> its scopes


class User(Base):
    """A person or a program of one organisation; its name is unique there (another tenant's names are not told)."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_users_org_name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    role: Mapped[str] = mapped_column(String(16), default="developer")  # admin, developer, viewer
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class ApiToken(Base):
    """A bearer token of a user: its SHA-256 only, the scopes it may use (within the user's role), until when."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list] = mapped_column(JSON)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # the token that created this one (it ends with it); None for a user's first token
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id", name="fk_api_tokens_parent_id"),
                                                  index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


# a device's key: its organisation's id and its name, which is unique within the organisation only ('.' is in no
# name, so keys of different tenants never meet); devices registered before names were per organisation keep their
# name as key (their credentials go on working)
DEVICE_KEY_LENGTH = 96


class Device(Base):
    """A board of an organisation. `id`, its key, is also its MQTT user name and client id (the broker's namespace
    is the whole service's); the API calls it by `name`."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_devices_org_name"),)
    id: Mapped[str] = mapped_column(String(DEVICE_KEY_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(32))
    group: Mapped[str] = mapped_column(String(64), default="default", index=True)
    flash_bytes: Mapped[int] = mapped_column(Integer)
    ram_bytes: Mapped[int] = mapped_column(Integer)
    firmware_version: Mapped[str | None] = mapped_column(String(32))
    build_id: Mapped[int | None] = mapped_column(ForeignKey("builds.id"))
    # the build whose firmware image its active slot holds: build_id's, except after a model-only update (then the
    # build_id's model runs on this build's code part); None: build_id's
    image_build_id: Mapped[int | None] = mapped_column(ForeignKey("builds.id"))
    secret_hash: Mapped[str] = mapped_column(String(200))  # Mosquitto's PBKDF2-SHA512 format
    state: Mapped[str] = mapped_column(String(16), default="registered")  # registered, online, lost
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime)
    instructions: Mapped[int | None] = mapped_column(Integer)  # last measured instructions per inference
    slot: Mapped[int | None] = mapped_column(Integer)  # the A/B slot it booted (0: A, 1: B), as it reports it
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Integer)
    quantized: Mapped[bool] = mapped_column(Boolean)
    operators: Mapped[list] = mapped_column(JSON)
    format: Mapped[str] = mapped_column(String(16), default="tflite", server_default="tflite")  # tflite | onnx
    # held-out samples (an .npz of x and y in the artifact store): every microcontroller build's accuracy on them
    validation_sha256: Mapped[str | None] = mapped_column(String(64))
    validation_samples: Mapped[int | None] = mapped_column(Integer)
    # what converting it did (a Keras model: TensorFlow's version, the quantization, calibrated on what)
    notes: Mapped[list | None] = mapped_column(JSON, default=list)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Build(Base):
    __tablename__ = "builds"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    target: Mapped[str] = mapped_column(String(32))
    request: Mapped[BuildRequest] = mapped_column(RequestColumn, default=lambda: BuildRequest())
    version: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict | None] = mapped_column(JSON)
    artifacts: Mapped[dict] = mapped_column(JSON, default=dict)  # name -> sha256 in the artifact store
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the worker running it and until when its claim holds (renewed while it runs; a lapsed claim is requeued)
    lease_owner: Mapped[str | None] = mapped_column(String(96))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now, onupdate=now)


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(primary_key=True)  # also the sequence number: increasing, never reused
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"))
    group: Mapped[str] = mapped_column(String(64))
    stages: Mapped[list] = mapped_column(JSON)
    success_threshold: Mapped[float] = mapped_column(Float)
    error_threshold: Mapped[float] = mapped_column(Float)
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    rollback_of: Mapped[int | None] = mapped_column(ForeignKey("deployments.id"))
    state: Mapped[str] = mapped_column(String(16), default="in_progress")  # in_progress, succeeded, halted, cancelled
    # "<org>/<group>/<target>" while in progress, NULL after: the database itself allows one active rollout per devices
    active_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    current_stage: Mapped[int] = mapped_column(Integer, default=-1)
    job_timeout: Mapped[int] = mapped_column(Integer, default=1800)  # s a notified device may stay silent
    reason: Mapped[str | None] = mapped_column(Text)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now, onupdate=now)


class DeviceJob(Base):
    """One device's part of a deployment; its id is the MQTT job id (idempotent)."""

    __tablename__ = "device_jobs"
    id: Mapped[str] = mapped_column(String(96), primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    device_id: Mapped[str] = mapped_column(String(DEVICE_KEY_LENGTH), ForeignKey("devices.id"), index=True)
    device: Mapped[Device] = relationship(lazy="raise")  # jobs_of loads it with the jobs (one query, not one each)
    position: Mapped[int] = mapped_column(Integer)
    stage: Mapped[int] = mapped_column(Integer)
    # pending (not notified yet), notified, in_progress, succeeded, failed, rejected, cancelled
    status: Mapped[str] = mapped_column(String(16), default="pending")
    step: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    instructions: Mapped[int | None] = mapped_column(Integer)
    # what goes over the air: full, compressed or delta (the server's choice; the device's report once it ends,
    # e.g. a full image after a patch it could not apply) and its bytes
    payload: Mapped[str | None] = mapped_column(String(48))
    payload_bytes: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now, onupdate=now)


class DeploymentEvent(Base):
    """A rollout's history: created, each stage started, each device's outcome, how it ended."""

    __tablename__ = "deployment_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    # created, stage_started, device_<status> (succeeded, failed, rejected, timed_out), succeeded, halted, cancelled
    kind: Mapped[str] = mapped_column(String(24))
    stage: Mapped[int | None] = mapped_column(Integer)
    device_id: Mapped[str | None] = mapped_column(String(DEVICE_KEY_LENGTH), ForeignKey("devices.id"))
    detail: Mapped[str | None] = mapped_column(Text)


class Telemetry(Base):
    __tablename__ = "telemetry"
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(DEVICE_KEY_LENGTH), ForeignKey("devices.id"), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    data: Mapped[dict] = mapped_column(JSON)


# The measurement database's table lives in the service's database too (devices' cycles, the service's builds).
from tinymlaas.measure.database import Measurement

Measurement.__table__.to_metadata(Base.metadata)


def _private_sqlite(url: str) -> None:
    """A SQLite database file exists owner-only before anything writes it (it holds token and secret hashes)."""
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:":
        create_private(Path(database))


def make_engine(url: str):
    kwargs = {}
    _private_sqlite(url)
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    return engine


def make_sessionmaker(engine):
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the database to the newest schema (creates it when empty)."""
    from alembic import command

    _private_sqlite(url)
    command.upgrade(alembic_config(url), "head")
