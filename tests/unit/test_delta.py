"""Patches between images and compressed images: what they make, and what a device refuses."""

import hashlib
import random

import pytest

from tinymlaas.cli import main
from tinymlaas.ota.delta import (
    DeltaRejected,
    apply_patch,
    compress_image,
    decompress_image,
    make_patch,
    read_patch,
)
from tinymlaas.ota.package import generate_key, public_key_pem


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return generate_key(tmp_path_factory.mktemp("keys") / "signing.pem")


def _firmware_like(seed: int, size: int = 60_000) -> bytes:
    """Code-like bytes: repeated instruction patterns with variation, as firmware images have."""
    rng = random.Random(seed)
    words = [rng.getrandbits(32).to_bytes(4, "little") for _ in range(64)]
    return b"".join(rng.choice(words) for _ in range(size // 4))


def _one_change(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]


@pytest.mark.parametrize("case", ["one-byte", "insertion", "unrelated", "empty-base", "identical"])
def test_a_patch_makes_exactly_the_new_bytes(key, case):
    old = _firmware_like(1)
    new = {"one-byte": _one_change(old, 12_345), "insertion": old[:5000] + b"\x01\x02\x03" * 7 + old[5000:],
           "unrelated": _firmware_like(2), "empty-base": _firmware_like(3), "identical": old}[case]
    if case == "empty-base":
        old = b""
    patch = make_patch(old, new, key)
    assert apply_patch(old, patch, public_key_pem(key)) == new
    info = read_patch(patch)
    assert info.signed and info.size == len(patch) and info.result_size == len(new)
    assert info.base_sha256 == hashlib.sha256(old).hexdigest()
    if case in ("one-byte", "identical"):
        assert len(patch) < 0.02 * len(new), len(patch)


def test_a_patch_making_more_than_a_slot_is_refused_before_it_is_decoded(key):
    old = _firmware_like(1)
    patch = make_patch(old, old + bytes(5000), key)
    with pytest.raises(DeltaRejected) as e:
        apply_patch(old, patch, public_key_pem(key), max_size=len(old))
    assert e.value.reason == "too-large"
    assert len(apply_patch(old, patch, public_key_pem(key), max_size=len(old) + 5000)) == len(old) + 5000


def test_a_patch_for_another_base_is_refused_naming_both(key):
    old, other = _firmware_like(1), _firmware_like(2)
    patch = make_patch(old, _one_change(old, 7), key)
    with pytest.raises(DeltaRejected) as e:
        apply_patch(other, patch, public_key_pem(key))
    assert e.value.reason == "wrong-base" and hashlib.sha256(old).hexdigest()[:12] in str(e.value)


@pytest.mark.parametrize("harm, reason", [
    ("body-byte", "bad-signature"), ("signature-byte", "bad-signature"), ("truncated", "truncated"),
    ("not-a-patch", "not-a-patch"), ("unsigned", "unsigned"), ("other-key", "bad-signature"),
])
def test_tampered_or_unsigned_patches_are_refused(key, tmp_path, harm, reason):
    old = _firmware_like(1)
    patch = make_patch(old, _one_change(old, 99), key)
    body = len(patch) // 2
    bad = {"body-byte": patch[:body] + bytes([patch[body] ^ 1]) + patch[body + 1:],
           "signature-byte": patch[:-1] + bytes([patch[-1] ^ 1]),
           "truncated": patch[:-10],
           "not-a-patch": old[:200],
           "unsigned": make_patch(old, _one_change(old, 99)),
           "other-key": make_patch(old, _one_change(old, 99), generate_key(tmp_path / "rogue.pem"))}[harm]
    with pytest.raises(DeltaRejected) as e:
        apply_patch(old, bad, public_key_pem(key))
    assert e.value.reason == reason


def test_an_unsigned_patch_applies_where_no_key_is_asked_and_a_corrupt_body_is_caught():
    old = _firmware_like(4)
    new = _one_change(old, 1000)
    patch = make_patch(old, new)
    assert apply_patch(old, patch) == new
    body_at = 4 + 1 + 1 + 2 + 4 + 32 + 4 + 32 + 4 + 20
    broken = patch[:body_at] + bytes(b ^ 0xFF for b in patch[body_at:body_at + 8]) + patch[body_at + 8:]
    with pytest.raises(DeltaRejected) as e:
        apply_patch(old, broken)
    assert e.value.reason in ("corrupt", "bad-result")


def test_compressed_images_decompress_exactly_within_a_slot():
    image = _firmware_like(5, 200_000)
    packed = compress_image(image)
    assert len(packed) < len(image) and decompress_image(packed, len(image)) == image
    with pytest.raises(DeltaRejected) as e:
        decompress_image(packed, len(image) - 1)
    assert e.value.reason == "too-large"
    for bad, reason in ((packed[: len(packed) // 2], "truncated"), (b"not xz at all", "corrupt")):
        with pytest.raises(DeltaRejected) as e:
            decompress_image(bad, len(image))
        assert e.value.reason == reason


def test_cli_delta_and_apply_round_trip_any_two_files(key, tmp_path, capsys):
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(_firmware_like(6))
    new.write_bytes(_one_change(old.read_bytes(), 4242))
    assert main(["image", "delta", str(old), str(new), "-o", str(tmp_path / "p"), "--key", str(key)]) == 0
    assert "patch" in capsys.readouterr().out
    assert main(["image", "apply", str(old), str(tmp_path / "p"), "-o", str(tmp_path / "out"), "--key",
                 str(key)]) == 0
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    # against the wrong base: one line, exit 2, nothing written
    assert main(["image", "apply", str(new), str(tmp_path / "p"), "-o", str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong-base" in err[0] and not (tmp_path / "wrong").exists()
    assert main(["image", "apply", str(old), str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    assert "cannot read the patch" in capsys.readouterr().err
    assert main(["image", "delta", str(old), str(new), "-o", str(tmp_path / "no" / "such" / "p")]) == 2
    assert "cannot write" in capsys.readouterr().err
    (tmp_path / "rsa.pem").write_text("not a key")
    assert main(["image", "delta", str(old), str(new), "-o", str(tmp_path / "p2"), "--key", str(tmp_path / "rsa.pem")]) == 2
    assert "not a readable PEM private key" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["bsdiff", "zstd"])
def test_each_difference_method_round_trips_and_auto_keeps_the_smaller(key, method):
    old = _firmware_like(7)
    new = old[:30_000] + _firmware_like(8, 8_000) + old[30_000:]  # a region replaced, the rest moved
    patch = make_patch(old, new, key, method=method)
    assert read_patch(patch).method == method and apply_patch(old, patch, public_key_pem(key)) == new
    sizes = {m: len(make_patch(old, new, key, method=m)) for m in ("bsdiff", "zstd")}
    assert len(make_patch(old, new, key)) == min(sizes.values())
    body_at = 84 + 30
    broken = patch[:body_at] + bytes(b ^ 0xFF for b in patch[body_at:body_at + 8]) + patch[body_at + 8:-64]
    with pytest.raises(DeltaRejected) as e:  # unsigned check skipped: the body itself must not decode to NEW
        apply_patch(old, broken[:4 + 1] + b"\x00" + broken[6:])
    assert e.value.reason in ("corrupt", "bad-result")
