"""The engines that boot an image, and what each can offer a test.

A test declares what it needs (`@pytest.mark.racker(needs=[...])`); a need
that the engine or the image cannot meet skips the test, with the reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from racker import errors
from racker.store import StoredImage
from racker.vm import boards

# Everything a test may ask for.
NEEDS = {
    "systemd": "systemd is the image's init",
    "loopback": "a loopback interface inside the machine",
    "network": "a network interface with an address from DHCP",
    "full-boot": "a real boot: firmware, bootloader, kernel, initramfs",
    "kernel": "the image's own kernel",
    "ssh": "sshd reachable from the host",
    "cloud-init": "cloud-init runs with a datasource",
    # Else a qemu test's VM may be warm: restored from the first boot's snapshot (racker.vm.snapshots),
    # with that boot's machine-id, host keys and cloud-init done.
    "first-boot": "a real first boot of its own: cloud-init running, a fresh machine-id and host keys",
}


@dataclass(frozen=True)
class Engine:
    name: str
    # "module:callable" taking a StoredImage and returning an unstarted machine
    # (a context manager with .name and .run(argv)); imported when first used.
    factory: str
    provides: frozenset[str]
    # "module:callable" taking a running machine's name and returning it, attached.
    attacher: str = ""

    def machine_for(self, image: StoredImage, *, network_mode: str = "private", warm: bool = False, seed: bool = False):  # type: ignore[no-untyped-def]
        """warm: restored from a snapshot where the engine keeps them; seed: a real first boot
        that saves the snapshot later warm machines restore, if there is none yet."""
        return _load(self.factory)(image, network_mode=network_mode, warm=warm, seed=seed)

    def attach(self, name: str):  # type: ignore[no-untyped-def]
        """The running machine `name` (racker start, racker vm start), left running when done with."""
        return _load(self.attacher)(name)

    def unmet(self, needs: list[str], image: StoredImage | None = None) -> list[str]:
        """The needs this engine (and, once known, the image) cannot meet."""
        offered = set(self.provides)
        if image is None or boots_systemd(image):
            offered.add("systemd")  # not known before the image is there: decided at setup
        return [need for need in needs if need not in offered]


def boots_systemd(image: StoredImage) -> bool:
    """Whether systemd is PID 1 once the image boots: it is its init, or it has none and
    is given systemd (prepare.bootable). sysvinit and OpenRC images boot their own."""
    from racker.machines import inits

    try:
        return isinstance(inits.detect(image.rootfs) or inits.Systemd(), inits.Systemd)
    except errors.UnknownInit:
        return False


def _load(spec: str):  # type: ignore[no-untyped-def]
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def running(name: str) -> tuple[str, str] | None:
    """(engine, image) of the running machine or VM called `name`, or None."""
    from racker import machines

    for engine in ENGINES:
        state = machines.load(engine, name)
        if state is not None and not machines.is_stale(state):
            return engine, state.image
    return None


def nspawn_attach(name: str):  # type: ignore[no-untyped-def]
    from racker.machines import nspawn

    return nspawn.Machine.attach(name)


def qemu_attach(name: str):  # type: ignore[no-untyped-def]
    from racker.vm import qemu

    return qemu.VM.attach(name)


def nspawn_machine(image: StoredImage, *, network_mode: str = "private", warm: bool = False, seed: bool = False):  # type: ignore[no-untyped-def]
    """A machine booting the image under systemd-nspawn (given an init first if it has none);
    it boots in a second or two, so there is nothing to keep warm."""
    from racker import prepare
    from racker.machines import nspawn

    return nspawn.Machine(prepare.bootable(image), network_mode=network_mode)


# sysvinit and OpenRC start their services one after another (udev's settle, then cloud-init's four
# stages). Cold boots to ready under TCG, emulator CPU (2 cores, load 6): systemd 54 s, sysvinit 79 s,
# OpenRC 112 s. At load 11 an OpenRC boot took 690 s of wall time and a sysvinit one was cut off at
# the default budget's wall cap (3 x 240 s).
RC_BOOT_SLOWDOWN = 2.0


def vm_boot_timeout(image: StoredImage) -> float | None:
    """The boot budget of a VM of `image`: None (the default) where systemd boots it, else the
    default times RC_BOOT_SLOWDOWN."""
    from racker import settings

    return None if boots_systemd(image) else settings.VM_BOOT_TIMEOUT.value() * RC_BOOT_SLOWDOWN


def qemu_vm(image: StoredImage, *, network_mode: str = "private", warm: bool = False, seed: bool = False):  # type: ignore[no-untyped-def]
    """A VM booting the image's promoted disk (prepared and promoted once, then cached);
    warm: restored from the disk's snapshot (saved by the first such VM, or by a seed);
    seed: booted cold, and saving that snapshot once ready if the disk has none.

    network_mode is nspawn's: a VM always has its user-mode NIC."""
    from racker import prepare, promote
    from racker.vm import qemu

    prepared = prepare.prepare(image)
    machine, firmware = boards.board_for(prepare.image_architecture(prepared))
    disk = promote.cached_disk(prepared, firmware)
    timeout = vm_boot_timeout(prepared)
    return qemu.VM(disk, image=prepared.name, digest=prepared.digest, warm=warm, seed_snapshot=seed, machine=machine, boot_timeout=timeout)


ENGINES: dict[str, Engine] = {
    # systemd only where the image boots it (boots_systemd), on either engine: one without an init
    # is given it (prepare.bootable, prepare.prepare), one with sysvinit or OpenRC boots that.
    "nspawn": Engine("nspawn", "racker.engines:nspawn_machine", frozenset({"loopback"}), "racker.engines:nspawn_attach"),
    "qemu": Engine("qemu", "racker.engines:qemu_vm", frozenset(NEEDS) - {"systemd"}, "racker.engines:qemu_attach"),
}


def get(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
