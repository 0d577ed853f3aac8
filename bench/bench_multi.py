"""A two-machine group on a private network (groups.Group: network, two boots at once, teardown)
against one machine (nspawn.Machine, private network mode), both of the same prepared image, up to
a command run in each. Rounds alternate so that both see the same host state. Prints the medians
(bring-up, and up and down) as JSON.

    python bench/bench_multi.py [--rounds 5] [--image debian-bookworm+vm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from racker import images, prepare
from racker.machines import nspawn
from racker.pytest import groups


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image", default="debian-bookworm+vm")
    args = parser.parse_args()
    image = prepare.bootable(images.pull(args.image))
    one_machine(image), two_machine_group(args.image)  # warm the page cache for both
    single, pair = [], []
    for _ in range(args.rounds):
        single.append(one_machine(image))
        pair.append(two_machine_group(args.image))
    median = {name: [statistics.median(t[i] for t in runs) for i in (0, 1)] for name, runs in (("one", single), ("group", pair))}
    print(
        json.dumps(
            {
                "image": args.image,
                "rounds": args.rounds,
                "one_machine_up_s": round(median["one"][0], 2),
                "two_machine_group_up_s": round(median["group"][0], 2),
                "one_machine_up_and_down_s": round(median["one"][1], 2),
                "two_machine_group_up_and_down_s": round(median["group"][1], 2),
                "ratio_up": round(median["group"][0] / median["one"][0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
