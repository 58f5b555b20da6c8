"""The tuning log: what each candidate kernel of a layer cost on a target, keyed by the layer's signature (its
operator, shapes, strides, padding, activation, precision) and the candidate (a C kernel, or the TIR kernel under
one ir.layer_schedule.LayerSchedule). The next model with a layer of the same signature reads its costs here
instead of building them again.

A table of the measurement database (tinymlaas.measure.database: a SQLite file by default, or the URL in
$TINYMLAAS_MEASUREMENTS), so the service's workers share it; a candidate is recorded once per (target, signature).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from tinymlaas.measure.database import Base, engine_for


class TuningRecord(Base):
    __tablename__ = "tuning_log"
    __table_args__ = (UniqueConstraint("target", "signature", "candidate"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None))
    target: Mapped[str] = mapped_column(String(32), index=True)
    signature: Mapped[str] = mapped_column(String(64), index=True)  # sha256 of `layer`
    layer: Mapped[str] = mapped_column(Text)  # the signature itself (JSON)
    candidate: Mapped[str] = mapped_column(String(255))  # "dsp16", or "tir" + the LayerSchedule's key
    schedule: Mapped[dict | None] = mapped_column(JSON)
    instructions: Mapped[int] = mapped_column(Integer)
    cycles_estimate: Mapped[float | None] = mapped_column(Float)
    cycles: Mapped[float | None] = mapped_column(Float)  # true cycles (RTL), where measured
    model_name: Mapped[str] = mapped_column(String(128))  # the model it was measured in


def signature_hash(layer: str) -> str:
    return hashlib.sha256(layer.encode()).hexdigest()


def candidate_key(implementation: str, schedule=None) -> str:
    return implementation if schedule is None else f"{implementation}:{schedule.key()}"


class TuningLog:
    def __init__(self, url: str | None = None):
        self.engine = engine_for(url)
        Base.metadata.create_all(self.engine, tables=[TuningRecord.__table__])

    def measured(self, target: str, layer: str) -> dict[str, dict]:
        """candidate -> its costs, for one layer signature on one target."""
        with Session(self.engine) as s:
            rows = s.scalars(select(TuningRecord).where(TuningRecord.target == target,
                                                        TuningRecord.signature == signature_hash(layer)))
            return {r.candidate: _as_dict(r) for r in rows}

    def rows(self, target: str) -> list[dict]:
        """Every record of a target (what the schedule predictor learns from)."""
        with Session(self.engine) as s:
            return [_as_dict(r) for r in s.scalars(select(TuningRecord).where(TuningRecord.target == target)
                                                   .order_by(TuningRecord.id))]

    def record(self, target: str, layer: str, candidate: str, *, schedule: dict | None, instructions: int,
               cycles_estimate: float | None, cycles: float | None, model_name: str) -> bool:
        """Add one measurement; False if the log had this candidate already (another worker measured it)."""
        row = TuningRecord(target=target, signature=signature_hash(layer), layer=layer, candidate=candidate,
                           schedule=schedule, instructions=int(instructions), cycles_estimate=cycles_estimate,
                           cycles=cycles, model_name=model_name[:128])
        with Session(self.engine) as s:
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return False
        return True


def _as_dict(r: TuningRecord) -> dict:
    return {"layer": json.loads(r.layer), "candidate": r.candidate, "schedule": r.schedule,
            "instructions": r.instructions, "cycles_estimate": r.cycles_estimate, "cycles": r.cycles,
            "model_name": r.model_name}
