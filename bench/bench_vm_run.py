"""host.run("true") on a QEMU VM: through the root channel (racker/vm/guest_shell.py), against sudo per command.

Both sides run in the same process on the same VM, over the same SSH connection
master, rounds alternating, so that both see the same host load. host.run is
testinfra's, as a user's test calls it (root). The baseline is the path racker
took before the channel: a new session on the master and `sudo` per command.
The median of the same command as the login user (no sudo, a session each)
shows what a session costs under emulation. Prints medians and their ratio as JSON.

    python bench/bench_vm_run.py [--rounds 30] [--image debian-bookworm | --vm NAME]

From a worktree, PYTHONPATH=. (the venv's editable racker is /work/main's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

from racker import images, prepare, promote
from racker.cpu import accel
from racker.proc import Result
from racker.pytest.testinfra_backend import host_for
from racker.vm.qemu import VM


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


class SudoPerCommand:
    """The VM as testinfra saw it before the root channel: each root command a session and a sudo."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.name = vm.name

    def run(self, argv: Sequence[str], *, timeout: float | None = 600) -> Result:
        assert self.vm.endpoint is not None
        self.vm.connection()
        return self.vm.endpoint.run(argv, root=True, timeout=timeout)


def measure(vm: VM, rounds: int) -> dict:
    host = host_for(vm)
    backend = host.backend
    baseline = SudoPerCommand(vm)

    def per_command() -> None:
        backend.bind(baseline)
        try:
            host.run("true")
        finally:
            backend.bind(vm)

    host.run("true")  # warm: the master and the channel are up
    per_command()  # and sudo's files are in the guest's page cache
    channel, sudo, user = [], [], []
    for _ in range(rounds):
        channel.append(timed(lambda: host.run("true")))
        sudo.append(timed(per_command))
        user.append(timed(lambda: vm.run(["true"], root=False)))
    return {
        "channel_median_s": round(statistics.median(channel), 3),
        "sudo_per_command_median_s": round(statistics.median(sudo), 3),
        "ratio": round(statistics.median(channel) / statistics.median(sudo), 3),
        "session_no_sudo_median_s": round(statistics.median(user), 3),
        "channel_min_s": round(min(channel), 3),
        "sudo_per_command_min_s": round(min(sudo), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--vm", help="a running VM (racker vm start) instead of booting one")
    args = parser.parse_args()
    result = {"benchmark": 'host.run("true") on a VM: the root channel vs a session and sudo per command', "rounds": args.rounds}
    if args.vm:
        result.update(vm=args.vm, **measure(VM.attach(args.vm), args.rounds))
    else:
        disk = promote.cached_disk(prepare.prepare(images.pull(args.image)))
        with VM(disk, image=args.image) as vm:
            result.update(image=args.image, accel=vm.accelerator(), **measure(vm, args.rounds))
    result["accel"] = result.get("accel") or accel.choose(None)
    result["goal"] = {"channel_median_max_s": 0.15}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
