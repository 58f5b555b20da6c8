"""`tinymlaas serve`: the app, the MQTT broker and coordinator, and build workers, in one command."""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cheroot import wsgi
from sqlalchemy import select

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.private import write_private

from . import create_app
from .broker import SERVER_USER, EmbeddedBroker, MosquittoBroker, check_secret, hash_secret
from .config import Settings
from .coordinator import Coordinator
from .db import Device, User
from .jobs import ensure_signing_key
from .services.tenants import create_organization, create_user
from .tls import DevCA

log = logging.getLogger("tinymlaas.server")


class DeviceAuthority:
    """Who may log in to MQTT: the server, and each registered device with its own secret."""

    def __init__(self, sessions, server_secret: str):
        self.sessions = sessions
        self.server_secret = server_secret

    def authenticate(self, username: str, password: str) -> bool:
        if username == SERVER_USER:
            return secrets.compare_digest(password, self.server_secret)
        with self.sessions() as s:
            device = s.get(Device, username)
            return device is not None and check_secret(password, device.secret_hash)

    def credentials(self) -> dict[str, str]:
        with self.sessions() as s:
            creds = {d.id: d.secret_hash for d in s.scalars(select(Device))}
        creds[SERVER_USER] = hash_secret(self.server_secret)
        return creds


def _secret_file(path, make) -> str:
    if not path.exists():
        write_private(path, make())
    return path.read_text().strip()


class Server:
    """supervise_every: seconds between checks that restart a broker or build worker that died (None: no
    supervision, /health alone reports what is down)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
                 supervise_every: float | None = 1.0):
        self.settings, self.host, self.port, self.workers = settings, host, port, workers
        self.supervise_every = supervise_every
        self.restarts = {"broker": 0, "workers": 0}
        self.broker_error: str | None = None  # why the last restart of the broker failed
        self._stopping = threading.Event()
        self.app = None
        self.broker = None
        self.coordinator = None
        self.http = None
        self.worker_procs: list[subprocess.Popen] = []
        self.admin_token: str | None = None

    @property
    def bound_port(self) -> int:
        return self.http.bind_addr[1] if self.http else self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.bound_port}"

    def _wsgi(self, environ, start_response):
        return self.app(environ, start_response)

    def start(self) -> Server:
        # cheroot: a pool of threads (16, growing to 64 under load), HTTP/1.1 keep-alive, and request bodies
        # streamed to the app, so that Flask refuses an upload over the limit (413, problem+json) before it is read
        self.http = GuardedServer((self.host, self.port), self._wsgi, numthreads=16, max=64, request_queue_size=64,
                                  server_name="tinymlaas", shutdown_timeout=1)
        self.http.prepare()  # bound first: the port may be 0
        try:
            return self._start_parts()
        except BaseException:
            self.http.stop()  # its pool's threads are not daemons: left running, they would keep the process alive
            self.http = None
            raise

    def _start_parts(self) -> Server:
        s = self.settings
        if s.public_url == Settings.public_url or self.port == 0:
            s.public_url = self.url
        self.app = create_app(s)
        ctx = self.app.extensions["tinymlaas"]
        ensure_signing_key(s)
        self.admin_token = self._admin_token(ctx)
        server_secret = _secret_file(s.data_dir / "keys" / "mqtt-server.secret", lambda: secrets.token_urlsafe(24))
        authority = DeviceAuthority(ctx.sessions, server_secret)
        tls, coordinator_tls = self._tls()
        if s.mqtt == "embedded":
            self.broker = EmbeddedBroker(authority, s.mqtt_host, s.mqtt_port)
        elif s.mqtt == "mosquitto":
            self.broker = MosquittoBroker(s.mosquitto_dir, authority.credentials, s.mqtt_host, s.mqtt_port, tls,
                                          s.mqtt_client_certs)
        if self.broker is not None:
            self.broker.start()
        self.coordinator = Coordinator(ctx, s.mqtt_host, s.mqtt_port, server_secret, self.broker, tls=coordinator_tls)
        self.coordinator.start()
        ctx.coordinator = self.coordinator
        ctx.health = self.health
        threading.Thread(target=self.http.serve, name="http", daemon=True).start()
        for _ in range(self.workers):
            self.worker_procs.append(start_worker(s))
        if self.supervise_every:
            threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()
        return self

    def _tls(self):
        """With --mqtt-tls: the broker's files from the development CA, and the coordinator's TLS settings (its own
        client certificate when clients need one)."""
        s = self.settings
        if not s.mqtt_tls:
            if s.mqtt_client_certs:
                raise TinyMLaaSError("client certificates need MQTT over TLS (--mqtt-tls)")
            return None, None
        if s.mqtt != "mosquitto":
            raise TinyMLaaSError(f"MQTT over TLS needs the managed Mosquitto (--mqtt mosquitto), not '{s.mqtt}'")
        ca = DevCA(s.tls_dir)
        files = ca.ensure({s.mqtt_host, "localhost", "127.0.0.1"})
        coordinator = {"ca_certs": str(files.ca)}
        if s.mqtt_client_certs:
            cert, key = s.tls_dir / "coordinator.pem", s.tls_dir / "coordinator.key"
            if not cert.exists():
                cert_pem, key_pem = ca.issue(SERVER_USER)
                write_private(key, key_pem)
                cert.write_bytes(cert_pem)
            coordinator.update(certfile=str(cert), keyfile=str(key))
        return files, coordinator

    def broker_hung(self) -> str | None:
        """Why the broker counts as hung, or None: its process stopped (SIGSTOP), or it has not returned the
        coordinator's heartbeat for HUNG_AFTER seconds (a SIGSTOPped Mosquitto kept /health ok for 45 s)."""
        if self.broker is None or not self.broker.running():
            return None
        pid = getattr(getattr(self.broker, "proc", None), "pid", None)
        if pid is not None and process_stopped(pid):
            return f"the broker's process (pid {pid}) is stopped"
        if self.coordinator is not None and self.coordinator.connected.is_set() and \
                self.coordinator.echo_age() > HUNG_AFTER:
            return f"the broker has not passed a heartbeat on for {self.coordinator.echo_age():.0f} s"
        return None

    def _supervise(self) -> None:
        """Restart what died or hung: the broker we manage (a Mosquitto killed -9 takes every device offline) and
        build workers (their builds' leases lapse and the workers requeue them)."""
        while not self._stopping.wait(self.supervise_every):
            hung = self.broker_hung()
            if hung is not None and isinstance(self.broker, MosquittoBroker):  # ours to restart
                log.warning("%s: killing it, to restart it", hung)
                self.broker.proc.kill()
                self.broker.proc.wait(10)
            if self.broker is not None and not self.broker.running():
                log.warning("the %s MQTT broker is not running: restarting it", self.settings.mqtt)
                try:
                    self.broker.restart()
                    self.restarts["broker"] += 1
                    self.broker_error = None
                except Exception as e:  # noqa: BLE001 - e.g. the port is taken: /health says so; try again
                    if str(e) != self.broker_error:
                        log.error("restarting the MQTT broker failed: %s", e)
                    self.broker_error = str(e)
            for i, proc in enumerate(self.worker_procs):
                if proc.poll() is None and process_stopped(proc.pid) and not self._stopping.is_set():
                    log.warning("build worker %s is stopped: killing it, to start another", proc.pid)
                    proc.kill()
                    proc.wait(10)
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("build worker %s exited (%s): starting another", proc.pid, proc.returncode)
                    self.worker_procs[i] = start_worker(self.settings)
                    self.restarts["workers"] += 1

    def health(self) -> tuple[dict[str, str | None], dict[str, int]]:
        """Each part of the service and what is wrong with it (None: fine), and how often the supervisor restarted
        the broker and the workers: what /health reports."""
        dead = [p.pid for p in self.worker_procs if p.poll() is not None]
        stopped = [p.pid for p in self.worker_procs if p.poll() is None and process_stopped(p.pid)]
        broker = None if self.broker is None or self.broker.running() else f"the {self.settings.mqtt} MQTT " \
            "broker is not running" + (f" ({self.broker_error})" if self.broker_error else "")
        workers = None
        if dead:
            workers = f"{len(dead)} of {len(self.worker_procs)} build workers exited (pid {dead[0]})"
        elif stopped:
            workers = f"{len(stopped)} of {len(self.worker_procs)} build workers are stopped (pid {stopped[0]})"
        return {
            "broker": broker or self.broker_hung(),
            "mqtt": None if self.coordinator is not None and self.coordinator.connected.is_set()
            else "the coordinator is not connected to the broker",
            "workers": workers,
        }, dict(self.restarts)

    def _admin_token(self, ctx) -> str | None:
        """On first start: organisation `default` and its `admin` user, whose token goes to DATA/admin.token
        (owner-only, no expiry: the operator's way in)."""
        path = self.settings.data_dir / "admin.token"
        with ctx.sessions() as session:
            if session.scalar(select(User).limit(1)) is None:
                _, token = create_user(session, "admin", create_organization(session, "default"))
                write_private(path, token + "\n")
        return path.read_text().strip() if path.exists() else None

    def stop(self) -> None:
        self._stopping.set()
        for p in self.worker_procs:
            p.terminate()
        for p in self.worker_procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.worker_procs = []
        if self.http:
            self.http.stop()
        if self.coordinator:
            self.coordinator.stop()
        if self.broker:
            self.broker.stop()
        self.app.extensions["tinymlaas"].close()


HEADER_DEADLINE = 10.0  # seconds a connection may take to send its request headers
PER_CLIENT_WAITING = 32  # connections one address may have waiting for their headers at once


class GuardedServer(wsgi.Server):
    """cheroot, handing a connection to one of its worker threads only once the request's headers are in: a client
    that sends them slowly waits in a list a single thread watches (select, then MSG_PEEK: nothing consumed) instead
    of holding a worker (80 such sockets stalled every other request). One that takes longer than HEADER_DEADLINE
    is closed, and an address with PER_CLIENT_WAITING connections waiting gets no more."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting: dict[object, list] = {}  # conn -> [since, client address, bytes seen]
        self._waiting_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)  # a wake-up already pending is enough: never wait on it
        self._watcher: threading.Thread | None = None

    def process_conn(self, conn):
        seen = self._headers_in(conn)
        if seen is None:
            return super().process_conn(conn)
        peer = conn.remote_addr or ""
        with self._waiting_lock:
            if sum(1 for w in self._waiting.values() if w[1] == peer) >= PER_CLIENT_WAITING:
                conn.close()
                return None
            self._waiting[conn] = [time.monotonic(), peer, seen]
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_waiting, name="http-headers", daemon=True)
                self._watcher.start()
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass
        return None

    @staticmethod
    def _headers_in(conn) -> int | None:
        """None: hand it over (the headers are in, or it is for cheroot to refuse or close, or TLS, whose bytes say
        nothing here); else how many bytes of an unfinished request have arrived."""
        if conn.rfile.has_data() or not isinstance(conn.socket, socket.socket) or hasattr(conn.socket, "cipher"):
            return None
        try:
            data = conn.socket.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError:
            return None
        return None if not data or b"\r\n\r\n" in data or len(data) >= 65536 else len(data)

    def _watch_waiting(self) -> None:
        while self.ready:
            with self._waiting_lock:
                waiting = list(self._waiting.items())
            # sleep until a silent one speaks, a new one arrives, or the next look at those part-way (their unread
            # bytes keep them readable: they are looked at every 50 ms instead)
            silent = [conn.socket for conn, (_, _, seen) in waiting if seen == 0]
            with selectors.DefaultSelector() as sel:
                for sock in (self._wake_r, *silent):
                    try:
                        sel.register(sock, selectors.EVENT_READ)
                    except (ValueError, OSError):  # closed meanwhile: the look below hands it over
                        pass
                if any(key.fileobj is self._wake_r for key, _ in sel.select(0.05)):
                    self._wake_r.recv(4096)
            now = time.monotonic()
            for conn, entry in waiting:
                seen = self._headers_in(conn)
                if seen is not None and now - entry[0] < HEADER_DEADLINE:
                    entry[2] = seen
                    continue
                with self._waiting_lock:
                    self._waiting.pop(conn, None)
                if seen is not None:  # too slow: cut off
                    conn.close()
                else:
                    super().process_conn(conn)
        with self._waiting_lock:
            for conn in self._waiting:
                conn.close()
            self._waiting.clear()


HUNG_AFTER = 5.0  # seconds without the coordinator's heartbeat back: the broker is hung


def process_stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, a debugger): state T or t in /proc (Linux; elsewhere never)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def start_worker(settings: Settings) -> subprocess.Popen:
    """A build worker process (`tinymlaas worker`) on the same database, queue and files; it logs to DATA/worker.log."""
    env = {**os.environ, **settings.to_env()}
    with open(settings.data_dir / "worker.log", "ab") as log:  # the child keeps its own copy of the descriptor
        env["TINYMLAAS_SERVER_PID"] = str(os.getpid())  # the worker dies with it (die_with_server)
        return subprocess.Popen([sys.executable, "-m", "tinymlaas", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def die_with_server() -> None:
    """In a worker started by `serve`: the kernel sends it SIGTERM when the server process dies, however it dies (a
    SIGKILLed `serve` would otherwise leave an orphan working the queue next to its successor's workers)."""
    import ctypes
    import signal

    parent = os.environ.get("TINYMLAAS_SERVER_PID")
    if not parent:
        return  # a worker started by hand lives on its own
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no such guarantee
        return
    if os.getppid() != int(parent):  # the server died before the line above: too late for the signal
        os._exit(0)
