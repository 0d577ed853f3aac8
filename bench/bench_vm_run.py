"""host.run("true") on a QEMU VM: over its one SSH connection master, against a connection per command.

Both sides run in the same process on the same VM, rounds alternating, so
that both see the same host load. host.run is testinfra's, as a user's test
calls it: root through sudo in the guest. The median of the same command as
the login user (no sudo) shows what sudo itself costs under emulation.
Prints medians and their ratio as JSON.

    python bench/bench_vm_run.py [--rounds 30] [--image debian-bookworm | --vm NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

from racker import accel, images, prepare, promote
from racker.qemu import VM
from racker.testinfra_backend import host_for


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def measure(vm: VM, rounds: int) -> dict:
    host = host_for(vm)
    shared = vm.endpoint
    assert shared is not None
    separate = dataclasses.replace(shared, control=None)  # a connection, and a handshake, per command

    def without_master() -> None:
        vm.endpoint = separate
        try:
            host.run("true")
        finally:
            vm.endpoint = shared

    host.run("true")  # warm: the master is up, sudo's files are in the guest's page cache
    master, plain, user = [], [], []
    for _ in range(rounds):
        master.append(timed(lambda: host.run("true")))
        plain.append(timed(without_master))
        user.append(timed(lambda: vm.run(["true"], root=False)))
    return {
        "master_median_s": round(statistics.median(master), 3),
        "no_master_median_s": round(statistics.median(plain), 3),
        "ratio": round(statistics.median(master) / statistics.median(plain), 3),
        "master_no_sudo_median_s": round(statistics.median(user), 3),
        "master_min_s": round(min(master), 3),
        "no_master_min_s": round(min(plain), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--vm", help="a running VM (racker vm start) instead of booting one")
    args = parser.parse_args()
    result = {"benchmark": 'host.run("true") on a VM: one SSH connection master vs a connection per command', "rounds": args.rounds}
    if args.vm:
        result.update(vm=args.vm, **measure(VM.attach(args.vm), args.rounds))
    else:
        disk = promote.cached_disk(prepare.prepare(images.pull(args.image)))
        with VM(disk, image=args.image) as vm:
            result.update(image=args.image, accel=vm._accel(), **measure(vm, args.rounds))
    result["accel"] = result.get("accel") or accel.choose(None)
    result["goal"] = {"master_median_max_s": 0.15}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
