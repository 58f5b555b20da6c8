"""Device side of over-the-air updates: A/B slots in a flash image file and the boot decision.

Flash layout (one file per device): two 4 KiB boot-record sectors, then slot 0, then slot 1. The
boot record (active slot, pending slot, whether the pending image was tried) is written to the two
sectors in turn with a sequence number and a CRC, so a write torn by a reset leaves the previous
record intact. The semantics are MCUboot's test/confirm: a new image is written to the inactive
slot and marked pending; the next boot runs it once as a test image; only a confirm after the
self-test makes it active; a reset before the confirm reverts to the previous image.

Every flash write is a numbered write point; `Flash.fail_at` tears the write with that number
and raises PowerLoss, which is how the tests reset the device at every point of the path.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.ota.package import ImageInfo, ImageRejected, image_payload, inspect_image

SECTOR = 4096
RECORD_MAGIC = 0x544D4252  # "TMBR"
_RECORD = struct.Struct("<IIBBB")
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
    tried: bool = False

    def pack(self) -> bytes:
        body = _RECORD.pack(RECORD_MAGIC, self.seq, self.active, self.pending, int(self.tried))
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes) -> BootRecord | None:
        body, crc = raw[:_RECORD.size], raw[_RECORD.size:_RECORD.size + 4]
        if len(crc) < 4 or struct.unpack("<I", crc)[0] != zlib.crc32(body):
            return None
        magic, seq, active, pending, tried = _RECORD.unpack(body)
        if magic != RECORD_MAGIC or active > 1 or pending not in (0, 1, NO_SLOT):
            return None
        return cls(seq, active, pending, bool(tried))


class Flash:
    """A file standing in for the device's flash; every write is a numbered write point."""

    def __init__(self, path: Path, slot_size: int):
        self.path = Path(path)
        self.slot_size = slot_size
        self.writes = 0
        self.fail_at: int | None = None
        size = 2 * SECTOR + 2 * slot_size
        if not self.path.exists() or self.path.stat().st_size != size:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(size)  # sparse: reads as erased zeros

    def slot_offset(self, slot: int) -> int:
        return 2 * SECTOR + slot * self.slot_size

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

    def write_slot(self, slot: int, image: bytes) -> None:
        """`image` into `slot`: its header invalidated first and written last, so a slot half written (by a reset)
        never looks like any image; chunks that already hold their bytes are not written again, so writing the
        same image after a reset takes up where the reset left it."""
        base = self.slot_offset(slot)
        self.write(base, b"\0" * SECTOR)
        for off in [*range(CHUNK, len(image), CHUNK), 0]:
            chunk = image[off:off + CHUNK]
            if self.read(base + off, len(chunk)) != chunk:
                self.write(base + off, chunk)


@dataclass(frozen=True)
class BootedImage:
    slot: int
    info: ImageInfo
    payload: bytes
    test: bool  # running once as a test image: confirm or it reverts on the next boot


class Bootloader:
    """The boot decision over a Flash, checking images against the trusted key as MCUboot does."""

    def __init__(self, flash: Flash, trusted_key_pem: bytes):
        self.flash = flash
        self.key = trusted_key_pem

    def valid_image(self, slot: int) -> tuple[ImageInfo, bytes] | None:
        raw = self.flash.slot_image(slot)
        try:
            info = inspect_image(raw, self.key, self.flash.slot_size)
        except ImageRejected:
            return None
        data = raw[: info.total_size]
        return info, image_payload(data)

    def image_in(self, slot: int) -> bytes | None:
        """The signed image in `slot` as it was written (header to the end of its TLVs), None when it holds no valid
        one: the base a delta update applies to."""
        raw = self.flash.slot_image(slot)
        try:
            info = inspect_image(raw, self.key, self.flash.slot_size)
        except ImageRejected:
            return None
        return raw[: info.total_size]

    def boot(self) -> BootedImage:
        rec = self.flash.record()
        if rec.pending != NO_SLOT:
            if not rec.tried:
                found = self.valid_image(rec.pending)
                if found is not None:
                    self.flash.write_record(tried=True)
                    return BootedImage(rec.pending, found[0], found[1], test=True)
            # tried and not confirmed (or not valid): revert
            rec = self._abandon(rec.pending)
        for slot in (rec.active, 1 - rec.active):
            found = self.valid_image(slot)
            if found is not None:
                if slot != rec.active:
                    self.flash.write_record(active=slot)
                return BootedImage(slot, found[0], found[1], test=False)
        raise NoBootableImage("neither slot holds a valid signed image")

    # the update path, as the device runs it

    def stage(self, image: bytes) -> int:
        """Write `image` (already inspected) to the inactive slot and mark it pending. Returns the slot."""
        rec = self.flash.record()
        if rec.pending != NO_SLOT:
            rec = self.flash.write_record(pending=NO_SLOT, tried=False)
        slot = 1 - rec.active
        self.flash.write_slot(slot, image)
        if self.flash.read(self.flash.slot_offset(slot), len(image)) != image:
            raise ImageRejected("flash-verify", "the slot does not read back as written")
        self.flash.write_record(pending=slot, tried=False)
        return slot

    def confirm(self) -> None:
        rec = self.flash.record()
        if rec.pending != NO_SLOT and rec.tried:
            self.flash.write_record(active=rec.pending, pending=NO_SLOT, tried=False)

    def revert(self) -> None:
        rec = self.flash.record()
        if rec.pending != NO_SLOT:
            self._abandon(rec.pending)

    def _abandon(self, slot: int) -> BootRecord:
        """Drop a pending image: its header first, so no fallback can ever boot an image that failed."""
        self.flash.write(self.flash.slot_offset(slot), b"\0" * SECTOR)
        return self.flash.write_record(pending=NO_SLOT, tried=False)

    def provision(self, image: bytes) -> None:
        """Factory programming: `image` into slot 0 as the confirmed image."""
        self.flash.write_slot(0, image)
        self.flash.write_record(active=0, pending=NO_SLOT, tried=False)
