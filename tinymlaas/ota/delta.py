"""Smaller updates: a signed binary patch from one image to the next, and a compressed full image.

A patch names the exact bytes it applies to and the exact bytes it makes (size and SHA-256 of each), so a device
refuses one made for another base before it writes anything, and checks what it made before it stages it. The
difference is made two ways and the smaller kept: bsdiff's (the `bsdiff4` package: the BSDIFF40 format, its
control, difference and extra blocks bzip2-compressed), or Zstandard with the base as its dictionary (what
`zstd --patch-from` does: the result compressed with references into the base). Bsdiff wins where code moved a
little everywhere (a one-line change: addresses shift), Zstandard where whole regions changed (retrained weights:
their new values compress against the old ones). Both read the base at random and write the result in order, so
a device applies a patch from its running slot into the other slot (a Zstandard decoder needs no window beyond
the base and the result already written, both in flash); the patch stays on the device until the update ends, so
a reset during the apply starts it again from the same, untouched base.

Layout (little-endian):
    magic "TMDP", format u8 = 1, flags u8 (bit 0: signed), method u8 (1 bsdiff, 2 zstd), reserved u8,
    base size u32, base SHA-256 (32 B), result size u32, result SHA-256 (32 B), body size u32,
    body (BSDIFF40), then, when signed, an Ed25519 signature (64 B) over everything before it.

Compressed images are LZMA2 (the xz container) with a 64 KiB dictionary: what a decoder on the device needs
beside its output is that window and a few KiB of state (MCUboot 2.2 decompresses LZMA2 images the same way).
"""

from __future__ import annotations

import hashlib
import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError

MAGIC = b"TMDP"
FORMAT = 1
SIGNED = 0x01
BSDIFF, ZSTD = 1, 2
METHODS = {"bsdiff": BSDIFF, "zstd": ZSTD}
ZSTD_LEVEL = 19
_HEADER = struct.Struct("<4sBBBBI32sI32sI")
SIGNATURE_SIZE = 64
LZMA_DICT = 64 * 1024
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": LZMA_DICT}]
# A model-only payload is taken over a smaller one when it costs at most this much more: the device then writes
# its model slot alone (the model's bytes, not the whole firmware image) and its running code stays in place. A
# patch of the whole image and one of the model image carry the same new bytes (the model, the hash and the
# signature), so the two are within a few bytes of each other either way.
MODEL_ONLY_ALLOWANCE = 1.05


class DeltaRejected(TinyMLaaSError):
    """A patch that must not be applied: unreadable, for another base, tampered with, or making other bytes."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"patch refused ({reason}): {detail}")


@dataclass(frozen=True)
class PatchInfo:
    base_size: int
    base_sha256: str
    result_size: int
    result_sha256: str
    body_size: int
    signed: bool
    size: int  # the whole patch, header and signature included
    method: str  # bsdiff or zstd


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _zstd():
    try:
        from compression import zstd  # Python 3.14
    except ImportError:
        from backports import zstd
    return zstd


def _difference(base: bytes, result: bytes, method: str) -> bytes:
    if method == "bsdiff":
        import bsdiff4

        return bsdiff4.diff(base, result)
    zstd = _zstd()
    return zstd.compress(result, level=ZSTD_LEVEL, zstd_dict=zstd.ZstdDict(base, is_raw=True)) if base \
        else zstd.compress(result, level=ZSTD_LEVEL)


def make_patch(base: bytes, result: bytes, signing_key: Path | None = None, method: str = "auto") -> bytes:
    """The patch that turns `base` into `result` (method: bsdiff, zstd, or auto: the smaller of the two), signed with
    the Ed25519 PEM key when one is given."""
    if method != "auto" and method not in METHODS:
        raise TinyMLaaSError(f"patch method {method!r}: one of auto, {', '.join(METHODS)}")
    made = {m: _difference(base, result, m) for m in (METHODS if method == "auto" else (method,))}
    name, body = min(made.items(), key=lambda kv: len(kv[1]))
    head = _HEADER.pack(MAGIC, FORMAT, SIGNED if signing_key else 0, METHODS[name], 0, len(base), _sha(base),
                        len(result), _sha(result), len(body))
    data = head + body
    if signing_key is not None:
        data += _private_key(signing_key).sign(data)
    return data


def read_patch(patch: bytes) -> PatchInfo:
    """The patch's header, checked for consistency (not its signature: see apply_patch)."""
    if len(patch) < _HEADER.size or patch[:4] != MAGIC:
        raise DeltaRejected("not-a-patch", "no TMDP header")
    _magic, fmt, flags, method, _, base_size, base_sha, result_size, result_sha, body_size = \
        _HEADER.unpack_from(patch)
    if fmt != FORMAT:
        raise DeltaRejected("format", f"patch format {fmt}; this device reads format {FORMAT}")
    names = {v: k for k, v in METHODS.items()}
    if method not in names:
        raise DeltaRejected("format", f"patch method {method}; this device reads {', '.join(METHODS)}")
    signed = bool(flags & SIGNED)
    if len(patch) != _HEADER.size + body_size + (SIGNATURE_SIZE if signed else 0):
        raise DeltaRejected("truncated", f"{len(patch):,} B, the header says {_HEADER.size + body_size:,} B "
                            "and a signature" if signed else f"{len(patch):,} B does not match its header")
    return PatchInfo(base_size, base_sha.hex(), result_size, result_sha.hex(), body_size, signed, len(patch),
                     names[method])


def apply_patch(base: bytes, patch: bytes, trusted_key_pem: bytes | None = None, max_size: int | None = None) -> bytes:
    """The result of `patch` on `base`. With a trusted key the patch must carry a valid signature by it. Refused
    (DeltaRejected), before anything is made, when the base is not the one the patch was made for or the result
    would exceed `max_size` (a slot); the result is checked against the size and hash the patch names."""
    info = read_patch(patch)
    if max_size is not None and info.result_size > max_size:
        raise DeltaRejected("too-large", f"the patch makes {info.result_size:,} B, more than the {max_size:,} B slot")
    if trusted_key_pem is not None:
        if not info.signed:
            raise DeltaRejected("unsigned", "the patch carries no signature")
        from cryptography.exceptions import InvalidSignature

        signed_part = patch[:-SIGNATURE_SIZE]
        try:
            _public_key(trusted_key_pem).verify(patch[-SIGNATURE_SIZE:], signed_part)
        except InvalidSignature:
            raise DeltaRejected("bad-signature", "the signature does not verify with the trusted key") from None
    if len(base) != info.base_size or _sha(base).hex() != info.base_sha256:
        raise DeltaRejected("wrong-base", f"made for a {info.base_size:,} B base of SHA-256 {info.base_sha256[:12]}, "
                            f"not this {len(base):,} B one ({_sha(base).hex()[:12]})")
    body = patch[_HEADER.size:_HEADER.size + info.body_size]
    try:
        if info.method == "bsdiff":
            import bsdiff4

            result = bsdiff4.patch(base, body)
        else:
            zstd = _zstd()
            decoder = zstd.ZstdDecompressor(zstd.ZstdDict(base, is_raw=True)) if base else zstd.ZstdDecompressor()
            result = decoder.decompress(body, max_length=info.result_size + 1)
            if not decoder.eof:
                raise ValueError("the difference ends early")
    except Exception as e:  # noqa: BLE001 - a corrupt body fails inside the C extensions with any of several types
        raise DeltaRejected("corrupt", f"the difference does not decode ({type(e).__name__})") from None
    if len(result) != info.result_size or _sha(result).hex() != info.result_sha256:
        raise DeltaRejected("bad-result", "the patched bytes do not match the result the patch names")
    return result


def compress_image(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=LZMA_FILTERS)


def decompress_image(data: bytes, max_size: int) -> bytes:
    """The image inside a compressed one; refused when it does not decode or would exceed `max_size` (a slot)."""
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        out = d.decompress(data, max_length=max_size + 1)
    except lzma.LZMAError as e:
        raise DeltaRejected("corrupt", f"the compressed image does not decode ({e})") from None
    if len(out) > max_size:
        raise DeltaRejected("too-large", f"the compressed image expands past {max_size:,} B")
    if not d.eof:
        raise DeltaRejected("truncated", "the compressed image ends early")
    return out


def _private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise TinyMLaaSError(f"{path}: not a readable PEM private key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TinyMLaaSError(f"{path}: patches are signed with Ed25519 keys (imgtool keygen -t ed25519)")
    return key


def _public_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        try:  # a private key names its public one
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise TinyMLaaSError("the trusted key is not a PEM Ed25519 key") from None
        key = private.public_key() if isinstance(private, Ed25519PrivateKey) else None
    if not isinstance(key, Ed25519PublicKey):
        raise TinyMLaaSError("the trusted key is not an Ed25519 key")
    return key
