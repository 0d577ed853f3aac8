"""Images of other architectures: qemu-user through binfmt_misc (emulation.py), under nspawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import racker
from racker import store
from racker.cpu import emulation
from racker.errors import PromoteError
from racker.store import platforms
from racker.store.platforms import Platform
from racker.vm import boards

ARM64 = Platform("linux", "arm64")
S390X = Platform("linux", "s390x")
AARCH64_LINE = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OP"
)


def test_the_f_flag_is_added_once() -> None:
    assert emulation.with_f_flag(AARCH64_LINE).endswith(":OPF")
    assert emulation.with_f_flag(AARCH64_LINE + "F").endswith(":OPF")
    with pytest.raises(emulation.CannotEmulate, match="malformed"):
        emulation.with_f_flag(":qemu-x:M::")


def test_native_platforms_need_no_emulator() -> None:
    assert emulation.native(platforms.host())
    if platforms.host().architecture == "amd64":
        assert emulation.native(Platform("linux", "386"))
        assert not emulation.native(ARM64)
    assert emulation.qemu_name(ARM64) == "aarch64" and emulation.qemu_name(S390X) == "s390x"


def test_an_arm64_vm_is_a_virt_board_booting_uefi_only() -> None:
    from racker.errors import VMError
    from racker.promote import bootloader

    assert boards.board_for("amd64") == ("pc", "bios") and boards.board_for("amd64", "uefi") == ("pc", "uefi")
    assert boards.board_for("arm64") == ("virt", "uefi")
    with pytest.raises(VMError, match="UEFI only"):
        boards.board_for("arm64", "bios")
    virt = boards.board("virt")
    assert (virt.binary, virt.uefi[0]) == ("qemu-system-aarch64", "/usr/share/AAVMF/AAVMF_CODE.fd")
    arm = bootloader.efi_target("arm64")
    assert (arm.grub, arm.binary, arm.console, arm.from_image) == ("arm64-efi", "BOOTAA64.EFI", "ttyAMA0", True)
    with pytest.raises(PromoteError, match="does not make riscv64 disks"):
        bootloader.efi_target("riscv64")


@pytest.fixture
def fake_binfmt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A binfmt_misc directory and binfmt.d of the test's own: what is registered and shipped is what it writes."""
    misc = tmp_path / "binfmt_misc"
    misc.mkdir()
    (misc / "register").touch()
    shipped = tmp_path / "binfmt.d"
    shipped.mkdir()
    monkeypatch.setattr(emulation, "BINFMT_MISC", misc)
    monkeypatch.setenv("RACKER_BINFMT_DIRS", str(shipped))
    return tmp_path


@pytest.mark.skipif(platforms.host().architecture != "amd64", reason="the fake handlers are for an amd64 host")
def test_what_is_missing_is_said_in_one_line(fake_binfmt: Path) -> None:
    missing = emulation.status(ARM64)
    assert missing.missing == "cannot run linux/arm64 programs here: no qemu-aarch64 emulator (apt-get install qemu-user-static)"
    assert not missing.fixable and missing.package == "qemu-user-static"
    with pytest.raises(emulation.CannotEmulate, match=r"^cannot run linux/arm64 programs here"):
        emulation.ensure(ARM64)
    # Shipped, with its interpreter there, but not registered: racker can register it.
    interpreter = fake_binfmt / "qemu-aarch64-static"
    interpreter.touch()
    (fake_binfmt / "binfmt.d" / "qemu-aarch64.conf").write_text(
        AARCH64_LINE.replace("/usr/libexec/qemu-binfmt/aarch64-binfmt-P", str(interpreter))
    )
    shipped = emulation.status(ARM64)
    assert shipped.fixable and "doctor --fix" in shipped.missing
    # Registered by someone else without F: left alone, and said.
    (fake_binfmt / "binfmt_misc" / "qemu-aarch64").write_text(f"enabled\ninterpreter {interpreter}\nflags: OP\noffset 0\n")
    unflagged = emulation.status(ARM64)
    assert unflagged.registered and "lacks the F flag" in unflagged.missing
    assert not emulation.register(ARM64), "a handler someone registered was replaced"
    (fake_binfmt / "binfmt_misc" / "qemu-aarch64").write_text(f"enabled\ninterpreter {interpreter}\nflags: OPF\noffset 0\n")
    assert emulation.status(ARM64).missing == ""


@pytest.mark.root
def test_racker_registers_a_missing_handler_with_the_f_flag() -> None:
    """s390x: a platform nothing else here uses, so its handler can be registered and removed again."""
    if not Path("/usr/lib/binfmt.d/qemu-s390x.conf").exists():
        pytest.skip("qemu-user-static is not installed")
    handler = emulation.BINFMT_MISC / "qemu-s390x"
    if handler.exists():
        pytest.skip("a qemu-s390x handler is registered already: not ours to remove")
    try:
        emulation.ensure(S390X)
        assert "F" in handler.read_text().split("flags:")[1].splitlines()[0]
        assert emulation.status(S390X).missing == ""
    finally:
        if handler.exists():
            handler.write_text("-1")


@pytest.mark.root
def test_a_platform_without_an_emulator_is_one_line_naming_the_package(private_store: dict, tmp_path: Path) -> None:
    """No emulator (binfmt.d without qemu-s390x's line, nothing registered): one line, nothing stored, nothing asked."""
    if (emulation.BINFMT_MISC / "qemu-s390x").exists():
        pytest.skip("a qemu-s390x handler is registered")
    empty = tmp_path / "binfmt.d"
    empty.mkdir()
    env = {"RACKER_BINFMT_DIRS": str(empty), "RACKER_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}
    result = racker("pull", "debian-bookworm", "--platform", "linux/s390x", env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "racker: error: cannot run linux/s390x programs here: no qemu-s390x emulator (apt-get install qemu-user-static)"
    ]
    assert not (emulation.BINFMT_MISC / "qemu-s390x").exists()
    assert store.images() == []


# -- a real arm64 image under nspawn (built once into the shared store: ~5 min under emulation) --


@pytest.mark.slow
@pytest.mark.root
def test_an_arm64_image_boots_and_passes_the_container_checks_under_qemu_user() -> None:
    from racker import images

    image = images.pull("debian-bookworm@linux-arm64")  # the shared store: built once, under emulation (~5 min)
    assert platforms.of_manifest(image.manifest) == ARM64
    assert (image.rootfs / "lib/ld-linux-aarch64.so.1").exists(), "not an arm64 root"
    booted = racker("run", "debian-bookworm", "--platform", "linux/arm64", "--", "uname", "-m")
    assert (booted.returncode, booted.stdout.strip()) == (0, "aarch64"), booted.stderr
    unbooted = racker("run", "--no-boot", "debian-bookworm@linux-arm64", "--", "uname", "-m")
    assert unbooted.stdout.strip() == "aarch64", unbooted.stderr
    # systemd as PID 1 under qemu-user reaches `running`: its units' credentials are spared (emulation.py).
    checked = racker("check", "debian-bookworm@linux-arm64")
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "system_reaches_running               pass" in checked.stdout


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.qemu
def test_an_arm64_image_promoted_boots_in_qemu_aarch64_and_passes_the_full_boot_checks() -> None:
    """Prepared with the arm64 cloud kernel and GRUB, promoted to a UEFI disk, booted on -M virt with AAVMF under TCG.

    In the shared store, where `racker check` finds the image and its +vm built (a private store
    would bootstrap and prepare arm64 again under emulation: some 16 minutes)."""
    from racker import images, prepare, promote

    image = prepare.prepare(images.pull("debian-bookworm@linux-arm64"))
    assert image.manifest["prepared"]["kernel"].endswith("-cloud-arm64")
    assert (image.rootfs / "usr/lib/grub/arm64-efi/normal.mod").is_file()
    layout, _kernel, _profile, _fmt = promote.plan(image, promote.Options(firmware="uefi"))
    assert layout.firmware == "uefi" and layout.esp_size > 0
    with pytest.raises(PromoteError, match="UEFI disk only"):
        promote.plan(image, promote.Options(firmware="bios"))
    checked = racker("check", "--engine", "qemu", "debian-bookworm@linux-arm64", timeout=1800)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert "sshd_active_and_listening            pass" in checked.stdout


@pytest.mark.root
def test_doctor_says_for_each_foreign_platform_whether_it_runs() -> None:
    import json

    if not Path("/usr/lib/binfmt.d/qemu-aarch64.conf").exists():
        pytest.skip("qemu-user-static is not installed")
    emulation.ensure(ARM64)  # what doctor --fix does for it
    report = {c["name"]: c for c in json.loads(racker("doctor", "--json", "--no-probe").stdout)}
    assert report["linux/arm64 (nspawn)"]["ok"], report["linux/arm64 (nspawn)"]
    assert report["linux/arm64 (nspawn)"]["detail"] == "runs through qemu-aarch64 (binfmt_misc, F flag)"
    assert report["linux/arm64 (vm)"]["ok"] == Path("/usr/share/AAVMF/AAVMF_CODE.fd").exists()


def test_the_images_grub_modules_are_read_inside_the_image(tmp_path: Path) -> None:
    """arm64's GRUB comes from the image: a module that links to a host file gets the image's file of
    that path (or nothing), never the host's, in the disk."""
    from racker.promote import bootloader

    host_secret = tmp_path / "host" / "id_ed25519"
    host_secret.parent.mkdir()
    host_secret.write_bytes(b"HOST SECRET")
    root = tmp_path / "image"
    modules = root / "usr/lib/grub/arm64-efi"
    modules.mkdir(parents=True)
    (modules / "normal.mod").write_bytes(b"normal")
    (modules / "evil.mod").symlink_to(host_secret)  # absolute: inside the image, a path that does not exist
    (modules / "up.mod").symlink_to("../../../../../../host/id_ed25519")  # `..` stops at the image's /
    (root / "host").mkdir()
    (root / "host/id_ed25519").write_bytes(b"the image's own")
    lib = bootloader.grub_lib(bootloader.EFI_TARGETS["arm64"], root, tmp_path / "work")
    copied = {p.name: p.read_bytes() for p in (lib / "arm64-efi").iterdir()}
    assert copied == {"normal.mod": b"normal", "up.mod": b"the image's own"}, copied


def test_units_with_credentials_are_read_inside_the_image(tmp_path: Path) -> None:
    host = tmp_path / "host/lib/systemd/system"
    host.mkdir(parents=True)
    (host / "host-only.service").write_text("[Service]\nLoadCredential=x\n")
    root = tmp_path / "image"
    (root / "etc/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd/system/own.service").write_text("[Service]\nLoadCredential=y\n")
    (root / "lib").symlink_to(tmp_path / "host/lib")  # the host's units, were the link followed on the host
    assert emulation.units_with_credentials(root) == ["own.service"]
