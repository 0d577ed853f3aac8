"""Promote time and size for debian-bookworm: racker against the usual hand procedure.

The hand procedure is the one the public write-ups use (dd a zeroed file,
sfdisk, losetup, mkfs, mount, tar the tree in, grub-install, umount), timed
on the same prepared image, in the same run. It needs loop devices, mounts
and root; racker's needs none of them.

    .venv/bin/python bench/bench_promote.py [--image debian-bookworm] [--size 2G] [--runs 3]

Goal (issue 4): racker at most half the hand procedure's time, its qcow2 no larger.
"""

from __future__ import annotations

import argparse
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

from racker import images, prepare, proc, promote
from racker.promote import disk


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = disk.parse_size(args.size)
    image = prepare.prepare(images.pull(args.image))
    kernel = prepare.find_kernel(image.rootfs)
    ours_raw, ours_qcow2, hand_raw, hand_qcow2 = [], [], [], []
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-promote-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        work = Path(tmp)
        for run in range(args.runs):
            out = work / f"ours-{run}.raw"
            ours_raw.append(timed(lambda out=out: promote.promote(image, out, promote.Options(size=size))))
            out.unlink()
            out = work / f"ours-{run}.qcow2"
            ours_qcow2.append(timed(lambda out=out: promote.promote(image, out, promote.Options(fmt="qcow2", size=size))))
            sizes["racker qcow2"] = out.stat().st_size
            out.unlink()
            hand_dir = work / f"hand-{run}"
            hand_dir.mkdir()
            try:
                started = time.monotonic()
                raw = hand_procedure(image.rootfs, kernel, hand_dir, size)
                hand_raw.append(time.monotonic() - started)
                qcow2 = hand_dir / "hand.qcow2"
                sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
                hand_qcow2.append(time.monotonic() - started)
                sizes["hand qcow2"] = qcow2.stat().st_size
            except Exception as error:
                print(f"hand procedure not runnable here: {error}", file=sys.stderr)
            finally:
                with contextlib.suppress(Exception):
                    subprocess.run(["rm", "-rf", str(hand_dir)], check=False)
    result = {
        "image": image.name,
        "disk_size": size,
        "runs": args.runs,
        "racker_raw_s": round(statistics.median(ours_raw), 2),
        "racker_qcow2_s": round(statistics.median(ours_qcow2), 2),
        "hand_raw_s": round(statistics.median(hand_raw), 2) if hand_raw else None,
        "hand_qcow2_s": round(statistics.median(hand_qcow2), 2) if hand_qcow2 else None,
        "racker_qcow2_bytes": sizes.get("racker qcow2"),
        "hand_qcow2_bytes": sizes.get("hand qcow2"),
    }
    if hand_raw:
        result["time_ratio_raw"] = round(result["racker_raw_s"] / result["hand_raw_s"], 2)
        result["goal_half_the_time"] = result["time_ratio_raw"] <= 0.5
        result["goal_qcow2_no_larger"] = sizes["racker qcow2"] <= sizes["hand qcow2"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
