"""One build request: every option a user can give a build, declared once.

Each field of `BuildRequest` carries its `Option`: help text, choices, range, which backends and model formats it
applies to, where users set it (the `compile` and `search` commands, the service's build request) and, for the
service, the object it is nested in. From these come the command-line flags (`add_arguments`, `from_args`), the
service's request schema (server/api/schemas.py reads `options("service")`) and the one validation
(`BuildRequest.check(target)`), used by the CLI, the API and the build worker alike. A new option is one field here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinymlaas.errors import TinyMLaaSError

SURFACES = ("compile", "search", "service")
ALL_BACKENDS = frozenset({"mcu", "host"})


class InvalidRequest(TinyMLaaSError):
    """An option out of range, not among its choices, or set where it does not apply: names the option."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why
        super().__init__(f"{flag_of(name)} {why}")


@dataclass(frozen=True)
class Option:
    """What a user needs to know of one field, and the rules its value follows."""

    help: str
    choices: tuple | Callable[[], tuple] | None = None  # a callable reads a table (runners, strategies) when asked
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    unit: str | None = None  # "bytes": the CLI takes 256K / 1M; "path": a file on the machine that builds
    backends: frozenset = ALL_BACKENDS  # the backends (tinymlaas.backends.BACKENDS) it applies to
    formats: frozenset | None = None  # the model formats it applies to (tinymlaas.build.formats); None: all
    surfaces: tuple = SURFACES  # where users set it
    group: str | None = None  # the service's request nests it in this object ("constraints", "search", "host")
    short: str | None = None  # a one-letter CLI flag
    flag: str | None = None  # the CLI flag, where it is not the name with dashes
    metavar: str | None = None

    def allowed(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices

    def problem(self, value) -> str | None:
        """Why `value` is not acceptable, or None."""
        if value is None:
            return None
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            return f"must be one of {', '.join(map(str, allowed))}, not '{str(value)[:40]}'"
        if self.min is not None and (value < self.min if self.min_inclusive else value <= self.min):
            return f"must be {'at least' if self.min_inclusive else 'more than'} {self.min:g}"
        if self.max is not None and value > self.max:
            return f"must be at most {self.max:g}"
        return None


def option(default: Any = None, **kwargs) -> Any:
    return field(default=default, metadata={"option": Option(**kwargs)})


def _runners() -> tuple:
    from tinymlaas.runners import RUNNERS

    return tuple(RUNNERS)


def _strategies() -> tuple:
    from tinymlaas.search.strategies import STRATEGIES

    return tuple(STRATEGIES)


def _quantize() -> tuple:
    from tinymlaas.frontend.keras import QUANTIZE

    return QUANTIZE


def _weights() -> tuple:
    from tinymlaas.frontend.lowbit import WEIGHT_SETS

    return ("stored", "float32", "int4", "auto", "palette", *WEIGHT_SETS)


MCU, HOST = frozenset({"mcu"}), frozenset({"host"})
KERAS = frozenset({"keras"})
COMPILE, SEARCH, SERVICE = "compile", "search", "service"


@dataclass(frozen=True)
class BuildRequest:
    """How to build a model for a target (the model and the target themselves are named beside it)."""

    # budgets, tighter than the board's
    max_flash: int | None = option(help="flash budget for the model, e.g. 512K (default: the board's)", min=1,
                                   unit="bytes", group="constraints", backends=MCU)
    max_ram: int | None = option(help="RAM budget for the model, e.g. 128K (default: the board's)", min=1,
                                 unit="bytes", group="constraints", backends=MCU)
    # verification
    inputs: int | None = option(help="random inputs to verify with (default 10 in QEMU and Renode, 1 on Ibex, 3 "
                                "on host targets; search: 3 per point)", min=1, max=10_000, short="n",
                                surfaces=(COMPILE, SEARCH))
    seed: int = option(0, help="seed of the random inputs (and of the search; default 0)", min=0, max=2**31 - 1,
                       group="search")
    timeout: float | None = option(help="emulator time limit in seconds (default 120 in QEMU, 300 in Renode, 1800 "
                                   "on Ibex)", min=0, min_inclusive=False, surfaces=(COMPILE,), backends=MCU)
    emulator: str | None = option(help="where the firmware runs: qemu (exact instruction counts), renode "
                                  "(Renode's model of a real part of the target's class, exact instruction "
                                  "counts) or ibex (the Ibex core simulated from its RTL: true cycles, RV32 "
                                  "without FPU); default: the target's", choices=_runners, backends=MCU,
                                  surfaces=(COMPILE, SERVICE))
    estimate_cycles: bool = option(True, help="estimate the cycles of an inference and its latency at the board's "
                                   "clock from QEMU's per-block counts and the core's cost model (llvm-mca's "
                                   "scheduling model, or the core manual's pipeline table): core cycles with zero "
                                   "flash wait states; block costs are cached, so only a model's new code costs "
                                   "llvm-mca time (true cycles need the core's RTL: the ibex runner)",
                                   backends=MCU, surfaces=(COMPILE, SERVICE))
    profile: bool = option(False, help="also profile the build layer by layer (one more build, with a mark around "
                           "each step): instructions, memory accesses and estimated cycles per TFLite operator and "
                           "kernel variant (true cycles on Ibex), printed and kept in report.json",
                           backends=MCU, surfaces=(COMPILE,))
    # microcontroller code generation
    int8_lowering: str = option("integer", help="int8 models: integer kernels (bit-exact, default) or TVM's float "
                                "emulation of int8 ops", choices=("integer", "float"), backends=MCU,
                                surfaces=(COMPILE,))
    kernels: str = option("auto", help="int8 layers: TIR kernels, DSP micro-kernels (SMLAD) with the int8 weights "
                          "or int16 (dsp16: faster, 2x weight flash), or auto: dsp where the core has DSP",
                          choices=("auto", "tir", "dsp", "dsp16"), backends=MCU, surfaces=(COMPILE,))
    memory: str = option("auto", help="arena plan: TVM's, optimal offsets over tensor lifetimes, inplace: optimal "
                         "with streaming kernels writing over their dying input (smallest RAM), or auto (default): "
                         "optimal, in place when that does not fit the RAM budget; optimal and inplace write each "
                         "input of a concatenation straight into its slice",
                         choices=("auto", "tvm", "optimal", "inplace"), backends=MCU, surfaces=(COMPILE,))
    weights: str = option("stored", help="stored (default): weights as the model stores them; float16 and "
                          "dynamic-range exports keep that width in flash and the kernels widen each one they read; "
                          "float32: those widened once at build time (fewer instructions, 2x or 4x the weight "
                          "flash; the same values); int4: an integer model's convolution and fully connected "
                          "weights re-quantized to 4 bits per channel, two to a byte in flash (the build verified "
                          "against the interpreter on that int4 model); auto: per layer the smallest of palettes "
                          "of 4 or 8 values, int4 and int8 that keeps the accuracy on --validation within "
                          "--max-accuracy-drop; palette: "
                          "each layer's weights snapped to 2^--palette-bits values (k-means), kept as indices. "
                          "search (and a service build that searches) also takes a set of int4, palette and auto, "
                          "such as int4,palette: each one's plan measured on --validation, the smallest within "
                          "--max-accuracy-drop given to every candidate, the others built on the best and kept on "
                          "the front when within it (off it when not)",
                          choices=_weights, backends=MCU, surfaces=(COMPILE, SEARCH, SERVICE), metavar="WEIGHTS")
    palette_bits: int = option(4, help="--weights palette: bits per weight index (2-6: 4 to 64 values a layer)",
                               min=2, max=6, backends=MCU, surfaces=(COMPILE, SEARCH, SERVICE), metavar="BITS")
    validation: str | None = option(help="an .npz of held-out samples: `x` (sample axis first; floats are quantized "
                                    "as the model's input asks) and `y` (labels, or target outputs for mse): the "
                                    "build's accuracy on them (the interpreter on the model the firmware computes, "
                                    "bit-exact), beside the model as given (the service: the model's uploaded set, "
                                    "PUT /models/{id}/validation)", unit="path", backends=MCU,
                                    surfaces=(COMPILE, SEARCH), metavar="NPZ")
    metric: str = option("top1", help="the accuracy --validation measures: top1, top5, auc (a single score, or the "
                         "second of two) or mse", choices=("top1", "top5", "mse", "auc"), backends=MCU,
                         surfaces=(COMPILE, SEARCH, SERVICE))
    max_accuracy_drop: float | None = option(help="weights below eight bits: the most accuracy they may cost against "
                                             "the model as given, in points (percentage points of top-k or AUC; "
                                             "percent more error for mse); needs --validation", min=0.0, max=100.0,
                                             backends=MCU, surfaces=(COMPILE, SEARCH, SERVICE), metavar="POINTS")
    # Keras / SavedModel input
    quantize: str = option("none", help="Keras/SavedModel input: quantize when converting (default none: float32; "
                           "mixed: int8 with the layers int8 hurts most left in float)", choices=_quantize,
                           formats=KERAS, surfaces=(COMPILE,))
    calibration: str | None = option(help="Keras/SavedModel input: .npz of calibration samples, one array per "
                                     "input (search: an array `labels` adds accuracy, and the search compares "
                                     "float32, int8, int16x8 and mixed precision)", unit="path", formats=KERAS,
                                     surfaces=(COMPILE, SEARCH), metavar="NPZ")
    # host targets
    precision: str = option("float32", help="host targets: float16 halves weights and activations (float32 "
                            "accumulation; tensor cores on CUDA); the target lists what it builds",
                            choices=("float32", "float16"), backends=HOST, group="host")
    tune_trials: int = option(0, help="host targets: tune with meta_schedule, at most N trials (default 0: TVM's "
                              "default schedules); the tuning is kept per model, target and precision, so a "
                              "rebuild runs none", min=0, max=20_000, backends=HOST, group="host", metavar="N")
    tune_trials_per_task: int | None = option(help="host targets: at most M trials per task", min=1, max=20_000,
                                              backends=HOST, surfaces=(COMPILE,), metavar="M")
    tune_minutes: float | None = option(help="host targets: stop tuning once MIN minutes have passed (checked "
                                        "between rounds)", min=0.1, max=720, backends=HOST, group="host",
                                        metavar="MIN")
    cuda_graph: bool = option(True, help="host targets: a CUDA build captures its kernel launches once and replays "
                              "them as a CUDA graph (--no-cuda-graph: launched one by one, as TVM does by default)",
                              backends=HOST, group="host")
    tuning_dir: str | None = option(help="host targets: tuning databases, reused by later builds of the same "
                                    "model (default OUT/../tuning)", unit="path", backends=HOST,
                                    surfaces=(COMPILE,))
    sample_inputs: str | None = option(help="verify with these inputs instead of random ones (one array per input "
                                       "name, samples on a leading axis): for inputs random values do not suit",
                                       unit="path", surfaces=(COMPILE,), metavar="NPZ")
    # the variant search (microcontroller targets)
    budget: int | None = option(help="search: at most this many variants built, run and verified (default 16; "
                                "Keras input: the 5 quantization variants first, then the kernel search on the "
                                "chosen one)", min=1, max=256, backends=MCU, surfaces=(SEARCH, SERVICE),
                                group="search", short="b")
    strategy: str = option("nsga2", help="search: NSGA-II (default), random, or guided (a learned model screens "
                           "sampled candidates, only its best are built; on Ibex targets the best are confirmed in "
                           "true cycles); all seeded with the default build and uniform kernels; tune: every "
                           "convolution and fully connected layer tuned on its own over its TIR schedules and C "
                           "kernels, a predictor choosing what to build, a tuning log shared across models "
                           "(tune-random: without the predictor)",
                           choices=_strategies, backends=MCU, surfaces=(SEARCH, SERVICE), group="search")
    max_fidelity_loss: float = option(0.0, help="search: largest accepted fidelity loss (int8: LSB off the "
                                      "interpreter; float: relative error beyond the compiler's tolerance is never "
                                      "accepted; Keras input: the quantized variant's output RMSE relative to the "
                                      "float model's); default 0", min=0.0, max=1e6, backends=MCU,
                                      surfaces=(SEARCH, SERVICE), group="search")
    workers: int | None = option(help="search: parallel builds (default: the CPU count, at most 8)", min=1, max=256,
                                 backends=MCU, surfaces=(SEARCH,), short="j")
    ray: str | None = option(help="search: build on a Ray cluster (e.g. auto, ray://head:10001; local: one started "
                             "on this machine); its workers need tinymlaas and the model's folder shared",
                             backends=MCU, surfaces=(SEARCH,), metavar="ADDRESS")
    variant_file: str | None = option(help="build exactly this variant (per-layer kernels, schedule, fusion, memory "
                                      "plan): a JSON file of one, such as a search's front.json (its chosen point) "
                                      "or a build's report.json (the variant it was built as)", unit="path",
                                      backends=MCU, surfaces=(COMPILE,), flag="--variant", metavar="JSON")
    # not an option: a search's point (a tinymlaas.search.space.Variant), built instead of `kernels`
    variant: Any = field(default=None, compare=False)

    def check(self, target, model_format: str | None = None) -> BuildRequest:
        """Every value within its option's rules, and set only where it applies to `target` (and the model's
        format, when known); raises InvalidRequest naming the first that is not. Returns the request."""
        from tinymlaas.backends import backend_for, targets_of

        backend = backend_for(target)
        for f, opt in declared():
            value = getattr(self, f.name)
            why = _type_problem(f, value) or opt.problem(value)
            if why is not None:
                raise InvalidRequest(f.name, why)
            if value == f.default:
                continue
            if backend.name not in opt.backends:
                raise InvalidRequest(f.name, f"applies to {targets_of(opt.backends)}, not {target.name}")
            if model_format is not None and opt.formats is not None and model_format not in opt.formats:
                from tinymlaas.build.formats import FORMATS

                raise InvalidRequest(f.name, f"applies to {' and '.join(FORMATS[n].what for n in sorted(opt.formats))}"
                                     f", not {FORMATS[model_format].what}")
        why = backend.request_problem(self, target)
        if why is not None:
            raise InvalidRequest(*why)
        return self

    def applying(self, target, **values) -> BuildRequest:
        """The request with those of `values` set whose options apply to `target`'s backend (a service's defaults:
        a tuning folder means nothing to firmware)."""
        from tinymlaas.backends import backend_for

        kind = backend_for(target).name
        return dataclasses.replace(self, **{k: v for k, v in values.items() if kind in OPTIONS[k].backends})

    def to_dict(self) -> dict:
        """The declared options that differ from their defaults (JSON: what the service stores)."""
        return {f.name: getattr(self, f.name) for f, _ in declared() if getattr(self, f.name) != f.default}

    @classmethod
    def from_dict(cls, data: dict) -> BuildRequest:
        known = {f.name for f, _ in declared()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(unknown[0], "is not a build option")
        return cls(**data)

    def grouped(self, surface: str = SERVICE) -> dict:
        """The service's shape of `to_dict()`: grouped options nested in their objects."""
        out: dict = {}
        for name, value in self.to_dict().items():
            opt = OPTIONS[name]
            if surface in opt.surfaces:
                (out.setdefault(opt.group, {}) if opt.group else out)[name] = value
        return out

    @classmethod
    def from_grouped(cls, data: dict, surface: str = SERVICE) -> BuildRequest:
        """The request from the service's nested shape (objects named by `Option.group`; None: not given)."""
        flat = {}
        for f, opt in declared(surface):
            holder = (data.get(opt.group) or {}) if opt.group else data
            if f.name in holder:
                flat[f.name] = holder[f.name]
        return cls(**flat)


def declared(surface: str | None = None) -> list[tuple[dataclasses.Field, Option]]:
    """The request's options in declaration order, those a surface offers when one is named."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(BuildRequest)
            if "option" in f.metadata and (surface is None or surface in f.metadata["option"].surfaces)]


OPTIONS = {f.name: opt for f, opt in declared()}


def groups(surface: str = SERVICE) -> dict[str | None, list[tuple[dataclasses.Field, Option]]]:
    """The options a surface offers by the object they are nested in (None: the request's top level)."""
    out: dict = {}
    for f, opt in declared(surface):
        out.setdefault(opt.group, []).append((f, opt))
    return out


def value_type(f: dataclasses.Field) -> type:
    """bool, int, float or str: the field's type without None."""
    text = str(f.type)
    return next((t for t in (bool, int, float) if text.startswith(t.__name__)), str)


def flag_of(name: str) -> str:
    """The CLI flag of an option (errors name options by it): its own, else the name with dashes."""
    opt = OPTIONS.get(name)
    return opt.flag if opt and opt.flag else f"--{name.replace('_', '-')}"


def _type_problem(f: dataclasses.Field, value) -> str | None:
    """Requests made in code (or read back from storage) carry Python values: the field's type, or None."""
    want = value_type(f)
    ok = value is None or (isinstance(value, want) and not (want is int and isinstance(value, bool))) or \
        (want is float and isinstance(value, int) and not isinstance(value, bool))
    what = {bool: "true or false", int: "an integer", float: "a number", str: "text"}[want]
    return None if ok else f"must be {what}, not {type(value).__name__}"


# the command line

def parse_size(text: str) -> int:
    """Bytes, with an optional K/M suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    try:
        return int(float(t.rstrip("KM")) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 256K, 1M, 65536)") from None


BOOL_TEXT = {"yes": True, "no": False, "true": True, "false": False}


def parse_text(name: str, text: str):
    """An option's value from text (a command line's, a web form's): sizes take K/M, booleans yes/no. Its range and
    choices are left to `check`; a text that is not of the option's type is an InvalidRequest naming it."""
    f, opt = next((f, o) for f, o in declared() if f.name == name)
    kind = value_type(f)
    try:
        if kind is bool:
            return BOOL_TEXT[text.strip().lower()]
        if opt.unit == "bytes":
            return parse_size(text)
        return kind(text)
    except (KeyError, ValueError, argparse.ArgumentTypeError):
        what = ("a size (e.g. 256K, 1M, 65536)" if opt.unit == "bytes" else
                {bool: "yes or no", int: "an integer", float: "a number"}.get(kind, "text"))
        raise InvalidRequest(name, f"'{text[:40]}' is not {what}") from None


def _cli_type(f: dataclasses.Field, opt: Option) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = parse_text(f.name, text)
        except InvalidRequest as e:
            raise argparse.ArgumentTypeError(e.why) from None
        if opt.unit != "path" and opt.allowed() is None:
            why = opt.problem(value)
            if why is not None:
                raise argparse.ArgumentTypeError(why)
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, surface: str) -> None:
    """The flags of every option `surface` offers: --max-ram, --tune-trials, ..."""
    for f, opt in declared(surface):
        flags = [flag_of(f.name)] + ([f"-{opt.short}"] if opt.short else [])
        kwargs: dict = {"help": opt.help, "dest": f.name, "default": f.default}
        if value_type(f) is bool:  # --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.allowed() is not None:
            kwargs["choices"] = opt.allowed()
        else:
            kwargs["type"] = _cli_type(f, opt)
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        parser.add_argument(*flags, **kwargs)


def from_args(args: argparse.Namespace, surface: str) -> BuildRequest:
    return BuildRequest(**{f.name: getattr(args, f.name) for f, _ in declared(surface)})
