"""Promote time and size for debian-bookworm: racker against the usual hand procedure.

The hand procedure is the one the public write-ups use (dd a zeroed file,
sfdisk, losetup, mkfs, mount, tar the tree in, grub-install, umount), timed
on the same prepared image, in the same run. It needs loop devices, mounts
and root; racker's needs none of them. Every case runs once per round, the
rounds one after another, so that a busy host slows all of them alike.

    .venv/bin/python bench/bench_promote.py [--image debian-bookworm] [--size 2G] [--runs 3]

Goals: racker at most half the hand procedure's time, its qcow2 no larger
(issue 4); its compressed qcow2 (--compress) no larger than the hand
procedure's `qemu-img convert -c` in at most half the time, and its BIOS raw
disk at most 1.2x systemd-repart's GPT + ext4 image of the same tree, which
has no bootloader (issue 16). racker's steps are reported too: where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from racker import images, prepare, proc, progress, promote
from racker.promote import disk

REPART_ROOT = "[Partition]\nType=root\nFormat=ext4\nCopyFiles=/\n"


def timed(func) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    func()
    return time.monotonic() - started


def sh(*argv: str, input: bytes | None = None) -> str:
    return proc.run(list(argv), input=input, timeout=1800).stdout


def hand_procedure(rootfs: Path, kernel: prepare.Kernel, work: Path, size: int) -> Path:
    """dd + sfdisk + losetup + mkfs + mount + tar + grub-install, as in the write-ups."""
    image = work / "hand.img"
    sh("dd", "if=/dev/zero", f"of={image}", "bs=1M", f"count={size // (1024 * 1024)}", "status=none")
    sh("sfdisk", "--quiet", str(image), input=b"label: dos\nunit: sectors\nstart=2048, type=83, bootable\n")
    # One loop device for the disk (grub-install), one at the partition's offset (mkfs, mount),
    # as in the write-ups; partition nodes (losetup -P) need udev, which CI hosts often lack.
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    part = sh("losetup", "--find", "--show", "--offset", str(1024 * 1024), str(image)).strip()
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        sh("mkfs.ext4", "-q", "-F", "-O", disk.EXT4_FEATURES, part)
        uuid = sh("blkid", "-s", "UUID", "-o", "value", part).strip()
        sh("mount", part, str(mnt))
        try:
            packed = subprocess.Popen(["tar", "-C", str(rootfs), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-C", str(mnt), "-xf", "-"], stdin=packed.stdout, check=True)
            packed.wait()
            (mnt / "etc/fstab").unlink(missing_ok=True)
            (mnt / "etc/fstab").write_text(f"UUID={uuid} / ext4 rw,errors=remount-ro 0 1\n")
            sh("grub-install", "--target=i386-pc", f"--boot-directory={mnt}/boot", "--modules=part_msdos ext2", loop)
            entry = f" linux /{kernel.vmlinuz} root=UUID={uuid} rw console=ttyS0\n initrd /{kernel.initrd}\n"
            (mnt / "boot/grub/grub.cfg").write_text("set timeout=0\nmenuentry linux {\n" + entry + "}\n")
        finally:
            sh("umount", str(mnt))
    finally:
        sh("losetup", "-d", part)
        sh("losetup", "-d", loop)
    return image


def repart(rootfs: Path, work: Path, size: int) -> Path:
    """systemd-repart's GPT + ext4 image of the tree, of the same size: the floor without a bootloader."""
    definitions = work / "repart.d"
    definitions.mkdir(exist_ok=True)
    (definitions / "10-root.conf").write_text(REPART_ROOT)
    image = work / "repart.raw"
    sh("systemd-repart", "--empty=create", f"--size={size}", f"--definitions={definitions}", f"--root={rootfs}", "--dry-run=no", str(image))
    return image


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = disk.parse_size(args.size)
    image = prepare.prepare(images.pull(args.image))
    kernel = prepare.find_kernel(image.rootfs)
    times: dict[str, list[float]] = collections.defaultdict(list)
    steps: dict[str, list[float]] = collections.defaultdict(list)
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-promote-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        work = Path(tmp)

        def ours(case: str, fmt: str, compress: bool = False) -> None:
            out = work / f"{case}.{fmt}"
            progress.TIMINGS.clear()
            times[case].append(timed(lambda: promote.promote(image, out, promote.Options(fmt=fmt, size=size, compress=compress))))
            if case == "racker raw":
                for name, seconds in progress.TIMINGS:
                    steps[name.split(".", 1)[-1]].append(seconds)
            sizes[case] = out.stat().st_size
            out.unlink()

        for _run in range(args.runs):
            ours("racker raw", "raw")
            try:
                times["systemd-repart raw"].append(timed(lambda: repart(image.rootfs, work, size).unlink()))
            except Exception as error:
                print(f"systemd-repart not runnable here: {error}", file=sys.stderr)
            ours("racker qcow2", "qcow2")
            ours("racker qcow2 --compress", "qcow2", compress=True)
            hand_dir = work / "hand"
            hand_dir.mkdir()
            try:
                started = time.monotonic()
                raw = hand_procedure(image.rootfs, kernel, hand_dir, size)
                times["hand raw"].append(time.monotonic() - started)
                for case, compress in (("hand qcow2", ()), ("hand qcow2 -c", ("-c",))):
                    qcow2 = hand_dir / f"{case}.qcow2"
                    converting = time.monotonic()
                    sh("qemu-img", "convert", *compress, "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
                    times[case].append(times["hand raw"][-1] + time.monotonic() - converting)
                    times[case + " (convert only)"].append(time.monotonic() - converting)
                    sizes[case] = qcow2.stat().st_size
            except Exception as error:
                print(f"hand procedure not runnable here: {error}", file=sys.stderr)
            finally:
                with contextlib.suppress(Exception):
                    subprocess.run(["rm", "-rf", str(hand_dir)], check=False)
    seconds = {case: median(values) for case, values in times.items()}
    result: dict = {"image": image.name, "disk_size": size, "runs": args.runs, "seconds": seconds, "bytes": sizes}
    result["racker_raw_steps_s"] = {name: median(values) for name, values in steps.items()}

    def ratio(ours: str, theirs: str) -> float | None:
        return round(seconds[ours] / seconds[theirs], 2) if seconds.get(theirs) else None

    result["ratios"] = {
        "raw / hand raw": ratio("racker raw", "hand raw"),
        "raw / systemd-repart": ratio("racker raw", "systemd-repart raw"),
        "qcow2 --compress / hand qcow2 -c": ratio("racker qcow2 --compress", "hand qcow2 -c"),
        "qcow2 --compress bytes / hand qcow2 -c bytes": round(sizes["racker qcow2 --compress"] / sizes["hand qcow2 -c"], 3)
        if "hand qcow2 -c" in sizes
        else None,
    }
    goals = {
        "raw_half_the_hand_time": ("raw / hand raw", 0.5),
        "raw_within_1.2x_systemd_repart": ("raw / systemd-repart", 1.2),
        "compressed_half_the_hand_time": ("qcow2 --compress / hand qcow2 -c", 0.5),
        "compressed_no_larger": ("qcow2 --compress bytes / hand qcow2 -c bytes", 1.0),
    }
    result["goals"] = {goal: result["ratios"][key] <= limit for goal, (key, limit) in goals.items() if result["ratios"][key] is not None}
    if "hand qcow2" in sizes:
        result["goals"]["qcow2_no_larger"] = sizes["racker qcow2"] <= sizes["hand qcow2"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
