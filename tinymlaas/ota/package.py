"""Package stage: firmware ELF -> flash payload -> MCUboot image signed with imgtool.

The image is MCUboot's format (header, payload, TLVs with SHA-256 and an Ed25519 signature), so the
same image boots under a real MCUboot. `inspect_image` is what a device runs before it writes a slot:
magic, hash, signature against its trusted key, size against the slot, and version against the
running one (downgrades refused unless the job explicitly allows them).

Firmware whose model's constants are linked in the model region (layout.py) makes two images: the firmware
image (the code part, then the model it was built with) and the model image (the model alone). Both carry, in
a protected (signed) TLV, the model ABI: a hash of the code part and the model section's address and size,
i.e. of everything the code assumes of the model (offsets, sizes, the requantization immediates generated
kernels hold, the kernels themselves). A device takes a model image only for running firmware of the same ABI.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.ota.layout import model_slot_size, slot_size
from tinymlaas.private import create_private
from tinymlaas.targets import MemoryRegion, Target

HEADER_SIZE = 0x200
IMAGE_MAGIC = 0x96F3B83D
ALIGN = 4
PROTECTED_TLV_MAGIC, TLV_MAGIC = 0x6908, 0x6907
MODEL_TLV = 0x00A0  # a vendor TLV (imgtool puts custom TLVs in the protected area, under the signature)
FIRMWARE_IMAGE, MODEL_IMAGE = 1, 2
_MODEL_TLV = struct.Struct("<B3x32sIII")
MODEL_ALIGN = 16  # the model part of a firmware image's payload starts at this alignment


class ImageRejected(TinyMLaaSError):
    """An image a device must not install; `reason` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"image rejected ({reason}): {detail}")


@dataclass(frozen=True)
class ImageInfo:
    version: str  # "major.minor.revision+build"
    version_key: tuple[int, int, int, int]
    payload_offset: int
    payload_size: int
    total_size: int
    sha256: str  # of the whole image file


@dataclass(frozen=True)
class ModelLayout:
    """The MODEL_TLV of an image: which kind of image, the model ABI, where the model section is linked and its
    size, and (firmware images) where the firmware's own model starts in the payload."""
    kind: int  # FIRMWARE_IMAGE or MODEL_IMAGE
    abi: str  # SHA-256, hex
    address: int
    size: int
    offset: int = 0

    def pack(self) -> bytes:
        return _MODEL_TLV.pack(self.kind, bytes.fromhex(self.abi), self.address, self.size, self.offset)

    @classmethod
    def unpack(cls, raw: bytes) -> ModelLayout | None:
        if len(raw) != _MODEL_TLV.size:
            return None
        kind, abi, address, size, offset = _MODEL_TLV.unpack(raw)
        return cls(kind, abi.hex(), address, size, offset) if kind in (FIRMWARE_IMAGE, MODEL_IMAGE) else None


def model_abi(code: bytes, region: MemoryRegion) -> str:
    """What a firmware's code assumes of its model section: its code part's bytes (every offset, size, kernel and
    immediate in it) and the section's address and size. Equal ABIs: the code parts are byte for byte the same."""
    h = hashlib.sha256(b"tinymlaas model ABI 1\0")
    h.update(struct.pack("<II", region.base, region.size))
    h.update(code)
    return h.hexdigest()


def _imgtool(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "imgtool.main", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TinyMLaaSError(f"imgtool {args[0]} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc


def generate_key(path: Path) -> Path:
    """A new Ed25519 signing key (PEM), readable by its owner only."""
    create_private(path)  # imgtool writes into a file that was never readable by others
    _imgtool("keygen", "-k", str(path), "-t", "ed25519")
    return path


def public_key_pem(key_path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_image(payload: Path, key: Path, version: str, max_size: int, out: Path,
               layout: ModelLayout | None = None) -> ImageInfo:
    """Sign `payload` as an MCUboot image of `version`, with `layout` as its MODEL_TLV when given; refuses payloads
    that cannot fit `max_size`."""
    if payload.stat().st_size + HEADER_SIZE > max_size:
        what = "model" if layout is not None and layout.kind == MODEL_IMAGE else "firmware"
        raise TinyMLaaSError(f"{what} payload {payload.stat().st_size:,} B does not fit a {max_size:,} B slot")
    tlv = ("--custom-tlv", hex(MODEL_TLV), "0x" + layout.pack().hex()) if layout is not None else ()
    _imgtool("sign", "-k", str(key), "--align", str(ALIGN), "-v", version, "--header-size", hex(HEADER_SIZE),
             "--pad-header", "--slot-size", hex(max_size), *tlv, str(payload), str(out))
    return read_header(out.read_bytes())


# MCUboot's image header holds the version as u8 major, u8 minor, u16 revision, u32 build number
VERSION_LIMITS = (("major", 255), ("minor", 255), ("revision", 65535), ("build", 2**32 - 1))
_VERSION = re.compile(r"(\d{1,10})(?:\.(\d{1,10}))?(?:\.(\d{1,10}))?(?:\+(\d{1,10}))?", re.ASCII)


def parse_version(text: str) -> tuple[int, int, int, int]:
    """major[.minor[.revision]][+build] as an MCUboot header holds it; ValueError saying why if it is not one."""
    m = _VERSION.fullmatch(str(text))
    if m is None:
        raise ValueError(f"'{str(text)[:40]}' is not major.minor.revision[+build]")
    values = tuple(int(g or 0) for g in m.groups())
    for v, (name, limit) in zip(values, VERSION_LIMITS):
        if v > limit:
            raise ValueError(f"'{text}': {name} {v} is more than an MCUboot image header holds ({limit})")
    return values


def version_key(text: str | None) -> tuple[int, ...]:
    """For ordering versions a device reported (any text): one that does not parse sorts first."""
    try:
        return parse_version(text or "")
    except ValueError:
        return (-1,)


def canonical_version(text: str) -> str:
    major, minor, revision, build = parse_version(text)
    return f"{major}.{minor}.{revision}+{build}"


def read_header(data: bytes) -> ImageInfo:
    if len(data) < 32:
        raise ImageRejected("truncated", f"{len(data)} B is shorter than an image header")
    magic, _, header_size, _protected, image_size = struct.unpack_from("<IIHHI", data, 0)
    if magic != IMAGE_MAGIC:
        raise ImageRejected("bad-magic", f"header magic {magic:#010x} is not MCUboot's {IMAGE_MAGIC:#010x}")
    major, minor, revision, build = struct.unpack_from("<BBHI", data, 20)
    tlv_off = header_size + image_size
    if len(data) < tlv_off + 4:
        raise ImageRejected("truncated", f"{len(data):,} B, but the header says payload ends at {tlv_off:,} B")
    total = tlv_off
    for _ in range(2):  # an optional protected TLV area, then the TLV area
        if total + 4 > len(data):
            break
        tlv_magic, tlv_len = struct.unpack_from("<HH", data, total)
        if tlv_magic not in (0x6907, 0x6908):
            break
        total += tlv_len
    return ImageInfo(
        version=f"{major}.{minor}.{revision}+{build}",
        version_key=(major, minor, revision, build),
        payload_offset=header_size,
        payload_size=image_size,
        total_size=total,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def model_layout(data: bytes) -> ModelLayout | None:
    """The MODEL_TLV in an image's protected TLV area (None: firmware with its model after the code, or no image).
    Trust it only in an image `inspect_image` accepted: the signature covers the protected area."""
    try:
        info = read_header(data)
    except ImageRejected:
        return None
    at = info.payload_offset + info.payload_size
    if at + 4 > len(data) or struct.unpack_from("<H", data, at)[0] != PROTECTED_TLV_MAGIC:
        return None
    end = min(at + struct.unpack_from("<H", data, at + 2)[0], len(data))
    at += 4
    while at + 4 <= end:
        kind, size = struct.unpack_from("<HH", data, at)
        if kind == MODEL_TLV:
            return ModelLayout.unpack(data[at + 4:at + 4 + size])
        at += 4 + size
    return None


def inspect_image(data: bytes, trusted_key_pem: bytes, max_size: int, running_version: str | None = None,
                  allow_downgrade: bool = False, kind: int = FIRMWARE_IMAGE) -> ImageInfo:
    """Everything a device checks before it writes `data` to a slot (of `kind`: firmware or model images). Raises
    ImageRejected."""
    from imgtool import image as imgtool_image
    from imgtool import keys

    if len(data) > max_size:
        raise ImageRejected("oversized", f"{len(data):,} B is larger than the {max_size:,} B slot")
    info = read_header(data)
    if info.total_size > len(data):
        raise ImageRejected("truncated", f"{len(data):,} B of a {info.total_size:,} B image")
    with tempfile.TemporaryDirectory() as tmp:
        img, pub = Path(tmp) / "image.bin", Path(tmp) / "key.pem"
        img.write_bytes(data)
        pub.write_bytes(trusted_key_pem)
        try:
            result, _, _, _ = imgtool_image.Image.verify(str(img), keys.load(str(pub)))
        except (struct.error, ValueError) as e:
            raise ImageRejected("corrupt", f"unreadable TLVs ({e})") from None
    if result != imgtool_image.VerifyResult.OK:
        reason = {"INVALID_HASH": "bad-hash", "INVALID_SIGNATURE": "bad-signature",
                  "KEY_MISMATCH": "bad-signature"}.get(result.name, "corrupt")
        raise ImageRejected(reason, f"imgtool verification: {result.name.lower()}")
    layout = model_layout(data)
    if (layout.kind if layout is not None else FIRMWARE_IMAGE) != kind:
        raise ImageRejected(*(("not-a-model", "a firmware image, not a model image") if kind == MODEL_IMAGE else
                              ("not-firmware", "a model image, not a firmware image")))
    if running_version and not allow_downgrade and info.version_key < version_key(running_version):
        raise ImageRejected("downgrade", f"version {info.version} is older than the running {running_version}")
    return info


def inspect_model_image(data: bytes, trusted_key_pem: bytes, max_size: int, running_abi: str | None,
                        running_version: str | None = None, allow_downgrade: bool = False) -> tuple[ImageInfo, ModelLayout]:
    """Everything a device checks before it writes a model slot: the image's own checks (inspect_image), then that
    it is a model image and that its ABI is the running firmware's (`running_abi`: None when the firmware has its
    model after the code, where no model image can go). Raises ImageRejected."""
    info = inspect_image(data, trusted_key_pem, max_size, running_version, allow_downgrade, kind=MODEL_IMAGE)
    layout = model_layout(data)
    if running_abi is None:
        raise ImageRejected("abi-mismatch", "the running firmware has no model region: it takes no model image")
    if layout.abi != running_abi:
        raise ImageRejected("abi-mismatch", f"made for firmware of model ABI {layout.abi[:12]}, the running "
                            f"firmware's is {running_abi[:12]}")
    if layout.size != info.payload_size:
        raise ImageRejected("corrupt", f"the model is {info.payload_size:,} B, its ABI says {layout.size:,} B")
    return info, layout


def image_payload(data: bytes) -> bytes:
    info = read_header(data)
    return data[info.payload_offset:info.payload_offset + info.payload_size]


def split_payload(payload: bytes, layout: ModelLayout | None) -> tuple[bytes, bytes | None]:
    """A firmware image's payload as a bootloader puts it in place: the code part (at the flash base) and the
    firmware's own model (at its region), or the whole payload and None for firmware without a model region."""
    if layout is None:
        return payload, None
    return payload[:layout.offset], payload[layout.offset:layout.offset + layout.size]


@dataclass(frozen=True)
class BuildPackage:
    image: Path  # MCUboot image, signed
    payload: Path  # raw flash contents
    selftest: Path  # inputs and the verified outputs, for the device's self-test
    info: ImageInfo
    model_image: Path | None = None  # the model alone, signed (firmware with a model region)
    abi: str | None = None  # the model ABI of both images


def firmware_image_payload(elf: Path, target: Target, out: Path) -> tuple[Path, ModelLayout | None]:
    """A firmware image's payload: the code part, then (firmware with a model region) the firmware's own model,
    MODEL_ALIGN-aligned; the layout says where each goes."""
    from tinymlaas.backends.mcu.firmware import code_payload, linked_model_region, model_payload

    region = linked_model_region(elf, target)
    code = code_payload(elf, target, out).read_bytes()
    if region is None:
        return out, None
    model = model_payload(elf, target, out.with_suffix(".model.bin")).read_bytes()
    offset = -(-len(code) // MODEL_ALIGN) * MODEL_ALIGN
    out.write_bytes(code.ljust(offset, b"\0") + model)
    return out, ModelLayout(FIRMWARE_IMAGE, model_abi(code, region), region.base, region.size, offset)


def package_build(build_dir: Path, target: Target, key: Path, version: str) -> BuildPackage:
    """The deployable artifacts of a compiled build folder (what `compile_model` wrote)."""
    import json

    from tinymlaas.backends.mcu.firmware import Firmware, read_symbols
    from tinymlaas.ota.selftest import selftest_spec

    build_dir = Path(build_dir)
    elf = build_dir / "firmware.elf"
    firmware = Firmware(elf, build_dir / "firmware.map", read_symbols(elf, target))
    payload, layout = firmware_image_payload(elf, target, build_dir / "firmware.bin")
    image = build_dir / "image.signed.bin"
    info = sign_image(payload, key, version, slot_size(target), image, layout)
    model_image = None
    if layout is not None:
        model_image = build_dir / "model.signed.bin"
        sign_image(build_dir / "firmware.model.bin", key, version, model_slot_size(target), model_image,
                   ModelLayout(MODEL_IMAGE, layout.abi, layout.address, layout.size))
    runner = json.loads((build_dir / "report.json").read_text()).get("runner", "qemu")
    spec = selftest_spec(target.name, firmware, (build_dir / "inputs.bin").read_bytes(),
                         (build_dir / "outputs.bin").read_bytes(), runner)
    selftest = build_dir / "selftest.json"
    selftest.write_text(json.dumps(spec))
    return BuildPackage(image, payload, selftest, info, model_image, layout.abi if layout else None)
