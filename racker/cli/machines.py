"""The commands about nspawn machines and their networks: run, start, exec, shell, ps, stop, network."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from racker import errors, machines, progress, store

if TYPE_CHECKING:
    from racker.machines.logins import Login
    from racker.machines.nspawn import Machine

from racker.cli.options import USER_HELP, Verb, add_pull_options, pull_options
from racker.cli.output import print_json, table


def _bootable(reference: str, args: argparse.Namespace) -> store.StoredImage:
    """The image to boot for `reference`: pulled if missing, and given an init first if it has none."""
    from racker import images, prepare

    return prepare.bootable(images.pull(reference, **pull_options(args)))


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
        return nspawn.run_unbooted(images.pull(args.image, **pull_options(args)), args.command, tty=args.tty)
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
        print_json(
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
    table(rows, ["NAME", "IMAGE", "LEADER", "ADDRESS", "PORTS", "STARTED"])
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
        print_json(listed)
        return 0
    rows = [[n["name"], n["bridge"], n["subnet"], ",".join(f"{k}={v}" for k, v in sorted(n["machines"].items())) or "-"] for n in listed]
    table(rows, ["NAME", "BRIDGE", "SUBNET", "MACHINES"])
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


def add_commands(verb: Verb, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

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
