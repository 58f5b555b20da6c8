"""MQTT over TLS with the managed Mosquitto and the development CA `serve --mqtt-tls` makes: devices verify the
broker, plain MQTT is refused, and with client certificates a device needs its certificate and its secret. Real
Mosquitto, real agents, a real rollout."""

import ssl
import threading

import paho.mqtt.client as mqtt
import pytest

from server.broker import MosquittoBroker
from server.client import Client
from tests.helpers.fleet import build, start_agents, start_server
from tests.helpers.paths import model_path
from tinymlaas.errors import TinyMLaaSError

pytestmark = pytest.mark.skipif(MosquittoBroker.binary() is None,
                                reason="mosquitto is not installed (make setup installs it)")


def _connect(port: int, user: str, password: str, tls: dict | None) -> str:
    """'ok', the broker's refusal, or the TLS/socket error: what one connection attempt ends in."""
    done, result = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    c.username_pw_set(user, password)
    if tls is not None:
        c.tls_set(**tls)
    c.on_connect = lambda *a: (result.append("ok" if not a[3].is_failure else str(a[3])), done.set())
    c.on_disconnect = lambda *a: (result.append("disconnected"), done.set())
    try:
        c.connect("127.0.0.1", port, keepalive=5)
    except (OSError, ssl.SSLError) as e:
        return type(e).__name__
    c.loop_start()
    done.wait(10)
    c.loop_stop()
    c.disconnect()
    return result[0] if result else "no answer"


def _written(agent, name: str) -> str:
    return str(agent.dir / name)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("tls") / "data", mqtt="mosquitto", mqtt_tls=True)
    yield server
    server.stop()


def test_devices_update_over_tls_and_plain_mqtt_is_refused(tls_server, tmp_path):
    server = tls_server
    client = Client(server.url, server.admin_token)
    agents = start_agents(server, tmp_path, ["tls-01", "tls-02"], group="tls")
    try:
        m = agents[0].state["mqtt"]
        assert m["tls"] and "BEGIN CERTIFICATE" in m["ca"] and "certificate" not in m
        port, ca = server.settings.mqtt_port, {"ca_certs": _written(agents[0], "mqtt-ca.pem")}
        user, other = m["username"], agents[1].state["mqtt"]["username"]
        assert _connect(port, user, m["password"], None) != "ok"  # plain MQTT on the TLS port
        assert _connect(port, user, m["password"], {}) == "SSLCertVerificationError"  # the system CAs: no trust
        b = build(client, model_path("ad01_int8"))
        d = client.wait_deployment(client.deploy(b["id"], group="tls")["id"], timeout=300)
        assert d["state"] == "succeeded" and d["summary"]["counts"] == {"succeeded": 2}
        assert all(a.version == b["version"] for a in agents)
        assert _connect(port, user, m["password"], ca) == "ok"
        assert _connect(port, other, "wrong", ca) == "Not authorized"  # the secret still counts
    finally:
        for a in agents:
            a.stop()


def test_with_client_certificates_a_device_needs_its_certificate_and_its_secret(tmp_path):
    server = start_server(tmp_path / "data", mqtt="mosquitto", mqtt_tls=True, mqtt_client_certs=True)
    agents = []
    try:
        agents = start_agents(server, tmp_path, ["cert-01", "cert-02"], group="certs")  # they connect: cert + secret
        m = agents[0].state["mqtt"]
        assert "BEGIN CERTIFICATE" in m["certificate"] and "PRIVATE KEY" in m["private_key"]
        assert (agents[0].dir / "mqtt-key.pem").stat().st_mode & 0o777 == 0o600
        port = server.settings.mqtt_port
        ca_only = {"ca_certs": _written(agents[0], "mqtt-ca.pem")}
        with_cert = {**ca_only, "certfile": _written(agents[0], "mqtt-cert.pem"),
                     "keyfile": _written(agents[0], "mqtt-key.pem")}
        user = m["username"]
        assert _connect(port, user, m["password"], with_cert) == "ok"
        assert _connect(port, user, m["password"], ca_only) != "ok"  # the secret alone is not enough
        assert _connect(port, user, "wrong", with_cert) == "Not authorized"  # nor the certificate alone
        assert (tmp_path / "data" / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    finally:
        for a in agents:
            a.stop()
        server.stop()


def test_tls_needs_the_managed_mosquitto(tmp_path):
    before = set(threading.enumerate())
    with pytest.raises(TinyMLaaSError, match="managed Mosquitto"):
        start_server(tmp_path / "data", mqtt="embedded", mqtt_tls=True)
    # a server that failed to start leaves no HTTP worker thread behind: they are not daemons, and one left
    # running keeps the process from exiting
    assert not [t.name for t in set(threading.enumerate()) - before if not t.daemon]
