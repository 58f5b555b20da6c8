"""Both MQTT brokers (amqtt in-process, Mosquitto) against the attacks a device could try with its own valid login:
a last will on another device's topics, another client's id (a device's or the server's), and a refused login
that must disturb no one. Real brokers, real paho clients on loopback."""

import time

import paho.mqtt.client as mqtt
import pytest

from server.broker import RELOAD_GAP, ROOT, SERVER_USER, MosquittoBroker, free_port, hash_secret
from tests.helpers.fleet import SECRETS, make_broker, wait_for


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request, tmp_path):
    b = make_broker(request.param, tmp_path, free_port())
    b.start()
    yield b
    b.stop()


def client(broker, user: str, client_id: str | None = None, will: tuple | None = None, password: str | None = None):
    """A connected paho client (None if the broker refused it), recording what it receives."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user, clean_session=True)
    c.username_pw_set(user, password or SECRETS[user])
    if will:
        c.will_set(will[0], will[1], qos=1, retain=True)
    c.got = []
    c.on_message = lambda _c, _u, m: c.got.append((m.topic, m.payload))
    answered = []  # the broker's answer: a CONNACK (accepted or refused) or the connection closed
    c.on_connect = lambda _c, _u, _f, reason, _p: answered.append(reason)
    c.on_disconnect = lambda _c, _u, _f, reason, _p: answered.append(reason)
    c.connect("127.0.0.1", broker.port, keepalive=5)
    c.loop_start()
    try:  # a loaded machine can take seconds to hand a session over: wait for the answer, not a fixed time
        wait_for(lambda: answered or c.is_connected(), 15, "CONNACK")
    except TimeoutError:
        pass
    if not c.is_connected():
        c.loop_stop()
        return None
    return c


def subscribed(c, topic: str):
    c.subscribe(topic, qos=1)
    time.sleep(0.3)
    return c


def drop(c) -> None:
    """Lose the connection without DISCONNECT, as a power cut would: the broker publishes the client's will."""
    c.loop_stop()
    c.socket().close()


def test_a_last_will_on_another_devices_topic_never_arrives(broker):
    server = subscribed(client(broker, SERVER_USER), f"{ROOT}/#")
    forger = client(broker, "dev-a", will=(f"{ROOT}/devices/dev-b/state", b"forged"))
    if forger is not None:  # Mosquitto takes the connection and drops the will at publication; amqtt refuses it
        drop(forger)
    time.sleep(1.0)
    honest = client(broker, "dev-b", will=(f"{ROOT}/devices/dev-b/state", b"lost"))
    drop(honest)
    wait_for(lambda: server.got, 10, "the honest device's will")
    time.sleep(0.5)
    assert server.got == [(f"{ROOT}/devices/dev-b/state", b"lost")]  # dev-b's own, not dev-a's forgery
    late = subscribed(client(broker, SERVER_USER, client_id=SERVER_USER), f"{ROOT}/devices/dev-b/#")
    wait_for(lambda: late.got, 5, "the retained will")
    assert late.got == [(f"{ROOT}/devices/dev-b/state", b"lost")]
    server.loop_stop()
    late.loop_stop()


@pytest.mark.parametrize("intruder", [("dev-a", "secret-a"), ("dev-a", "wrong"), ("nobody", "x")],
                         ids=["another-device", "bad-secret", "unknown-user"])
@pytest.mark.parametrize("victim", ["dev-b", SERVER_USER])
def test_a_connection_with_someone_elses_client_id_leaves_them_connected_and_hearing(broker, intruder, victim):
    target = subscribed(client(broker, victim), f"{ROOT}/devices/dev-b/#")
    user, password = intruder
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=victim, clean_session=True)
    c.username_pw_set(user, password)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    time.sleep(1.0)  # refused (amqtt; Mosquitto for bad logins) or filed under its own user name (Mosquitto)
    c.loop_stop()
    c.disconnect()
    assert target.is_connected()
    sender = client(broker, "dev-b", client_id="dev-b") if victim == SERVER_USER else client(broker, SERVER_USER)
    sender.publish(f"{ROOT}/devices/dev-b/telemetry", b"still here", qos=1)
    wait_for(lambda: (f"{ROOT}/devices/dev-b/telemetry", b"still here") in target.got, 5, "delivery to the victim")
    for x in (target, sender):
        x.loop_stop()


def test_the_same_client_connecting_again_takes_its_session_over(broker):
    first = client(broker, "dev-a")
    second = subscribed(client(broker, "dev-a"), f"{ROOT}/devices/dev-a/#")
    wait_for(lambda: not first.is_connected(), 5, "the old connection to be closed")
    server = client(broker, SERVER_USER)
    server.publish(f"{ROOT}/devices/dev-a/jobs/notify-next", b"job", qos=1)
    wait_for(lambda: second.got, 5, "delivery to the new connection")
    for x in (first, second, server):
        x.loop_stop()


def test_concurrent_registrations_all_reach_mosquittos_password_file(tmp_path):
    """Registrations racing each other each rewrite the password file: the last write must hold every device, and
    Mosquitto must have reloaded it (it drops a SIGHUP that arrives during a reload)."""
    import threading

    if MosquittoBroker.binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    users: dict[str, str] = {SERVER_USER: hash_secret("s", b"0123456789ab")}
    lock = threading.Lock()

    def credentials():
        with lock:
            snapshot = dict(users)
        time.sleep(0.002 * (30 - len(snapshot)))  # a slow database read: the older the answer, the later it arrives
        return snapshot

    b = MosquittoBroker(tmp_path / "mosquitto", credentials, port=free_port())
    b.start()
    try:
        def register(i):
            time.sleep(0.003 * i)
            with lock:
                users[f"dev-{i}"] = hash_secret(f"secret-{i}", b"0123456789ab")
            b.credentials_changed()

        threads = [threading.Thread(target=register, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        written = {line.split(":")[0] for line in (tmp_path / "mosquitto" / "passwd").read_text().splitlines()}
        assert written == set(users)
        assert (tmp_path / "mosquitto" / "passwd").stat().st_mode & 0o077 == 0
        time.sleep(2 * RELOAD_GAP)  # and Mosquitto has reloaded after the last change: every device gets in
        for i in (23, 22, 0):
            c = client(b, f"dev-{i}", password=f"secret-{i}")
            assert c is not None, f"dev-{i} refused"
            c.loop_stop()
    finally:
        b.stop()
