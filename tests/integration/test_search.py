"""The variant search: specs that round-trip, searches that repeat for a seed, fronts of really built and verified
points, constraints that hold."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import CORPUS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.cli import main
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.search.result import dominates, write_result
from tinymlaas.search.search import search
from tinymlaas.search.space import ScheduleSpec, Space, Variant
from tinymlaas.targets import get_target

# int8 graphs with a few layers that offer kernel choices (TIR, DSP, DSP with int16 weights)
SMALL = CORPUS / "ops" / "conv_2d_int8.tflite"
TWO_LAYERS = CORPUS / "models" / "conv1d_sensor_int8.tflite"


def _space(path, target):
    return Space.of(clean(load_tflite(path).graph, shapes_from_interpreter=True), get_target(target))


def test_variants_round_trip_and_the_default_is_what_compile_builds():
    space = _space(TWO_LAYERS, "cortex-m4")
    # DSP core: the C kernels first, but for the first layer (three channels, taps of nine bytes: TIR's few-channel
    # default schedule, ir/layer_schedule.py)
    assert len(space.layers) >= 2 and [layer.choices[0] for layer in space.layers] == ["tir"] + ["dsp"] * (
        len(space.layers) - 1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = space.sample(rng)
        assert Variant.from_dict(json.loads(json.dumps(v.to_dict()))) == v
        assert space.decode(space.encode(v)) == v
    rv32 = _space(TWO_LAYERS, "rv32imac")  # no DSP: the C kernels' scalar fallbacks are still the default
    assert [k for _, k in rv32.default().kernels] == ["tir"] + ["dsp"] * (len(rv32.layers) - 1)
    assert all("tir" in layer.choices for layer in rv32.layers)
    assert space.default().schedule == ScheduleSpec() and space.default().fusion == "default"


def test_a_variant_rebuilds_to_the_same_counts(tmp_path):
    space = _space(TWO_LAYERS, "rv32imac")
    v = Variant(tuple((layer.op_index, "dsp16") for layer in space.layers), ScheduleSpec(True, 4), "none")
    a = compile_model(TWO_LAYERS, "rv32imac", tmp_path / "a", BuildRequest(inputs=2, variant=v))
    b = compile_model(TWO_LAYERS, "rv32imac", tmp_path / "b", BuildRequest(inputs=2, variant=v))
    default = compile_model(TWO_LAYERS, "rv32imac", tmp_path / "c", BuildRequest(inputs=2))
    assert a.verified and a.fidelity["max_lsb_diff"] == 0
    assert a.instructions == b.instructions and a.variant == v.to_dict()
    assert a.instructions != default.instructions  # the variant is really another build


@pytest.mark.parametrize("strategy", ["nsga2", "random"])
def test_search_repeats_for_a_seed_and_its_front_is_built_and_verified(tmp_path, strategy):
    one = search(SMALL, "rv32imac", tmp_path / "one", BuildRequest(budget=6, strategy=strategy, seed=3, workers=1))
    two = search(SMALL, "rv32imac", tmp_path / "two", BuildRequest(budget=6, strategy=strategy, seed=3, workers=2))
    assert [p.variant for p in one.points] == [p.variant for p in two.points]
    assert [p.objectives() for p in one.points] == [p.objectives() for p in two.points]
    assert len(one.points) == 6 and one.points[one.default].variant == _space(SMALL, "rv32imac").default().to_dict()
    for i in one.front:
        p = one.points[i]
        report = json.loads((Path(p.build_dir) / "report.json").read_text())
        assert report["verified"] and report["fidelity"]["max_lsb_diff"] == 0
        assert report["variant"] == p.variant and report["instructions"] == p.cost
        assert not any(dominates(q, p) for q in one.points if q.verified)
    chosen = one.points[one.chosen]
    assert chosen.cost == min(p.cost for p in one.points if p.verified)
    assert chosen.cost <= one.points[one.default].cost


def test_constraints_are_respected(tmp_path):
    free = search(TWO_LAYERS, "cortex-m4", tmp_path / "free", BuildRequest(budget=5, strategy="random", seed=1, workers=2))
    flashes = sorted(p.flash for p in free.points if p.verified)
    assert flashes[0] < flashes[-1]
    limit = (flashes[0] + flashes[-1]) // 2
    bound = search(TWO_LAYERS, "cortex-m4", tmp_path / "bound",
                   BuildRequest(budget=5, strategy="random", seed=1, workers=2, max_flash=limit))
    assert bound.front and all(bound.points[i].flash <= limit for i in bound.front)
    assert bound.points[bound.chosen].flash <= limit
    over = [i for i, p in enumerate(bound.points) if p.flash > limit]
    assert over and not set(over) & set(bound.front)
    artifacts = write_result(bound, tmp_path / "out")
    assert Path(artifacts["plot"]).read_bytes()[:4] == b"\x89PNG"
    best = json.loads((Path(artifacts["best"]) / "report.json").read_text())
    assert best["sizes"]["flash_model"] <= limit


def test_cli_search_writes_the_front_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", str(SMALL), "-t", "cortex-m4", "-b", "3", "-j", "1", "-o", str(out), "--no-record"]) == 0
    text = capsys.readouterr().out
    assert "chosen (*)" in text and (out / "front.json").is_file() and (out / "best" / "firmware.elf").is_file()
    assert main(["search", str(SMALL), "-t", "no-such-board", "-b", "2", "--no-record"]) == 2
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model")
    assert main(["search", str(bad), "-t", "cortex-m4", "-b", "2", "--no-record"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_compile_variant_rebuilds_the_searched_point_exactly(tmp_path, capsys):
    """`tinymlaas compile --variant front.json` builds the search's chosen point: the same variant, the same count
    (for the same seed: it also seeds the verification inputs)."""
    out = tmp_path / "s"
    assert main(["search", str(TWO_LAYERS), "-t", "rv32imac", "-b", "4", "--seed", "2", "--strategy", "random",
                 "-j", "1", "-o", str(out), "--no-record"]) == 0
    front = json.loads((out / "front.json").read_text())
    chosen = front["points"][front["chosen"]]
    capsys.readouterr()
    for source in (out / "front.json", out / "best" / "report.json"):  # a search, or a build made from one
        assert main(["compile", str(TWO_LAYERS), "-t", "rv32imac", "--variant", str(source), "--seed", "2", "--json",
                     "-o", str(tmp_path / "v"), "--no-record"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["variant"] == chosen["variant"] and report["instructions"] == chosen["instructions"]


def test_a_variant_of_another_model_or_a_broken_file_is_refused(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kernels": {"999": "dsp"}}))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kernels": [1, 2]}))
    for path, words in ((other, "has no operator #999"), (broken, "`kernels` must map operator indices"),
                        (tmp_path / "missing.json", "not a readable JSON file")):
        assert main(["compile", str(TWO_LAYERS), "-t", "rv32imac", "--variant", str(path), "-o",
                     str(tmp_path / "b"), "--no-record"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tinymlaas: error: --variant ") and words in err[0], err
    assert not (tmp_path / "b").exists()


def test_guided_search_screens_more_than_it_builds_and_repeats_for_a_seed(tmp_path):
    one = search(TWO_LAYERS, "rv32imac", tmp_path / "one", BuildRequest(budget=8, strategy="guided", seed=5, workers=1),
                 pool=300)
    two = search(TWO_LAYERS, "rv32imac", tmp_path / "two", BuildRequest(budget=8, strategy="guided", seed=5, workers=2),
                 pool=300)
    assert [p.variant for p in one.points] == [p.variant for p in two.points]
    assert len(one.points) == 8 and one.screened > len(one.points)
    assert all(p.verified for p in one.points) and one.chosen in one.front
    assert not one.confirmed  # no RTL core on rv32imac


def test_guided_search_on_ibex_confirms_the_best_in_true_cycles(tmp_path):
    """Candidates run in QEMU (instructions and Ibex's pipeline-table estimate of cycles); the best two by that
    estimate and the default build run again on the Verilator model of Ibex, whose cycles choose."""
    r = search(SMALL, "ibex-small", tmp_path / "s", BuildRequest(budget=6, strategy="guided", seed=1, workers=2),
               pool=100, confirm=2)
    assert all(p.cost_kind == "cycles (estimate)" for p in r.points)
    assert 2 <= len(r.confirmed) <= 3 and r.default in r.confirmed and r.chosen in r.confirmed
    cycles = {i: r.points[i].cycles for i in r.confirmed}
    assert all(c > r.points[i].instructions for i, c in cycles.items())  # a 2-stage core: more cycles than instr.
    assert r.points[r.chosen].cycles == min(cycles.values())
    assert all(abs(r.points[i].cost - c) <= 0.05 * c for i, c in cycles.items())  # the estimate's stated bound
    report = json.loads((Path(r.points[r.chosen].build_dir) / "report.json").read_text())
    assert report["cycles"] == r.points[r.chosen].cycles and report["cycles_source"]


def test_ray_gives_the_points_of_the_local_pool(tmp_path):
    """A Ray cluster started on this machine builds the same points, in the same order, as the process pool."""
    pytest.importorskip("ray", reason="Ray is a dependency of the search (requirements.lock)")
    local = search(SMALL, "rv32imac", tmp_path / "local", BuildRequest(budget=5, strategy="nsga2", seed=4, workers=2))
    ray = search(SMALL, "rv32imac", tmp_path / "ray", BuildRequest(budget=5, strategy="nsga2", seed=4, ray="local"))
    assert [p.variant for p in ray.points] == [p.variant for p in local.points]
    assert [p.objectives() for p in ray.points] == [p.objectives() for p in local.points]
    assert ray.front == local.front and ray.chosen == local.chosen
