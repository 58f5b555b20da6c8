"""One network thread for any number of MQTT clients, on epoll.

paho's own loop (`loop_start`) waits with `select()`, which cannot watch a file descriptor above 1023: in a
process with many open descriptors (a server with an in-process broker and a large fleet, or many emulated
devices) a new connection silently fails and is retried forever. paho also supports an external event loop;
this is one, on `selectors` (epoll on Linux: no such limit), and with one thread for all clients instead of
one each. It keeps paho's reconnect behaviour: a lost connection is retried with a delay that doubles from
0.2 s to 2 s.

Other threads may publish at any time: paho then asks for write readiness, which wakes this loop.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

log = logging.getLogger("tinymlaas.mqtt")

MIN_RETRY, MAX_RETRY = 0.2, 2.0
MISC_EVERY = 0.5  # seconds between keep-alive checks


@dataclass
class _Entry:
    client: mqtt.Client
    sock: object | None = None  # the socket registered with the selector
    events: int = 0
    retry_at: float = 0.0
    retry_delay: float = MIN_RETRY
    leaving: bool = False  # stopping: no more reconnects


class MqttLoop:
    def __init__(self, name: str = "mqtt-loop"):
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._entries: dict[int, _Entry] = {}
        self._dirty: set[int] = set()  # clients to look at on the next round (all of them every MISC_EVERY)
        self._gone: list[_Entry] = []  # disconnected by their owners, still to unregister
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # clients

    def connect(self, client: mqtt.Client, host: str, port: int, keepalive: int) -> None:
        """Connect `client` from this loop and keep it connected until `disconnect`."""
        client.connect_async(host, port, keepalive)
        client.on_socket_register_write = client.on_socket_unregister_write = client.on_socket_close = \
            lambda c, *_: self._touch(c)
        with self._lock:
            self._entries[id(client)] = _Entry(client)
        self._touch(client)

    def disconnect(self, client: mqtt.Client, clean: bool = True, timeout: float = 5.0) -> None:
        """clean: send DISCONNECT and wait (up to `timeout`) until it is written; otherwise drop the socket,
        as a power cut would (the broker then publishes the client's will)."""
        with self._lock:
            entry = self._entries.get(id(client))
        if entry is None:
            return
        entry.leaving = True
        if clean and client.is_connected():
            client.disconnect()
            self.wake()
            deadline = time.monotonic() + timeout
            while client.socket() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
        client._sock_close()  # paho has no public way to drop a connection without a DISCONNECT packet
        with self._lock:
            if self._entries.pop(id(client), None) is not None:
                self._gone.append(entry)
        self.wake()

    def _touch(self, client: mqtt.Client) -> None:
        """`client`'s socket or wish to write changed (paho's callbacks, from any thread): look at it again."""
        with self._lock:
            self._dirty.add(id(client))
        self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):  # already awake, or closed
            pass

    def close(self) -> None:
        self._closed = True
        self.wake()
        self._thread.join(5)

    # the loop

    def _run(self) -> None:
        next_misc = 0.0
        while not self._closed:
            try:
                full = time.monotonic() >= next_misc
                if full:
                    next_misc = time.monotonic() + MISC_EVERY
                    with self._lock:
                        entries = list(self._entries.values())
                    for entry in entries:
                        entry.client.loop_misc()  # keep-alive pings; a dead connection is closed here
                self._reconcile(full)
                self._serve(self._selector.select(timeout=MISC_EVERY))
            except Exception:  # one client's failure must not stop the network of every other client
                log.exception("MQTT loop")
                time.sleep(MIN_RETRY)
        self._selector.close()  # the loop's own descriptors: a server started and stopped often keeps none
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self, ready) -> None:
        for key, mask in ready:
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            client = key.data.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
                while client.socket() is not None and getattr(client.socket(), "pending", lambda: 0)():
                    client.loop_read()  # TLS: records already decrypted are invisible to epoll
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()

    def _reconcile(self, full: bool) -> None:
        """Make the selector match each client's socket and wish to write, and reconnect the clients that are due:
        every client on a full round, else only those whose state changed (one publish must not cost a pass over
        a thousand clients)."""
        with self._lock:
            entries = list(self._entries.values()) if full else \
                [self._entries[i] for i in self._dirty if i in self._entries]
            self._dirty.clear()
            gone, self._gone = self._gone, []
        for entry in gone:
            self._unregister(entry)
        for entry in entries:  # first forget closed sockets: their numbers get reused
            if entry.sock is not None and entry.client.socket() is not entry.sock:
                self._unregister(entry)
        now = time.monotonic()
        for entry in entries:
            client = entry.client
            if client.socket() is None and not entry.leaving and now >= entry.retry_at:
                try:
                    client.reconnect()
                except OSError as e:  # refused, unreachable, TLS failure: try again later
                    log.debug("MQTT connect to %s:%s failed: %s", client.host, client.port, e)
                entry.retry_delay = min(entry.retry_delay * 2, MAX_RETRY)
                entry.retry_at = now + entry.retry_delay
            if client.is_connected():
                entry.retry_delay = MIN_RETRY
            sock = client.socket()
            if sock is None:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            if entry.sock is None:
                stale = self._selector.get_map().get(sock.fileno())
                if stale is not None:  # a closed socket of a client not looked at this round
                    self._unregister(stale.data)
                self._selector.register(sock, events, entry)
                entry.sock, entry.events = sock, events
            elif events != entry.events:
                self._selector.modify(sock, events, entry)
                entry.events = events

    def _unregister(self, entry: _Entry) -> None:
        if entry.sock is not None:
            try:
                self._selector.unregister(entry.sock)
            except (KeyError, ValueError):  # closed and already forgotten
                pass
            entry.sock, entry.events = None, 0


_shared: MqttLoop | None = None
_shared_lock = threading.Lock()


def shared_loop() -> MqttLoop:
    """The process's loop for device-side clients (an agent, or many emulated ones)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MqttLoop("mqtt-devices")
        return _shared
