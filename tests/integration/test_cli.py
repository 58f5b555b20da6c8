"""The CLI as a user meets it: exit status 2 and one clear line for bad input, nothing half-written."""

import json

from tests.helpers.cli import cli
from tests.helpers.paths import model_path
from tests.helpers.quantized_layers import unsupported_operator_model


def assert_clean_failure(proc, out_dir, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tinymlaas: error: ")
    for f in fragments:
        assert f in lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


def test_targets_lists_boards():
    proc = cli("targets")
    assert proc.returncode == 0
    for name in ("cortex-m3", "cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55", "rv32imac", "rv32imafc"):
        assert name in proc.stdout


def test_not_a_tflite_file(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    out = tmp_path / "out"
    assert_clean_failure(cli("compile", bad, "--target", "cortex-m4", "--out", out), out, "not a TFLite flatbuffer")


def test_unknown_target(tmp_path, models_dir):
    out = tmp_path / "out"
    proc = cli("compile", model_path("kws_ref_model"), "--target", "esp8266", "--out", out)
    assert_clean_failure(proc, out, "unknown target 'esp8266'", "cortex-m4")


def test_unsupported_operator_named(tmp_path):
    data = unsupported_operator_model()
    path = tmp_path / "dus.tflite"
    path.write_bytes(data)
    out = tmp_path / "out"
    assert_clean_failure(cli("compile", path, "--target", "cortex-m4", "--out", out), out, "DYNAMIC_UPDATE_SLICE")


def test_model_too_large_for_board(tmp_path, models_dir):
    out = tmp_path / "out"
    proc = cli("compile", model_path("vww_96_float"), "--target", "cortex-m3", "--out", out)
    # the 128 KiB of RAM of the Cortex-M3 board cannot hold VWW's float activations
    assert_clean_failure(proc, out, "does not fit cortex-m3", "RAM", "> 131,072 B", "arena",
                         "--target cuda-host (NVIDIA GPU) or cpu-host")


def test_model_over_user_budget(tmp_path, models_dir):
    out = tmp_path / "out"
    proc = cli("compile", model_path("kws_ref_model"), "--target", "cortex-m4", "--max-flash", "16K", "--out", out)
    assert_clean_failure(proc, out, "flash", "> 16,384 B")
    assert "cuda-host" not in proc.stderr  # the board could hold it: the user's budget refused it, no host hint


def test_emulator_timeout_keeps_previous_output(tmp_path, models_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous build\n")
    proc = cli("compile", model_path("kws_ref_model"), "--target", "cortex-m4", "--timeout", "0.05", "--out", out)
    assert proc.returncode == 2
    assert "did not finish within 0.05 s" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "report.json").read_text() == "previous build\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_option_values(tmp_path, models_dir):
    proc = cli("compile", model_path("kws_ref_model"), "--target", "cortex-m4", "--max-ram", "lots")
    assert proc.returncode == 2 and "is not a size" in proc.stderr
    proc = cli("compile", model_path("kws_ref_model"), "--target", "cortex-m4", "--inputs", "0")
    assert proc.returncode == 2 and "at least 1" in proc.stderr


def test_default_output_folder_is_relative_to_cwd(tmp_path, models_dir):
    proc = cli("compile", model_path("ad01_int8"), "--target", "cortex-m4", "--inputs", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "ad01_int8-cortex-m4" / "firmware.elf").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ad01_int8-cortex-m4"]


def test_compile_json(tmp_path, models_dir):
    out = tmp_path / "kws"
    proc = cli("compile", model_path("ad01_fp32"), "--target", "rv32imafc", "--inputs", "2", "--json", "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verified"] and report["target"] == "rv32imafc"
    assert report["instructions"] > 0 and report["sizes"]["weights"] > 1_000_000
    assert (out / "firmware.elf").exists()


def test_output_cut_short_by_its_reader_is_not_an_error():
    """`tinymlaas targets | head -1`: the reader closes the pipe; no internal error, no traceback, status 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tinymlaas", "targets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()  # before the process has written anything (its imports take a second): every write fails
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_targets_name_their_renode_machine():
    r = cli("targets")
    assert r.returncode == 0 and "Renode: STM32F407 (Renode stm32f4)" in r.stdout
