"""The measurement database: one row per measured build or layer, for the runtime predictor to learn from.

Every build and run can record here: the CLI's compile and profile, the service's builds (in the service's own
database), the benchmarks and the search; devices in the field that report measured cycles over MQTT land in the
same table marked `cycles_kind="device"`. SQLAlchemy: a SQLite file by default ($TINYMLAAS_MEASUREMENTS, a URL or
a path; else ~/.local/share/tinymlaas/measurements.db), or any database URL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

CYCLES_KINDS = ("true", "estimate", "device")  # RTL simulation, static model x block counts, a board's own counter


class Base(DeclarativeBase):
    pass


class Measurement(Base):
    __tablename__ = "measurements"
    id: Mapped[int] = mapped_column(primary_key=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None))
    source: Mapped[str] = mapped_column(String(16), index=True)  # compile, profile, service, benchmark, search, device
    model_hash: Mapped[str] = mapped_column(String(64), index=True)  # sha256 of the .tflite compiled
    model_name: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(String(32), index=True)
    core: Mapped[str] = mapped_column(String(32))
    runner: Mapped[str] = mapped_column(String(16))  # qemu, ibex, device
    layer: Mapped[int | None] = mapped_column(Integer)  # step of the inference; None: the whole model
    op_index: Mapped[int | None] = mapped_column(Integer)  # TFLite operator index
    opcode: Mapped[str | None] = mapped_column(String(48))
    implementation: Mapped[str | None] = mapped_column(String(32))  # kernel variant (registry)
    schedule: Mapped[dict | None] = mapped_column(JSON)  # schedule parameters of the variant
    quantization: Mapped[str | None] = mapped_column(String(16))
    features: Mapped[dict | None] = mapped_column(JSON)  # static features: shapes, MACs, bytes
    instructions: Mapped[int | None] = mapped_column(Integer)
    memory_accesses: Mapped[int | None] = mapped_column(Integer)
    cycles: Mapped[float | None] = mapped_column(Float)
    cycles_kind: Mapped[str | None] = mapped_column(String(16))  # CYCLES_KINDS
    cycles_source: Mapped[str | None] = mapped_column(Text)  # e.g. "Ibex 'small' RTL (Verilator)"
    fidelity: Mapped[dict | None] = mapped_column(JSON)
    flash_bytes: Mapped[int | None] = mapped_column(Integer)
    ram_bytes: Mapped[int | None] = mapped_column(Integer)
    device_id: Mapped[str | None] = mapped_column(String(96))
    build_id: Mapped[int | None] = mapped_column(Integer)


def default_url() -> str:
    env = os.environ.get("TINYMLAAS_MEASUREMENTS")
    if env:
        return env if "://" in env else f"sqlite:///{Path(env).resolve()}"
    home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tinymlaas"
    return f"sqlite:///{home / 'measurements.db'}"


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def engine_for(url: str | None = None):
    """The database at `url` (default: default_url()); a SQLite file is made private (0600) when created."""
    url = url or default_url()
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        if not db.exists():  # private from the start
            db.touch(mode=0o600)
    return create_engine(url)


class MeasurementStore:
    """Rows in and out. `engine`: an existing engine (the service's); else one for `url`."""

    def __init__(self, url: str | None = None, engine=None):
        self.engine = engine if engine is not None else engine_for(url)
        engine = self.engine
        Base.metadata.create_all(engine, checkfirst=True)

    def add(self, rows: list[Measurement]) -> list[int]:
        with Session(self.engine, expire_on_commit=False) as s:
            s.add_all(rows)
            s.commit()
            return [r.id for r in rows]

    def rows(self, **where) -> list[Measurement]:
        with Session(self.engine, expire_on_commit=False) as s:
            q = select(Measurement).order_by(Measurement.id)
            for key, value in where.items():
                q = q.where(getattr(Measurement, key) == value)
            return list(s.scalars(q))

    def record_compile(self, report, model_file: Path, source: str = "compile", build_id: int | None = None,
                       target=None) -> list[int]:
        """One whole-model row from a CompileReport (`model_file`: the .tflite it compiled)."""
        cycles_kind = "true" if report.cycles is not None else None
        return self.add([Measurement(
            source=source, model_hash=file_hash(model_file), model_name=report.model, target=report.target,
            core=report.core, runner=report.runner, quantization=report.lowering,
            instructions=report.instructions, memory_accesses=report.memory_accesses, cycles=report.cycles,
            cycles_kind=cycles_kind, cycles_source=report.cycles_source, fidelity=report.fidelity,
            flash_bytes=report.sizes.get("flash_model"), ram_bytes=report.sizes.get("ram_model"), build_id=build_id)])

    def record_profile(self, profile, model_file: Path, target, source: str = "profile") -> list[int]:
        """One row per step of a Profile: the estimate, and a second row with the true cycles where there are."""
        digest, rows = file_hash(model_file), []
        variant = profile.variant or {}
        schedule = {**variant.get("schedule", {}), "fusion": variant.get("fusion", "default")} if variant else None
        for s in profile.steps:
            common = {"source": source, "model_hash": digest, "model_name": profile.model, "target": profile.target,
                      "core": target.core, "layer": s.step, "op_index": s.op_index, "opcode": s.opcode,
                      "implementation": s.implementation, "schedule": schedule, "quantization": profile.quantization,
                      "features": s.features, "instructions": s.instructions, "memory_accesses": s.memory_accesses}
            rows.append(Measurement(**common, runner="qemu", cycles=s.cycles_estimate, cycles_kind="estimate",
                                    cycles_source=profile.estimate_method))
            if s.cycles is not None:
                rows.append(Measurement(**common, runner="ibex", cycles=s.cycles, cycles_kind="true",
                                        cycles_source=profile.cycles_source))
        return self.add(rows)


def device_measurement(device_id: str, target: str, core: str, data: dict, model_hash: str, model_name: str,
                       build_id: int | None) -> Measurement | None:
    """A row from a device's telemetry, when it reports cycles it measured itself (None otherwise)."""
    cycles = data.get("cycles")
    if not isinstance(cycles, int) or isinstance(cycles, bool) or cycles <= 0:
        return None
    instructions = data.get("instructions") if isinstance(data.get("instructions"), int) else None
    return Measurement(source="device", model_hash=model_hash, model_name=model_name, target=target, core=core,
                       runner="device", instructions=instructions, cycles=float(cycles), cycles_kind="device",
                       cycles_source=f"reported by device {device_id}", device_id=device_id, build_id=build_id)


def record_report(report) -> str | None:
    """A CompileReport into the default measurement database. A database problem costs the row, not the build:
    returns a one-line warning instead of raising."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        MeasurementStore().record_compile(report, Path(report.artifacts["model"]))
    except (SQLAlchemyError, OSError) as e:
        return f"not recorded in {default_url()}: {str(e).splitlines()[0][:200]}"
    return None
