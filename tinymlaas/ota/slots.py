"""Device side of over-the-air updates: A/B slots in a flash image file and the boot decision.

Flash layout (one file per device): two 4 KiB boot-record sectors, then firmware slots 0 and 1, then model
slots 0 and 1 (layout.py). The boot record (active and pending firmware slot, active and pending model slot,
whether the pending image was tried) is written to the two sectors in turn with a sequence number and a CRC, so
a write torn by a reset leaves the previous record intact. The semantics are MCUboot's test/confirm: a new
image is written to an inactive slot and marked pending; the next boot runs it once as a test image; only a
confirm after the self-test makes it active; a reset before the confirm reverts to the previous image.

A firmware image carries the model it was built with; a model slot, once confirmed, replaces that model for
firmware of the same model ABI (package.py). Every boot pairs the firmware with a model its code was built
for: the active model slot's when its image is valid and of the firmware's ABI, else the firmware's own, so a
device always boots a valid pair. A pending firmware is tried with its own model; confirming it drops the
model slot's (made for the old code). One update is pending at a time.

Every flash write is a numbered write point; `Flash.fail_at` tears the write with that number
and raises PowerLoss, which is how the tests reset the device at every point of the path.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.ota.package import (
    FIRMWARE_IMAGE,
    MODEL_IMAGE,
    ImageInfo,
    ImageRejected,
    ModelLayout,
    image_payload,
    inspect_image,
    model_layout,
    split_payload,
)

SECTOR = 4096
RECORD_MAGIC = 0x544D4252  # "TMBR"
_RECORD = struct.Struct("<IIBBBBB")
NO_SLOT = 0xFF
CHUNK = SECTOR


class PowerLoss(Exception):
    """Raised at an injected reset: the write in progress was torn and nothing after it ran."""


class NoBootableImage(TinyMLaaSError):
    pass


@dataclass(frozen=True)
class BootRecord:
    seq: int = 0
    active: int = 0
    pending: int = NO_SLOT
    tried: bool = False  # the pending image (firmware or model) was booted once
    model_active: int = NO_SLOT  # NO_SLOT: the firmware's own model
    model_pending: int = NO_SLOT

    def pack(self) -> bytes:
        body = _RECORD.pack(RECORD_MAGIC, self.seq, self.active, self.pending, int(self.tried), self.model_active,
                            self.model_pending)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes) -> BootRecord | None:
        body, crc = raw[:_RECORD.size], raw[_RECORD.size:_RECORD.size + 4]
        if len(crc) < 4 or struct.unpack("<I", crc)[0] != zlib.crc32(body):
            return None
        magic, seq, active, pending, tried, model_active, model_pending = _RECORD.unpack(body)
        if magic != RECORD_MAGIC or active > 1 or any(s not in (0, 1, NO_SLOT) for s in
                                                      (pending, model_active, model_pending)):
            return None
        return cls(seq, active, pending, bool(tried), model_active, model_pending)


class Flash:
    """A file standing in for the device's flash; every write is a numbered write point."""

    def __init__(self, path: Path, slot_size: int, model_slot_size: int = 0):
        self.path = Path(path)
        self.slot_size = slot_size
        self.model_slot_size = model_slot_size
        self.writes = 0
        self.fail_at: int | None = None
        size = 2 * SECTOR + 2 * slot_size + 2 * model_slot_size
        if not self.path.exists() or self.path.stat().st_size != size:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(size)  # sparse: reads as erased zeros

    def slot_offset(self, slot: int) -> int:
        return 2 * SECTOR + slot * self.slot_size

    def model_slot_offset(self, slot: int) -> int:
        return 2 * SECTOR + 2 * self.slot_size + slot * self.model_slot_size

    def read(self, offset: int, size: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        torn = self.fail_at is not None and self.writes == self.fail_at
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data[: len(data) // 2] if torn else data)
        if torn:
            raise PowerLoss(f"reset during write {self.writes}")

    # boot record

    def record(self) -> BootRecord:
        found = [r for r in (BootRecord.unpack(self.read(i * SECTOR, 32)) for i in (0, 1)) if r is not None]
        return max(found, key=lambda r: r.seq) if found else BootRecord(seq=0)

    def write_record(self, **changes) -> BootRecord:
        old = self.record()
        new = BootRecord(**{**old.__dict__, **changes, "seq": old.seq + 1})
        self.write((new.seq % 2) * SECTOR, new.pack())
        return new

    # slots

    def slot_image(self, slot: int) -> bytes:
        return self.read(self.slot_offset(slot), self.slot_size)

    def model_slot_image(self, slot: int) -> bytes:
        return self.read(self.model_slot_offset(slot), self.model_slot_size)

    def write_slot(self, slot: int, image: bytes) -> None:
        self.write_image(self.slot_offset(slot), image)

    def write_model_slot(self, slot: int, image: bytes) -> None:
        self.write_image(self.model_slot_offset(slot), image)

    def write_image(self, base: int, image: bytes) -> None:
        """`image` into the slot at `base`: its header invalidated first and written last, so a slot half written
        (by a reset) never looks like any image; chunks that already hold their bytes are not written again, so
        writing the same image after a reset takes up where the reset left it."""
        self.write(base, b"\0" * SECTOR)
        for off in [*range(CHUNK, len(image), CHUNK), 0]:
            chunk = image[off:off + CHUNK]
            if self.read(base + off, len(chunk)) != chunk:
                self.write(base + off, chunk)


@dataclass(frozen=True)
class BootedImage:
    slot: int
    info: ImageInfo
    payload: bytes  # what the bootloader put at the flash base (firmware with a model region: its code part)
    test: bool  # running once as a test image (the firmware or the model): confirm or it reverts on the next boot
    layout: ModelLayout | None = None  # the firmware's model ABI and region (None: its model is after the code)
    model: bytes | None = None  # what the bootloader put in the model region
    model_slot: int = NO_SLOT  # where that model came from (NO_SLOT: the firmware image's own)
    model_info: ImageInfo | None = None  # its model image's header (None: the firmware's own model)

    @property
    def version(self) -> str:
        """The version of what runs: the model image's where one replaced the firmware's own model."""
        return (self.model_info or self.info).version

    @property
    def model_region(self) -> tuple[int, bytes] | None:
        """(address, bytes) of the model in its region, for the self-test's emulator."""
        return (self.layout.address, self.model) if self.layout is not None else None


@dataclass(frozen=True)
class _Firmware:
    info: ImageInfo
    code: bytes
    layout: ModelLayout | None
    own_model: bytes | None


class Bootloader:
    """The boot decision over a Flash, checking images against the trusted key as MCUboot does."""

    def __init__(self, flash: Flash, trusted_key_pem: bytes):
        self.flash = flash
        self.key = trusted_key_pem

    def _valid(self, raw: bytes, max_size: int, kind: int) -> tuple[ImageInfo, bytes, ModelLayout | None] | None:
        try:  # a model image in a firmware slot, or the other way round, is not valid there
            info = inspect_image(raw, self.key, max_size, kind=kind)
        except ImageRejected:
            return None
        data = raw[: info.total_size]
        return info, data, model_layout(data)

    def _firmware(self, slot: int) -> _Firmware | None:
        found = self._valid(self.flash.slot_image(slot), self.flash.slot_size, FIRMWARE_IMAGE)
        if found is None:
            return None
        info, data, layout = found
        return _Firmware(info, *_split(image_payload(data), layout))

    def _model(self, slot: int, firmware: _Firmware) -> tuple[ImageInfo, bytes] | None:
        """The model image in model `slot` when it is valid and made for `firmware`'s model ABI."""
        if slot == NO_SLOT or firmware.layout is None or not self.flash.model_slot_size:
            return None
        found = self._valid(self.flash.model_slot_image(slot), self.flash.model_slot_size, MODEL_IMAGE)
        if found is None or found[2].abi != firmware.layout.abi or found[2].size != firmware.layout.size:
            return None
        return found[0], image_payload(found[1])

    def image_in(self, slot: int) -> bytes | None:
        """The signed image in `slot` as it was written (header to the end of its TLVs), None when it holds no valid
        one: the base a delta update applies to."""
        found = self._valid(self.flash.slot_image(slot), self.flash.slot_size, FIRMWARE_IMAGE)
        return found[1] if found else None

    def model_source(self, booted: BootedImage) -> bytes | None:
        """The signed image `booted` runs its model from, as it was written: its model slot's model image, or its
        firmware image (the firmware's own model). The base a model-only patch applies to."""
        if booted.model_slot == NO_SLOT:
            return self.image_in(booted.slot)
        found = self._valid(self.flash.model_slot_image(booted.model_slot), self.flash.model_slot_size, MODEL_IMAGE)
        return found[1] if found else None

    def boot(self) -> BootedImage:
        rec = self.flash.record()
        if rec.pending != NO_SLOT:
            if not rec.tried:
                firmware = self._firmware(rec.pending)
                if firmware is not None:
                    self.flash.write_record(tried=True)
                    return _booted(rec.pending, firmware, None, NO_SLOT, test=True)
            # tried and not confirmed (or not valid): revert
            rec = self._abandon(rec.pending)
        if rec.model_pending != NO_SLOT:
            firmware = self._firmware(rec.active)
            model = self._model(rec.model_pending, firmware) if firmware is not None and not rec.tried else None
            if model is not None:
                self.flash.write_record(tried=True)
                return _booted(rec.active, firmware, model, rec.model_pending, test=True)
            rec = self._abandon_model(rec.model_pending)
        for slot in (rec.active, 1 - rec.active):
            firmware = self._firmware(slot)
            if firmware is not None:
                if slot != rec.active:
                    rec = self.flash.write_record(active=slot)
                model = self._model(rec.model_active, firmware)  # else the firmware's own
                return _booted(slot, firmware, model, rec.model_active if model else NO_SLOT, test=False)
        raise NoBootableImage("neither slot holds a valid signed image")

    # the update path, as the device runs it

    def stage(self, image: bytes) -> int:
        """Write `image` (already inspected) to the inactive slot and mark it pending. Returns the slot."""
        rec = self._drop_pending()
        slot = 1 - rec.active
        self.flash.write_slot(slot, image)
        if self.flash.read(self.flash.slot_offset(slot), len(image)) != image:
            raise ImageRejected("flash-verify", "the slot does not read back as written")
        self.flash.write_record(pending=slot, tried=False)
        return slot

    def stage_model(self, image: bytes) -> int:
        """Write a model image (already inspected against the running firmware) to the inactive model slot and mark
        it pending. Returns the model slot."""
        rec = self._drop_pending()
        slot = 0 if rec.model_active == NO_SLOT else 1 - rec.model_active
        self.flash.write_model_slot(slot, image)
        if self.flash.read(self.flash.model_slot_offset(slot), len(image)) != image:
            raise ImageRejected("flash-verify", "the model slot does not read back as written")
        self.flash.write_record(model_pending=slot, tried=False)
        return slot

    def _drop_pending(self) -> BootRecord:
        rec = self.flash.record()
        if rec.pending != NO_SLOT or rec.model_pending != NO_SLOT:
            rec = self.flash.write_record(pending=NO_SLOT, model_pending=NO_SLOT, tried=False)
        return rec

    def confirm(self) -> None:
        rec = self.flash.record()
        if rec.pending != NO_SLOT and rec.tried:  # new code: the model slots hold models for the old one
            self.flash.write_record(active=rec.pending, pending=NO_SLOT, tried=False, model_active=NO_SLOT)
        elif rec.model_pending != NO_SLOT and rec.tried:
            self.flash.write_record(model_active=rec.model_pending, model_pending=NO_SLOT, tried=False)

    def revert(self) -> None:
        rec = self.flash.record()
        if rec.pending != NO_SLOT:
            self._abandon(rec.pending)
        elif rec.model_pending != NO_SLOT:
            self._abandon_model(rec.model_pending)

    def _abandon(self, slot: int) -> BootRecord:
        """Drop a pending image: its header first, so no fallback can ever boot an image that failed."""
        self.flash.write(self.flash.slot_offset(slot), b"\0" * SECTOR)
        return self.flash.write_record(pending=NO_SLOT, tried=False)

    def _abandon_model(self, slot: int) -> BootRecord:
        self.flash.write(self.flash.model_slot_offset(slot), b"\0" * SECTOR)
        return self.flash.write_record(model_pending=NO_SLOT, tried=False)

    def provision(self, image: bytes) -> None:
        """Factory programming: `image` into slot 0 as the confirmed image."""
        self.flash.write_slot(0, image)
        self.flash.write_record(active=0, pending=NO_SLOT, tried=False, model_active=NO_SLOT, model_pending=NO_SLOT)


def _split(payload: bytes, layout: ModelLayout | None) -> tuple[bytes, ModelLayout | None, bytes | None]:
    code, own = split_payload(payload, layout)
    return code, layout, own


def _booted(slot: int, firmware: _Firmware, model: tuple[ImageInfo, bytes] | None, model_slot: int,
            test: bool) -> BootedImage:
    return BootedImage(slot, firmware.info, firmware.code, test, firmware.layout,
                       model[1] if model else firmware.own_model, model_slot, model[0] if model else None)
