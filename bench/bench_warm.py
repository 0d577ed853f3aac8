"""Warm VMs (issue 16): cold boot-to-ready against warm restore-to-ready of the same disk.

Rounds alternate a cold boot and a warm restore, so that both see the same
host load; the disk's snapshot is saved first (a cold boot, not counted).
Then 4 warm clones are started at once: the time until all 4 are ready
against one clone's median. Ready means what VM.start() returns on: cold, SSH
logs in over the connection master and systemd says the boot finished;
restored, the snapshot's agent answers on its virtio-serial port and the
guest's clock is stepped (racker.vm.guest_agent). A restored VM's first SSH
login, which it does not wait for, is timed apart (first_ssh_s).
Prints medians and ratios as JSON.

    python bench/bench_warm.py [--rounds 3] [--clones 4] [--image debian-bookworm | --disk PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from racker import images, prepare, promote
from racker.cpu import accel
from racker.vm import snapshots
from racker.vm.qemu import VM


def ready_seconds(disk: Path, *, warm: bool, first_ssh: list[float]) -> float:
    vm = VM(disk, warm=warm)
    started = time.monotonic()
    with vm:
        took = time.monotonic() - started
        assert vm.check_output(["true"]) == ""
        assert bool(vm.restored_from) == warm, vm.restored_from
        if warm:
            login = time.monotonic()
            assert vm.run(["true"], root=False).returncode == 0
            first_ssh.append(time.monotonic() - login)
    return took


def clones_at_once(disk: Path, count: int) -> float:
    """Seconds from starting `count` warm VMs together until the last is ready."""
    vms = [VM(disk, warm=True) for _ in range(count)]
    # The threads outlive the VMs' start: QEMU dies with the thread that started it (PR_SET_PDEATHSIG).
    pool = ThreadPoolExecutor(count)
    started = time.monotonic()
    try:
        list(pool.map(VM.start, vms))
        took = time.monotonic() - started
        assert all(vm.restored_from for vm in vms)
        assert len({vm.endpoint.port for vm in vms if vm.endpoint}) == count
        assert all(vm.check_output(["true"]) == "" for vm in vms)
    finally:
        for vm in vms:
            vm.stop()
        pool.shutdown()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clones", type=int, default=4)
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--disk", help="a disk file instead of the image's cached disk")
    args = parser.parse_args()
    disk = Path(args.disk) if args.disk else promote.cached_disk(prepare.prepare(images.pull(args.image)))
    with VM(disk, warm=True) as vm:  # the snapshot every warm VM below restores
        saved = "restored an existing snapshot" if vm.restored_from else "saved by a cold boot"
    cold, warm, first_ssh = [], [], []
    for _ in range(args.rounds):
        cold.append(ready_seconds(disk, warm=False, first_ssh=first_ssh))
        warm.append(ready_seconds(disk, warm=True, first_ssh=first_ssh))
    clones = clones_at_once(disk, args.clones)
    one = statistics.median(warm)
    snapshot = next(s for s in snapshots.all_snapshots() if s.key.disk == str(disk.absolute()) and not s.stale())
    result = {
        "benchmark": "VM ready: cold boot against warm restore of the same disk; then clones at once",
        "disk": str(disk),
        "accel": accel.choose(None),
        "rounds": args.rounds,
        "snapshot": saved,
        "snapshot_mib": round(snapshot.size() / 2**20, 1),
        "cold_s": [round(t, 2) for t in cold],
        "warm_s": [round(t, 2) for t in warm],
        "cold_median_s": round(statistics.median(cold), 2),
        "warm_median_s": round(one, 2),
        "warm_over_cold": round(one / statistics.median(cold), 3),
        "first_ssh_s": round(statistics.median(first_ssh), 2),
        "clones": args.clones,
        "clones_all_ready_s": round(clones, 2),
        "clones_over_one": round(clones / one, 2),
        "goal": {"warm_over_cold_max": 0.1, "warm_median_max_s": 3.0, "clones_over_one_max": 2.0},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
