"""The racker command. The only module that prints for people and calls exit.

Exit status: a command run in a machine passes its own status through;
racker's own failures exit 125 (as docker and podman do), so scripts can
tell "racker failed" from "your command failed".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from racker import __version__, errors, machines, proc, progress, redact, sizes, store

if TYPE_CHECKING:
    from racker.machines.logins import Login
    from racker.machines.nspawn import Machine

EXIT_RACKER_FAILED = 125
USER_HELP = "run as this guest user: NAME, UID, NAME:GROUP or UID:GID (as docker's --user), with a login environment"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    print()


# -- commands ---------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from racker import settings

    rows = settings.listing()
    if args.json:
        _print_json(rows)
    else:
        _table(
            [[r["name"], r["value"] or "(unset)", r["source"] + (" (invalid)" if "error" in r else "")] for r in rows],
            ["SETTING", "VALUE", "FROM"],
        )
        for row in rows:
            if "error" in row:
                print(f"racker: error: {row['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from racker.upkeep import doctor

    costs = doctor.machine_costs()
    if args.fix:
        for line in [*doctor.fix(costs), *doctor.fix_platforms()]:
            print(line, file=sys.stderr if args.json else sys.stdout)
    results = doctor.checks(probe_kvm=not args.no_probe)
    machines_check, limit_lines = doctor.capacity(costs)
    results.append(machines_check)
    if args.json:
        _print_json([c.as_json() for c in results])
    else:
        for check in results:
            mark = "ok" if check.ok else ("MISSING" if check.required else "no")
            line = f"{mark:8} {check.name:20} {check.detail}"
            if not check.ok and check.package and check.package not in check.detail:
                line += f"  (apt-get install {check.package})"
            print(line)
        for line in limit_lines:
            print(f"{'':29}{line}")
    return 0 if all(c.ok for c in results if c.required) else 1


def _pull_options(args: argparse.Namespace) -> dict:
    """images.pull's keywords from --platform and --insecure (add_pull_options)."""
    from pathlib import Path

    from racker.store import platforms

    keyring = Path(args.keyring).absolute() if args.keyring else None
    if keyring is not None and not keyring.is_file():
        raise errors.RackerError(f"--keyring {args.keyring}: no such file")
    return {"platform": platforms.parse(args.platform) if args.platform else None, "insecure": args.insecure, "keyring": keyring}


def cmd_pull(args: argparse.Namespace) -> int:
    from racker import images

    if args.refresh:
        done = images.refresh(args.image, **_pull_options(args))
        if isinstance(done.error, errors.UpstreamUnreachable):
            progress.warn(f"{done.error}; kept the stored image, last reached {done.last_reached}")
        elif done.error is not None:
            raise done.error
        assert done.image is not None
        print(f"{done.image.name} {done.image.digest}")
        return 0
    image = images.pull(args.image, force=args.force, **_pull_options(args))
    print(f"{image.name} {image.digest}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from racker import images

    image = images.import_image(args.name, Path(args.path))
    print(f"{image.name} {image.digest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from racker import images
    from racker.sources import export

    print(export.export(images.find(args.image), Path(args.output), args.format))
    return 0


def cmd_sbom(args: argparse.Namespace) -> int:
    from racker import images
    from racker.store import sbom

    text = json.dumps(sbom.write(images.find(args.image), args.format), indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    from pathlib import Path

    try:
        Path(args.output).write_text(text)
    except OSError as error:
        raise errors.RackerError(f"cannot write {args.output}: {error.strerror or error}") from None
    print(args.output)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from racker import images
    from racker.store import diff

    found = diff.images(images.find(args.a), images.find(args.b))
    if args.json:
        _print_json(found.as_json())
    else:
        print("\n".join(diff.lines(args.a, args.b, found)))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from racker import images
    from racker.sources import export

    print(export.push(images.find(args.image), args.destination, tls_verify=args.tls_verify))
    return 0


def _foreign_platform(image: store.StoredImage) -> str:
    """The platform a pulled image records, if it is not the host's ("" for the host's or none)."""
    from racker.store import platforms

    recorded = platforms.of_manifest(image.manifest)
    return str(recorded) if recorded is not None and recorded != platforms.host() else ""


def _last_checked(image: store.StoredImage) -> str:
    """When the image's upstream was last asked ("-": never, e.g. a local file's or a prepared image)."""
    return (image.manifest.get("upstream") or {}).get("checked") or "-"


def cmd_images(args: argparse.Namespace) -> int:
    from racker.store import platforms

    listed = store.images()
    if args.json:
        _print_json(
            [
                dict(i.as_json(), platform=str(platforms.of_manifest(i.manifest) or ""), built=i.created, checked=_last_checked(i))
                for i in listed
            ]
        )
        return 0
    rows = [[i.name, i.short_digest, sizes.human(i.size), i.created, _last_checked(i), i.source] for i in listed]
    header = ["NAME", "DIGEST", "SIZE", "BUILT", "CHECKED", "SOURCE"]
    foreign = [_foreign_platform(i) for i in listed]
    if any(foreign):  # a column only when some image is not for this host
        rows = [[*row, platform] for row, platform in zip(rows, foreign, strict=True)]
        header.append("PLATFORM")
    _table(rows, header)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from racker import images
    from racker.vm import snapshots

    for name in args.images:
        image = images.find(name)
        users = machines.in_use(image.digest)
        if users and not args.force:
            names = ", ".join(s.name for s in users)
            raise errors.StoreError(f"image {image.name!r} is in use by {names}", hint="stop them first (racker stop NAME)")
        store.remove(image.name)
        if store.lookup(image.name) is None and not any(other.digest == image.digest for other in store.images()):
            snapshots.remove_image(image.digest)  # the image is gone: its VMs' saved states too
        print(f"removed {image.name} {image.digest}")
    return 0


def _bootable(reference: str, args: argparse.Namespace) -> store.StoredImage:
    """The image to boot for `reference`: pulled if missing, and given an init first if it has none."""
    from racker import images, prepare

    return prepare.bootable(images.pull(reference, **_pull_options(args)))


def _login_shell(machine: Machine, login: Login | None = None) -> list[str]:
    if login is not None:
        return [login.shell, "-l"]  # the user's own, from the guest's passwd
    has_bash = machine.run(["test", "-x", "/bin/bash"]).succeeded
    return ["/bin/bash", "-l"] if has_bash else ["/bin/sh", "-l"]


def _network(args: argparse.Namespace, name: str | None = None) -> dict:
    """Machine(...) keywords for --network and --publish (checked before anything is pulled or booted).
    A private network (racker network create) must exist, and `name`, the machine's, be a host name there."""
    from racker.machines import named_networks, network

    publish = [network.parse_publish(spec) for spec in args.publish]
    mode = args.network
    if args.allow_link_local:
        if mode != "nat":
            raise errors.MachineError("--allow-link-local opens link-local addresses to a nat machine", hint="add --network nat")
        mode = "nat+link-local"
    named_networks.for_mode(mode, publish)
    if mode not in network.MODES and name is not None:
        named_networks.check_hostname(name)  # the others resolve it by its name
    return {"network_mode": mode, "publish": publish}


def _login(machine: Machine, user: str | None) -> Login | None:
    """The guest user a command runs as (--user), or None for root."""
    return machine.login(user) if user else None


def cmd_run(args: argparse.Namespace) -> int:
    from racker.machines.nspawn import Machine

    options = _network(args, args.name)
    if args.no_boot:
        from racker import images
        from racker.machines import nspawn

        if args.network not in ("none", "private"):
            raise errors.MachineError(f"--network {args.network} needs a booted machine", hint="drop --no-boot")
        return nspawn.run_unbooted(images.pull(args.image, **_pull_options(args)), args.command, tty=args.tty)
    image = _bootable(args.image, args)
    with Machine(image, args.name, boot_timeout=args.timeout, **options) as machine:
        command = args.command or _login_shell(machine)
        return machine.interact(command, tty=args.tty)


def cmd_start(args: argparse.Namespace) -> int:
    from racker.machines.nspawn import Machine

    options = _network(args, args.name)
    image = _bootable(args.image, args)
    machine = Machine(image, args.name, boot_timeout=args.timeout, detached=True, **options)
    with progress.step(f"booting {machine.name}"):
        machine.start()
    machine.detach()
    print(machine.name)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from racker.machines.nspawn import Machine

    machine = Machine.attach(args.name)
    if not args.command:
        raise errors.MachineError("no command given", hint=f"racker exec {args.name} -- CMD …")
    return machine.interact(args.command, tty=args.tty, login=_login(machine, args.user))


def cmd_shell(args: argparse.Namespace) -> int:
    """Enter a running machine, or boot one from the image of that name and enter it."""
    from racker.machines.nspawn import Machine

    # An image reference (bootstrap:debian/bookworm) is no machine name: boot it.
    state = machines.load("nspawn", args.name) if machines.valid_name(args.name) else None
    if state is not None and not machines.is_stale(state):
        machine = Machine.attach(args.name)
        login = _login(machine, args.user)
        return machine.interact(_login_shell(machine, login), login=login)
    options = _network(args)
    image = _bootable(args.name, args)
    with Machine(image, boot_timeout=args.timeout, **options) as machine:
        login = _login(machine, args.user)
        return machine.interact(_login_shell(machine, login), login=login)


def cmd_ps(args: argparse.Namespace) -> int:
    running = [s for s in machines.all_states("nspawn") if not machines.is_stale(s)]
    nets = {s.name: s.extra.get("network") or {} for s in running}
    if args.json:
        _print_json(
            [
                {
                    "name": s.name,
                    "image": s.image,
                    "digest": s.digest,
                    "pid": s.pid,
                    "leader": s.leader,
                    "started": s.started,
                    "network": nets[s.name].get("network") or nets[s.name].get("mode", "private"),
                    "address": nets[s.name].get("address", ""),
                    "ports": nets[s.name].get("ports", []),
                }
                for s in running
            ]
        )
        return 0
    rows = [
        [s.name, s.image, str(s.leader), nets[s.name].get("address", "-"), ",".join(nets[s.name].get("ports", [])), s.started]
        for s in running
    ]
    _table(rows, ["NAME", "IMAGE", "LEADER", "ADDRESS", "PORTS", "STARTED"])
    return 0


def cmd_network_create(args: argparse.Namespace) -> int:
    from racker.machines import named_networks

    made = named_networks.create(args.name)
    print(f"{made.name} {made.subnet}")
    return 0


def cmd_network_ls(args: argparse.Namespace) -> int:
    from racker.machines import named_networks

    listed = named_networks.listing()
    if args.json:
        _print_json(listed)
        return 0
    rows = [[n["name"], n["bridge"], n["subnet"], ",".join(f"{k}={v}" for k, v in sorted(n["machines"].items())) or "-"] for n in listed]
    _table(rows, ["NAME", "BRIDGE", "SUBNET", "MACHINES"])
    return 0


def cmd_network_rm(args: argparse.Namespace) -> int:
    from racker.machines import named_networks

    for name in args.names:
        named_networks.remove(name)
        print(name)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop every named machine that runs (all of this store's with --all), at once; then name those not found."""
    from concurrent.futures import ThreadPoolExecutor

    from racker.machines.nspawn import Machine

    if args.all == bool(args.names):
        raise errors.RackerError("name the machines to stop, or give --all", hint="racker stop NAME... | racker stop --all")
    names = [s.name for s in machines.all_states("nspawn") if not machines.is_stale(s)] if args.all else list(dict.fromkeys(args.names))
    found, missing, failed = [], [], []
    for name in names:
        try:
            found.append(Machine.attach(name))
        except errors.NoSuchMachine:
            missing.append(name)
        except errors.MachineError as error:  # a bad name, a damaged record: said after the others are stopped
            failed.append(error)
    # Each stop waits for its machine's shutdown: in parallel, 100 take as long as one.
    with ThreadPoolExecutor(max_workers=min(32, len(found) or 1)) as pool:
        for machine, _ in zip(found, pool.map(lambda m: m.stop(grace=args.timeout), found), strict=True):
            print(machine.name, flush=True)
    if failed:
        raise failed[0]
    if missing:
        raise errors.NoSuchMachine(f"no running machine named {', '.join(map(repr, missing))}", hint="see `racker ps`")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run the built-in compatibility checks (racker.checks) and print a table of results."""
    import tempfile
    from pathlib import Path

    from racker import images
    from racker.pytest import matrix
    from racker.report.results import read_tests

    # Build first, with progress, and fail early on a bad name; the checks take the stored names
    # (a platform's included), which need no network and no --insecure again.
    names = [images.pull(name, **_pull_options(args)).name for name in args.images]
    with tempfile.TemporaryDirectory(prefix="racker-check-") as tmp:
        results = Path(args.results or os.path.join(tmp, "results.jsonl"))
        options = {"workers": args.workers, "junit": args.junit, "verbose": args.verbose}
        status = matrix.run(names, matrix.engine_names(args.engine), results, **options)
        records = read_tests(results)
    print()
    _table(*check_table(records))
    return 0 if status == 0 else 1


def _print_report(made: dict, output: str, previous: str | None) -> None:
    from pathlib import Path

    from racker import report

    counts = made["counts"]
    print(f"{Path(output) / 'report.html'}: " + ", ".join(f"{counts[o]} {o}" for o in report.OUTCOMES))
    reused = sum(1 for cell in made["cells"] if cell.get("reused"))
    if reused:
        print(f"{reused} of {len(made['cells'])} cells reused from earlier nights (their inputs unchanged; --full runs them)")
    if made["missing"]:
        print("no results for: " + ", ".join(f"{image} ({engine})" for image, engine in made["missing"]))
    nights = len(made["history"]["nights"])
    labels = [cell.get("label") for cell in made["cells"]]
    if nights > 1:
        print(f"over the last {nights} nights: {labels.count('FAILING')} cells FAILING, {labels.count('FLAKY')} FLAKY")
    comparison = made["comparison"]
    if comparison:
        print(f"against {previous}: {len(comparison['new_failures'])} new failures, {len(comparison['fixed'])} fixed")
        for cell in comparison["new_failures"]:
            first = cell["message"].splitlines()[0] if cell["message"] else cell["outcome"]
            print(f"  new failure: {cell['image']} ({cell['engine']}) {cell['check']}: {first}")


def cmd_report(args: argparse.Namespace) -> int:
    """Merge results into report.json, report.md and report.html; exit 1 if something regressed
    or a planned image has no results (a lost shard must turn the merge job red)."""
    from pathlib import Path

    from racker import report

    made = report.make([Path(p) for p in args.results], Path(args.output), Path(args.previous) if args.previous else None, args.history)
    _print_report(made, args.output, args.previous)
    return 1 if report.regressed(made) or made["missing"] else 0


# What a cell shows when a check ran more than once there (parametrised): the worst outcome.
OUTCOME_RANK = {"error": 0, "fail": 1, "flaky": 2, "pass": 3, "skip": 4}


def check_table(records: list[dict]) -> tuple[list[list[str]], list[str]]:
    """A row per check, a column per image and engine."""
    columns = sorted({(r["image"], r["engine"]) for r in records})
    cells: dict[tuple[str, tuple[str, str]], str] = {}
    for r in records:
        key = (r["check"], (r["image"], r["engine"]))
        if key not in cells or OUTCOME_RANK[r["outcome"]] < OUTCOME_RANK[cells[key]]:
            cells[key] = r["outcome"]
    checks = sorted({r["check"] for r in records})
    rows = [[check.removeprefix("test_"), *(cells.get((check, column), "-") for column in columns)] for check in checks]
    return rows, ["CHECK", *(f"{image}/{engine}" for image, engine in columns)]


def _nights(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of nights >= 1, not {text!r}")
    return int(text)


def _max_age(text: str) -> dt.timedelta:
    """--max-age: a number of days (0: reuse nothing), or hours with an h: 7, 1.5, 12h."""
    hours = text.endswith("h")
    try:
        value = float(text.removesuffix("h"))
    except ValueError:
        value = -1.0
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected days (7) or hours (12h), 0 or more, not {text!r}")
    return dt.timedelta(hours=value) if hours else dt.timedelta(days=value)


def add_history_option(p: argparse.ArgumentParser) -> None:
    from racker.report import history

    p.add_argument(
        "--history",
        type=_nights,
        default=history.WINDOW,
        metavar="N",
        help="nights of history the report keeps, carried from --previous's (default %(default)s)",
    )


def cmd_nightly(args: argparse.Namespace) -> int:
    """Refresh the images, run the checks on every engine, write the report; exit 1 if the night went red."""
    from pathlib import Path

    from racker import nightly
    from racker.pytest import matrix
    from racker.report import shards

    shard = shards.parse(args.shard) if args.shard else None
    night = nightly.run(
        args.images,
        Path(args.output),
        matrix.engine_names(args.engine),
        previous=Path(args.previous) if args.previous else None,
        workers=args.workers,
        shard=shard,
        window=args.history,
        offline=args.offline,
        full=args.full,
        max_age=args.max_age,
    )
    if night.report is None:
        # A shard: its results are half of a report; the job that gathers every shard makes it.
        for path in night.results:
            print(path)
        print(f"shard {shard}: merge every shard's results with: racker report RESULTS… -o DIR")
        return 0
    _print_report(night.report, args.output, args.previous)
    print(f"report: {(Path(args.output) / 'report.html').absolute()}")
    return 1 if nightly.failed(night.report) else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from racker.upkeep import gc

    removed = gc.collect()
    for line in removed:
        print(line)
    if not removed:
        print("nothing to clean up")
    return 0


# -- parser -----------------------------------------------------------------


VM_VERBS = ("promote", "vm")


def add_pull_options(p: argparse.ArgumentParser) -> None:
    """--platform and --insecure, for every command that may pull its image."""
    p.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="the image of a multi-arch index to pull, e.g. linux/arm64 (default: the host's)"
    )
    p.add_argument("--insecure", action="store_true", help="let this pull's registry answer plain HTTP or unverified TLS")
    p.add_argument("--keyring", metavar="FILE", help="an OpenPGP keyring: a download's SHA256SUMS must be signed by a key in it (gpgv)")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; the promote and vm commands only when argv may use them.

    Building those imports the promote package (about 25 ms), which every
    `racker run` would otherwise pay. racker's own options take no values,
    so the first word that is not an option is the command.
    """
    parser = argparse.ArgumentParser(prog="racker", description="Boot OS images under systemd-nspawn and QEMU, and test that they work.")
    parser.add_argument("--version", action="version", version=f"racker {__version__}")
    parser.add_argument("--debug", action="store_true", help="log every command and show tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    def verb(name: str, func, help: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = verb("config", cmd_config, "list every RACKER_* setting: its value and where it came from (environment or default)")
    p.add_argument("--json", action="store_true")

    p = verb("doctor", cmd_doctor, "check the host's prerequisites")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-probe", action="store_true", help="do not boot a probe guest to test KVM")
    p.add_argument(
        "--fix",
        action="store_true",
        help="raise the host limits (sysctl) to hold 200 more machines, register qemu-user's binfmt_misc handlers; says what it changed",
    )

    p = verb("pull", cmd_pull, "build or fetch an image into the store")
    p.add_argument("image")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.add_argument("--refresh", action="store_true", help="ask the image's upstream what it holds now; acquire again only if it moved")
    add_pull_options(p)

    p = verb("import", cmd_import, "store a root filesystem (a directory or a tarball) made by another tool")
    p.add_argument("name")
    p.add_argument("path", metavar="DIR|TARBALL")

    p = verb("export", cmd_export, "write an image as an OCI or docker archive (docker/podman load), or a root tarball (docker import)")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--format", choices=["oci-archive", "docker-archive", "rootfs-tar"], default="oci-archive")

    p = verb("sbom", cmd_sbom, "write an image's software bill of materials (its packages) as SPDX or CycloneDX JSON")
    p.add_argument("image")
    p.add_argument("--format", choices=["spdx-json", "cyclonedx-json"], default="spdx-json")
    p.add_argument("-o", "--output", help="the file to write (default: standard output)")

    p = verb("diff", cmd_diff, "list the packages and files where two stored images differ")
    p.add_argument("a", metavar="IMAGE_A")
    p.add_argument("b", metavar="IMAGE_B")
    p.add_argument("--json", action="store_true")

    p = verb("push", cmd_push, "push an image to a registry: racker push IMAGE docker://HOST/NAME[:TAG]")
    p.add_argument("image")
    p.add_argument("destination")
    p.add_argument("--tls-verify", action=argparse.BooleanOptionalAction, default=True, help="(loopback registries: never)")

    p = verb("images", cmd_images, "list the images in the store")
    p.add_argument("--json", action="store_true")

    p = verb("rmi", cmd_rmi, "remove images from the store")
    p.add_argument("images", nargs="+")
    p.add_argument("--force", action="store_true", help="remove even while machines use it")

    def network_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--network",
            default="private",
            metavar="none|private|nat|NAME",
            help="none and private (one mode): only lo; nat: eth0 with an address of racker's range, outbound NAT; "
            "NAME: a private network (racker network create), where the others resolve the machine by its --name "
            "(default %(default)s)",
        )
        p.add_argument(
            "-p",
            "--publish",
            action="append",
            default=[],
            metavar="[ADDR:]HOST:GUEST",
            help="forward the host's port (on 127.0.0.1 unless ADDR is given) to the machine's (--network nat)",
        )
        p.add_argument(
            "--allow-link-local",
            action="store_true",
            help="let a nat machine reach 169.254.0.0/16, the cloud metadata service (and its credentials) among them",
        )

    p = verb("run", cmd_run, "boot an image, run a command in it, tear it down")
    p.add_argument("--rm", action="store_true", help="accepted for docker compatibility: machines are always removed")
    p.add_argument("--name")
    p.add_argument("-t", "--tty", action="store_true", default=None, help="give the command a terminal of the machine's own")
    p.add_argument("--timeout", type=float, help="seconds to wait for boot (default $RACKER_BOOT_TIMEOUT, else 60)")
    p.add_argument(
        "--no-boot",
        action="store_true",
        help="run the command (default: the image's ENTRYPOINT and CMD) directly, as docker run does, without booting an init",
    )
    add_pull_options(p)
    network_options(p)
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(command_follows=("image", "the image", "racker run [OPTIONS] IMAGE [-- COMMAND ...]"))

    p = verb("start", cmd_start, "boot an image and leave it running")
    p.add_argument("image")
    add_pull_options(p)
    p.add_argument("--name")
    p.add_argument("--timeout", type=float, help="seconds to wait for boot (default $RACKER_BOOT_TIMEOUT, else 60)")
    network_options(p)

    p = verb("exec", cmd_exec, "run a command in a running machine")
    p.add_argument("-t", "--tty", action="store_true", default=None)
    p.add_argument("-u", "--user", help=USER_HELP)
    p.add_argument("name")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(command_follows=("name", "the machine's name", "racker exec [OPTIONS] NAME -- COMMAND ..."))

    p = verb("shell", cmd_shell, "a login shell in a machine (booted from the image of that name if none runs)")
    p.add_argument("-u", "--user", help=USER_HELP)
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="seconds to wait for boot (default $RACKER_BOOT_TIMEOUT, else 60)")
    add_pull_options(p)
    network_options(p)

    p = verb("ps", cmd_ps, "list running machines")
    p.add_argument("--json", action="store_true")

    p = verb("stop", cmd_stop, "stop running machines; exit 125 if any named one was not found (the others are stopped)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every machine of this store")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for a clean shutdown before killing")

    from racker import engines

    p = verb("check", cmd_check, "boot images and run the built-in compatibility checks")
    p.add_argument("images", nargs="+")
    p.add_argument("--engine", default="nspawn", choices=[*engines.ENGINES, "all"], help="where to boot the images (default nspawn)")
    add_pull_options(p)
    p.add_argument("-n", "--workers", help="parallel pytest workers (pytest-xdist), e.g. auto")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML")
    p.add_argument("--results", metavar="FILE", help="also keep the JSON-lines results")
    p.add_argument("-v", "--verbose", action="store_true")

    p = verb("report", cmd_report, "merge results (JSON lines or JUnit XML) into report.json, .md and .html; exit 1 on regressions")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files of one or more runs (shards)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--previous", metavar="DIR|report.json", help="an earlier report to compare against")
    add_history_option(p)

    p = verb(
        "nightly",
        cmd_nightly,
        "refresh the images, run the checks on every engine and write the report into DIR; exit 1 if the night went red",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES", help="default: every catalogue image")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="where the results and report.json, .md and .html go")
    p.add_argument(
        "--previous",
        metavar="DIR|report.json",
        help="an earlier report: exit 1 only on new failures against it (without one: on any failure)",
    )
    from racker import engines

    p.add_argument("--engine", default="all", choices=[*engines.ENGINES, "all"], help="where to boot the images (default %(default)s)")
    p.add_argument("-n", "--workers", default="auto", help="parallel pytest workers (pytest-xdist; default %(default)s, 0: none)")
    p.add_argument(
        "--shard", metavar="K/N", help="run only the K-th of N slices of the images, and write results, not the report (CI: one per runner)"
    )
    p.add_argument("--offline", action="store_true", help="test the stored images as they are: ask no upstream (pull's offline fast path)")
    p.add_argument("--full", action="store_true", help="run every cell, none carried over from --previous")
    p.add_argument(
        "--max-age",
        type=_max_age,
        default=dt.timedelta(days=7),
        metavar="DAYS",
        help="carry over a --previous cell whose inputs are unchanged only if it ran less than this long ago "
        "(days, or hours with h: 12h; default 7; 0: never)",
    )
    add_history_option(p)

    verb("gc", cmd_gc, "remove what killed racker processes left behind")

    p = verb("network", None, "manage private networks: machines on one resolve each other by name, and nothing else reaches them")
    networks = p.add_subparsers(dest="network_verb", required=True, metavar="ACTION")
    q = networks.add_parser("create", help="make a network", description="make a network")
    q.add_argument("name")
    q.set_defaults(func=cmd_network_create)
    q = networks.add_parser("ls", help="list the networks and their machines", description="list the networks and their machines")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_network_ls)
    q = networks.add_parser("rm", help="remove networks no machine is on", description="remove networks no machine is on")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.set_defaults(func=cmd_network_rm)

    command = next((word for word in (argv or []) if not word.startswith("-")), None)
    if argv is None or command is None or command in VM_VERBS:
        from racker.cli import vm as cli_vm

        cli_vm.add_commands(verb, sub)
    return parser


def _command_and_options(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """Split what follows IMAGE (or NAME) into options and the command; never take an option for the command.

        racker run IMAGE -- CMD ARGS            racker run IMAGE --name x -t -- CMD ARGS
        racker run IMAGE CMD ARGS               (CMD does not start with -; any -- after it is CMD's own)
        racker run IMAGE                        (a login shell)

    Verbs that take a command declare command_follows = (dest, what, usage) with their `command` REMAINDER.
    """
    if getattr(args, "command", None) is None:
        return args
    dest, what, usage = args.command_follows
    after = _words_after(argv, getattr(args, dest), args.command)
    if not after or not after[0].startswith("-"):
        args.command = after
        return args
    if after[0] == "--":
        args.command = after[1:]
        return args
    if "--" not in after:
        raise errors.RackerError(f"{after[0]!r} follows {what}: put options before {what}, or the command after --", hint=usage)
    cut = after.index("--")
    head = argv[: len(argv) - len(after)]  # ends with the IMAGE (or NAME)
    options, command = after[:cut], after[cut + 1 :]
    reparsed = parser.parse_args([*head[:-1], *options, head[-1]])
    if getattr(reparsed, dest) != head[-1] or reparsed.command:
        stray = getattr(reparsed, dest) if getattr(reparsed, dest) != head[-1] else reparsed.command[0]
        raise errors.RackerError(f"only options may come between {what} and --, not {stray!r}", hint=usage)
    reparsed.command = command
    return reparsed


def _words_after(argv: list[str], value: str, remainder: list[str]) -> list[str]:
    """Every word after the IMAGE (or NAME) as typed: argparse's REMAINDER, with the `--` that some
    Python versions drop from its start put back."""
    start = len(argv) - len(remainder)
    if argv[start - 1] != value and argv[start - 1] == "--" and argv[start - 2] == value:
        start -= 1
    return argv[start:]


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise errors.Interrupted(signum)


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as main() reads it; RackerError for a misplaced option (argparse exits for the rest)."""
    parser = build_parser(argv)
    return _command_and_options(parser, argv, parser.parse_args(argv))


def _print_error(error: errors.RackerError) -> int:
    # Every message names its URLs redacted already; this is the last guard before the terminal.
    print(f"racker: error: {redact.text(str(error))}", file=sys.stderr)
    if error.hint:
        print(redact.text(error.hint), file=sys.stderr)
    return EXIT_RACKER_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
    except errors.RackerError as error:
        return _print_error(error)
    proc.DEBUG = proc.DEBUG or args.debug
    store.narrow_umask()
    # SIGINT and SIGTERM unwind the stack, so every `finally` and `with` cleans
    # up. SIGINT explicitly: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("racker: interrupted", file=sys.stderr)
        return 130
    except errors.Interrupted as interrupted:
        print("racker: interrupted", file=sys.stderr)
        return 128 + interrupted.signum
    except errors.RackerError as error:
        if args.debug:
            raise
        return _print_error(error)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
