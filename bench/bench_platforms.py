"""Platforms side by side (issue 26): one image on the host's architecture and on arm64, in one run.

For each platform: `racker run IMAGE -- true` (boot under nspawn, run, stop; arm64's
programs under qemu-user through binfmt_misc), then the VM's cold boot to ready and
its warm restore to ready (arm64: qemu-system-aarch64 -M virt, AAVMF, TCG). The
disk's snapshot is saved first by a cold boot that is not counted. Medians of
--rounds; rounds alternate platforms so that both see the same host load.
Prints JSON.

    PYTHONPATH=. python bench/bench_platforms.py [--rounds 3] [--image debian-bookworm] [--platforms linux/amd64,linux/arm64] [--no-vm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from racker import images, prepare, promote
from racker.cpu import accel
from racker.store import platforms
from racker.vm import boards, qemu

ROOT = Path(__file__).resolve().parent.parent


def run_true(name: str) -> float:
    """Seconds for `racker run NAME -- true` through the command line, as a user types it."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "racker", "run", name, "--", "true"],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def vm_ready(disk: Path, machine: str, *, warm: bool) -> float:
    vm = qemu.VM(disk, warm=warm, machine=machine)
    started = time.monotonic()
    with vm:
        took = time.monotonic() - started
        assert vm.check_output(["true"]) == ""
        assert bool(vm.restored_from) == warm, vm.restored_from
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--platforms", default=f"{platforms.host()},linux/arm64")
    parser.add_argument("--no-vm", action="store_true", help="nspawn only")
    args = parser.parse_args()
    chosen = [platforms.parse(text) for text in args.platforms.split(",")]
    names, disks = {}, {}
    for platform in chosen:
        image = images.pull(args.image, platform=platform)
        names[platform] = image.name
        if not args.no_vm:
            prepared = prepare.prepare(image)
            machine, firmware = boards.board_for(prepare.image_architecture(prepared))
            disks[platform] = (promote.cached_disk(prepared, firmware), machine)
            with qemu.VM(disks[platform][0], warm=True, machine=machine):  # the snapshot every warm VM restores
                pass
    timings: dict = {str(p): {"run_true": [], "cold_boot": [], "warm_restore": []} for p in chosen}
    for _ in range(args.rounds):
        for platform in chosen:
            row = timings[str(platform)]
            row["run_true"].append(run_true(names[platform]))
            if platform in disks:
                disk, machine = disks[platform]
                row["cold_boot"].append(vm_ready(disk, machine, warm=False))
                row["warm_restore"].append(vm_ready(disk, machine, warm=True))
    result = {
        "benchmark": "one image per platform: racker run -- true (nspawn), VM cold boot and warm restore to ready",
        "image": args.image,
        "rounds": args.rounds,
        "host_accel": accel.choose(None),
        "platforms": {
            platform: {
                "image": names[platforms.parse(platform)],
                **{f"{what}_median_s": round(statistics.median(values), 2) for what, values in row.items() if values},
                **{f"{what}_s": [round(v, 2) for v in values] for what, values in row.items() if values},
            }
            for platform, row in timings.items()
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
