"""The REST API through the real app and a real database (SQLite and PostgreSQL): outcomes and refusals."""

import io
import json

import pytest
from sqlalchemy import func, select

from server.config import Settings
from server.db import Build, Deployment, Device, DeviceJob, Model, alembic_config
from server.services.tenants import create_user
from tests.helpers.api import done_build
from tests.helpers.paths import CORPUS_MODELS, CORPUS_OPS, model_path


def counts(app) -> dict:
    with app.extensions["tinymlaas"].sessions() as s:
        return {m.__name__: s.scalar(select(func.count()).select_from(m))
                for m in (Device, Model, Build, Deployment, DeviceJob)}


def artifacts(app) -> list:
    return sorted(p.name for p in app.extensions["tinymlaas"].store.root.rglob("*") if p.is_file())


def assert_problem(r, status: int, field: str | None = None, words: str = ""):
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["status"] == status and body["title"] and body["detail"]
    if field:
        assert body.get("field") == field, body
    assert words.lower() in body["detail"].lower(), body


def test_register_list_and_get_devices(client):
    r = client.post("/api/v1/devices", json={"id": "m4-001", "target": "cortex-m4", "group": "lab"}, headers=client.auth)
    assert r.status_code == 201
    body = r.get_json()
    assert body["id"] == "m4-001" and body["state"] == "registered" and body["group"] == "lab"
    assert body["flash_bytes"] == 2 * 1024 * 1024 and body["mqtt"]["username"] == "1.m4-001"  # <organisation id>.<name>
    assert body["mqtt"]["password"] and "BEGIN PUBLIC KEY" in body["signing_key"]
    assert [d["id"] for d in client.get("/api/v1/devices?group=lab", headers=client.auth).get_json()] == ["m4-001"]
    assert client.get("/api/v1/devices?group=other", headers=client.auth).get_json() == []
    got = client.get("/api/v1/devices/m4-001", headers=client.auth).get_json()
    assert got["state"] == "registered" and "mqtt" not in got  # the secret is shown once only
    assert_problem(client.post("/api/v1/devices", json={"id": "m4-001", "target": "cortex-m4"}, headers=client.auth),
                   409, "id", "already registered")


def test_device_list_rows_are_what_the_schema_dumps(client, app):
    """The list is serialized from columns (the fast path), a single device by the schema: the same fields and
    values, a seen device's time included."""
    import datetime as dt

    from server.db import Device

    for i in range(3):
        client.post("/api/v1/devices", json={"id": f"row-{i}", "target": "rv32imac", "group": "rows"},
                    headers=client.auth)
    with app.extensions["tinymlaas"].sessions() as s:
        d = s.get(Device, "1.row-1")  # its key: <organisation id>.<name>
        d.last_seen, d.firmware_version, d.instructions, d.state = dt.datetime(2026, 12, 7, 6, 5, 4, 321), "1.2.3", 99, "online"
        s.commit()
    listed = client.get("/api/v1/devices?group=rows", headers=client.auth).get_json()
    assert [d["id"] for d in listed] == ["row-0", "row-1", "row-2"]
    for row in listed:
        assert row == client.get(f"/api/v1/devices/{row['id']}", headers=client.auth).get_json()
    assert listed[1]["last_seen"] == "2026-12-07T06:05:04.000321+00:00" and listed[1]["instructions"] == 99


def test_model_upload_and_build_request(client, app, models_dir):
    data = model_path("ad01_int8").read_bytes()
    r = client.post("/api/v1/models", data={"file": (io.BytesIO(data), "ad01_int8.tflite")}, headers=client.auth)
    assert r.status_code == 201, r.get_json()
    m = r.get_json()
    assert m["quantized"] and m["size"] == len(data) and m["operators"] == ["FULLY_CONNECTED"]
    assert m["sha256"] in artifacts(app)
    r = client.post("/api/v1/builds", json={"model_id": m["id"], "target": "rv32imac",
                                             "constraints": {"max_ram": 65536}}, headers=client.auth)
    assert r.status_code == 202
    b = r.get_json()
    assert b["state"] == "queued" and b["version"] == f"1.0.{b['id']}+0" and b["constraints"] == {"max_ram": 65536}
    assert client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()["state"] == "queued"
    assert_problem(client.get(f"/api/v1/builds/{b['id']}/artifacts/image", headers=client.auth), 409, None, "queued")
    r = client.post(f"/api/v1/builds/{b['id']}/cancel", headers=client.auth)
    assert r.get_json()["state"] == "cancelled"
    assert_problem(client.post(f"/api/v1/builds/{b['id']}/cancel", headers=client.auth), 409, None, "cancelled")


BAD_REQUESTS = {
    "unknown target": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m, "target": "cortex-m99"},
                                           headers=c.auth), 422, "target", "unknown target 'cortex-m99'"),
    "unknown model": (lambda c, m: c.post("/api/v1/builds", json={"model_id": 999, "target": "cortex-m4"},
                                          headers=c.auth), 422, "model_id", "no model 999"),
    "missing field": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m}, headers=c.auth),
                      422, "target", "missing data"),
    "wrong type": (lambda c, m: c.post("/api/v1/builds", json={"model_id": "seven", "target": "cortex-m4"},
                                       headers=c.auth), 422, "model_id", "integer"),
    "bad version": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m, "target": "cortex-m4",
                                                                "version": "one"}, headers=c.auth),
                    422, "version", "major.minor"),
    "renode without a machine": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m, "target": "cortex-m55",
                                                                          "emulator": "renode"}, headers=c.auth),
                                 422, "emulator", "cortex-m55 has no Renode machine"),
    "unknown emulator": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m, "target": "cortex-m4",
                                                                     "emulator": "gem5"}, headers=c.auth),
                         422, "emulator", "one of"),
    "corrupt model": (lambda c, m: c.post("/api/v1/models", data={"file": (io.BytesIO(b"\x00" * 4096), "x.tflite")},
                                          headers=c.auth), 422, "file", "not a tflite flatbuffer"),
    "truncated model": (lambda c, m: c.post("/api/v1/models", data={
        "file": (io.BytesIO(model_path("ad01_int8").read_bytes()[:5000]), "ad.tflite")}, headers=c.auth),
        422, "file", ""),
    "empty model": (lambda c, m: c.post("/api/v1/models", data={"file": (io.BytesIO(b""), "x.tflite")},
                                        headers=c.auth), 422, "file", "empty"),
    "missing file": (lambda c, m: c.post("/api/v1/models", data={}, headers=c.auth), 422, "file", "missing"),
    "huge upload": (lambda c, m: c.post("/api/v1/models", data={"file": (io.BytesIO(b"\x00" * (3 << 20)), "x")},
                                        headers=c.auth), 413, None, "large"),
    "wrong token": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m, "target": "cortex-m4"},
                                        headers={"Authorization": "Bearer tmk_wrong"}), 401, "Authorization", "token"),
    "no token": (lambda c, m: c.get("/api/v1/devices"), 401, "Authorization", "token"),
    "bad device id": (lambda c, m: c.post("/api/v1/devices", json={"id": "Bad/Id", "target": "cortex-m4"},
                                          headers=c.auth), 422, "id", "lower-case"),
    "device unknown target": (lambda c, m: c.post("/api/v1/devices", json={"id": "d1", "target": "esp32"},
                                                  headers=c.auth), 422, "target", "unknown target"),
    "deploy unknown build": (lambda c, m: c.post("/api/v1/deployments", json={"build_id": 42}, headers=c.auth),
                             422, "build_id", "no build 42"),
    "deploy unfinished build": (lambda c, m: c.post("/api/v1/deployments", json={"build_id": 1}, headers=c.auth),
                                409, "build_id", "queued"),
    "unknown artifact": (lambda c, m: c.get("/api/v1/artifacts/" + "0" * 64, headers=c.auth), 404, None, "no artifact"),
    "artifact without auth": (lambda c, m: c.get("/api/v1/artifacts/" + "0" * 64), 401, "Authorization", ""),
    "not json": (lambda c, m: c.post("/api/v1/builds", data="{", headers={**c.auth, "Content-Type": "application/json"}),
                 400, None, ""),
    # found by an attacker's and a schema fuzzer's inputs: each was a 500 before
    "id past the database in the path": (lambda c, m: c.get(f"/api/v1/builds/{2**64}", headers=c.auth), 404, None, ""),
    "id past the database in the body": (lambda c, m: c.post("/api/v1/builds", json={"model_id": 2**70,
                                                                                      "target": "cortex-m4"},
                                                              headers=c.auth), 422, "model_id", "less than"),
    "upload named ..": (lambda c, m: c.post("/api/v1/models", data={"file": (io.BytesIO(b"x" * 64), "..")},
                                            headers=c.auth), 422, "file", "file name"),
    "upload with a 300-character name": (lambda c, m: c.post("/api/v1/models", data={
        "file": (io.BytesIO(b"x" * 64), "a" * 300 + ".tflite")}, headers=c.auth), 422, "file", "200 characters"),
    "5,000-deep JSON": (lambda c, m: c.post("/api/v1/builds", data="[" * 5000 + "]" * 5000,
                                            headers={**c.auth, "Content-Type": "application/json"}),
                        400, None, "nested too deeply"),
    "5,000-digit integer": (lambda c, m: c.post("/api/v1/builds", data='{"model_id": ' + "9" * 5000 + "}",
                                                headers={**c.auth, "Content-Type": "application/json"}),
                            400, None, "4,300 digits"),
    "5,000-digit integer, no token": (lambda c, m: c.post("/api/v1/devices", data='{"id": ' + "1" * 5000 + "}",
                                                          headers={"Content-Type": "application/json"}),
                                      400, None, "4,300 digits"),
    "5,000-digit id in the path": (lambda c, m: c.get("/api/v1/builds/" + "7" * 5000, headers=c.auth), 404, None, ""),
    "5,000-digit page number": (lambda c, m: c.get("/api/v1/devices?page=" + "7" * 5000, headers=c.auth), 422, None,
                                ""),
    **{f"group name with {what}": (lambda c, m, name=name: c.post("/api/v1/devices", json={
        "id": "g-dev", "target": "cortex-m4", "group": name}, headers=c.auth), 422, "group", "group name")
       for what, name in (("NUL", "a\x00b"), ("/", "a/b"), ("+", "a+"), ("#", "#"))},
    "deployment to a group named #": (lambda c, m: c.post("/api/v1/deployments", json={"build_id": 1, "group": "#"},
                                                          headers=c.auth), 422, "group", "group name"),
    "10,000-character firmware version": (lambda c, m: c.post("/api/v1/devices", json={
        "id": "fv", "target": "cortex-m4", "firmware_version": "1" * 10_000}, headers=c.auth), 422, "firmware_version",
        "major.minor.revision"),
    "firmware version past the image header": (lambda c, m: c.post("/api/v1/devices", json={
        "id": "fv", "target": "cortex-m4", "firmware_version": "1.0.65536"}, headers=c.auth), 422, "firmware_version",
        "within an MCUboot header's limits"),
    "version past the image header": (lambda c, m: c.post("/api/v1/builds", json={
        "model_id": m, "target": "cortex-m4", "version": "256.0.0"}, headers=c.auth), 422, "version", "major 256"),
    "version with five parts": (lambda c, m: c.post("/api/v1/builds", json={
        "model_id": m, "target": "cortex-m4", "version": "1.2.3.4.5"}, headers=c.auth), 422, "version",
        "major.minor.revision"),
    "empty target": (lambda c, m: c.post("/api/v1/builds", json={"model_id": m, "target": ""}, headers=c.auth),
                     422, "target", "unknown target ''"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_problem_and_change_nothing(client, app, models_dir, case):
    data = model_path("ad01_int8").read_bytes()
    m = client.post("/api/v1/models", data={"file": (io.BytesIO(data), "ad.tflite")}, headers=client.auth).get_json()
    client.post("/api/v1/builds", json={"model_id": m["id"], "target": "cortex-m4"}, headers=client.auth)
    before, files = counts(app), artifacts(app)
    call, status, field, words = BAD_REQUESTS[case]
    assert_problem(call(client, m["id"]), status, field, words)
    assert counts(app) == before and artifacts(app) == files


def test_unsupported_operator_is_named(client, app):
    from tests.helpers import quantized_layers as q

    r = client.post("/api/v1/models", data={"file": (io.BytesIO(q.unsupported_operator_model()), "x.tflite")},
                    headers=client.auth)
    assert_problem(r, 422, "file", "DYNAMIC_UPDATE_SLICE")
    assert counts(app)["Model"] == 0 and artifacts(app) == []


def test_openapi_document_is_valid_and_complete(client):
    from openapi_spec_validator import validate

    spec = client.get("/api/v1/openapi.json").get_json()
    validate(spec)
    paths = spec["paths"]
    for path in ("/api/v1/devices", "/api/v1/models", "/api/v1/builds", "/api/v1/builds/{build_id}",
                 "/api/v1/deployments", "/api/v1/deployments/{dep_id}", "/api/v1/deployments/{dep_id}/rollback",
                 "/api/v1/artifacts/{digest}"):
        assert path in paths
    assert "BuildRequest" in spec["components"]["schemas"]


def test_migrations_match_the_models(database_url, tmp_path):
    """The Alembic history creates exactly the schema the models declare (no forgotten migration)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from server.db import Base, upgrade

    upgrade(database_url)
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
    assert alembic_config(database_url).get_main_option("script_location").endswith("migrations")


def test_a_build_for_a_core_simulated_from_rtl_gives_true_cycles_and_no_image(client, app):
    """ibex-small through the service: built and verified on the Verilator model of Ibex, its true cycles in the
    report and in the measurement table; no signed image, so no deployment, and no device can be one."""
    from server.jobs import run_build
    from tinymlaas.measure.database import MeasurementStore

    corpus = CORPUS_OPS / "fully_connected_int8.tflite"
    r = client.post("/api/v1/models", data={"file": (io.BytesIO(corpus.read_bytes()), "fc.tflite")}, headers=client.auth)
    b = client.post("/api/v1/builds", json={"model_id": r.get_json()["id"], "target": "ibex-small"},
                    headers=client.auth).get_json()
    settings = app.extensions["tinymlaas"].settings
    run_build(settings, b["id"])
    done = client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()
    assert done["state"] == "done", done
    assert done["report"]["cycles"] > done["report"]["instructions"] > 0 and done["report"]["runner"] == "ibex"
    assert "image" not in done["artifacts"] and "firmware" in done["artifacts"]
    rows = MeasurementStore(settings.database_url).rows(build_id=b["id"])
    assert [(r.source, r.cycles_kind, r.cycles) for r in rows] == [("service", "true", done["report"]["cycles"])]
    assert_problem(client.post("/api/v1/devices", json={"id": "ibex-1", "target": "ibex-small"}, headers=client.auth),
                   422, "target", "simulated from its rtl")
    assert_problem(client.post("/api/v1/deployments", json={"build_id": b["id"], "group": "default"},
                               headers=client.auth), 409, "build_id", "no signed image")


def test_a_build_for_a_host_target_gives_latency_and_a_library(client, app):
    """cpu-host through the service (cuda-host is the same path on a GPU server): a TVM runtime library checked
    against the interpreter and timed; no image, so no deployment; no device can be a host target; no search."""
    from server.jobs import run_build

    corpus = CORPUS_MODELS / "conv_autoencoder_float32.tflite"
    r = client.post("/api/v1/models", data={"file": (io.BytesIO(corpus.read_bytes()), "ae.tflite")},
                    headers=client.auth)
    model_id = r.get_json()["id"]
    assert_problem(client.post("/api/v1/builds", json={"model_id": model_id, "target": "cpu-host",
                                                       "search": {"budget": 4}}, headers=client.auth),
                   422, "search.budget", "applies to the microcontroller targets")
    assert_problem(client.post("/api/v1/builds", json={"model_id": model_id, "target": "cortex-m4",
                                                       "host": {"tune_trials": 8}}, headers=client.auth),
                   422, "host.tune_trials", "not cortex-m4")
    assert_problem(client.post("/api/v1/builds", json={"model_id": model_id, "target": "cpu-host",
                                                       "host": {"precision": "float16"}}, headers=client.auth),
                   422, "host.precision", "cpu-host builds float32, not float16")
    b = client.post("/api/v1/builds", json={"model_id": model_id, "target": "cpu-host"},
                    headers=client.auth).get_json()
    run_build(app.extensions["tinymlaas"].settings, b["id"])
    done = client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()
    assert done["state"] == "done", done
    report = done["report"]
    assert report["kind"] == "host" and report["latency_ms"] > 0 and report["verified"]
    assert report["fidelity"]["max_rel_error"] <= 1e-5 and report["sizes"]["weights"] > 0
    assert set(done["artifacts"]) == {"library", "metadata", "report"}
    lib = client.get(f"/api/v1/builds/{done['id']}/artifacts/library", headers=client.auth)
    assert lib.status_code == 200 and lib.data[:4] == b"\x7fELF"
    assert_problem(client.post("/api/v1/devices", json={"id": "gw-1", "target": "cuda-host"}, headers=client.auth),
                   422, "target", "cuda-host")
    assert_problem(client.post("/api/v1/deployments", json={"build_id": done["id"], "group": "default"},
                               headers=client.auth), 409, "build_id", "no signed image")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # tuning does not touch the service database
def test_a_host_build_request_tunes_within_its_budget_and_a_rebuild_reuses_it(client, app):
    """The request's host options reach the compiler: a tuning budget is spent once, its database kept for the
    tenant (per target, model and precision), and the same request again runs no trials."""
    from pathlib import Path

    from server.jobs import run_build

    corpus = CORPUS_MODELS / "flatten_mlp_float32.tflite"
    model_id = client.post("/api/v1/models", data={"file": (io.BytesIO(corpus.read_bytes()), "mlp.tflite")},
                           headers=client.auth).get_json()["id"]
    settings = app.extensions["tinymlaas"].settings

    def build() -> dict:
        b = client.post("/api/v1/builds", json={"model_id": model_id, "target": "cpu-host",
                                                "host": {"tune_trials": 1}}, headers=client.auth).get_json()
        run_build(settings, b["id"])
        done = client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()
        assert done["state"] == "done" and done["report"]["verified"], done
        return done

    first = build()
    tuning = first["report"]["tuning"]
    assert first["request"] == {"host": {"tune_trials": 1}}  # what was asked beyond the defaults
    assert tuning["ran"]["trials"] == 1 and not tuning["reused"]
    assert Path(tuning["database"]).is_relative_to(settings.data_dir / "tuning")
    again = build()["report"]["tuning"]
    assert again["reused"] and again["database"] == tuning["database"]


def test_an_onnx_model_through_the_service_builds_for_every_kind_of_target(client, app, tmp_path):
    """An ONNX upload is checked, converted and imported at once, stored, and built as firmware for cortex-m4 and
    as a library for cpu-host, both checked against ONNX Runtime; a .pt2 (pickled code), broken ONNX and an operator
    neither path takes are refused and leave nothing stored."""
    from onnx import TensorProto, helper, save

    from server.jobs import run_build
    from tests.helpers.onnx_models import small_cnn

    def upload(name: str, data: bytes, **form):
        return client.post("/api/v1/models", data={"file": (io.BytesIO(data), name), **form}, headers=client.auth)

    before = artifacts(app)
    assert_problem(upload("junk.onnx", b"not a protobuf"), 422, "file", "junk.onnx is not a valid onnx model")
    assert_problem(upload("net.pt2", b"PK\x03\x04"), 422, "file", "pickled objects that run code")
    op = helper.make_node("DeformConv", ["x", "w", "o"], ["y"])
    graph = helper.make_graph([op], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
                                          [("x", [1, 1, 4, 4]), ("w", [1, 1, 2, 2]), ("o", [1, 8, 3, 3])]],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "deform.onnx")
    assert_problem(upload("deform.onnx", (tmp_path / "deform.onnx").read_bytes()), 422, "file",
                   "not supported for frontend ONNX: DeformConv")
    data = small_cnn(tmp_path / "cnn.onnx").read_bytes()
    assert_problem(upload("cnn.onnx", data, quantize="int8"), 422, "quantize", "onnx model builds as it is")
    assert artifacts(app) == before
    with app.extensions["tinymlaas"].sessions() as s:
        assert s.scalar(select(func.count()).select_from(Model)) == 0

    r = upload("cnn.onnx", data)
    assert r.status_code == 201, r.get_json()
    m = r.get_json()
    assert m["format"] == "onnx" and not m["quantized"] and m["size"] == len(data)
    assert m["operators"] == ["Conv", "Flatten", "Gemm", "MaxPool", "Relu", "Softmax"]
    b = client.post("/api/v1/builds", json={"model_id": m["id"], "target": "cortex-m4"}, headers=client.auth).get_json()
    run_build(app.extensions["tinymlaas"].settings, b["id"])
    done = client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()
    assert done["state"] == "done" and done["report"]["verified"], done
    assert done["report"]["fidelity"]["source"]["reference"] == "ONNX Runtime"
    assert done["report"]["fidelity"]["source"]["max_rel_error"] <= 1e-5 and "firmware" in done["artifacts"]
    b = client.post("/api/v1/builds", json={"model_id": m["id"], "target": "cpu-host"}, headers=client.auth).get_json()
    run_build(app.extensions["tinymlaas"].settings, b["id"])
    done = client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()
    assert done["state"] == "done", done
    assert done["report"]["verified"] and done["report"]["fidelity"]["reference"] == "ONNX Runtime"
    assert done["report"]["fidelity"]["max_rel_error"] <= 1e-5
    assert set(done["artifacts"]) == {"library", "metadata", "report"}


def test_a_build_with_a_search_packages_the_chosen_variant(client, app):
    """A build request with a search budget: the job reports search progress, the front comes back as artifacts and
    the signed image is the chosen variant's build (its report says which, and it beats or equals the default)."""
    import json

    from server.jobs import run_build

    corpus = CORPUS_MODELS / "conv1d_sensor_int8.tflite"
    r = client.post("/api/v1/models", data={"file": (io.BytesIO(corpus.read_bytes()), "s.tflite")}, headers=client.auth)
    b = client.post("/api/v1/builds", json={"model_id": r.get_json()["id"], "target": "rv32imac",
                                            "search": {"budget": 4, "seed": 2}}, headers=client.auth).get_json()
    assert b["request"] == {"search": {"budget": 4, "seed": 2}}
    run_build(app.extensions["tinymlaas"].settings, b["id"])
    done = client.get(f"/api/v1/builds/{b['id']}", headers=client.auth).get_json()
    assert done["state"] == "done" and done["progress"] == 1.0, done
    searched = done["report"]["search"]
    assert searched["built"] == 4 and searched["chosen"]["instructions"] <= searched["default"]["instructions"]
    assert done["report"]["variant"] == searched["chosen"]["variant"] and done["report"]["verified"]
    assert {"image", "front", "front_plot"} <= set(done["artifacts"])
    front = json.loads(client.get(f"/api/v1/builds/{b['id']}/artifacts/front", headers=client.auth).data)
    assert front["points"][front["chosen"]]["variant"] == searched["chosen"]["variant"]
    assert client.get(f"/api/v1/builds/{b['id']}/artifacts/front_plot", headers=client.auth).data[:4] == b"\x89PNG"


@pytest.mark.parametrize("search, words", [({"budget": 0}, "budget"), ({"budget": 4, "strategy": "grid"}, "strategy"),
                                           ({"strategy": "random"}, "budget"), ("eight", "search")])
def test_bad_search_requests_are_refused(client, search, words):
    r = client.post("/api/v1/models", data={"file": (io.BytesIO(model_path("ad01_int8").read_bytes()), "a.tflite")},
                    headers=client.auth)
    assert_problem(client.post("/api/v1/builds", json={"model_id": r.get_json()["id"], "target": "cortex-m4",
                                                       "search": search}, headers=client.auth), 422, None, "")
    body = client.post("/api/v1/builds", json={"model_id": r.get_json()["id"], "target": "cortex-m4",
                                               "search": search}, headers=client.auth).get_json()
    assert words in json.dumps(body)


def test_method_not_allowed_says_what_is(client):
    r = client.put("/api/v1/health", headers=client.auth)
    assert_problem(r, 405)
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "HEAD"}


def _at_once(app, method: str, url: str, json: dict, n: int = 10) -> list[int]:
    """The same request from `n` threads at once; their status codes."""
    import threading

    codes = []

    def send():
        codes.append(app.test_client().open(url, method=method, json=json,
                                             headers={"Authorization": f"Bearer {app.token}"}).status_code)

    threads = [threading.Thread(target=send) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_concurrent_registrations_of_one_device_give_one_201_and_the_rest_409(app):
    codes = _at_once(app, "POST", "/api/v1/devices", {"id": "race", "target": "cortex-m4"})
    assert sorted(codes) == [201] + [409] * 9
    assert counts(app)["Device"] == 1


def test_timestamps_carry_their_timezone(client):
    import datetime as dt

    client.post("/api/v1/devices", json={"id": "tz1", "target": "cortex-m4"}, headers=client.auth)
    data = model_path("ad01_int8").read_bytes()
    m = client.post("/api/v1/models", data={"file": (io.BytesIO(data), "ad.tflite")}, headers=client.auth).get_json()
    b = client.post("/api/v1/builds", json={"model_id": m["id"], "target": "cortex-m4"}, headers=client.auth).get_json()
    for stamp in (m["created_at"], b["created_at"], b["updated_at"]):
        assert dt.datetime.fromisoformat(stamp).utcoffset() == dt.timedelta(0), stamp


def test_the_database_file_is_private_from_the_start(tmp_path, make_app):
    import os
    import stat

    settings = Settings(data_dir=tmp_path / "d", database_url=f"sqlite:///{tmp_path / 'd' / 'db.sqlite'}")
    make_app(settings)
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "db.sqlite").st_mode) == 0o600


def _done_build(app, client) -> int:
    return done_build(app, client, client.auth, "g1")[0]


def test_ten_concurrent_deployments_to_one_group_start_exactly_one(app, client):
    build_id = _done_build(app, client)
    codes = _at_once(app, "POST", "/api/v1/deployments", {"build_id": build_id, "group": "g1"})
    assert sorted(codes) == [201] + [409] * 9
    with app.extensions["tinymlaas"].sessions() as s:
        assert s.scalar(select(func.count()).select_from(Deployment).where(Deployment.state == "in_progress")) == 1


def test_a_cancelled_deployment_frees_its_group(app, client):
    build_id = _done_build(app, client)
    dep = client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1"}, headers=client.auth).get_json()
    assert_problem(client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1"}, headers=client.auth),
                   409, "group", "in progress")
    r = client.post(f"/api/v1/deployments/{dep['id']}/cancel", headers=client.auth)
    assert r.status_code == 200 and r.get_json()["state"] == "cancelled"
    status = client.get(f"/api/v1/deployments/{dep['id']}", headers=client.auth).get_json()
    assert {j["status"] for j in status["jobs"]} == {"cancelled"}  # never notified (no coordinator here)
    assert_problem(client.post(f"/api/v1/deployments/{dep['id']}/cancel", headers=client.auth), 409, None,
                   "cancelled")
    again = client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1"}, headers=client.auth)
    assert again.status_code == 201


def test_a_device_that_never_answers_times_out_and_the_rollout_moves_on(app, client):
    """Before job timeouts, one silent device held its stage open forever. Its job now becomes timed_out after the
    rollout's job_timeout (a failure for the thresholds), and the rollout decides again."""
    import datetime as dt

    from server.services.deployments import advance, expire_silent_jobs

    build_id = _done_build(app, client)
    for bad in (5, 10**20, "soon"):
        assert_problem(client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1",
                                                                "job_timeout": bad}, headers=client.auth),
                       422, "job_timeout")
    dep = client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1", "job_timeout": 60,
                                                   "error_threshold": 1.0}, headers=client.auth).get_json()
    assert dep["job_timeout"] == 60
    with app.extensions["tinymlaas"].sessions() as s:
        d = s.get(Deployment, dep["id"])
        [job] = advance(s, d)  # no coordinator here: notify the one device by hand
        assert expire_silent_jobs(s) == {}  # just notified: not yet
        job.updated_at = job.updated_at - dt.timedelta(seconds=61)
        s.commit()
        assert [j.id for j in expire_silent_jobs(s)[dep["id"]]] == [job.id]
        advance(s, d)
    status = client.get(f"/api/v1/deployments/{dep['id']}", headers=client.auth).get_json()
    assert status["state"] == "halted" and status["summary"]["counts"] == {"timed_out": 1}
    assert "60 s" in status["jobs"][0]["message"]
    # the rollout's history tells it in order, the device by name
    events = status["events"]
    assert [e["kind"] for e in events] == ["created", "stage_started", "device_timed_out", "halted"]
    assert "by alice" in events[0]["detail"] and "1 device(s) in 1 stage(s)" in events[0]["detail"]
    assert events[1]["stage"] == 0 and events[2]["device"] == status["jobs"][0]["device_id"]
    assert events[3]["detail"] == status["reason"]


def test_a_rollouts_history_holds_each_stage_and_device_outcome(app, client):
    """Two stages over two devices: created, stage 1, the device's success, stage 2, a failure, halted; a cancelled
    rollout says who cancelled it and how many devices were never notified."""
    from server.services.deployments import advance, apply_job_update

    build_id, _ = done_build(app, client, client.auth, "g2", devices=2)
    dep = client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g2", "stages": [50, 100],
                                                   "error_threshold": 0.4}, headers=client.auth).get_json()
    with app.extensions["tinymlaas"].sessions() as s:
        d = s.get(Deployment, dep["id"])
        [first] = advance(s, d)
        assert apply_job_update(s, first.device_id, first.id, {"status": "IN_PROGRESS", "step": "download"}).accepted
        assert apply_job_update(s, first.device_id, first.id, {"status": "SUCCEEDED", "instructions": 1234}).accepted
        [second] = advance(s, d)
        assert apply_job_update(s, second.device_id, second.id, {"status": "FAILED", "message": "self-test"}).accepted
        advance(s, d)
    status = client.get(f"/api/v1/deployments/{dep['id']}", headers=client.auth).get_json()
    kinds = [(e["kind"], e["stage"]) for e in status["events"]]
    assert kinds == [("created", None), ("stage_started", 0), ("device_succeeded", 0), ("stage_started", 1),
                     ("device_failed", 1), ("halted", None)], kinds
    assert "1,234 instructions" in status["events"][2]["detail"] and status["events"][4]["detail"] == "self-test"
    assert [e["device"] for e in status["events"] if e["device"]] == [j["device_id"] for j in status["jobs"]]


def test_a_version_no_build_of_ours_carries_does_not_hold_rollouts_back(app, client):
    """A device that reports 255.255.65535 (over MQTT or at registration) blocked every non-forced rollout to its
    group. Only a version this organisation built counts as newer: a rollout below one still needs force."""
    from server.services.devices import record_state

    build_id = _done_build(app, client)
    version = client.get(f"/api/v1/builds/{build_id}", headers=client.auth).get_json()["version"]
    r = client.post("/api/v1/devices", json={"id": "liar", "target": "cortex-m4", "group": "g1",
                                             "firmware_version": "255.255.65535"}, headers=client.auth)
    assert r.status_code == 201
    dep = client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1"}, headers=client.auth)
    assert dep.status_code == 201, dep.get_json()
    client.post(f"/api/v1/deployments/{dep.get_json()['id']}/cancel", headers=client.auth)
    with app.extensions["tinymlaas"].sessions() as s:
        liar = r.get_json()["mqtt"]["username"]  # the device's key (what the broker delivers its reports under)
        record_state(s, liar, {"state": "idle", "firmware_version": "1" * 10_000})  # not a version: ignored
        assert s.get(Device, liar).firmware_version == "255.255.65535"
    with app.extensions["tinymlaas"].sessions() as s:  # now it runs a build of ours newer than this one
        newer = s.get(Build, build_id)
        s.add(Build(model_id=newer.model_id, target=newer.target, request=newer.request, version="9.0.0+0",
                    state="failed", owner_id=newer.owner_id, org_id=newer.org_id))
        s.commit()
        record_state(s, liar, {"state": "idle", "firmware_version": "9.0.0+0"})
    assert_problem(client.post("/api/v1/deployments", json={"build_id": build_id, "group": "g1"},
                               headers=client.auth), 409, "force", "downgrade")
    assert version != "9.0.0+0"


def test_thresholds_are_documented_as_the_api_takes_them(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    props = spec["components"]["schemas"]["DeploymentRequest"]["properties"]
    for name in ("success_threshold", "error_threshold"):
        assert props[name]["minimum"] == 0 and props[name]["exclusiveMinimum"] is True, props[name]


def test_the_database_itself_refuses_a_second_active_deployment(app, client):
    """What makes the rule hold under any interleaving of requests: the unique key, not the service's check."""
    from sqlalchemy.exc import IntegrityError

    build_id = _done_build(app, client)
    with app.extensions["tinymlaas"].sessions() as s:
        for _ in range(2):
            s.add(Deployment(build_id=build_id, group="g1", stages=[100], success_threshold=1.0, error_threshold=0.1,
                             owner_id=1, org_id=1, active_key="1/g1/cortex-m4"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_the_open_builds_limit_holds_under_concurrent_requests(tmp_path, database_url, make_app):
    """24 build requests at once with a limit of 16 had 23 accepted (the count was read, then written): the user's
    row is locked for the check, in SQLite and PostgreSQL alike."""
    app = make_app(Settings(data_dir=tmp_path / "data", database_url=database_url, max_open_builds=16))
    with app.extensions["tinymlaas"].sessions() as s:
        _, app.token = create_user(s, "carol")
    m = app.test_client().post("/api/v1/models", data={"file": (io.BytesIO(model_path("ad01_int8").read_bytes()),
                                                                "ad.tflite")},
                               headers={"Authorization": f"Bearer {app.token}"}).get_json()
    codes = _at_once(app, "POST", "/api/v1/builds", {"model_id": m["id"], "target": "cortex-m4"}, n=24)
    assert sorted(codes) == [202] * 16 + [429] * 8
    assert counts(app)["Build"] == 16


def test_a_user_with_too_many_open_builds_is_told_to_wait(tmp_path, make_app):
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        max_open_builds=3)
    app = make_app(settings)
    with app.extensions["tinymlaas"].sessions() as s:
        _, token = create_user(s, "bob")
    c, auth = app.test_client(), {"Authorization": f"Bearer {token}"}
    m = c.post("/api/v1/models", data={"file": (io.BytesIO(model_path("ad01_int8").read_bytes()), "ad.tflite")},
               headers=auth).get_json()
    codes = [c.post("/api/v1/builds", json={"model_id": m["id"], "target": "cortex-m4"}, headers=auth).status_code
             for _ in range(4)]
    assert codes == [202, 202, 202, 429]  # no worker runs here: the first three stay queued
    r = c.post("/api/v1/builds", json={"model_id": m["id"], "target": "cortex-m4"}, headers=auth)
    assert_problem(r, 429, None, "most at once is 3")
    assert r.headers["Retry-After"] == "30" and counts(app)["Build"] == 3
