"""Keras and SavedModel input: converted with TensorFlow's converter, then compiled, run and verified."""

import numpy as np
import pytest

from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.cli import main
from tinymlaas.errors import InvalidModel

tf = pytest.importorskip("tensorflow", reason="TensorFlow is the optional `tensorflow` extra (make setup installs it)")


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    from tensorflow import keras

    keras.utils.set_random_seed(3)
    L = keras.layers
    inp = keras.Input((10, 9, 2))
    x = L.Conv2D(5, 3, activation="relu")(inp)
    x = L.Dense(4)(L.Flatten()(x))
    model = keras.Model(inp, x)
    folder = tmp_path_factory.mktemp("keras")
    model.save(folder / "net.keras")
    model.export(str(folder / "saved"))
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).standard_normal((16, 10, 9, 2)).astype(np.float32))
    return folder


@pytest.mark.parametrize("source, quantize", [("net.keras", "none"), ("net.keras", "int8"), ("saved", "int8")])
def test_keras_and_savedmodel_compile(keras_model, tmp_path, source, quantize):
    calib = str(keras_model / "calib.npz") if source == "net.keras" and quantize != "none" else None
    r = compile_model(keras_model / source, "cortex-m4", tmp_path / "out",
                      BuildRequest(inputs=3, quantize=quantize, calibration=calib))
    assert r.verified
    assert r.lowering == ("float" if quantize == "none" else "integer")
    if r.lowering == "integer":
        assert r.fidelity["max_lsb_diff"] == 0
    assert (calib is None and quantize != "none") == any("accuracy is unknown" in n for n in r.notes)
    assert (tmp_path / "out" / "model.tflite").exists()


def test_bad_calibration_is_refused(keras_model, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 3), np.float32))
    with pytest.raises(InvalidModel, match="calibration samples of shape"):
        compile_model(keras_model / "net.keras", "cortex-m4", tmp_path / "out",
                      BuildRequest(quantize="int8", calibration=str(tmp_path / "bad.npz")))


def test_cli_compiles_keras(keras_model, tmp_path, capsys):
    assert main(["compile", str(keras_model / "net.keras"), "-t", "rv32imac", "--quantize", "int8", "-n", "2",
                 "--calibration", str(keras_model / "calib.npz"), "-o", str(tmp_path / "o")]) == 0
    assert "bit-exact" in capsys.readouterr().out


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_api_takes_keras_upload(keras_model, tmp_path, quantize, make_app):
    import io

    from server.config import Settings
    from server.services.tenants import create_user

    app = make_app(Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    with app.extensions["tinymlaas"].sessions() as s:
        _, token = create_user(s, "keras")
    data = (keras_model / "net.keras").read_bytes()
    r = app.test_client().post("/api/v1/models", data={"file": (io.BytesIO(data), "net.keras"), "quantize": quantize},
                               headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.get_data(as_text=True)
    body = r.get_json()
    assert body["name"] == "net" and body["quantized"] == (quantize != "none")
    assert "CONV_2D" in body["operators"]
    assert any("TensorFlow" in n for n in body["notes"])
    assert any("accuracy is unknown" in n for n in body["notes"]) == (quantize != "none")  # generated calibration


@pytest.fixture
def keras_service(keras_model, tmp_path, make_app):
    """An app, a user's token and an upload function for the Keras model (extra fields and files as given)."""
    import io

    from server.config import Settings
    from server.services.tenants import create_user

    app = make_app(Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    with app.extensions["tinymlaas"].sessions() as s:
        _, token = create_user(s, "keras")
    client = app.test_client()

    def upload(name="net.keras", data=None, calibration: bytes | None = None, **form):
        fields = {"file": (io.BytesIO(data or (keras_model / "net.keras").read_bytes()), name), **form}
        if calibration is not None:
            fields["calibration"] = (io.BytesIO(calibration), "calib.npz")
        return client.post("/api/v1/models", data=fields, headers={"Authorization": f"Bearer {token}"})

    return app, token, upload


def test_a_keras_upload_is_calibrated_on_the_users_samples(keras_model, keras_service):
    """The calibration file quantizes the model: its ranges, not generated inputs' (the notes say which)."""
    _, _, upload = keras_service
    mine = upload(calibration=(keras_model / "calib.npz").read_bytes(), quantize="int8")
    generated = upload(quantize="int8")
    assert mine.status_code == generated.status_code == 201, mine.get_data(as_text=True)
    assert not any("accuracy is unknown" in n for n in mine.get_json()["notes"])
    assert any("accuracy is unknown" in n for n in generated.get_json()["notes"])
    assert mine.get_json()["sha256"] != generated.get_json()["sha256"]  # other samples, other quantization


def test_bad_calibration_uploads_are_refused_naming_the_field(keras_model, keras_service, tmp_path):
    import io

    from tests.helpers import quantized_layers as q

    app, _, upload = keras_service
    wrong = io.BytesIO()
    np.savez(wrong, x=np.zeros((4, 3, 3), np.float32))
    for r, why in ((upload(calibration=wrong.getvalue(), quantize="int8"), "calibration samples of shape"),
                   (upload(calibration=b"not an npz", quantize="int8"), "not a readable .npz"),
                   (upload(calibration=(keras_model / "calib.npz").read_bytes()), "choose quantize"),
                   (upload("m.tflite", q.fully_connected(1, [1, 16], 4, 0),
                           calibration=(keras_model / "calib.npz").read_bytes(), quantize="int8"), "built as it is")):
        body = r.get_json()
        assert r.status_code == 422 and why in body["detail"], body
        assert str(tmp_path) not in body["detail"]  # no server path in the answer
    from server.db import Model

    with app.extensions["tinymlaas"].sessions() as s:
        assert s.query(Model).count() == 0


def test_the_dashboard_uploads_keras_with_its_calibration(keras_model, keras_service):
    """The models page's upload: quantize and a calibration file; the model page shows what converting did."""
    import io
    import re

    app, token, _ = keras_service
    ui = app.test_client()
    login = ui.get("/ui/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
    assert ui.post("/ui/login", data={"token": token, "csrf_token": csrf}).status_code == 302
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', ui.get("/ui/models").get_data(as_text=True)).group(1)
    r = ui.post("/ui/models", data={"csrf_token": csrf, "quantize": "int8",
                                    "file": (io.BytesIO((keras_model / "net.keras").read_bytes()), "net.keras"),
                                    "calibration": (io.BytesIO((keras_model / "calib.npz").read_bytes()), "c.npz")},
                content_type="multipart/form-data")
    assert r.status_code == 302, r.get_data(as_text=True)
    page = ui.get(r.headers["Location"]).get_data(as_text=True)
    assert 'id="model-notes"' in page and "quantization: int8" in page and "accuracy is unknown" not in page


@pytest.fixture(scope="module")
def deeper_keras_model(tmp_path_factory):
    """Conv, depthwise, pointwise, pooling, dense: enough layers for mixed precision to choose from; labels are the
    float model's own classes."""
    from tensorflow import keras

    keras.utils.set_random_seed(3)
    L = keras.layers
    inp = keras.Input((16, 12, 3))
    x = L.Conv2D(8, 3, activation="relu")(inp)
    x = L.DepthwiseConv2D(3, activation="relu")(x)
    x = L.Conv2D(12, 1)(x)
    x = L.Dense(6)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, x)
    folder = tmp_path_factory.mktemp("deeper")
    model.save(folder / "net.keras")
    xs = np.random.default_rng(0).standard_normal((48, 16, 12, 3)).astype(np.float32)
    np.savez(folder / "calib.npz", x=xs, labels=np.argmax(model.predict(xs, verbose=0), axis=1))
    return folder


def test_quantization_search_has_a_mixed_precision_point_on_the_front(deeper_keras_model, tmp_path):
    from tinymlaas.search.quantization import search_quantization
    from tinymlaas.search.result import dominates

    r = search_quantization(deeper_keras_model / "net.keras", "rv32imac", tmp_path,
                            BuildRequest(calibration=str(deeper_keras_model / "calib.npz"), max_fidelity_loss=0.01))
    by = {p.label: p for p in r.points}
    assert set(by) == {"float32", "int8", "int16x8", "mixed-1", "mixed-2"} and all(p.verified for p in r.points)
    assert by["float32"].fidelity_loss == 0 and 0 < by["int16x8"].fidelity_loss < by["int8"].fidelity_loss
    assert by["mixed-1"].fidelity_loss < by["int8"].fidelity_loss  # the layer it keeps float was the worst
    assert by["float32"].variant["accuracy"] == 1.0 and all("accuracy" in p.variant for p in r.points)
    mixed_on_front = [i for i in r.front if r.points[i].label.startswith("mixed")]
    assert mixed_on_front
    assert not any(dominates(q, r.points[i]) for i in mixed_on_front for q in r.points)
    # soft float on rv32imac: every quantized point is far cheaper than float; the constraint picks among them
    chosen = r.points[r.chosen]
    assert chosen.fidelity_loss <= 0.01 and chosen.cost < by["float32"].cost


def test_cli_search_of_keras_input_writes_the_quantization_front(deeper_keras_model, tmp_path, capsys):
    """The budget is spent: the five quantization variants, then the kernel search on the chosen one."""
    out = tmp_path / "s"
    assert main(["search", str(deeper_keras_model / "net.keras"), "-t", "cortex-m4", "--calibration",
                 str(deeper_keras_model / "calib.npz"), "--max-fidelity-loss", "0.02", "-n", "2", "-o", str(out),
                 "--no-record", "--budget", "8", "--strategy", "random"]) == 0
    text = capsys.readouterr().out
    assert "int16x8" in text and "chosen (*)" in text
    front = __import__("json").loads((out / "front.json").read_text())
    assert front["strategy"] == "quantization+random" and front["budget"] == 8 and (out / "front.png").exists()
    points = front["points"]
    assert 5 < len(points) <= 8 and all(p["verified"] for p in points)
    first = min(points[:5], key=lambda p: (p["fidelity_loss"] > 0.02, p["cost"]))  # the variant the kernels refine
    kernels = points[5:]
    assert all(p["variant"]["quantization"] == first["variant"]["quantization"] for p in kernels)
    assert all(p["fidelity_loss"] == pytest.approx(first["fidelity_loss"], abs=1e-3) for p in kernels)
    chosen = points[front["chosen"]]
    assert chosen["cost"] == min(p["cost"] for p in points if p["fidelity_loss"] <= 0.02)


def test_a_keras_search_budget_below_its_quantization_variants_is_refused(deeper_keras_model, tmp_path, capsys):
    assert main(["search", str(deeper_keras_model / "net.keras"), "-t", "cortex-m4", "--budget", "3", "-o",
                 str(tmp_path / "s")]) == 2
    assert "--budget 3 is below the 5 quantization variants" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_input_model(tmp_path_factory):
    """Two inputs of different shapes, named, as a sensor-fusion model has them."""
    from tensorflow import keras

    keras.utils.set_random_seed(5)
    L = keras.layers
    image = keras.Input((8, 8, 1), name="image")
    series = keras.Input((12,), name="series")
    x = L.Flatten()(L.Conv2D(4, 3, activation="relu")(image))
    x = L.Concatenate()([x, L.Dense(6, activation="relu")(series)])
    folder = tmp_path_factory.mktemp("two")
    keras.Model([image, series], L.Dense(3)(x)).save(folder / "fusion.keras")
    rng = np.random.default_rng(2)
    # the arrays in the other order than the model's inputs: matched by name
    np.savez(folder / "calib.npz", series=rng.standard_normal((16, 12)).astype(np.float32),
             image=rng.standard_normal((16, 8, 8, 1)).astype(np.float32))
    return folder


def test_a_two_input_model_is_calibrated_input_by_input(two_input_model, tmp_path):
    r = compile_model(two_input_model / "fusion.keras", "cortex-m4", tmp_path / "out",
                      BuildRequest(inputs=2, quantize="int8", calibration=str(two_input_model / "calib.npz")))
    assert r.verified and r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0
    assert not any("accuracy is unknown" in n for n in r.notes)


def test_calibration_arrays_that_do_not_name_the_inputs_are_refused(two_input_model, tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "unnamed.npz", rng.standard_normal((4, 8, 8, 1)).astype(np.float32),
             rng.standard_normal((4, 12)).astype(np.float32))  # arr_0, arr_1: which feeds which?
    with pytest.raises(InvalidModel, match="inputs are image, series.*name each array after the input"):
        compile_model(two_input_model / "fusion.keras", "cortex-m4", tmp_path / "out",
                      BuildRequest(quantize="int8", calibration=str(tmp_path / "unnamed.npz")))


def test_json_output_of_keras_input_is_json_only(keras_model, tmp_path, capfd):
    import json

    assert main(["compile", str(keras_model / "net.keras"), "-t", "cortex-m4", "--quantize", "int8", "-n", "1",
                 "--calibration", str(keras_model / "calib.npz"), "-o", str(tmp_path / "o"), "--json"]) == 0
    out = capfd.readouterr().out  # the file descriptor: TensorFlow's own prints included
    assert json.loads(out)["verified"] is True
