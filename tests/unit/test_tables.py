"""Backends, runners, strategies and model formats are found by name in one table each; the choices users see
come from those tables."""

import argparse
from pathlib import Path

import pytest

from tinymlaas.backends import BACKENDS, backend_for, backend_named, builds_format, targets_of
from tinymlaas.backends.host import host_options
from tinymlaas.build.formats import FORMATS, format_of
from tinymlaas.build.request import OPTIONS, BuildRequest, add_arguments
from tinymlaas.runners import RUNNERS, runner_class
from tinymlaas.search.strategies import STRATEGIES
from tinymlaas.targets import all_targets, get_target

BACKEND_INTERFACE = ("name", "what", "label", "formats", "firmware", "searchable", "stored_artifacts", "build",
                     "format_report", "deployable", "request_problem")


@pytest.mark.parametrize("kind", BACKENDS)
def test_every_backend_has_the_interface(kind):
    backend = backend_named(kind)
    assert backend.name == kind
    assert all(hasattr(backend, a) for a in BACKEND_INTERFACE)
    assert backend.formats <= set(FORMATS)


def test_every_target_has_a_backend_and_the_deployable_ones_are_boards():
    for target in all_targets().values():
        backend = backend_for(target)
        if backend.deployable(target):
            assert backend.firmware and target.rtl is None and target.board.flash_bytes > 0
    assert not backend_for(get_target("cpu-host")).deployable(get_target("cpu-host"))
    assert not backend_for(get_target("ibex-small")).deployable(get_target("ibex-small"))


def test_formats_are_recognised_and_routed():
    assert [format_of(Path(p)).name for p in ("a.tflite", "b.onnx", "c.pt2", "d.keras", "e.h5", "f.bin")] == \
        ["tflite", "onnx", "pt2", "keras", "keras", "tflite"]
    assert builds_format("onnx") == {"mcu", "host"} and builds_format("tflite") == {"mcu", "host"}
    assert targets_of({"host"}) == "the host targets (cpu-host, cuda-host)"


@pytest.mark.parametrize("name", RUNNERS)
def test_every_runner_is_one_class_with_the_interface(name):
    cls = runner_class(name)
    assert cls.name == name
    assert all(hasattr(cls, a) for a in ("default_inputs", "device_images", "problem", "for_target", "run"))
    runner = cls.for_target(get_target("rv32imac" if name == "ibex" else "cortex-m4"), None)
    assert runner.name == name and hasattr(runner, "layout")  # Renode's memory map is its machine's


def test_which_runner_runs_which_target():
    assert runner_class("qemu").problem(get_target("cortex-m55")) is None
    assert runner_class("renode").problem(get_target("cortex-m55"))  # no Renode machine
    assert runner_class("renode").problem(get_target("cortex-m4")) is None
    assert runner_class("ibex").problem(get_target("rv32imafc"))  # Ibex has no FPU
    assert runner_class("ibex").problem(get_target("rv32imac")) is None
    with pytest.raises(ValueError, match="unknown emulator 'gem5'"):
        runner_class("gem5")


@pytest.mark.parametrize("option, table", [("emulator", RUNNERS), ("strategy", STRATEGIES)])
def test_the_choices_users_see_are_the_tables(option, table):
    assert OPTIONS[option].allowed() == tuple(table)
    parser = argparse.ArgumentParser()
    add_arguments(parser, "search" if option == "strategy" else "compile")
    assert tuple(next(a for a in parser._actions if a.dest == option).choices) == tuple(table)


def test_every_strategy_takes_one_context():
    import inspect

    for name, strategy in STRATEGIES.items():
        assert list(inspect.signature(strategy).parameters) == ["ctx"], name


def test_host_options_reach_the_host_build_by_name():
    options = host_options(BuildRequest(precision="float16", tune_trials=3, cuda_graph=False, tuning_dir="db",
                                        max_ram=1))
    assert (options.precision, options.tune_trials, options.cuda_graph) == ("float16", 3, False)
    assert options.tuning_dir == Path("db").resolve() and options.inputs == 3  # unset: HostOptions' default
    assert host_options(BuildRequest()).cuda_graph is True
