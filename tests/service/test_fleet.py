"""The service end to end on loopback: real HTTP server, real MQTT broker, a Huey worker process,
emulated devices whose self-test runs every new image in QEMU (all of them, no sampling)."""

import hashlib
import os
import signal
import time

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from server.agent import Agent
from server.client import ApiError, Client
from server.db import Build, Telemetry
from server.runtime import start_worker
from server.services.tenants import create_organization, create_user
from tests.helpers.fleet import CuttingProxy, build, start_agents, start_server, wait_for
from tests.helpers.paths import model_path
from tinymlaas.ota.package import inspect_image, public_key_pem, sign_image, slot_size
from tinymlaas.targets import get_target


@pytest.fixture(scope="module")
def live(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("fleet")
    server = start_server(root / "data")
    client = Client(server.url, server.admin_token)
    first = build(client, model_path("ad01_int8"))
    second = build(client, model_path("ad01_int8"))
    yield {"server": server, "client": client, "root": root, "v1": first, "v2": second}
    server.stop()


def _stop(agents):
    for a in agents:
        a.stop()


def test_build_job_produces_a_verified_signed_image(live, tmp_path):
    client, b = live["client"], live["v1"]
    assert b["progress"] == 1.0 and b["report"]["verified"] and b["report"]["lowering"] == "integer"
    made = {"image", "firmware", "payload", "report", "selftest", "platformio"}
    # a model image where the model's constants fit the model region; rollouts add the payloads they sent: the
    # image (or the model image) compressed, patches from the builds (or the models) devices ran
    assert made <= set(b["artifacts"]) and all(a in ("image_xz", "model_image", "model_xz")
                                               or a.startswith(("delta_from_", "model_from_"))
                                               for a in set(b["artifacts"]) - made), b["artifacts"]
    image = client.download_artifact(b["id"], "image", tmp_path / "image.bin").read_bytes()
    key = public_key_pem(live["server"].settings.signing_key)
    info = inspect_image(image, key, slot_size(get_target("cortex-m4")))
    assert info.version == b["version"] and b["report"]["image"]["sha256"] == info.sha256


@pytest.mark.slow  # 40 s on 2-core CI; the staged rollouts below run on fewer devices in the fast suite
def test_rollout_to_200_devices(live):
    client, b = live["client"], live["v1"]
    ids = [f"fleet-{i:03d}" for i in range(200)]
    agents = start_agents(live["server"], live["root"], ids, group="fleet")
    try:
        d = client.deploy(b["id"], group="fleet", stages=[10, 50, 100], success_threshold=0.95, error_threshold=0.05)
        d = client.wait_deployment(d["id"], timeout=600)
        assert d["state"] == "succeeded", d["reason"]
        assert d["summary"]["counts"] == {"succeeded": 200}
        assert [len(s["statuses"]) for s in d["summary"]["stages"]] == [20, 80, 100]
        assert all(j["instructions"] == b["report"]["instructions"] for j in d["jobs"])  # measured by every device
        assert all(a.version == b["version"] and not a.booted.test for a in agents)
        devices = {x["id"]: x for x in client.devices() if x["group"] == "fleet"}
        assert all(devices[i]["firmware_version"] == b["version"] and devices[i]["state"] == "online" for i in ids)
    finally:
        _stop(agents)


def test_rollout_halts_at_the_error_threshold(live, capsys):
    client, b = live["client"], live["v1"]
    ids = [f"canary-{i:02d}" for i in range(30)]
    faults = {ids[0]: ("selftest",), ids[1]: ("selftest",)}  # 2 of the 3 devices of the first stage fail
    agents = start_agents(live["server"], live["root"], ids, group="canary", faults=faults)
    try:
        d = client.deploy(b["id"], group="canary", stages=[10, 50, 100], error_threshold=0.2)
        d = client.wait_deployment(d["id"], timeout=300)
        assert d["state"] == "halted" and "of 3 notified devices failed" in d["reason"]
        by_id = {j["device_id"]: j for j in d["jobs"]}
        assert by_id[ids[0]]["status"] == "failed" and "self-test failed" in by_id[ids[0]]["message"]
        assert by_id[ids[2]]["status"] == "succeeded"
        for a in agents[3:]:  # past the threshold: never notified, never touched
            assert by_id[a.device_id]["status"] == "cancelled"
            assert a.events == [] and a.version is None
        for a in agents[:2]:  # the failing devices reverted (they had no image before)
            assert a.version is None and a.flash.record().pending == 0xFF
        # drawn by the CLI; a halted rollout exits 1
        from tinymlaas.cli import main

        server = live["server"]
        assert main(["rollouts", "status", str(d["id"]), "--server", server.url, "--token", server.admin_token]) == 1
        out = capsys.readouterr().out
        assert "HALTED" in out and "stage 1 (  3 dev) [X" in out and "stage 2" in out
    finally:
        _stop(agents)


def test_renode_board_devices_take_renode_builds_and_refuse_others(live):
    """Devices whose board is Renode's STM32F407 model: a build requested for Renode is linked for that part and
    verified on it; they self-test it on the model and confirm it. An image linked for the QEMU machine fails their
    self-test (it names why) and they revert to the image they ran."""
    client, server = live["client"], live["server"]
    m = client.upload_model(model_path("ad01_int8"))
    b = client.wait_build(client.request_build(m["id"], "cortex-m4", emulator="renode")["id"], timeout=300)
    assert b["state"] == "done" and b["report"]["runner"] == "renode" and b["report"]["verified"], b
    assert b["request"]["emulator"] == "renode"
    agents = start_agents(server, live["root"], ["renode-0", "renode-1"], group="renode", board="renode")
    try:
        d = client.wait_deployment(client.deploy(b["id"], group="renode")["id"], timeout=300)
        assert d["state"] == "succeeded", d["reason"]
        # the instructions every device measured on the part's model are the build's
        assert [j["instructions"] for j in d["jobs"]] == [b["report"]["instructions"]] * 2
        assert all(a.version == b["version"] for a in agents)
        qemu_build = build(client, model_path("ad01_int8"))  # newer, linked for the QEMU machine
        d = client.wait_deployment(client.deploy(qemu_build["id"], group="renode", error_threshold=0.9)["id"],
                                   timeout=300)
        assert {j["status"] for j in d["jobs"]} == {"failed"}
        assert all("linked for the qemu machine" in j["message"] for j in d["jobs"])
        assert all(a.version == b["version"] and not a.booted.test for a in agents)  # reverted to the Renode build
    finally:
        _stop(agents)


def test_a_silent_device_times_out_and_the_rollout_finishes(live):
    """A registered device that never comes online: its job times out (job_timeout, the shortest allowed) instead of
    holding the last stage open forever, and the rollout ends with the others updated."""
    client, b = live["client"], live["v1"]
    client.register_device("silent-00", "cortex-m4", group="silent")  # no agent: it never answers
    agents = start_agents(live["server"], live["root"], ["silent-01", "silent-02"], group="silent")
    try:
        d = client.deploy(b["id"], group="silent", error_threshold=0.5, job_timeout=10)
        d = client.wait_deployment(d["id"], timeout=120)
        assert d["state"] == "succeeded" and d["summary"]["counts"] == {"succeeded": 2, "timed_out": 1}
        assert {j["device_id"]: j["status"] for j in d["jobs"]}["silent-00"] == "timed_out"
    finally:
        _stop(agents)


def test_downgrade_refused_unless_forced_and_rollback(live):
    client, v1, v2 = live["client"], live["v1"], live["v2"]
    agents = start_agents(live["server"], live["root"], ["ab-0", "ab-1", "ab-2"], group="ab")
    try:
        assert client.wait_deployment(client.deploy(v1["id"], group="ab")["id"])["state"] == "succeeded"
        dep2 = client.wait_deployment(client.deploy(v2["id"], group="ab")["id"])
        assert dep2["state"] == "succeeded" and all(a.version == v2["version"] for a in agents)
        # the devices ran v1, which this server shipped: each got a patch from it, a small part of the image
        image_bytes = v2["report"]["image"]["size"]
        assert {j["payload"] for j in dep2["jobs"]} == {"delta"}, dep2["jobs"]
        assert all(j["payload_bytes"] < 0.05 * image_bytes for j in dep2["jobs"]), dep2["jobs"]
        assert dep2["summary"]["bytes"]["total"] == sum(j["payload_bytes"] for j in dep2["jobs"])
        for a in agents:  # what each booted is byte for byte the signed image of v2
            running = a.bootloader.image_in(a.booted.slot)
            assert hashlib.sha256(running).hexdigest() == v2["artifacts"]["image"]
        with pytest.raises(ApiError) as e:
            client.deploy(v1["id"], group="ab")
        assert e.value.status == 409 and e.value.problem["field"] == "force" and "downgrade" in str(e.value)
        back = client.rollback(dep2["id"])
        assert back["force"] and back["rollback_of"] == dep2["id"] and back["build_id"] == v1["id"]
        assert back["id"] > dep2["id"]  # a new deployment, with a higher sequence number
        assert client.wait_deployment(back["id"])["state"] == "succeeded"
        assert all(a.version == v1["version"] for a in agents)
    finally:
        _stop(agents)


def test_payloads_are_the_smallest_valid_one_and_a_wrong_base_falls_back_to_the_full_image(live):
    """A device the server shipped nothing to gets the image compressed; a device the server believes runs v1 but
    that runs v2 checks the patch's base against its running image, fetches the full image instead and says so."""
    from server.db import Device

    server, client, v1, v2 = live["server"], live["client"], live["v1"], live["v2"]
    agent = start_agents(server, live["root"], ["payload-0"], group="payload")[0]
    try:
        first = client.wait_deployment(client.deploy(v2["id"], group="payload")["id"])
        job = first["jobs"][0]
        assert first["state"] == "succeeded" and job["payload"] == "compressed", job
        assert job["payload_bytes"] < v2["report"]["image"]["size"]
        with server.app.extensions["tinymlaas"].sessions() as s:  # the server's record goes wrong
            device = s.scalars(select(Device).where(Device.name == "payload-0")).one()
            device.build_id, device.image_build_id = v1["id"], None  # None: the firmware image is build_id's
            s.commit()
        again = client.wait_deployment(client.deploy(v2["id"], group="payload")["id"])
        job = again["jobs"][0]
        assert again["state"] == "succeeded", job
        assert job["payload"].startswith("full (") and job["payload_bytes"] == v2["report"]["image"]["size"], job
        assert agent.version == v2["version"]
    finally:
        _stop([agent])


def test_a_retrained_model_goes_out_as_a_model_only_update(live, tmp_path):
    """Builds of one architecture (each retrained: every weight and its scale changed) have the same code part, so
    a device running one gets the next one's model image alone: written to a model slot, its self-test bit-exact
    on the first build's code with the new model; the next model-only update patches the model image the device
    runs. A device of the same target running a model of another architecture gets the full image."""
    from tests.helpers import quantized_layers as q
    from tinymlaas.ota.slots import NO_SLOT

    server, client = live["server"], live["client"]
    store = server.app.extensions["tinymlaas"].store
    names = {"fc-a": 7, "fc-other": 7, "fc-b": 8, "fc-c": 9}
    for name, seed in names.items():
        (tmp_path / f"{name}.tflite").write_bytes(q.fully_connected(seed, [1, 37], 12 if name == "fc-other" else 11, 1))
    first, other, retrained, again = (build(client, tmp_path / f"{n}.tflite") for n in names)
    abi = lambda b: b["report"]["image"]["abi"]
    assert abi(first) == abi(retrained) == abi(again) != abi(other)
    agents = start_agents(server, live["root"], ["model-0", "model-1"], group="model-a")
    other_agent = start_agents(server, live["root"], ["model-2"], group="model-o")[0]
    try:
        assert client.wait_deployment(client.deploy(first["id"], group="model-a")["id"])["state"] == "succeeded"
        assert client.wait_deployment(client.deploy(other["id"], group="model-o")["id"])["state"] == "succeeded"
        for new, base in ((retrained, first["artifacts"]["image"]), (again, retrained["artifacts"]["model_image"])):
            d = client.wait_deployment(client.deploy(new["id"], group="model-a")["id"])
            assert d["state"] == "succeeded", d["jobs"]
            assert {j["payload"] for j in d["jobs"]} == {"model"}, d["jobs"]
            sizes = {k: store.path(v).stat().st_size for k, v in client.build(new["id"])["artifacts"].items()}
            sent = d["jobs"][0]["payload_bytes"]  # the smaller of the model image compressed and patched
            assert sent == min(sizes["model_xz"], sizes[f"model_from_{base[:16]}"]), (sent, sizes)
            delta = sizes[f"delta_from_{first['id']}"]  # from the firmware image the devices still run
            assert sent <= 1.05 * delta and sent < 0.2 * sizes["image_xz"], (sent, sizes)
            assert d["summary"]["bytes"] == {"total": 2 * sent, "model": 2 * sent}
            for a, job in zip(agents, d["jobs"]):
                assert a.version == new["version"] and a.booted.model_slot != NO_SLOT and not a.booted.test
                # the first build's firmware, byte for byte, runs the new model: its verified outputs (the self-test
                # passed) and its instruction count
                assert hashlib.sha256(a.bootloader.image_in(a.booted.slot)).hexdigest() == first["artifacts"]["image"]
                assert job["instructions"] == new["report"]["instructions"]
        # the server believes model-2 runs the first build; it runs a model of another architecture: the model
        # payload's base is not what its model runs from, so it takes the full image
        with server.app.extensions["tinymlaas"].sessions() as s:
            from server.db import Device

            device = s.scalars(select(Device).where(Device.name == "model-2")).one()
            device.build_id, device.image_build_id, device.group = first["id"], None, "model-a2"
            s.commit()
        d = client.wait_deployment(client.deploy(again["id"], group="model-a2")["id"])
        job = d["jobs"][0]
        assert d["state"] == "succeeded" and job["payload"] == "full (wrong-base model)", job
        assert other_agent.version == again["version"] and other_agent.booted.model_slot == NO_SLOT
    finally:
        _stop([*agents, other_agent])


def _bad_build(live, tmp_path, kind: str) -> int:
    """A finished build whose image artifact is bad in one way (what a compromised or buggy server could send)."""
    server, v2 = live["server"], live["v2"]
    ctx = server.app.extensions["tinymlaas"]
    store = ctx.store
    good = store.read(v2["artifacts"]["image"])
    payload = store.path(v2["artifacts"]["payload"])
    slot = slot_size(get_target("cortex-m4"))
    if kind == "bad-signature":
        data = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]
    elif kind == "truncated":
        data = good[: len(good) // 2]
    elif kind == "oversized":
        data = good + bytes(slot)
    elif kind == "downgrade":  # signed by the server's key, but older than what the device runs
        sign_image(payload, server.settings.signing_key, "0.9.0", slot, tmp_path / "old.bin")
        data = (tmp_path / "old.bin").read_bytes()
    else:  # unknown key
        from tinymlaas.ota.package import generate_key

        sign_image(payload, generate_key(tmp_path / "rogue.pem"), "9.0.0", slot, tmp_path / "rogue.bin")
        data = (tmp_path / "rogue.bin").read_bytes()
    with ctx.sessions() as s:
        row = s.get(Build, v2["id"])
        bad = Build(model_id=row.model_id, target=row.target, version="9.9.9+0", state="done",
                    report={**row.report, "image": {"size": len(data)}},
                    artifacts={**{k: v for k, v in row.artifacts.items() if k in ("payload", "selftest")},
                               "image": store.put_bytes(data)}, owner_id=row.owner_id,
                    org_id=row.org_id)
        s.add(bad)
        s.commit()
        return bad.id


@pytest.mark.parametrize("kind, reason", [("bad-signature", "bad-signature"), ("truncated", "truncated"),
                                          ("oversized", "oversized"), ("downgrade", "downgrade"),
                                          ("unknown-key", "bad-signature")])
def test_device_rejects_bad_images_and_keeps_running(live, tmp_path, kind, reason):
    client, v1 = live["client"], live["v1"]
    group = f"bad-{kind}"
    agents = start_agents(live["server"], live["root"], [f"{group}-0"], group=group)
    try:
        assert client.wait_deployment(client.deploy(v1["id"], group=group)["id"])["state"] == "succeeded"
        d = client.wait_deployment(client.deploy(_bad_build(live, tmp_path, kind), group=group,
                                                 error_threshold=1.0)["id"])
        job = d["jobs"][0]
        assert job["status"] == "rejected" and job["step"] == "verify", job
        assert reason in job["message"]
        assert agents[0].version == v1["version"] and not agents[0].booted.test  # still the old build
    finally:
        _stop(agents)


def test_dropped_connection_mid_download_resumes(live, tmp_path):
    server, client, v1 = live["server"], live["client"], live["v1"]
    proxy = CuttingProxy(server.bound_port, after=100_000, cuts=1)
    old = server.settings.public_url
    server.settings.public_url = f"http://127.0.0.1:{proxy.port}"
    agents = start_agents(server, live["root"], ["resume-0"], group="resume")
    try:
        d = client.wait_deployment(client.deploy(v1["id"], group="resume")["id"])
        assert d["state"] == "succeeded"
        assert proxy.cut == 1 and agents[0].version == v1["version"]
        assert agents[0].state["done_jobs"][d["jobs"][0]["id"]]["status"] == "SUCCEEDED"
        assert agents[0].resumed_downloads >= 1
    finally:
        server.settings.public_url = old
        proxy.close()
        _stop(agents)


@pytest.mark.parametrize("point", ["first-chunk", "last-chunk", "pending-record", "tried-record", "confirm-record"])
def test_device_reset_during_update_recovers(live, point):
    """A power cut at a write point of the update: the restarted device boots a valid image and finishes."""
    server, client, v1, v2 = live["server"], live["client"], live["v1"], live["v2"]
    group = f"reset-{point}"
    agent = start_agents(server, live["root"], [f"{group}-0"], group=group)[0]
    assert client.wait_deployment(client.deploy(v1["id"], group=group)["id"])["state"] == "succeeded"
    assert (agent.dir / "agent.json").stat().st_mode & 0o777 == 0o600  # it holds the device's secret
    chunks = -(-v2["report"]["image"]["size"] // 4096)
    # writes of one update: header invalidation, chunks, pending record, tried record, confirm record
    offset = {"first-chunk": 2, "last-chunk": 1 + chunks, "pending-record": 2 + chunks,
              "tried-record": 3 + chunks, "confirm-record": 4 + chunks}[point]
    agent.flash.fail_at = agent.flash.writes + offset
    dep = client.deploy(v2["id"], group=group)
    wait_for(lambda: agent.crashed is not None, 60, "the injected reset")
    agent.stop(clean=False)
    reborn = Agent(server.url, agent.device_id, "cortex-m4", agent.dir, group=group)
    reborn.start()
    try:
        assert reborn.booted is not None and reborn.booted.info.version in (v1["version"], v2["version"])
        d = client.wait_deployment(dep["id"], timeout=120)
        job = d["jobs"][0]
        if point == "confirm-record":  # reset after the test boot, before the confirm: MCUboot reverts
            assert job["status"] == "failed" and "reverted" in job["message"]
            assert reborn.version == v1["version"]
        else:
            assert job["status"] == "succeeded", job
            assert reborn.version == v2["version"]
        assert not reborn.booted.test
    finally:
        reborn.stop()


def test_devices_are_confined_to_their_own_topics_and_the_will_marks_them_lost(live):
    server, client = live["server"], live["client"]
    agents = start_agents(server, live["root"], ["acl-a", "acl-b"], group="acl")
    a, b = agents
    # another organisation names a device 'acl-b' too: a name is unique in its organisation only, and the broker
    # keeps the two apart (each logs in with its own key)
    with server.app.extensions["tinymlaas"].sessions() as s:
        _, rival_token = create_user(s, "rival-admin", create_organization(s, "rival"))
        s.commit()
    twin = Agent(server.url, "acl-b", "cortex-m4", live["root"] / "rival-acl-b", rival_token, "acl").start()
    wait_for(twin.connected.is_set, 60, "the other organisation's acl-b to connect")
    user_a, user_b, user_twin = (x.state["mqtt"]["username"] for x in (a, b, twin))
    assert len({user_a, user_b, user_twin}) == 3
    got = []
    a.stop()  # its login is the spy's: a client's id must be its user name (so the spy would take a's session over)
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user_a)
    spy.username_pw_set(user_a, a.state["mqtt"]["password"])
    spy.on_message = lambda c, u, m: got.append(m.topic)
    try:
        spy.connect("127.0.0.1", server.settings.mqtt_port)
        spy.loop_start()
        wait_for(spy.is_connected, 5, "the spy's login")
        for victim in (b, twin):
            root = victim.state["mqtt"]["topic_root"]
            spy.subscribe(f"{root}/#", qos=1)
            spy.publish(f"{root}/jobs/dep1-acl-b/update", b'{"status": "SUCCEEDED"}', qos=1)
            victim._publish("telemetry", {"instructions": 1})
        time.sleep(1.0)
        own = a.state["mqtt"]["topic_root"] + "/"
        assert [t for t in got if not t.startswith(own)] == []  # its own retained state at most
        for user, other in ((user_b, twin), (user_twin, b)):  # one organisation's secret is not the other's
            wrong = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
            wrong.username_pw_set(user, other.state["mqtt"]["password"])
            with pytest.raises(TimeoutError):  # the broker answers CONNACK "not authorized"
                wrong.connect("127.0.0.1", server.settings.mqtt_port)
                wrong.loop_start()
                wait_for(lambda w=wrong: w.is_connected(), 2, "a refused login")
            wrong.loop_stop()
        b.stop(clean=False)  # a power cut: the broker publishes its will
        wait_for(lambda: next(d for d in client.devices() if d["id"] == "acl-b")["state"] == "lost", 90, "lost")
        rival = Client(server.url, rival_token)
        assert [(d["id"], d["state"]) for d in rival.devices()] == [("acl-b", "online")]  # its own acl-b, untouched
    finally:
        spy.loop_stop()
        a.stop()
        twin.stop()


def test_killed_worker_build_is_resumed(live):
    server, client = live["server"], live["client"]
    for p in server.worker_procs:
        p.terminate()
        p.wait(20)
    server.worker_procs = []
    m = client.upload_model(model_path("kws_ref_model"))
    b = client.request_build(m["id"], "rv32imac")
    assert client.build(b["id"])["state"] == "queued"  # no worker: it waits, persisted in the queue
    worker = start_worker(server.settings)
    wait_for(lambda: client.build(b["id"])["state"] in ("building", "emulating"), 120, "the build to start")
    os.kill(worker.pid, signal.SIGKILL)  # the worker dies mid-build
    worker.wait()
    assert client.build(b["id"])["state"] in ("building", "emulating")
    server.worker_procs = [start_worker(server.settings)]
    done = client.wait_build(b["id"], timeout=300)
    assert done["state"] == "done" and done["report"]["verified"]
    ctx = server.app.extensions["tinymlaas"]
    with ctx.sessions() as s:
        assert s.scalar(select(Build.attempts).where(Build.id == b["id"])) == 2


def test_a_worker_started_mid_build_does_not_run_it_again(live):
    """Before leases, a worker that started (a restarted server's) requeued every build left running, so a build still
    running in another worker ran twice at once. Now the running build keeps its lease and runs exactly once."""
    server, client = live["server"], live["client"]
    m = client.upload_model(model_path("kws_ref_model"))
    b = client.request_build(m["id"], "rv32imac")
    wait_for(lambda: client.build(b["id"])["state"] in ("building", "emulating"), 120, "the build to start")
    extra = start_worker(server.settings)  # recovers at start and then every lease length (4 s here)
    try:
        done = client.wait_build(b["id"], timeout=300)
        assert done["state"] == "done" and done["report"]["verified"]
        ctx = server.app.extensions["tinymlaas"]
        with ctx.sessions() as s:
            assert s.scalar(select(Build.attempts).where(Build.id == b["id"])) == 1
    finally:
        extra.terminate()
        extra.wait(20)


def test_mosquitto_killed_mid_rollout_is_restarted_and_the_rollout_completes(tmp_path, models_dir):
    """With Mosquitto (the production broker, our password file and ACLs): kill -9 it mid-rollout. Before, nothing
    restarted it and /health still said ok."""
    import requests

    from server.broker import MosquittoBroker

    if MosquittoBroker.binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    server = start_server(tmp_path / "data", mqtt="mosquitto")
    client = Client(server.url, server.admin_token)
    agents = []
    try:
        b = build(client, model_path("ad01_int8"))
        agents = start_agents(server, tmp_path, [f"mq-{i:02d}" for i in range(12)], group="mq")
        dep = client.deploy(b["id"], group="mq", stages=[25, 100])
        wait_for(lambda: any(j["status"] == "succeeded" for j in client.deployment(dep["id"])["jobs"]), 120,
                 "the first device updated")
        server.broker.proc.kill()  # -9: retained messages and sessions are gone; `serve` restarts it
        server.worker_procs[0].kill()  # and a build worker, for good measure
        d = client.wait_deployment(dep["id"], timeout=300)
        assert d["state"] == "succeeded" and d["summary"]["counts"] == {"succeeded": 12}
        assert all(a.version == b["version"] for a in agents)
        wait_for(lambda: requests.get(f"{server.url}/api/v1/health", timeout=10).status_code == 200, 30, "health ok")
        assert requests.get(f"{server.url}/api/v1/health", timeout=10).json()["restarts"] == {"broker": 1,
                                                                                             "workers": 1}
    finally:
        _stop(agents)
        server.stop()


def test_cli_against_the_live_server(live, capsys, tmp_path):
    from tinymlaas.cli import main

    server, v1 = live["server"], live["v1"]
    api = ["--server", server.url, "--token", server.admin_token]
    assert main(["devices", "register", "cli-dev-1", "--target", "cortex-m7", "--group", "cli", *api]) == 0
    assert "registered cli-dev-1 (cortex-m7, group cli); MQTT user 1.cli-dev-1 password" in capsys.readouterr().out
    assert main(["devices", "list", "--group", "cli", *api]) == 0
    assert "cli-dev-1" in capsys.readouterr().out
    assert main(["builds", "status", str(v1["id"]), *api]) == 0
    assert "instructions/inference" in capsys.readouterr().out
    assert main(["builds", "download", str(v1["id"]), "--artifact", "report", "-o", str(tmp_path / "r.json"), *api]) == 0
    assert (tmp_path / "r.json").exists()
    # refusals: exit 2, one line naming what and why
    assert main(["builds", "request", "--model", "1", "--target", "cortex-m99", *api]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[target]" in err[0] and "cortex-m99" in err[0]
    assert main(["builds", "request", "--model", str(v1["model_id"]), "--target", "cortex-m7", "--tune-trials", "8",
                 *api]) == 2  # host options are for host targets: said, nothing queued
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[host.tune_trials]" in err[0] and "not cortex-m7" in err[0]
    assert main(["devices", "list", "--server", server.url, "--token", "tmk_wrong"]) == 2
    assert "401" in capsys.readouterr().err
    assert main(["deploy", str(v1["id"]), "--group", "cli", "--stages", "50,20", *api]) == 2
    assert "[stages]" in capsys.readouterr().err
    # a rollout of its own (a device with no agent behind it: notified, never answering), cancelled and drawn
    assert main(["devices", "register", "cli-dev-2", "--target", "cortex-m4", "--group", "cli", *api]) == 0
    capsys.readouterr()
    dep = live["client"].deploy(v1["id"], group="cli")
    assert main(["rollouts", "cancel", str(dep["id"]), *api]) == 0
    out = capsys.readouterr().out
    assert "CANCELLED" in out and "cancelled by admin" in out and "stage 1 (  1 dev) [." in out
    assert main(["rollouts", "cancel", str(dep["id"]), *api]) == 2  # not in progress any more
    assert "cancelled" in capsys.readouterr().err
    assert main(["rollouts", "status", str(dep["id"]), "--history", *api]) == 0
    history = capsys.readouterr().out.split("history:")[1].strip().splitlines()
    assert [line.split()[2] for line in history] == ["created", "stage", "cancelled"], history
    assert "1 device(s) notified" in history[1] and "cancelled by admin" in history[2]
    # uploads: a file that is not there, calibration samples for a model that is not Keras
    assert main(["models", "upload", str(tmp_path / "missing.tflite"), *api]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "c.npz").write_bytes(b"samples")
    assert main(["models", "upload", str(model_path("ad01_int8")), "--quantize", "int8", "--calibration",
                 str(tmp_path / "c.npz"), *api]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[calibration]" in err[0] and "built as it is" in err[0], err
    # tenants: a user, a narrower token, its revocation; a second organisation made by the operator sees nothing
    assert main(["users", "create", "dana", "--role", "viewer", *api]) == 0
    assert "user dana (viewer); token tmk_" in capsys.readouterr().out
    assert main(["tokens", "create", "ci", "--scopes", "read", "--expires-in-days", "3", *api]) == 0
    made = capsys.readouterr().out
    token = made.split(": ")[-1].split()[0]
    assert "'ci' (read; expires " in made and token.startswith("tmk_")
    assert main(["whoami", "--server", server.url, "--token", token]) == 0
    assert "admin (admin) in default; token 'ci' may read" in capsys.readouterr().out
    assert main(["devices", "register", "cli-dev-3", "--target", "cortex-m4", "--server", server.url, "--token",
                 token]) == 2
    assert "403" in capsys.readouterr().err
    assert main(["tokens", "list", *api]) == 0
    listed = capsys.readouterr().out
    assert " ci " in listed and "active" in listed and token not in listed
    token_id = next(line.split()[0] for line in listed.splitlines() if " ci " in line)
    assert main(["tokens", "revoke", token_id, *api]) == 0
    assert main(["whoami", "--server", server.url, "--token", token]) == 2
    assert "revoked" in capsys.readouterr().err
    assert main(["orgs", "create", "initech", "--admin", "peter", "--data", str(server.settings.data_dir)]) == 0
    peter = capsys.readouterr().out.split("token ")[-1].split()[0]
    assert main(["devices", "list", "--server", server.url, "--token", peter]) == 0
    assert "cli-dev" not in capsys.readouterr().out
    assert main(["orgs", "create", "initech", "--admin", "paul", "--data", str(server.settings.data_dir)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_whole_flow_on_postgresql(database_url, tmp_path, models_dir):
    """Server, worker process and coordinator on a real PostgreSQL: build, staged rollout, fleet state."""
    server = start_server(tmp_path / "data", database_url=database_url)
    agents = []
    try:
        assert server.settings.database_url.startswith("postgresql")
        client = Client(server.url, server.admin_token)
        b = build(client, model_path("ad01_int8"), target="rv32imac")
        agents = start_agents(server, tmp_path, [f"pg-{i}" for i in range(4)], target="rv32imac", group="pg")
        d = client.wait_deployment(client.deploy(b["id"], group="pg", stages=[50, 100])["id"], timeout=300)
        assert d["state"] == "succeeded" and d["summary"]["counts"] == {"succeeded": 4}
        assert {x["firmware_version"] for x in client.devices("pg")} == {b["version"]}
    finally:
        _stop(agents)
        server.stop()


def test_cycles_a_device_reports_land_in_the_measurement_database(live):
    """A board's own cycle counter, over telemetry: a row marked as device-measured, for the build it runs only."""
    from tinymlaas.measure.database import MeasurementStore

    server, client, v1, v2 = live["server"], live["client"], live["v1"], live["v2"]
    agent = start_agents(server, live["root"], ["cyc-0"], group="cyc")[0]
    try:
        assert client.wait_deployment(client.deploy(v1["id"], group="cyc")["id"])["state"] == "succeeded"
        agent._publish("telemetry", {"build": v2["id"], "cycles": 99})  # a build never sent to it: ignored
        agent._publish("telemetry", {"build": v1["id"], "instructions": 5, "cycles": 123456})
        store = MeasurementStore(server.settings.database_url)
        key = agent.state["mqtt"]["username"]  # the measurement names the device by its key (unique service-wide)
        wait_for(lambda: store.rows(device_id=key), 10, "the device's row")
        time.sleep(0.5)
        rows = store.rows(device_id=key)
        assert [(r.cycles, r.cycles_kind, r.build_id, r.target) for r in rows] == [
            (123456.0, "device", v1["id"], "cortex-m4")]
        # the service's own build of v1 is a row too, with its exact instruction count
        built = store.rows(source="service", build_id=v1["id"])
        assert len(built) == 1 and built[0].instructions == v1["report"]["instructions"]
    finally:
        agent.stop()


def test_telemetry_is_bounded_in_size_and_rate(live):
    """A 1 MB telemetry message was stored as it came, and a device could send as many as it liked: now neither is
    stored past 4 KB, and a device gets a burst of 10 messages, then one a second."""
    from server.coordinator import TELEMETRY_BURST

    server = live["server"]
    agent = start_agents(server, live["root"], ["tel-0"], group="tel")[0]

    def stored() -> list[dict]:
        with server.app.extensions["tinymlaas"].sessions() as s:
            return [t.data for t in s.scalars(select(Telemetry).where(
                Telemetry.device_id == agent.state["mqtt"]["username"]))]

    try:
        agent._publish("telemetry", {"blob": "x" * 1_000_000})
        agent._publish("telemetry", {"seq": -1})
        wait_for(lambda: stored(), 10, "the small message")
        assert stored() == [{"seq": -1}]
        started = time.monotonic()
        for k in range(40):
            agent._publish("telemetry", {"seq": k})
        time.sleep(2.0)
        seconds = time.monotonic() - started
        kept = [d["seq"] for d in stored() if d["seq"] >= 0]
        assert kept == sorted(kept) and kept[: TELEMETRY_BURST - 1] == list(range(TELEMETRY_BURST - 1))
        assert TELEMETRY_BURST - 1 <= len(kept) <= TELEMETRY_BURST + seconds + 1, (len(kept), seconds)
    finally:
        agent.stop()


def test_hung_parts_are_named_and_restarted(tmp_path):
    """A SIGSTOPped broker left /health ok for 45 s and was never restarted; a stopped worker was never reported.
    Now /health names both within seconds (the broker: its process state, and the coordinator's heartbeat through
    it), and the supervisor replaces them."""
    import shutil
    import threading

    import requests

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    server = start_server(tmp_path / "data", mqtt="mosquitto", supervise_every=None)
    broker, worker = server.broker.proc.pid, server.worker_procs[0].pid
    try:
        os.kill(broker, signal.SIGSTOP)
        os.kill(worker, signal.SIGSTOP)
        checks = requests.get(f"{server.url}/api/v1/health", timeout=10).json()["checks"]
        assert f"pid {broker}) is stopped" in checks["broker"] and f"stopped (pid {worker})" in checks["workers"]
        os.kill(broker, signal.SIGCONT)  # a broker hung another way: only the heartbeat notices
        server.coordinator.last_echo -= 60
        checks = requests.get(f"{server.url}/api/v1/health", timeout=10).json()["checks"]
        assert "not passed a heartbeat on" in checks["broker"]
        wait_for(lambda: requests.get(f"{server.url}/api/v1/health", timeout=10).json()["checks"]["broker"] == "ok",
                 10, "the heartbeat again")
        os.kill(broker, signal.SIGSTOP)
        server.supervise_every = 0.5
        threading.Thread(target=server._supervise, daemon=True).start()  # the supervisor, as serve runs it
        wait_for(lambda: getattr(server.broker.proc, "pid", broker) != broker  # proc: None while it restarts
                 and server.worker_procs[0].pid != worker, 30, "the supervisor's restarts")
        wait_for(lambda: requests.get(f"{server.url}/api/v1/health", timeout=10).status_code == 200, 30,
                 "health ok again")
        assert server.restarts == {"broker": 1, "workers": 1}
    finally:
        for pid in (broker, worker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.stop()


def test_health_names_what_is_down(tmp_path):
    """/health was 'ok' with Mosquitto killed -9: now every part is checked and a failing one makes it 503 (here with
    the supervisor off, which would restart them within a second)."""
    import requests

    from server.broker import MosquittoBroker

    if MosquittoBroker.binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    server = start_server(tmp_path / "data", mqtt="mosquitto", supervise_every=None)
    try:
        r = requests.get(f"{server.url}/api/v1/health", timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok", "checks": {"broker": "ok", "mqtt": "ok",
                                                                                 "workers": "ok", "storage": "ok"},
                                                     "restarts": {"broker": 0, "workers": 0}}
        server.broker.proc.kill()
        server.worker_procs[0].kill()
        server.broker.proc.wait()
        server.worker_procs[0].wait()
        r = requests.get(f"{server.url}/api/v1/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "degraded"
        checks = r.json()["checks"]
        assert "not running" in checks["broker"] and "1 of 1 build workers exited" in checks["workers"]
    finally:
        server.stop()
