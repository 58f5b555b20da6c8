"""Package stage: firmware ELF -> flash payload -> MCUboot image signed with imgtool.

The image is MCUboot's format (header, payload, TLVs with SHA-256 and an Ed25519 signature), so the
same image boots under a real MCUboot. `inspect_image` is what a device runs before it writes a slot:
magic, hash, signature against its trusted key, size against the slot, and version against the
running one (downgrades refused unless the job explicitly allows them).
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

from tinymlaas.backends.mcu.firmware import require_tool
from tinymlaas.errors import TinyMLaaSError
from tinymlaas.private import create_private
from tinymlaas.targets import Target

HEADER_SIZE = 0x200
IMAGE_MAGIC = 0x96F3B83D
ALIGN = 4


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


def slot_size(target: Target) -> int:
    """Two equal slots in the board's flash, each 4 KiB aligned (a bootloader and the boot record sit in the rest)."""
    return (target.board.flash_bytes // 2 - 0x8000) & ~0xFFF


def firmware_payload(elf: Path, target: Target, out: Path) -> Path:
    """The raw flash contents of `elf`, from the flash base up (what a bootloader copies into place)."""
    subprocess.run([require_tool(target.tool("objcopy")), "-O", "binary", str(elf), str(out)], check=True)
    return out


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


def sign_image(payload: Path, key: Path, version: str, max_size: int, out: Path) -> ImageInfo:
    """Sign `payload` as an MCUboot image of `version`; refuses payloads that cannot fit `max_size`."""
    if payload.stat().st_size + HEADER_SIZE > max_size:
        raise TinyMLaaSError(f"firmware payload {payload.stat().st_size:,} B does not fit a {max_size:,} B slot")
    _imgtool("sign", "-k", str(key), "--align", str(ALIGN), "-v", version, "--header-size", hex(HEADER_SIZE),
             "--pad-header", "--slot-size", hex(max_size), str(payload), str(out))
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


def inspect_image(data: bytes, trusted_key_pem: bytes, max_size: int, running_version: str | None = None,
                  allow_downgrade: bool = False) -> ImageInfo:
    """Everything a device checks before it writes `data` to a slot. Raises ImageRejected."""
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
    if running_version and not allow_downgrade and info.version_key < version_key(running_version):
        raise ImageRejected("downgrade", f"version {info.version} is older than the running {running_version}")
    return info


def image_payload(data: bytes) -> bytes:
    info = read_header(data)
    return data[info.payload_offset:info.payload_offset + info.payload_size]


@dataclass
class BuildPackage:
    image: Path  # MCUboot image, signed
    payload: Path  # raw flash contents
    selftest: Path  # inputs and the verified outputs, for the device's self-test
    info: ImageInfo


def package_build(build_dir: Path, target: Target, key: Path, version: str) -> BuildPackage:
    """The deployable artifacts of a compiled build folder (what `compile_model` wrote)."""
    import json

    from tinymlaas.backends.mcu.firmware import Firmware, read_symbols
    from tinymlaas.ota.selftest import selftest_spec

    build_dir = Path(build_dir)
    elf = build_dir / "firmware.elf"
    firmware = Firmware(elf, build_dir / "firmware.map", read_symbols(elf, target))
    payload = firmware_payload(elf, target, build_dir / "firmware.bin")
    image = build_dir / "image.signed.bin"
    info = sign_image(payload, key, version, slot_size(target), image)
    runner = json.loads((build_dir / "report.json").read_text()).get("runner", "qemu")
    spec = selftest_spec(target.name, firmware, (build_dir / "inputs.bin").read_bytes(),
                         (build_dir / "outputs.bin").read_bytes(), runner)
    selftest = build_dir / "selftest.json"
    selftest.write_text(json.dumps(spec))
    return BuildPackage(image, payload, selftest, info)
