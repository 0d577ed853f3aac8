"""Running another architecture's programs on this host: qemu-user through binfmt_misc.

An arm64 image's programs run here when the kernel hands aarch64 ELF files to
qemu-aarch64-static. That takes a handler registered in binfmt_misc, with the F
flag: the kernel then opens the interpreter once, at registration, so it works
inside containers and nspawn's own mount namespace, where the host's
/usr/libexec/qemu-binfmt is not to be seen.

Debian's qemu-user-static ships each handler's line in /usr/lib/binfmt.d (for
systemd-binfmt); where PID 1 is not systemd nobody registers them. racker
registers one from that line, with F, only where no handler of that name is
registered: a handler someone else registered is theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from racker import proc, settings
from racker.errors import RackerError
from racker.store import platforms
from racker.store.platforms import Platform

BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
PACKAGE = "qemu-user-static"
# qemu-user's name of an architecture, where it is not Go's.
QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64", "386": "i386", "mips64le": "mips64el", "mipsle": "mipsel", "loong64": "loongarch64"}
# What this host's CPU runs natively besides its own architecture.
NATIVE_ALSO = {"amd64": ("386",), "arm64": ("arm",)}


class CannotEmulate(RackerError):
    """This host cannot run a platform's programs: no emulator, or no binfmt_misc."""


@dataclass(frozen=True)
class Status:
    """What running a platform here needs, and what of it is missing ("" if nothing)."""

    platform: Platform
    qemu: str  # qemu-user's name: aarch64
    registered: bool  # a handler of that name is registered and enabled
    missing: str  # one line: what is missing and what to do; "" if the platform runs here
    fixable: bool = False  # racker can register the handler itself (doctor --fix, or at first use)
    package: str = ""  # the package that would bring what is missing


def native(platform: Platform) -> bool:
    host = platforms.host()
    return platform.os == host.os and (
        platform.architecture == host.architecture or platform.architecture in NATIVE_ALSO.get(host.architecture, ())
    )


def qemu_name(platform: Platform) -> str:
    return QEMU_NAMES.get(platform.architecture, platform.architecture)


def _dirs() -> list[Path]:
    return settings.BINFMT_DIRS.value()


def handler_line(qemu: str) -> str | None:
    """The binfmt line of qemu-`qemu` that the distribution ships (first directory wins), if any."""
    for directory in _dirs():
        path = directory / f"qemu-{qemu}.conf"
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.startswith(":"):
                    return line.strip()
    return None


def with_f_flag(line: str) -> str:
    """A binfmt line (:name:type:offset:magic:mask:interpreter:flags) with the F flag."""
    fields = line.split(":")
    if len(fields) != 8:
        raise CannotEmulate(f"malformed binfmt line {line!r}")
    if "F" not in fields[7]:
        fields[7] += "F"
    return ":".join(fields)


def _interpreter(line: str) -> str:
    return line.split(":")[6]


def _registered(qemu: str) -> dict[str, str] | None:
    """The registered handler qemu-`qemu`'s fields (enabled, interpreter, flags), or None."""
    path = BINFMT_MISC / f"qemu-{qemu}"
    try:
        text = path.read_text()
    except OSError:
        return None
    fields = {"enabled": text.splitlines()[0].strip() if text else ""}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(" ")
        fields[key.rstrip(":")] = value.strip()  # "flags: POF", "interpreter /usr/…"
    return fields


def mounted() -> bool:
    return (BINFMT_MISC / "register").exists()


def status(platform: Platform) -> Status:
    qemu = qemu_name(platform)
    if native(platform):
        return Status(platform, qemu, True, "")
    registered = _registered(qemu)
    if registered is not None:
        if registered.get("enabled") != "enabled":
            return Status(platform, qemu, False, f"the binfmt_misc handler qemu-{qemu} is disabled (echo 1 > {BINFMT_MISC}/qemu-{qemu})")
        if "F" not in registered.get("flags", ""):
            return Status(
                platform,
                qemu,
                True,
                f"the binfmt_misc handler qemu-{qemu} lacks the F flag, so containers cannot find its interpreter"
                f" (echo -1 > {BINFMT_MISC}/qemu-{qemu}, then racker doctor --fix)",
            )
        return Status(platform, qemu, True, "")
    line = handler_line(qemu)
    if line is None or not Path(_interpreter(line)).exists():
        return Status(
            platform,
            qemu,
            False,
            f"cannot run {platform} programs here: no qemu-{qemu} emulator (apt-get install {PACKAGE})",
            package=PACKAGE,
        )
    return Status(platform, qemu, False, f"no binfmt_misc handler qemu-{qemu} is registered (racker doctor --fix)", fixable=True)


def _mount() -> None:
    if mounted():
        return
    try:
        proc.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_MISC)], timeout=30)
    except RackerError as err:
        raise CannotEmulate(f"binfmt_misc is unavailable on this host, so no other architecture runs here: {err}") from None


def register(platform: Platform) -> bool:
    """Register qemu-user's handler for `platform` with the F flag, unless one is; True if this registered it."""
    found = status(platform)
    if found.registered or not found.fixable:
        return False
    _mount()
    line = with_f_flag(handler_line(found.qemu) or "")
    try:
        (BINFMT_MISC / "register").write_text(line)
    except FileExistsError:
        return False  # another process registered it meanwhile
    except OSError as err:
        raise CannotEmulate(f"could not register the binfmt_misc handler qemu-{found.qemu}: {err.strerror}") from None
    return True


def ensure(platform: Platform) -> None:
    """Make `platform`'s programs run here (registering its handler if need be), or say in one line what to install."""
    found = status(platform)
    if found.fixable:  # checked first, so that a platform that cannot run here changes nothing
        register(platform)
        found = status(platform)
    if found.missing:
        raise CannotEmulate(found.missing)


# How much slower a machine boots and answers under qemu-user: its timeouts grow by this much.
SLOWDOWN = 6.0


def image_slowdown(manifest: dict) -> float:
    """Make a stored image's programs run here (see ensure); how much slower they run (1.0 natively)."""
    platform = platforms.of_manifest(manifest)
    if platform is None or native(platform):
        return 1.0
    ensure(platform)
    return SLOWDOWN


# systemd sets a unit's credentials up (LoadCredential=) on a mount of its own, which qemu-user
# refuses (EINVAL: "Failed at step CREDENTIALS"): systemd-sysctl, -sysusers and -tmpfiles-setup
# would fail on every boot. None gets a credential under nspawn, so their lists are emptied.
CREDENTIAL_DROPIN = (
    "# Written by racker: no credentials under qemu-user (see racker/cpu/emulation.py).\n[Service]\nLoadCredential=\nSetCredential=\n"
)
UNIT_DIRS = ("usr/lib/systemd/system", "lib/systemd/system")
_CREDENTIAL_KEYS = ("LoadCredential=", "SetCredential=", "LoadCredentialEncrypted=", "SetCredentialEncrypted=", "ImportCredential=")


def units_with_credentials(rootfs: Path) -> list[str]:
    """The image's service units that declare credentials, read through imagetree (the image's links
    resolve inside it, never on the host)."""
    from racker.store import imagetree

    tree = imagetree.Tree(rootfs)
    found: set[str] = set()
    for rel in UNIT_DIRS:
        if tree.is_symlink(rel):
            continue  # /lib -> usr/lib: the other name is read
        for name in tree.listdir(rel):
            unit = f"{rel}/{name}"
            if name.endswith(".service") and tree.is_file(unit) and not tree.is_symlink(unit):
                if tree.stat(unit).st_size > 1 << 20:
                    continue  # no unit file is that large: not one to read
                text = tree.read_bytes(unit).decode(errors="replace")
                if any(line.startswith(_CREDENTIAL_KEYS) for line in text.splitlines()):
                    found.add(name)
    return sorted(found)


def nspawn_options(rootfs: Path, rundir: Path) -> list[str]:
    """systemd-nspawn's options for booting another architecture's image: drop-ins bound over the
    machine's overlay (the store's copy is never written) that spare units what qemu-user cannot do."""
    units = units_with_credentials(rootfs)
    if not units:
        return []
    dropin = rundir / "qemu-user-credentials.conf"
    dropin.write_text(CREDENTIAL_DROPIN)
    return [f"--bind-ro={dropin}:/etc/systemd/system/{unit}.d/50-racker-qemu-user.conf" for unit in units]
