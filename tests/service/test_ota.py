"""OTA on the device side: MCUboot images (imgtool), A/B slots, resets at every write point, the self-test."""

import json

import pytest

from tinymlaas.ota.package import (
    FIRMWARE_IMAGE,
    MODEL_IMAGE,
    ImageRejected,
    generate_key,
    image_payload,
    inspect_image,
    inspect_model_image,
    model_layout,
    model_slot_size,
    public_key_pem,
    read_header,
    sign_image,
    slot_size,
)
from tinymlaas.ota.rollout import RolloutPlan, decide, stage_bounds
from tinymlaas.ota.selftest import run_selftest
from tinymlaas.ota.slots import NO_SLOT, Bootloader, Flash, PowerLoss
from tinymlaas.targets import get_target

M4 = get_target("cortex-m4")


def _flash(path) -> Flash:
    return Flash(path, slot_size(M4), model_slot_size(M4))


@pytest.fixture(scope="module")
def images(small_firmware, tmp_path_factory):
    """The same firmware signed as 1.0.1 and 1.0.2, plus a key the device does not trust."""
    work = tmp_path_factory.mktemp("images")
    key, payload = small_firmware["key"], small_firmware["payload"]
    layout = model_layout(small_firmware["package"].image.read_bytes())
    out = {}
    for version in ("1.0.1", "1.0.2"):
        sign_image(payload, key, version, slot_size(M4), work / f"{version}.bin", layout)
        out[version] = (work / f"{version}.bin").read_bytes()
    other = generate_key(work / "other.pem")
    sign_image(payload, other, "1.0.3", slot_size(M4), work / "other.bin", layout)
    out["unknown-key"] = (work / "other.bin").read_bytes()
    out["trusted"] = public_key_pem(key)
    return out


def test_signed_image_is_mcuboot_format_and_verifies(images, small_firmware):
    info = inspect_image(images["1.0.2"], images["trusted"], slot_size(M4), running_version="1.0.1")
    assert info.version == "1.0.2+0"
    assert info.payload_offset == 0x200
    assert images["1.0.2"][info.payload_offset:info.payload_offset + info.payload_size] == \
        small_firmware["payload"].read_bytes()


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


@pytest.mark.parametrize("case, reason", [
    ("payload-byte", "bad-hash"),
    ("signature-byte", "bad-signature"),
    ("truncated", "truncated"),
    ("oversized", "oversized"),
    ("downgrade", "downgrade"),
    ("unknown-key", "bad-signature"),
    ("not-an-image", "bad-magic"),
])
def test_bad_images_are_rejected(images, case, reason):
    good = images["1.0.2"]
    running = "1.0.2"
    data = {
        "payload-byte": _flip(good, 0x200 + 100),
        "signature-byte": _flip(good, len(good) - 3),
        "truncated": good[: len(good) - 40],
        "oversized": good + bytes(slot_size(M4)),
        "downgrade": images["1.0.1"],
        "unknown-key": images["unknown-key"],
        "not-an-image": bytes(4096),
    }[case]
    with pytest.raises(ImageRejected) as e:
        inspect_image(data, images["trusted"], slot_size(M4), running_version=running)
    assert e.value.reason == reason


def test_forced_downgrade_is_allowed(images):
    info = inspect_image(images["1.0.1"], images["trusted"], slot_size(M4), "1.0.2", allow_downgrade=True)
    assert info.version == "1.0.1+0"


def _update_path(bl: Bootloader, image: bytes, selftest_passes: bool = True, model: bool = False) -> None:
    """What a device does for one update: stage (a firmware image, or a model image), reboot into the test image,
    then confirm or revert."""
    bl.stage_model(image) if model else bl.stage(image)
    booted = bl.boot()
    assert booted.test
    if selftest_passes:
        bl.confirm()
    else:
        bl.revert()


def _reset_at_every_write_point(images, tmp_path, update, models: dict[str, bytes]) -> int:
    """`update(bootloader)` takes a device from 1.0.1 to 1.0.2; a reset is injected at each of its flash writes in
    turn: power comes back to a valid firmware and model pair (`models`: the model each version runs), and the
    device can always finish an update afterwards. Returns how many write points there were."""
    trusted = images["trusted"]
    clean = _flash(tmp_path / "clean.img")
    Bootloader(clean, trusted).provision(images["1.0.1"])
    base = clean.writes
    update(Bootloader(clean, trusted))
    total = clean.writes - base
    assert total > 4  # header invalidation, data chunks, pending record, tried record, confirm record
    assert Bootloader(clean, trusted).boot().version == "1.0.2+0"

    for point in range(1, total + 1):
        flash = _flash(tmp_path / f"f{point}.img")
        Bootloader(flash, trusted).provision(images["1.0.1"])
        flash.fail_at = flash.writes + point
        with pytest.raises(PowerLoss):
            update(Bootloader(flash, trusted))
        # power comes back: a fresh view of the same flash
        after = _flash(flash.path)
        booted = Bootloader(after, trusted).boot()
        assert booted.version in ("1.0.1+0", "1.0.2+0"), point
        assert booted.model == models[booted.version], point  # the firmware runs with the model of its pair
        if booted.test:  # the reset hit before the test boot was recorded: it runs once, as a test
            assert booted.version == "1.0.2+0"
        if point == total:  # torn confirm: the old record stands, the test image was tried -> revert
            assert booted.version == "1.0.1+0" and not booted.test
        # and the device can always finish an update afterwards
        bl = Bootloader(after, trusted)
        if booted.test:
            bl.confirm()
        else:
            update(bl)
        final = Bootloader(after, trusted).boot()
        assert final.version == "1.0.2+0" and not final.test and final.model == models["1.0.2+0"], point
    return total


def _own_model(small_firmware) -> dict[str, bytes]:
    weights = (small_firmware["dir"] / "build" / "weights.bin").read_bytes()
    return {"1.0.1+0": weights, "1.0.2+0": weights}


def test_reset_at_every_write_point_boots_a_valid_image(images, small_firmware, tmp_path):
    _reset_at_every_write_point(images, tmp_path, lambda bl: _update_path(bl, images["1.0.2"]),
                                _own_model(small_firmware))


def test_unconfirmed_test_image_reverts_on_next_boot(images, tmp_path):
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, images["trusted"])
    bl.provision(images["1.0.1"])
    bl.stage(images["1.0.2"])
    assert bl.boot().test
    again = bl.boot()  # reset without confirm
    assert again.info.version == "1.0.1+0" and not again.test
    assert flash.record().pending == NO_SLOT


def test_corrupt_active_slot_falls_back_to_the_other(images, tmp_path):
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, images["trusted"])
    bl.provision(images["1.0.1"])
    _update_path(bl, images["1.0.2"])
    active = flash.record().active
    flash.write(flash.slot_offset(active) + 0x300, b"\xde\xad")  # a flash bit error in the running image
    booted = bl.boot()
    assert booted.version == "1.0.1+0" and booted.slot == 1 - active


def test_selftest_passes_on_the_image_and_catches_a_corrupt_one(small_firmware):
    """The self-test boots the code part at the flash base and the model at its region, as the bootloader puts
    them: bit-exact, with the build's own instruction count; weights corrupted in flash are caught."""
    from tinymlaas.ota.package import split_payload

    spec = json.loads(small_firmware["package"].selftest.read_text())
    image = small_firmware["package"].image.read_bytes()
    layout = model_layout(image)
    code, model = split_payload(image_payload(image), layout)
    weights = (small_firmware["dir"] / "build" / "weights.bin").read_bytes()
    assert layout.kind == FIRMWARE_IMAGE and model == weights and weights not in code
    ok = run_selftest(code, spec, model=(layout.address, model))
    assert ok.passed, ok.detail
    report = json.loads((small_firmware["dir"] / "build" / "report.json").read_text())
    assert ok.instructions == report["instructions"]
    # weights corrupted in flash: the image runs but its outputs differ
    bad = run_selftest(code, spec, model=(layout.address, bytes(b ^ 0x80 for b in model[:64]) + model[64:]))
    assert not bad.passed and "differ" in bad.detail


def test_image_header_reports_sizes(images):
    info = read_header(images["1.0.1"])
    assert info.total_size == len(images["1.0.1"])


def test_rollout_stages_and_decisions():
    plan = RolloutPlan((10, 50, 100), success_threshold=0.9, error_threshold=0.2)
    assert stage_bounds(plan, 20) == [(0, 2), (2, 10), (10, 20)]
    assert stage_bounds(plan, 1) == [(0, 1)]
    s = ["pending"] * 20
    assert decide(plan, s, -1).notify_stage == 0
    s[0:2] = ["succeeded", "in_progress"]
    assert decide(plan, s, 0).notify_stage is None
    s[1] = "succeeded"
    assert decide(plan, s, 0).notify_stage == 1
    s[2:10] = ["succeeded"] * 6 + ["failed", "failed"]  # 2 of 10 notified failed: the error threshold
    d = decide(plan, s, 1)
    assert d.state == "halted" and "2 of 10" in d.reason
    assert RolloutPlan((50, 40)).problems().keys() == {"stages"}
    assert RolloutPlan((100,), error_threshold=0).problems().keys() == {"error_threshold"}
    assert RolloutPlan((100,), job_timeout=5).problems().keys() == {"job_timeout"}
    # a device that stayed silent past its timeout counts as failed, and a stage of such devices halts the rollout
    assert decide(plan, ["timed_out", "timed_out"] + ["pending"] * 18, 0).state == "halted"


@pytest.mark.parametrize("text, expected", [("1.2.3", (1, 2, 3, 0)), ("7", (7, 0, 0, 0)), ("255.255.65535+4294967295",
                                                                                       (255, 255, 65535, 2**32 - 1))])
def test_versions_an_image_header_holds(text, expected):
    from tinymlaas.ota.package import parse_version

    assert parse_version(text) == expected


@pytest.mark.parametrize("text, words", [("256.0.0", "major 256"), ("1.256.0", "minor 256"),
                                         ("1.0.65536", "revision 65536"), ("1.0.0+4294967296", "build"),
                                         ("1.2.3.4.5", "is not"), ("one", "is not"), ("1..2", "is not"),
                                         ("1.2+", "is not"), ("１.２.３", "is not")])
def test_versions_an_image_header_cannot_hold_are_refused(text, words):
    from tinymlaas.ota.package import parse_version, version_key

    with pytest.raises(ValueError, match=words):
        parse_version(text)
    assert version_key(text) < version_key("0.0.0")  # a device reporting one sorts below every real version


def test_a_new_signing_key_is_private_from_the_start(tmp_path):
    import os
    import stat

    from tinymlaas.ota.package import generate_key

    key = generate_key(tmp_path / "keys" / "k.pem")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and b"PRIVATE KEY" in key.read_bytes()


def _delta_update(bl: Bootloader, patch: bytes, trusted: bytes) -> None:
    """A delta update as a device runs it: the patch applied to the image in its active slot, the result staged."""
    from tinymlaas.ota.delta import apply_patch

    _update_path(bl, apply_patch(bl.image_in(bl.flash.record().active), patch, trusted))


def test_reset_at_every_write_point_of_a_delta_update_boots_a_valid_image(images, small_firmware, tmp_path):
    """The patch is applied from the running slot, which the update never writes: after a reset at any write
    point the device boots a valid image and, applying the same patch again, finishes."""
    from tinymlaas.ota.delta import make_patch

    trusted = images["trusted"]
    patch = make_patch(images["1.0.1"], images["1.0.2"], small_firmware["key"])
    assert len(patch) < 0.05 * len(images["1.0.2"])  # a new version of the same firmware: header and signature
    _reset_at_every_write_point(images, tmp_path, lambda bl: _delta_update(bl, patch, trusted),
                                _own_model(small_firmware))


def test_a_patch_for_another_base_is_refused_before_anything_is_written(images, small_firmware, tmp_path):
    from tinymlaas.ota.delta import DeltaRejected, make_patch

    trusted = images["trusted"]
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, trusted)
    bl.provision(images["1.0.2"])
    before, writes = flash.path.read_bytes(), flash.writes
    patch = make_patch(images["1.0.1"], images["1.0.2"], small_firmware["key"])
    with pytest.raises(DeltaRejected) as e:
        _delta_update(bl, patch, trusted)
    assert e.value.reason == "wrong-base"
    assert flash.writes == writes and flash.path.read_bytes() == before


def test_cli_patches_signed_images_and_firmware_elfs(images, small_firmware, tmp_path, capsys):
    from tinymlaas.cli import main

    pairs = {"images": (images["1.0.1"], images["1.0.2"]),
             "elf": (small_firmware["payload"].read_bytes(), (small_firmware["dir"] / "build" / "firmware.elf").read_bytes())}
    for name, (old, new) in pairs.items():
        (tmp_path / f"{name}.old").write_bytes(old)
        (tmp_path / f"{name}.new").write_bytes(new)
        assert main(["image", "delta", str(tmp_path / f"{name}.old"), str(tmp_path / f"{name}.new"), "-o",
                     str(tmp_path / f"{name}.patch")]) == 0
        assert main(["image", "apply", str(tmp_path / f"{name}.old"), str(tmp_path / f"{name}.patch"), "-o",
                     str(tmp_path / f"{name}.out")]) == 0
        assert (tmp_path / f"{name}.out").read_bytes() == new, name
    capsys.readouterr()


# model-only updates: a model image for the running firmware's code part (its model ABI)

@pytest.fixture(scope="module")
def models(small_firmware, tmp_path_factory):
    """small_firmware's model retrained (another seed: every weight, the weight scale and so the requantization
    multiplier changed; the code part stays byte for byte the same) and a model of another architecture (12 outputs
    instead of 11: another model ABI), built and packaged as 1.0.2 like the service does."""
    from tests.helpers import quantized_layers as q
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.build.request import BuildRequest
    from tinymlaas.ota.package import package_build

    work = tmp_path_factory.mktemp("models")
    out = {}
    for name, args in (("retrained", (8, [1, 37], 11, 1)), ("other-abi", (7, [1, 37], 12, 1))):
        (work / f"{name}.tflite").write_bytes(q.fully_connected(*args))
        compile_model(work / f"{name}.tflite", "cortex-m4", work / name, BuildRequest(inputs=3))
        out[name] = package_build(work / name, M4, small_firmware["key"], "1.0.2")
    return out


def test_firmware_and_model_images_carry_the_model_abi(small_firmware, models):
    first, retrained, other = small_firmware["package"], models["retrained"], models["other-abi"]
    fw, model = model_layout(first.image.read_bytes()), model_layout(first.model_image.read_bytes())
    assert (fw.kind, model.kind) == (FIRMWARE_IMAGE, MODEL_IMAGE) and fw.abi == model.abi == first.abi
    assert image_payload(first.model_image.read_bytes()) == (small_firmware["dir"] / "build" / "weights.bin").read_bytes()
    assert retrained.abi == first.abi and other.abi != first.abi
    # the same code part, another model: only the model bytes (and the image's header and TLVs) differ
    code = lambda p: image_payload(p.image.read_bytes())[:model_layout(p.image.read_bytes()).offset]
    assert code(retrained) == code(first)
    assert image_payload(retrained.model_image.read_bytes()) != image_payload(first.model_image.read_bytes())


def _model_update(bl: Bootloader, image: bytes, trusted: bytes, selftest_passes: bool = True) -> None:
    """A model-only update as a device runs it: the model image inspected against the running firmware (its
    model ABI) before anything is written, then staged in a model slot, test-booted, confirmed or reverted."""
    running = bl.boot()
    inspect_model_image(image, trusted, bl.flash.model_slot_size, running.layout and running.layout.abi,
                        running.version)
    _update_path(bl, image, selftest_passes, model=True)


def test_reset_at_every_write_point_of_a_model_only_update_boots_a_valid_pair(images, small_firmware, models,
                                                                             tmp_path):
    """The model image goes to a model slot; the firmware slots are never written: after a reset at any write
    point the device boots its firmware with the model of a valid pair (its own, or the new one once tried or
    confirmed), and writing the same model image again finishes the update."""
    new = models["retrained"].model_image.read_bytes()
    versions = {"1.0.1+0": (small_firmware["dir"] / "build" / "weights.bin").read_bytes(), "1.0.2+0": image_payload(new)}
    total = _reset_at_every_write_point(images, tmp_path, lambda bl: _model_update(bl, new, images["trusted"]),
                                        versions)
    assert total == 2 + -(-len(new) // 4096) + 2  # header invalidation, chunks, header, pending, tried, confirm


def test_the_device_runs_the_firmware_with_the_model_it_booted(images, small_firmware, models, tmp_path):
    """QEMU gets the code part at the flash base and the booted model at its region: the retrained model's own
    verified outputs bit for bit, with its build's instruction count; the firmware's own model does not give them."""
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, images["trusted"])
    bl.provision(images["1.0.1"])
    retrained = models["retrained"]
    spec = json.loads(retrained.selftest.read_text())
    before = run_selftest(bl.boot().payload, spec, model=bl.boot().model_region)
    assert not before.passed and "differ" in before.detail
    bl.stage_model(retrained.model_image.read_bytes())
    booted = bl.boot()
    assert booted.test and booted.model_slot == 0 and booted.version == "1.0.2+0"
    result = run_selftest(booted.payload, spec, model=booted.model_region)
    assert result.passed, result.detail
    report = json.loads((retrained.image.parent / "report.json").read_text())
    assert result.instructions == report["instructions"]
    bl.confirm()
    assert bl.boot().model_slot == 0 and not bl.boot().test


@pytest.mark.parametrize("case, reason", [
    ("other-abi", "abi-mismatch"),
    ("payload-byte", "bad-hash"),
    ("signature-byte", "bad-signature"),
    ("unknown-key", "bad-signature"),
    ("unsigned", "bad-signature"),
    ("firmware-image", "not-a-model"),
    ("downgrade", "downgrade"),
])
def test_bad_model_images_are_refused_before_anything_is_written(images, small_firmware, models, tmp_path, case,
                                                                  reason):
    good = models["retrained"].model_image.read_bytes()
    payload = models["retrained"].model_image.parent / "firmware.model.bin"
    layout = model_layout(good)
    if case in ("unknown-key", "downgrade"):
        key = generate_key(tmp_path / "rogue.pem") if case == "unknown-key" else small_firmware["key"]
        sign_image(payload, key, "1.0.0" if case == "downgrade" else "1.0.2", model_slot_size(M4),
                   tmp_path / "bad.bin", layout)
    elif case == "unsigned":  # imgtool without a key: a hash TLV, no signature
        import subprocess
        import sys

        subprocess.run([sys.executable, "-m", "imgtool.main", "sign", "--align", "4", "-v", "1.0.2", "--header-size",
                        "0x200", "--pad-header", "--slot-size", hex(model_slot_size(M4)), "--custom-tlv", "0xa0",
                        "0x" + layout.pack().hex(), str(payload), str(tmp_path / "bad.bin")], check=True)
    bad = {
        "other-abi": lambda: models["other-abi"].model_image.read_bytes(),
        "payload-byte": lambda: _flip(good, 0x200 + 10),
        "signature-byte": lambda: _flip(good, len(good) - 3),
        "firmware-image": lambda: images["1.0.2"],
    }.get(case, lambda: (tmp_path / "bad.bin").read_bytes())()
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, images["trusted"])
    bl.provision(images["1.0.1"])
    before, writes = flash.path.read_bytes(), flash.writes
    with pytest.raises(ImageRejected) as e:
        _model_update(bl, bad, images["trusted"])
    assert e.value.reason == reason, e.value
    assert flash.writes == writes and flash.path.read_bytes() == before


def test_a_model_slot_of_another_abi_is_never_booted(images, models, tmp_path):
    """Should a model for other code reach a model slot (inspection skipped), the bootloader does not pair it with
    this firmware: the pending model is dropped and the firmware runs its own model."""
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, images["trusted"])
    bl.provision(images["1.0.1"])
    own = bl.boot().model
    bl.stage_model(models["other-abi"].model_image.read_bytes())
    booted = bl.boot()
    assert not booted.test and booted.model_slot == NO_SLOT and booted.model == own
    assert flash.record().model_pending == NO_SLOT


def test_a_firmware_update_drops_the_model_slot_and_its_revert_keeps_it(images, models, tmp_path):
    """New code runs its own model (the model slots hold models for the old code); a firmware update that fails its
    self-test reverts to the old firmware with the model it ran."""
    flash = _flash(tmp_path / "f.img")
    bl = Bootloader(flash, images["trusted"])
    bl.provision(images["1.0.1"])
    _model_update(bl, models["retrained"].model_image.read_bytes(), images["trusted"])
    confirmed = bl.boot()
    assert confirmed.model_slot == 0 and confirmed.version == "1.0.2+0"
    firmware = models["retrained"].image.read_bytes()  # 1.0.2: the same code, its own model
    _update_path(bl, firmware, selftest_passes=False)
    assert bl.boot().model_slot == 0 and bl.boot().model == confirmed.model
    _update_path(bl, firmware)
    after = bl.boot()
    assert after.info.version == "1.0.2+0" and after.model_slot == NO_SLOT and after.model == confirmed.model


def test_a_firmware_elf_runs_with_its_model_section_put_in_place(small_firmware):
    """The model section is in no load segment (a model image replaces it): running the ELF (`tinymlaas run`) puts
    it at its region, as a bootloader would, and gives the build's outputs."""
    from tinymlaas.runners import run_elf

    build = small_firmware["dir"] / "build"
    run, outputs = run_elf(build / "firmware.elf", M4, "qemu", build / "inputs.bin")
    assert outputs == (build / "outputs.bin").read_bytes()
    assert run.regions[0].instructions == json.loads((build / "report.json").read_text())["instructions"]


def test_cli_inspects_images_and_refuses_a_model_for_other_code_in_one_line(small_firmware, models, tmp_path, capsys):
    from tinymlaas.cli import main

    firmware, key = str(small_firmware["package"].image), str(small_firmware["key"])
    assert main(["image", "inspect", str(models["retrained"].model_image), "--key", key, "--firmware", firmware]) == 0
    out = capsys.readouterr().out
    assert "model image 1.0.2+0" in out and small_firmware["package"].abi[:16] in out and "verified" in out
    assert main(["image", "inspect", firmware]) == 0 and "firmware image 1.0.1+0" in capsys.readouterr().out
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(_flip(models["retrained"].model_image.read_bytes(), 0x200 + 3))
    for image, said in ((models["other-abi"].model_image, "abi-mismatch"), (tampered, "bad-hash")):
        assert main(["image", "inspect", str(image), "--key", key, "--firmware", firmware]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
