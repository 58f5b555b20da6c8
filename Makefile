# tinymlaas: `make setup` installs everything on a fresh Debian 12 machine; `make demo`; `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= ../shared/models/mlperf-tiny
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Cross compilers with picolibc, QEMU for Arm and RISC-V, LLVM 15 (llvm-mca for cycle estimates);
# Mosquitto (the production MQTT broker) and PostgreSQL (the tests also run the API on it);
# Verilator, g++ and libelf for the cycle-accurate Ibex model; Mono for Renode; Chromium and its WebDriver for the
# dashboard's browser tests.
APT_PACKAGES := gcc make gcc-arm-none-eabi picolibc-arm-none-eabi \
	gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-arm qemu-system-misc llvm-15 \
	mosquitto postgresql verilator g++ libelf-dev mono-complete chromium chromium-driver
# lowRISC Ibex (RTL), from which `make ibex` builds the Verilator models of targets ibex-small and ibex-maxperf.
IBEX_SRC ?= ../shared/third_party/ibex
# Renode 1.15 (no package registry carries it): a `renode` on PATH, else this build.
RENODE ?= ../shared/third_party/renode/renode

PLUGIN := build/qemu-plugin/libtinymlaas_icount.so

.PHONY: setup apt venv plugin ibex renode platformio demo lint test test-all bench corpus clean

setup: apt venv plugin ibex renode platformio

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-tensorflow.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q -r requirements-tensorflow.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

plugin: $(PLUGIN)

$(PLUGIN): firmware/qemu_plugin/icount.c
	mkdir -p $(dir $@)
	gcc -shared -fPIC -O2 -Wall -o $@ $<

# Each configuration builds once (about 1-3 minutes) into build/ibex/CONFIG; skipped when present.
ibex: venv
	TINYMLAAS_IBEX_SRC=$(abspath $(IBEX_SRC)) $(PY) -m tinymlaas.runners.ibex small maxperf

# Renode runs from where it is; check that it starts (the runner finds it the same way: TINYMLAAS_RENODE, PATH, RENODE).
renode: apt
	@r=$$(command -v renode || echo $(RENODE)); test -x "$$r" || { echo "Renode not found at $(RENODE)"; exit 1; }; \
	echo "Renode: $$r"

# PlatformIO builds offline: its SCons package, made from the SCons on PyPI, in build/platformio/core.
platformio: venv
	$(PY) -m tinymlaas.backends.platformio

# The whole flow: boards, one compile report, then server + embedded broker + 3 emulated devices,
# KWS uploaded, built per target, rolled out over MQTT, final fleet state.
demo: setup
	$(VENV)/bin/tinymlaas targets
	$(VENV)/bin/tinymlaas compile $(MODELS)/kws_ref_model.tflite --target cortex-m4 --progress
	$(VENV)/bin/tinymlaas demo $(MODELS)/kws_ref_model.tflite --data build/demo

lint: venv
	$(VENV)/bin/ruff check .

# The fast suite: everything but the `slow` marker (whole-model sweeps on soft-float cores), after the linter.
test: setup lint
	TINYMLAAS_MODELS=$(MODELS) $(PY) -m pytest -q -m "not slow" --durations=15

test-all: setup
	TINYMLAAS_MODELS=$(MODELS) $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/mlperf_tiny.py --models $(MODELS) --out benchmarks/results/mlperf_tiny.json
	$(PY) benchmarks/corpus.py --out benchmarks/results/corpus_architectures.json
	$(PY) benchmarks/onnx_mcu.py --out benchmarks/results/onnx_mcu.json
	$(PY) benchmarks/fleet.py --models $(MODELS) --large 1000 --out benchmarks/results/fleet.json
	$(PY) benchmarks/cycles.py --models $(MODELS) --out benchmarks/results/cycles.json
	$(PY) benchmarks/search.py --models $(MODELS) --budget 20 --out benchmarks/results/search.json
	$(PY) benchmarks/predictor.py --models $(MODELS) --out benchmarks/results/predictor.json

# Regenerate the committed test corpus with TensorFlow (make setup installs it).
corpus: setup
	$(PY) tests/corpus/generate.py
	$(PY) tests/corpus/trained.py

clean:
	rm -rf build out .pytest_cache
