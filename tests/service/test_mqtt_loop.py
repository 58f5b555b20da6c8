"""The shared MQTT network loop: clients whose sockets are numbered past select()'s limit of 1023 still connect
and talk, a restarted broker is reconnected to, and a power cut (unlike a clean stop) fires the last will.
Real brokers and paho clients on loopback."""

import gc
import json
import os

import paho.mqtt.client as mqtt
import pytest

from server.broker import ROOT, SERVER_USER, free_port
from server.mqtt_loop import MqttLoop
from tests.helpers.fleet import SECRETS, make_broker, wait_for


@pytest.fixture
def loop():
    loop = MqttLoop("test-mqtt")
    yield loop
    loop.close()


def home(user: str) -> str:
    """The topics `user` may use: the server all, a device its own."""
    return ROOT if user == SERVER_USER else f"{ROOT}/devices/{user}"


def paho(user: str, will: str | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, clean_session=True)
    c.username_pw_set(user, SECRETS[user])
    if will:
        c.will_set(will, json.dumps({"state": "lost"}), qos=1, retain=False)
    c.got, c.connects = [], 0

    def on_connect(client, _u, _f, reason, _p):
        client.connects += 1
        client.subscribe(f"{home(user)}/#", qos=1)

    c.on_connect = on_connect
    c.on_message = lambda _c, _u, m: c.got.append((m.topic, m.payload))
    return c


def test_clients_with_descriptors_past_1023_connect_and_exchange_messages(loop, tmp_path):
    broker = make_broker("embedded", tmp_path, free_port())
    broker.start()
    filler = []
    a, b = paho("dev-a"), paho(SERVER_USER)
    try:
        # every free descriptor below 1024 taken just before connecting, so that the clients' sockets are numbered
        # > 1023; a descriptor freed meanwhile (the garbage collector closing an earlier test's file) is taken too,
        # and the clients connect again
        for _ in range(3):
            gc.collect()
            while not filler or filler[-1] <= 1023:
                filler.append(os.open(os.devnull, os.O_RDONLY))
            for c in (a, b):
                loop.connect(c, "127.0.0.1", broker.port, keepalive=5)
            wait_for(lambda a=a, b=b: a.connects and b.connects, 10, "both clients to connect")
            if min(a.socket().fileno(), b.socket().fileno()) > 1023:
                break
            for c in (a, b):
                loop.disconnect(c)
            a, b = paho("dev-a"), paho(SERVER_USER)
            filler.append(os.open(os.devnull, os.O_RDONLY))
        assert min(a.socket().fileno(), b.socket().fileno()) > 1023
        wait_for(lambda: len(broker_subscribers_ready(a, b)) == 2, 5, "subscriptions")
        a.publish(f"{home('dev-a')}/x", b"hello", qos=1)
        b.publish(f"{home('dev-a')}/y", b"hi", qos=1)
        wait_for(lambda: (b"hello", b"hi") == (payloads(b, "x"), payloads(a, "y")), 5, "both messages")
    finally:
        for fd in filler:
            os.close(fd)
        for c in (a, b):
            loop.disconnect(c)
        broker.stop()


def payloads(c, suffix: str):
    return next((p for t, p in c.got if t.endswith("/" + suffix)), None)


def broker_subscribers_ready(*clients):
    """Each client sees its own probe message once its subscription is in place."""
    ready = []
    for c in clients:
        probe = f"{home(c._username.decode())}/probe"
        if any(t == probe for t, _ in c.got):
            ready.append(c)
        else:
            c.publish(probe, b"probe", qos=1)
    return ready


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_a_restarted_broker_is_reconnected_to(loop, tmp_path, kind):
    port = free_port()
    broker = make_broker(kind, tmp_path, port)
    broker.start()
    c = paho("dev-a")
    loop.connect(c, "127.0.0.1", port, keepalive=5)
    wait_for(lambda: c.connects == 1, 10, "the first connection")
    broker.stop()
    wait_for(lambda: not c.is_connected(), 20, "the client to notice the broker is gone")
    broker = make_broker(kind, tmp_path, port)
    broker.start()
    try:
        wait_for(lambda: c.connects == 2 and c.is_connected(), 20, "the client to reconnect")
    finally:
        loop.disconnect(c)
        broker.stop()
    assert c.socket() is None


@pytest.mark.parametrize("clean, wills", [(True, 0), (False, 1)])
def test_only_a_power_cut_fires_the_last_will(loop, tmp_path, clean, wills):
    broker = make_broker("embedded", tmp_path, free_port())
    broker.start()
    will = f"{home('dev-a')}/state"
    watcher, device = paho(SERVER_USER), paho("dev-a", will=will)
    try:
        for c in (watcher, device):
            loop.connect(c, "127.0.0.1", broker.port, keepalive=5)
        wait_for(lambda: len(broker_subscribers_ready(watcher, device)) == 2, 10, "both clients subscribed")
        loop.disconnect(device, clean=clean)
        assert device.socket() is None
        if wills:
            wait_for(lambda: any(t == will for t, _ in watcher.got), 10, "the will")
        else:
            watcher.publish(f"{ROOT}/done", b"", qos=1)  # in order after anything the broker sent for dev-a
            wait_for(lambda: any(t == f"{ROOT}/done" for t, _ in watcher.got), 10, "the marker")
        assert [p for t, p in watcher.got if t == will] == [json.dumps({"state": "lost"}).encode()] * wills
    finally:
        loop.disconnect(watcher)
        broker.stop()
