"""The `promote` and `vm` commands (issue 4). Commands return an exit status; only cli.py exits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from racker import images, machines, progress, store
from racker.cli.options import Verb
from racker.cli.output import table
from racker.errors import BadReference, RequirementsFailed, VMError
from racker.store import refs
from racker.vm import boards


def _print_checks(profile: str, checks: list) -> None:
    print(f"requirements of profile {profile}:")
    verdict = {(True, True): "ok", (True, False): "ok", (False, True): "FAIL", (False, False): "WARN"}
    table([[verdict[c.ok, c.blocking], c.requirement, c.detail] for c in checks], ["", "REQUIREMENT", "DETAIL"])


def _prepared(reference: str, *, prepare_it: bool = True, kernel: str = "") -> store.StoredImage:
    from racker import prepare

    image = images.pull(reference)
    return prepare.prepare(image, kernel=kernel or prepare.CLOUD_KERNEL) if prepare_it else image


# -- promote ----------------------------------------------------------------


def cmd_promote(args: argparse.Namespace) -> int:
    from racker import prepare, promote
    from racker.promote import disk, formats, profiles

    fmt = args.format or {"gcp": "gce", "digitalocean": "qcow2", "azure": "vhd"}.get(args.profile, "raw")
    options = promote.Options(
        fmt=fmt,
        firmware=args.firmware or "bios",
        size=disk.parse_size(args.size) if args.size else None,
        profile=args.profile,
        app=args.app,
        vagrant_user=args.vagrant_user,
        compress=args.compress,
    )
    profiles.get(options.profile)  # a typo fails before an image is built
    # The kernel the format's platform needs drivers from (a vdi: the generic one).
    image = _prepared(args.image, prepare_it=not args.no_prepare, kernel=prepare.kernel_for(formats.get(fmt).drivers))
    if args.firmware is None and prepare.image_architecture(image) in boards.ARCH_BOARDS:
        options.firmware = "uefi"  # another architecture's disk boots UEFI only
    try:
        result = promote.promote(image, Path(args.output) if args.output else None, options)
    except RequirementsFailed as failed:
        _print_checks(options.profile, failed.checks)
        raise
    if result.checks:
        _print_checks(options.profile, result.checks)
    print(result.path)
    for path in result.extra.values():
        print(path)
    return 0


# -- vm ---------------------------------------------------------------------


def read_user_data(path: str) -> dict:
    """--user-data FILE: a #cloud-config YAML mapping, merged into the VM's seed beside racker's user."""
    import yaml  # cloud-config is YAML

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise VMError(f"cannot read --user-data {path}: {getattr(error, 'strerror', None) or error}") from None
    if not text.startswith("#cloud-config"):
        raise VMError(f"--user-data {path} is not cloud-config", hint="its first line must be #cloud-config")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise VMError(f"--user-data {path} is not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise VMError(f"--user-data {path} is not a cloud-config mapping (KEY: VALUE lines)")
    return config


def _vm_for(args: argparse.Namespace, *, detached: bool):  # type: ignore[no-untyped-def]
    """A VM for a disk file, or for an image (promoted once to a cached disk)."""
    from racker import promote
    from racker.promote import disk
    from racker.vm import qemu

    size = disk.parse_size(args.disk_size) if getattr(args, "disk_size", None) else None
    user_data = read_user_data(args.user_data) if args.user_data else None  # before anything is pulled or booted
    if user_data is not None and args.warm:
        raise VMError("--user-data needs a cold boot: a warm VM restores a snapshot whose cloud-init ran already", hint="drop --warm")
    from racker.machines import network
    from racker.vm import bridge

    publish = [network.parse_publish(spec) for spec in args.publish]  # and the network: before anything is pulled or booted
    bridge.check_mode(args.network, args.name)
    if publish and args.network == bridge.USER:
        raise VMError("--publish needs a bridge to publish from", hint="add --network nat")
    if args.network != bridge.USER and args.warm:
        raise VMError("a warm VM restores a snapshot taken on QEMU's user-mode network", hint="drop --warm")
    common = dict(
        network_mode=args.network,
        publish=publish,
        memory=args.memory,
        cpus=args.cpus,
        accelerator=args.accel,
        boot_timeout=args.timeout,
        disk_size=size,
        detached=detached,
        warm=args.warm,
        user_data=user_data,
    )
    disk = disk_or_image(args.target)
    if disk is not None:
        if not disk.is_file():
            raise VMError(f"no disk file {disk.absolute()}")
        return qemu.VM(disk, args.name, firmware=args.firmware, **common)  # type: ignore[arg-type]
    from racker import prepare

    image = _prepared(args.target)
    machine, firmware = boards.board_for(prepare.image_architecture(image), args.firmware)
    path = promote.cached_disk(image, firmware)
    return qemu.VM(path, args.name, image=image.name, digest=image.digest, machine=machine, **common)  # type: ignore[arg-type]


def disk_or_image(target: str) -> Path | None:
    """The disk file `racker vm start TARGET` boots, or None when TARGET is an image.

    The reference parser decides first: file:PATH is a disk; any other scheme
    (bootstrap:debian/bookworm, docker://…) and NAME+vm are images, whatever
    the filesystem holds. A plain name is a disk if it ends in a disk suffix
    (bookworm.qcow2), an image if the catalogue or the store knows it, else a
    disk if such a file exists. What does not parse (./disk.qcow2, /srv/vm.img)
    is a path, unless the store holds that very name.
    """
    try:
        ref = refs.parse(target)
    except BadReference:
        ref = None
    if ref is not None and ref.scheme == "file":
        return Path(ref.target)
    if ref is not None and (ref.scheme != "catalog" or ref.prepared):
        return None
    if ref is not None and target.endswith(_disk_suffixes()):
        return Path(target)
    if _is_image(target):
        return None
    if ref is None or Path(target).is_file():
        return Path(target)
    return None  # an unknown image name: pulling it says so, with the nearest names


def _is_image(text: str) -> bool:
    try:
        images.resolve(text)
    except BadReference:
        return False
    return True


def _disk_suffixes() -> tuple[str, ...]:
    from racker.promote import formats

    return tuple(f.suffix for f in formats.FORMATS.values())


def cmd_vm_start(args: argparse.Namespace) -> int:
    vm = _vm_for(args, detached=True)
    vm.start()
    vm.detach()
    progress.say(f"ssh on 127.0.0.1:{vm.endpoint.port}, booted in {vm.boot_seconds:.1f}s ({vm.system_state})")
    print(vm.name)
    return 0


def cmd_vm_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise VMError("no command given", hint="racker vm run IMAGE -- CMD …")
    with _vm_for(args, detached=False) as vm:
        return vm.interact(args.command, tty=args.tty, root=args.root)


def cmd_vm_ssh(args: argparse.Namespace) -> int:
    from racker.vm import qemu

    vm = qemu.VM.attach(args.name)
    return vm.interact(args.command, tty=args.tty, root=args.root)


def cmd_vm_console(args: argparse.Namespace) -> int:
    from racker.vm import qemu

    vm = qemu.VM.attach(args.name)
    try:
        data = vm.console_log.read_bytes()
    except FileNotFoundError:
        data = b""
    if args.tail:
        data = b"\n".join(data.splitlines()[-args.tail :]) + b"\n"
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_vm_ps(args: argparse.Namespace) -> int:
    import json

    running = [s for s in machines.all_states("qemu") if not machines.is_stale(s)]
    if args.json:
        json.dump(
            [
                {
                    "name": s.name,
                    "image": s.image,
                    "pid": s.pid,
                    "ssh_port": s.extra.get("ssh_port"),
                    "firmware": s.extra.get("firmware"),
                    "started": s.started,
                }
                for s in running
            ],
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    table(
        [[s.name, s.image, f"127.0.0.1:{s.extra.get('ssh_port', '?')}", str(s.extra.get("firmware", "")), s.started] for s in running],
        ["NAME", "IMAGE", "SSH", "FIRMWARE", "STARTED"],
    )
    return 0


def cmd_vm_snapshots(args: argparse.Namespace) -> int:
    import json
    import time

    from racker.vm import snapshots

    rows = [
        {
            "id": s.id,
            "image": s.image or Path(s.key.disk).name,
            "size": s.size(),
            "age_s": round(time.time() - s.created),
            "stale": s.stale(),
            **{k: getattr(s.key, k) for k in ("disk", "firmware", "memory", "cpus", "accel")},
        }
        for s in snapshots.all_snapshots()
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    cells = [
        [r["id"], r["image"], f"{r['size'] / 2**20:.0f}M", _age(r["age_s"]), f"{r['memory']}M {r['accel']}", "stale" if r["stale"] else ""]
        for r in rows
    ]
    table(cells, ["SNAPSHOT", "IMAGE", "SIZE", "AGE", "VM", ""])
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_vm_stop(args: argparse.Namespace) -> int:
    from racker.vm import qemu

    for name in args.names:
        qemu.VM.attach(name).stop(grace=args.timeout)
        print(name)
    return 0


def add_commands(verb: Verb, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands: verb(name, func, help) -> parser."""
    from racker.promote import formats, profiles

    p = verb("promote", cmd_promote, "turn an image into a bootable disk file")
    p.add_argument("image")
    p.add_argument("--format", choices=list(formats.FORMATS), help="output format (default raw; qcow2 for digitalocean, gce for gcp)")
    p.add_argument(
        "--firmware", choices=["bios", "uefi"], help="bios: GRUB in the MBR; uefi: GRUB on an ESP (default bios; arm64: uefi, its only one)"
    )
    p.add_argument("--size", help="disk size, e.g. 4G (default 2G, or what the image needs)")
    p.add_argument("--profile", choices=list(profiles.PROFILES), default="generic", help="apply and verify a cloud's requirements")
    p.add_argument("--app", action="store_true", help="run the image's ENTRYPOINT/CMD as a systemd service")
    p.add_argument(
        "--vagrant-user",
        action="store_true",
        help="add user vagrant with passwordless sudo and Vagrant's well-known insecure keys (test boxes only)",
    )
    p.add_argument("--no-prepare", action="store_true", help="promote the image as it is (it must hold a kernel)")
    p.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        help="qcow2 with compressed (zstd) clusters; vmdk and gce are compressed always, raw/vhd/vhdx/vdi never"
        " (default: on for a --profile's upload)",
    )
    p.add_argument("-o", "--output", help="output file (default IMAGE-FIRMWARE.FORMAT here)")

    vm = verb("vm", lambda _args: _missing_vm_command(), "boot disks and images in QEMU")
    vm_sub = vm.add_subparsers(dest="vm_verb", required=True, metavar="VM_COMMAND")

    def vm_verb(name: str, func, help: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        q = vm_sub.add_parser(name, help=help, description=help)
        q.set_defaults(func=func)
        return q

    def boot_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name")
        q.add_argument("--memory", type=int, default=1024, help="MiB (default %(default)s)")
        q.add_argument("--cpus", type=int, default=2)
        q.add_argument("--accel", choices=["kvm", "tcg"], help="override the KVM probe")
        q.add_argument("--firmware", choices=["bios", "uefi"], help="default: what the disk boots with")
        q.add_argument("--disk-size", help="grow the VM's disk (an overlay) to this size, e.g. 8G")
        q.add_argument("--timeout", type=float, help="seconds to wait for boot (default $RACKER_VM_BOOT_TIMEOUT, else 240)")
        q.add_argument("--warm", action="store_true", help="restore the disk's snapshot; without one, boot and save one")
        q.add_argument(
            "--user-data",
            metavar="FILE",
            help="more #cloud-config for the VM's seed (write_files, packages, runcmd…), beside racker's user and hostname",
        )
        q.add_argument(
            "--network",
            default="user",
            metavar="user|nat|NAME",
            help="user: QEMU's user-mode NIC only; nat: also a NIC on racker0, an address of racker's range from racker's DHCP, "
            "outbound NAT; NAME: also a NIC on that private network (racker network create), resolved there by its --name "
            "(default %(default)s; racker's SSH always uses the user-mode NIC)",
        )
        q.add_argument(
            "-p",
            "--publish",
            action="append",
            default=[],
            metavar="[ADDR:]HOST:GUEST",
            help="forward the host's port (on 127.0.0.1 unless ADDR is given) to the VM's on its bridge (--network nat)",
        )

    q = vm_verb("start", cmd_vm_start, "boot a disk file or an image and leave it running")
    q.add_argument("target", metavar="DISK|IMAGE")
    boot_options(q)

    q = vm_verb("run", cmd_vm_run, "boot, run a command over SSH, tear down")
    q.add_argument("target", metavar="DISK|IMAGE")
    boot_options(q)
    q.add_argument("-t", "--tty", action="store_true", default=None)
    q.add_argument("--root", action="store_true", help="run the command as root (through sudo)")
    q.add_argument("command", nargs=argparse.REMAINDER)
    q.set_defaults(command_follows=("target", "the disk or image", "racker vm run [OPTIONS] DISK|IMAGE -- COMMAND ..."))

    q = vm_verb("ssh", cmd_vm_ssh, "a shell or a command in a running VM")
    q.add_argument("name")
    q.add_argument("-t", "--tty", action="store_true", default=None)
    q.add_argument("--root", action="store_true", help="run the command as root (through sudo)")
    q.add_argument("command", nargs=argparse.REMAINDER)
    q.set_defaults(command_follows=("name", "the VM's name", "racker vm ssh [OPTIONS] NAME [-- COMMAND ...]"))

    q = vm_verb("console", cmd_vm_console, "print a VM's serial console log")
    q.add_argument("name")
    q.add_argument("--tail", type=int, help="only the last N lines")

    q = vm_verb("ps", cmd_vm_ps, "list running VMs")
    q.add_argument("--json", action="store_true")

    q = vm_verb("snapshots", cmd_vm_snapshots, "list the saved states warm VMs restore")
    q.add_argument("--json", action="store_true")

    q = vm_verb("stop", cmd_vm_stop, "power VMs off and remove them")
    q.add_argument("names", nargs="+")
    q.add_argument("--timeout", type=float, default=10.0, help="seconds for an ACPI power-off before quitting")


def _missing_vm_command() -> int:
    raise VMError("no vm command given", hint="racker vm start|run|ssh|console|ps|snapshots|stop")
