"""A two-machine group on a private network (groups.Group: network, two boots at once, teardown)
against one machine (nspawn.Machine, private network mode), both of the same prepared image, up to
a command run in each. Rounds alternate so that both see the same host state. Prints the medians
(bring-up, and up and down) as JSON.

--vm: a VM (QEMU, cold) and an nspawn machine in one group, the VM on the group's bridge
(racker.vm.bridge: tap, DHCP), against one VM on QEMU's user-mode network. A TCG boot takes
minutes: one round is the default there. The host's 1-minute load before each bring-up is printed
beside the figures: on a shared host they mean little without it.

    python bench/bench_multi.py [--rounds 5] [--image debian-bookworm+vm] [--vm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from racker import images, prepare
from racker.machines import nspawn
from racker.pytest import groups
from racker.vm import boards


def one_machine(image) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    machine = nspawn.Machine(image).start()
    machine.run(["true"])
    up = time.monotonic() - started
    machine.stop()
    return up, time.monotonic() - started


def two_machine_group(reference: str) -> tuple[float, float]:
    started = time.monotonic()
    group = groups.Group({"server": reference, "client": reference}).start()
    group["client"].run(["getent", "hosts", "server"])
    group["server"].run(["true"])
    up = time.monotonic() - started
    group.stop()
    return up, time.monotonic() - started


def one_vm(image) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    from racker import promote
    from racker.vm import qemu

    board, firmware = boards.board_for(prepare.image_architecture(image))
    started = time.monotonic()
    vm = qemu.VM(promote.cached_disk(image, firmware), image=image.name, digest=image.digest, machine=board, boot_timeout=1200).start()
    vm.run(["true"])
    up = time.monotonic() - started
    vm.stop()
    return up, time.monotonic() - started


def vm_and_machine_group(reference: str) -> tuple[float, float]:
    started = time.monotonic()
    group = groups.Group({"server": {"image": reference, "engine": "qemu"}, "client": reference}, boot_timeout=1200).start()
    group["client"].run(["getent", "hosts", "server"])
    group["server"].run(["getent", "hosts", "client"])  # the VM's DNS server answers: the network is whole
    up = time.monotonic() - started
    group.stop()
    return up, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--image", default="debian-bookworm+vm")
    parser.add_argument("--vm", action="store_true", help="a VM and a machine against one VM")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.vm else 5)
    if args.vm:
        image = prepare.prepare(images.pull(args.image.removesuffix("+vm")))
        alone, together = one_vm, vm_and_machine_group
    else:
        image = prepare.bootable(images.pull(args.image))
        alone, together = one_machine, two_machine_group
        one_machine(image), two_machine_group(args.image)  # warm the page cache for both
    single, pair, loads = [], [], []
    for _ in range(rounds):
        # The host's 1-minute load before each: the host is shared, and a busy one slows QEMU most.
        loads.append(os.getloadavg()[0])
        single.append(alone(image))
        loads.append(os.getloadavg()[0])
        pair.append(together(args.image))
    what = ("vm", "vm_and_machine") if args.vm else ("machine", "two_machine")
    median = {name: [statistics.median(t[i] for t in runs) for i in (0, 1)] for name, runs in (("one", single), ("group", pair))}
    print(
        json.dumps(
            {
                "image": args.image,
                "rounds": rounds,
                f"one_{what[0]}_up_s": round(median["one"][0], 2),
                f"{what[1]}_group_up_s": round(median["group"][0], 2),
                f"one_{what[0]}_up_and_down_s": round(median["one"][1], 2),
                f"{what[1]}_group_up_and_down_s": round(median["group"][1], 2),
                "ratio_up": round(median["group"][0] / median["one"][0], 2),
                "load_1m_before_each": [round(load, 2) for load in loads],  # one, group, one, group…
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
