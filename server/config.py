"""Server settings: one data folder, everything else derived from it unless set (env TINYMLAAS_*)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("TINYMLAAS_DATA", "instance")))
    database_url: str = ""  # default: SQLite (WAL) in the data folder; postgresql+psycopg://... for PostgreSQL
    queue_url: str = ""  # default: Huey on SQLite in the data folder; redis://... for Redis
    mqtt: str = "embedded"  # "embedded" (amqtt in the server process), "mosquitto" (managed), or "external"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_tls: bool = False  # MQTT over TLS (managed Mosquitto), certificates from a development CA in DATA/tls
    mqtt_client_certs: bool = False  # with TLS: every client also needs a certificate from that CA
    public_url: str = "http://127.0.0.1:8080"  # where devices download images from
    max_upload_bytes: int = 64 * 1024 * 1024
    build_inputs: int = 10  # random inputs each build is verified with (and replayed by the self-test)
    max_open_builds: int = 16  # per user: builds queued or running at once; more is 429 until some finish
    build_lease_seconds: float = 60.0  # a worker renews its claim on a build this often x3; a lapsed claim is requeued

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).resolve()
        env = os.environ.get
        self.database_url = self.database_url or env("TINYMLAAS_DATABASE_URL") or f"sqlite:///{self.data_dir / 'tinymlaas.db'}"
        self.queue_url = self.queue_url or env("TINYMLAAS_QUEUE_URL") or f"sqlite:///{self.data_dir / 'queue.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def builds_dir(self) -> Path:
        return self.data_dir / "builds"

    @property
    def signing_key(self) -> Path:
        return self.data_dir / "keys" / "signing.pem"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def mosquitto_dir(self) -> Path:
        return self.data_dir / "mosquitto"

    def to_env(self) -> dict[str, str]:
        """What a worker process needs to see the same database, queue and files."""
        return {
            "TINYMLAAS_DATA": str(self.data_dir),
            "TINYMLAAS_DATABASE_URL": self.database_url,
            "TINYMLAAS_QUEUE_URL": self.queue_url,
            "TINYMLAAS_PUBLIC_URL": self.public_url,
            "TINYMLAAS_BUILD_INPUTS": str(self.build_inputs),
            "TINYMLAAS_BUILD_LEASE": str(self.build_lease_seconds),
        }

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(public_url=env("TINYMLAAS_PUBLIC_URL", cls.public_url),
                   build_inputs=int(env("TINYMLAAS_BUILD_INPUTS", cls.build_inputs)),
                   max_open_builds=int(env("TINYMLAAS_MAX_OPEN_BUILDS", cls.max_open_builds)),
                   build_lease_seconds=float(env("TINYMLAAS_BUILD_LEASE", cls.build_lease_seconds)))
