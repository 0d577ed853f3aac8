"""Boot-to-SSH-ready time of a promoted disk in QEMU, and where the time goes.

Ready means what `racker vm` waits for: SSH answers with the VM's key and
`systemctl is-system-running --wait` has returned (cloud-init's last stage is
part of the boot, so it has finished). The split comes from the guest's own
`systemd-analyze` (kernel, initrd, userspace) and the cloud-init units' times.

    .venv/bin/python bench/bench_boot.py [--image debian-bookworm] [--firmware bios] [--runs 3] [--accel tcg]
        [--cpus 2] [--tcg-cpu MODEL] [--baseline-cpu MODEL] [--baseline-disk DISK]

With --baseline-cpu, every run is followed by one with that CPU model, and the
report gives the ratio of the medians: how a CPU model choice pays off, measured
in one process on the same noisy host. --baseline-disk does the same with
another disk (one promoted by another racker, say main's cached disk): what an
image change costs at boot.

Goal (issue 4): <= 12 s under TCG on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from racker import images, prepare, promote, settings
from racker.vm.qemu import DEFAULT_CPUS, VM

# cloud-init >= 24.3 runs every stage in one process (cloud-init-main); its
# start-up (Python importing cloud-init) is that unit's time, the stages' after it.
CLOUD_INIT_UNITS = (
    "cloud-init-main.service",
    "cloud-init-local.service",
    "cloud-init-network.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
)


def seconds(text: str) -> float:
    """systemd's '1min 2.345s' / '812ms' -> seconds."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*(min|ms|s)\b", text):
        total += float(number) * {"min": 60, "s": 1, "ms": 0.001}[unit]
    return total


def breakdown(vm: VM) -> dict[str, float]:
    analyze = vm.run(["systemd-analyze"]).stdout
    parts = {name: seconds(value) for value, name in re.findall(r"([\d.]+(?:min)?\s*[\d.]*m?s) \((\w+)\)", analyze)}
    blame = vm.run(["systemd-analyze", "blame", "--no-pager"]).stdout
    for line in blame.splitlines():
        words = line.split()
        if words and words[-1] in CLOUD_INIT_UNITS:
            parts[words[-1]] = seconds(" ".join(words[:-1]))
    parts["cloud-init (all stages)"] = sum(parts.get(u, 0.0) for u in CLOUD_INIT_UNITS)
    top = [line.strip() for line in blame.splitlines()[:8]]
    parts["_top"] = top  # type: ignore[assignment]
    return parts


def boot_once(disk: Path, image: str, args: argparse.Namespace, tcg_cpu: str) -> dict:
    with VM(disk, image=image, accelerator=args.accel, cpus=args.cpus, tcg_cpu=tcg_cpu) as vm:
        parts = breakdown(vm)
        run = {"ready_s": round(vm.boot_seconds, 2), "state": vm.system_state}
        # What the guest's clock does not see: QEMU start, firmware, GRUB loading and
        # decompressing the kernel, and the SSH round trip that notices readiness.
        guest = sum(parts.get(k, 0.0) for k in ("firmware", "loader", "kernel", "initrd", "userspace"))
        run["before_kernel_and_ssh_s"] = round(vm.boot_seconds - guest, 2)
        return {**run, **parts}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--firmware", default="bios", choices=["bios", "uefi"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--accel", default="tcg", choices=["kvm", "tcg"])
    parser.add_argument("--cpus", type=int, default=DEFAULT_CPUS)
    parser.add_argument("--tcg-cpu", default=settings.TCG_CPU.value(), help="the CPU model QEMU emulates under TCG")
    parser.add_argument(
        "--baseline-cpu",
        help="also boot with this CPU model, each run right after one with --tcg-cpu, and report the ratio (e.g. max,cx16=off)",
    )
    parser.add_argument("--baseline-disk", type=Path, help="also boot this disk, each run right after one of the image's")
    args = parser.parse_args()
    image = prepare.prepare(images.pull(args.image))
    disk = promote.cached_disk(image, args.firmware)
    runs, baseline = [], []
    for _ in range(args.runs):
        runs.append(boot_once(disk, image.name, args, args.tcg_cpu))
        if args.baseline_cpu or args.baseline_disk:
            # Interleaved, so that a noisy neighbour slows both sides alike.
            other = args.baseline_disk or disk
            baseline.append(boot_once(other, other.name, args, args.baseline_cpu or args.tcg_cpu))
    ready = [r["ready_s"] for r in runs]
    report = {
        "image": image.name,
        "firmware": args.firmware,
        "accel": args.accel,
        "tcg_cpu": args.tcg_cpu,
        "ready_median_s": statistics.median(ready),
        "ready_min_s": min(ready),
        "goal_12s": statistics.median(ready) <= 12,
    }
    if baseline:
        base = [r["ready_s"] for r in baseline]
        report |= {
            "baseline_cpu": args.baseline_cpu,
            "baseline_disk": str(args.baseline_disk or ""),
            "baseline_ready_median_s": statistics.median(base),
            "ratio_to_baseline": round(statistics.median(ready) / statistics.median(base), 3),
            "baseline_runs_s": base,
        }
    report["runs"] = runs
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
