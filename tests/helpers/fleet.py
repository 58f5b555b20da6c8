"""A live server (real HTTP, MQTT broker, Huey worker process) and emulated devices, for the fleet tests."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from server.agent import Agent
from server.broker import SERVER_USER, EmbeddedBroker, MosquittoBroker, check_secret, free_port, hash_secret
from server.client import Client
from server.config import Settings
from server.runtime import Server

logging.getLogger("amqtt").setLevel(logging.CRITICAL)


SECRETS = {SERVER_USER: "server-secret", "dev-a": "secret-a", "dev-b": "secret-b"}  # the broker tests' logins


class Authority:
    """What the broker asks the service: who may log in (the broker tests' fixed logins)."""

    def authenticate(self, username: str, password: str) -> bool:
        return username in SECRETS and check_secret(password, self.credentials()[username])

    def credentials(self) -> dict[str, str]:
        return {u: hash_secret(p, b"0123456789ab") for u, p in SECRETS.items()}


def make_broker(kind: str, workdir: Path, port: int):
    """An embedded or Mosquitto broker (not started) for the broker tests' logins; skips without Mosquitto."""
    import pytest

    if kind == "mosquitto":
        if MosquittoBroker.binary() is None:
            pytest.skip("mosquitto is not installed (make setup installs it)")
        return MosquittoBroker(workdir / "mosquitto", Authority().credentials, port=port)
    return EmbeddedBroker(Authority(), port=port)


def start_server(data: Path, mqtt: str = "embedded", workers: int = 1, public_url: str | None = None,
                 database_url: str = "", supervise_every: float | None = 1.0, **settings) -> Server:
    settings = Settings(data_dir=data, mqtt=mqtt, mqtt_port=free_port(), build_inputs=3, database_url=database_url,
                        build_lease_seconds=4.0, **settings)  # a killed worker's builds are requeued within seconds
    if public_url:
        settings.public_url = public_url
    return Server(settings, port=0, workers=workers, supervise_every=supervise_every).start()


def build(client: Client, model: Path, target: str = "cortex-m4", version: str | None = None) -> dict:
    m = client.upload_model(model)
    b = client.request_build(m["id"], target, version)
    b = client.wait_build(b["id"], timeout=300)
    assert b["state"] == "done", b
    return b


def start_agents(server: Server, root: Path, ids, target: str = "cortex-m4", group: str = "default",
                 faults: dict | None = None, connect_timeout: float = 120, board: str = "qemu") -> list[Agent]:
    agents = [Agent(server.url, i, target, root / i, server.admin_token, group, (faults or {}).get(i, ()), board=board)
              for i in ids]
    for a in agents:
        a.start()
    wait_for(lambda: all(a.connected.is_set() for a in agents), connect_timeout,
             lambda: f"agents to connect: {[a.device_id for a in agents if not a.connected.is_set()]}")
    return agents


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


class CuttingProxy:
    """A TCP proxy to the server that drops the first `cuts` connections after `after` bytes of response."""

    def __init__(self, upstream_port: int, after: int, cuts: int = 1):
        self.upstream, self.after, self.cuts = upstream_port, after, cuts
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        up = socket.create_connection(("127.0.0.1", self.upstream))
        limit = None
        if self.cut < self.cuts:
            self.cut += 1
            limit = self.after

        def pipe(src, dst, limit):
            sent = 0
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) > limit:
                        dst.sendall(data[: limit - sent])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(conn, up, None), daemon=True).start()
        pipe(up, conn, limit)

    def close(self):
        self.sock.close()
