"""The build request: one declaration, from which the CLI flags, the service's schema and the validation come."""

import argparse

import pytest

from tinymlaas.backends import backend_for
from tinymlaas.build.request import (
    OPTIONS,
    SURFACES,
    BuildRequest,
    InvalidRequest,
    add_arguments,
    declared,
    from_args,
)
from tinymlaas.cli import main
from tinymlaas.targets import all_targets, get_target


def test_defaults_are_valid_for_every_target():
    for target in all_targets().values():
        assert BuildRequest().check(target) == BuildRequest()


@pytest.mark.parametrize("surface", SURFACES[:2])
def test_every_option_of_a_command_is_a_flag_with_its_rules(surface):
    parser = argparse.ArgumentParser()
    add_arguments(parser, surface)
    actions = {a.dest: a for a in parser._actions}
    for f, opt in declared(surface):
        action = actions[f.name]
        assert action.help == opt.help
        assert action.default == f.default
        if opt.allowed() is not None:
            assert tuple(action.choices) == tuple(opt.allowed())
    assert set(actions) - {"help"} == {f.name for f, _ in declared(surface)}


def test_the_service_schema_is_made_from_the_same_declaration():
    from server.api.request_schema import request_fields

    made = request_fields()
    for f, opt in declared("service"):
        holder = made[opt.group].nested().fields if opt.group else made
        field = holder[f.name]
        assert field.metadata["description"] == opt.help
        if opt.min is not None:
            ranges = [v for v in field.validators if hasattr(v, "min")]
            assert ranges and ranges[0].min == opt.min
        if opt.allowed() is not None:
            assert tuple(next(v for v in field.validators if hasattr(v, "choices")).choices) == tuple(opt.allowed())


@pytest.mark.parametrize("request_, target, option", [
    (BuildRequest(max_ram=0), "cortex-m4", "max_ram"),
    (BuildRequest(tune_trials=-1), "cpu-host", "tune_trials"),
    (BuildRequest(tune_minutes=0.01), "cpu-host", "tune_minutes"),
    (BuildRequest(kernels="fast"), "cortex-m4", "kernels"),
    (BuildRequest(strategy="annealing"), "cortex-m4", "strategy"),
    (BuildRequest(precision="float16"), "cortex-m4", "precision"),  # a host option for firmware
    (BuildRequest(precision="float16"), "cpu-host", "precision"),  # a precision the target lacks
    (BuildRequest(max_flash=4096), "cpu-host", "max_flash"),  # a firmware budget for a host
    (BuildRequest(budget=8), "cuda-host", "budget"),  # host builds are not searched
    (BuildRequest(emulator="renode"), "cortex-m55", "emulator"),  # no Renode machine
    (BuildRequest(emulator="ibex"), "cortex-m4", "emulator"),  # Ibex runs RV32IMC only
    (BuildRequest(emulator="gem5"), "cortex-m4", "emulator"),  # not a runner
    (BuildRequest(max_ram="64K"), "cortex-m4", "max_ram"),  # made in code: the field's type
    (BuildRequest(cuda_graph=1), "cuda-host", "cuda_graph"),
    (BuildRequest(inputs=True), "cortex-m4", "inputs"),
])
def test_check_refuses_naming_the_option(request_, target, option):
    with pytest.raises(InvalidRequest) as e:
        request_.check(get_target(target))
    assert e.value.name == option
    assert str(e.value).startswith(f"--{option.replace('_', '-')} ")


def test_check_knows_which_formats_an_option_applies_to():
    BuildRequest(quantize="int8").check(get_target("cortex-m4"), "keras")
    with pytest.raises(InvalidRequest, match="--quantize applies to Keras/SavedModel models, not TFLite models"):
        BuildRequest(quantize="int8").check(get_target("cortex-m4"), "tflite")


def test_options_that_fit_are_accepted():
    BuildRequest(emulator="renode", max_ram=64 * 1024, budget=4, strategy="guided").check(get_target("cortex-m4"))
    BuildRequest(emulator="ibex").check(get_target("rv32imac"))
    BuildRequest(precision="float16", tune_trials=8, tune_minutes=1).check(get_target("cuda-host"))


def test_stored_and_grouped_forms_round_trip():
    r = BuildRequest(max_ram=1000, budget=4, strategy="random", seed=3, emulator="renode")
    assert r.to_dict() == {"max_ram": 1000, "budget": 4, "strategy": "random", "seed": 3, "emulator": "renode"}
    assert BuildRequest.from_dict(r.to_dict()) == r
    grouped = r.grouped()
    assert grouped == {"constraints": {"max_ram": 1000}, "search": {"budget": 4, "strategy": "random", "seed": 3},
                       "emulator": "renode"}
    assert BuildRequest.from_grouped(grouped) == r
    with pytest.raises(InvalidRequest, match="--colour is not a build option"):
        BuildRequest.from_dict({"colour": "red"})


def test_applying_sets_only_what_the_target_takes():
    r = BuildRequest().applying(get_target("cortex-m4"), inputs=5, tuning_dir="/tmp/db")
    assert (r.inputs, r.tuning_dir) == (5, None)
    r = BuildRequest().applying(get_target("cpu-host"), inputs=5, tuning_dir="/tmp/db")
    assert (r.inputs, r.tuning_dir) == (5, "/tmp/db")


def test_cli_flags_become_the_request():
    parser = argparse.ArgumentParser()
    add_arguments(parser, "compile")
    args = parser.parse_args(["--max-ram", "64K", "--kernels", "dsp16", "-n", "4", "--tune-minutes", "2.5"])
    assert from_args(args, "compile") == BuildRequest(max_ram=65536, kernels="dsp16", inputs=4, tune_minutes=2.5)


@pytest.mark.parametrize("argv, flag", [
    (["compile", "m.tflite", "-t", "cortex-m4", "--precision", "float16"], "--precision"),
    (["compile", "m.tflite", "-t", "cortex-m4", "--tune-trials", "5"], "--tune-trials"),
    (["search", "m.tflite", "-t", "cortex-m4", "--calibration", "c.npz"], "--calibration"),
])
def test_cli_refuses_an_option_the_target_or_model_does_not_take(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.tflite").write_bytes(b"not read: the request is refused first")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tinymlaas: error: {flag} ")


@pytest.mark.parametrize("command", ["compile", "search"])
def test_both_commands_validate_a_value_the_same_way(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "m.tflite", "-t", "cortex-m4", "--max-ram", "0"])
    assert e.value.code == 2
    assert "--max-ram: must be at least 1" in capsys.readouterr().err


def test_each_option_names_backends_that_exist():
    kinds = {backend_for(t).name for t in all_targets().values()}
    for name, opt in OPTIONS.items():
        assert opt.backends <= kinds, name
        assert set(opt.surfaces) <= set(SURFACES), name
