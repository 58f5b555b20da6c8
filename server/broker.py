"""MQTT brokers: Mosquitto (production; we write its password file and ACLs) or amqtt in-process (default).

Both enforce the same rules: a device logs in with its own id and secret and may touch only
`tinymlaas/v1/devices/<its id>/...` (its last will included); the server's own user may touch everything under
`tinymlaas/v1/`; a client's id is its user name, so no one can take over another's session.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import getpass
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.private import write_private

log = logging.getLogger("tinymlaas.broker")

ROOT = "tinymlaas/v1"
SERVER_USER = "tinymlaas-server"
RELOAD_GAP = 0.3  # seconds between Mosquitto reloads (a reload of thousands of logins takes milliseconds)
_ITERATIONS = 101  # Mosquitto's own default for its $7$ (PBKDF2-SHA512) hashes


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """The Mosquitto password-file hash of `secret`: $7$iterations$salt$hash, PBKDF2-HMAC-SHA512."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, _ITERATIONS, 64)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_secret(secret: str, hashed: str) -> bool:
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", secret.encode(), base64.b64decode(salt), int(iterations), 64)
    except ValueError:
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def topic_allowed(username: str | None, topic: str) -> bool:
    if username == SERVER_USER:
        return topic == ROOT or topic.startswith(ROOT + "/")
    if not username or "+" in username or "#" in username or "/" in username:
        return False
    return topic.startswith(f"{ROOT}/devices/{username}/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(TinyMLaaSError):
    """The broker's port is held by a process that is not ours (an orphaned broker, another service)."""


def port_holder(port: int) -> str:
    """Who listens on `port` (pid and name), where this user may see it; '' otherwise."""
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return f"pid {c.pid}, {psutil.Process(c.pid).name()}"
    except Exception as e:  # noqa: BLE001 - psutil missing or not allowed to look: say less
        log.debug("who holds port %s: %s", port, e)
    return ""


def ensure_port_free(what: str, host: str, port: int) -> None:
    """PortTaken, naming the holder, when something already accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            pass
    except OSError:
        return
    holder = port_holder(port)
    raise PortTaken(f"{what} cannot listen on {host}:{port}: another process already does"
                    f"{f' ({holder})' if holder else ''}; stop it or choose another --mqtt-port")


def dying_with_us(command: list[str]) -> list[str]:
    """`command` run so that the kernel sends it SIGTERM when this process dies, however it dies (a `serve` killed -9
    left its Mosquitto running with the old port and passwords): util-linux's setpriv sets the death signal and
    execs it (a preexec_fn would run Python between fork and exec in a threaded server). Tied to the forking
    thread: `serve`'s main thread or its supervisor's, both as long-lived as the server."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


class _SnapshotDict(dict):
    """amqtt 0.12 iterates its subscription table across awaits while other clients change it
    ("dictionary changed size during iteration" drops a connecting client); iterate over a copy."""

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):
        return list(super().items())


# amqtt plugins: they ask the authority registered under their config's name (the server's device registry).
_AUTHORITIES: dict[str, object] = {}

try:
    from dataclasses import dataclass

    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    class RegistryAuthPlugin(BaseAuthPlugin):
        @dataclass
        class Config:
            authority: str = "default"

        async def authenticate(self, *, session) -> bool:
            authority = _AUTHORITIES.get(self.config.authority)
            password = session.password.decode() if isinstance(session.password, bytes) else session.password
            return bool(authority and session.username and password
                        and authority.authenticate(session.username, password))

    class RegistryTopicPlugin(BaseTopicPlugin):
        @dataclass
        class Config:
            authority: str = "default"

        async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
            return bool(topic) and topic_allowed(session.username if session else None, topic)
except ImportError:  # pragma: no cover - amqtt is a dependency; keeps Mosquitto-only installs importable
    pass


# Set in each connection's own task until its CONNECT has authenticated (amqtt runs one task per connection).
_UNAUTHENTICATED = contextvars.ContextVar("tinymlaas_unauthenticated", default=False)


class _GuardedSessions(dict):
    """amqtt's session table, in which an unauthenticated CONNECT cannot see a connected client's session (amqtt
    0.12 resolves a CONNECT's client id against it, reusing or deleting the session, before it authenticates)."""

    def __contains__(self, client_id) -> bool:
        if not super().__contains__(client_id):
            return False
        return not (_UNAUTHENTICATED.get() and self[client_id][0].transitions.is_connected())


def client_allowed(username: str | None, client_id: str | None, will_topic: str | None) -> str | None:
    """Why a logged-in MQTT client may not have this connection (None: it may): its client id is its user name (so no
    one can take over another's session), and a last will only where it may publish."""
    if client_id != username:
        return f"client id '{client_id}' is not the user name '{username}'"
    if will_topic is not None and not topic_allowed(username, will_topic):
        return f"last will on '{will_topic}', outside the user's topics"
    return None


def _confined_broker_class():
    """amqtt's Broker held to the rules Mosquitto enforces for us (its ACL, use_username_as_clientid):

    - retained messages are delivered only where the ACL allows (amqtt 0.12 sends them on SUBSCRIBE, and on every
      new connection for every filter any client subscribed to, without asking the topic plugins);
    - a client's id must be its user name and its last will must be on its own topics (amqtt publishes wills
      without any ACL check), else the connection is refused;
    - a CONNECT changes no existing session before it has authenticated (amqtt deletes or reuses the session of
      the client id it names first: anyone could deafen the coordinator by connecting with its id); once it has,
      the old connection of that client id is closed, as MQTT's session take-over requires.
    """
    from amqtt.broker import Broker

    class ConfinedBroker(Broker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sessions = _GuardedSessions(self._sessions)

        async def _client_connected(self, listener_name, reader, writer) -> None:
            _UNAUTHENTICATED.set(True)  # this connection's task only
            await super()._client_connected(listener_name, reader, writer)

        async def _delete_session(self, client_id: str) -> None:
            if _UNAUTHENTICATED.get():
                return  # a clean-session CONNECT: done after it has authenticated (below)
            await super()._delete_session(client_id)

        async def _authenticate(self, session, listener) -> bool:
            ok = await super()._authenticate(session, listener)
            why = client_allowed(session.username, session.client_id, session.will_topic if session.will_flag
                                 else None) if ok else "bad user name or password"
            if why is not None:
                self.logger.warning("refused MQTT client %r: %s", session.client_id, why)
                # amqtt files even a refused connection under its client id: give it one that is no one's
                session.client_id = f"refused-{secrets.token_hex(8)}"
                asyncio.get_running_loop().call_later(30, self._sessions.pop, session.client_id, None)
                return False
            _UNAUTHENTICATED.set(False)
            old = self._sessions.get(session.client_id)
            if old is not None and old[0] is not session:
                if old[0].transitions.is_connected():  # take-over: the same client, connected anew
                    await old[1].handle_connection_closed()
                    await old[1].stop()
                if session.clean_session:
                    await super()._delete_session(session.client_id)
            return True

        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            topic_filter, qos = subscription
            handler = self._get_handler(session)
            tasks = [
                asyncio.ensure_future(handler.mqtt_publish(r.topic, r.data, min(qos, r.qos or qos), retain=True))
                for topic, r in list(self._retained_messages.items())
                if handler and self._matches(topic, topic_filter) and topic_allowed(session.username, topic)
            ]
            if tasks:
                await asyncio.wait(tasks)

    return ConfinedBroker


class EmbeddedBroker:
    """amqtt on an asyncio loop in a thread of the server process (the embedded default)."""

    def __init__(self, authority, host: str = "127.0.0.1", port: int = 1883):
        self.host, self.port = host, port
        self.authority = authority
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        ensure_port_free("the embedded MQTT broker", self.host, self.port)
        key = f"broker-{id(self)}"
        _AUTHORITIES[key] = self.authority
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {
                "server.broker.RegistryAuthPlugin": {"authority": key},
                "server.broker.RegistryTopicPlugin": {"authority": key},
            },
        }
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = _confined_broker_class()(config, loop=self._loop)
                self._broker._subscriptions = _SnapshotDict()
                self._loop.run_until_complete(self._broker.start())
            except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        wait_for_port(self.host, self.port)

    def stop(self) -> None:
        if self._loop and self._broker:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._broker = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def credentials_changed(self) -> None:
        pass  # the plugins ask the registry on every connection


class MosquittoBroker:
    """A Mosquitto process we configure: loopback listener, our password file, per-device ACL pattern."""

    def __init__(self, workdir: Path, credentials, host: str = "127.0.0.1", port: int = 1883, tls=None,
                 client_certs: bool = False):
        self.dir = Path(workdir)
        self._config_lock = threading.Lock()
        self._reload_wanted, self._stopping = threading.Event(), threading.Event()
        self._reloader: threading.Thread | None = None
        self.credentials = credentials  # () -> {user: hash_secret() string}
        self.host, self.port = host, port
        self.tls, self.client_certs = tls, client_certs  # tls: server.tls.TlsFiles, or None for plain MQTT
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)

    def write_config(self) -> None:
        """Password file, ACL and config, rewritten atomically and owner-only; SIGHUP makes a running Mosquitto
        reload them."""
        credentials = self.credentials()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_private(self.dir / "passwd", "".join(f"{u}:{h}\n" for u, h in sorted(credentials.items())))
        write_private(self.dir / "acl", (
            f"user {SERVER_USER}\ntopic readwrite {ROOT}/#\n\n"
            f"# every other user: its own subtree only\npattern readwrite {ROOT}/devices/%u/#\n"
        ))
        write_private(self.dir / "mosquitto.conf", (
            "per_listener_settings false\n"
            f"user {getpass.getuser()}\n"  # no privilege drop: the files stay readable on reload
            f"listener {self.port} {self.host}\n"
            "use_username_as_clientid true\n"  # a listener's setting: no one takes over another's session
            + self._tls_config() +
            "allow_anonymous false\n"
            f"password_file {self.dir / 'passwd'}\n"
            f"acl_file {self.dir / 'acl'}\n"
            "persistence false\n"
            "max_queued_messages 10000\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        ))

    def _tls_config(self) -> str:
        """TLS on the listener; with client certificates a client needs one signed by our CA *and* its secret
        (Mosquitto cannot tie a certificate's name to the user name without giving up the password check)."""
        if self.tls is None:
            return ""
        return (f"cafile {self.tls.ca}\ncertfile {self.tls.cert}\nkeyfile {self.tls.key}\ntls_version tlsv1.2\n"
                f"require_certificate {'true' if self.client_certs else 'false'}\n")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        exe = self.binary()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (run `make setup`)")
        ensure_port_free("Mosquitto", self.host, self.port)
        self.write_config()
        log_path = self.dir / "mosquitto.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(dying_with_us([exe, "-c", str(self.dir / "mosquitto.conf")]),
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while True:  # listening, and it is ours: a port taken since the check above makes Mosquitto exit
            if self.proc.poll() is not None:
                said = log_path.read_bytes()[start:].decode(errors="replace").strip().splitlines()
                raise PortTaken(f"Mosquitto exited at start ({said[-1] if said else self.proc.returncode})")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {self.host}:{self.port} after 10 s") from None
                time.sleep(0.05)
        if self._reloader is None or not self._reloader.is_alive():
            self._stopping.clear()
            self._reloader = threading.Thread(target=self._reload, name="mosquitto-reload", daemon=True)
            self._reloader.start()

    def credentials_changed(self) -> None:
        # Written one at a time: two registrations racing could otherwise write the older credentials last.
        with self._config_lock:
            self.write_config()
        self._reload_wanted.set()

    def _reload(self) -> None:
        """SIGHUP after each burst of changes, RELOAD_GAP apart: Mosquitto drops a SIGHUP that arrives while it is
        reloading, which left the last of 1,000 devices registered in a burst refused for good."""
        while not self._stopping.is_set():
            if self._reload_wanted.wait(1.0):
                self._reload_wanted.clear()
                if self.running():
                    self.proc.send_signal(signal.SIGHUP)
                self._stopping.wait(RELOAD_GAP)

    def stop(self) -> None:
        self._stopping.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        if self._reloader is not None:
            self._reloader.join(5)
            self._reloader = None

    def restart(self) -> None:
        self.stop()
        self.start()
