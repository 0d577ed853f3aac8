"""racker pull docker://… from a loopback registry, against the hand pipeline (skopeo copy + umoci unpack);
and racker pull http://…/rootfs.tar.xz (a root tarball with a SHA256SUMS) against `curl | tar -xJ`.

The registry is Debian's docker-registry, started here on a free 127.0.0.1
port and seeded with the store's debian-bookworm (pushed by racker). Each
round pulls into a fresh private store (racker) and a fresh directory
(by hand), alternating, so both download every blob and verify its digest.
racker also computes the tree digest, normalises and commits into the store:
that is what the ratio measures. Then a second pull of the present image,
in a namespace with no network. Prints JSON.

The tarball is the image exported as a rootfs tar and compressed with xz,
served by Python's http.server on 127.0.0.1; racker downloads it into a fresh
store each round, checks it against SHA256SUMS, then unpacks it through its
safe extractor; the hand pipeline only streams it into GNU tar.

The disk image is the image's promoted raw disk (racker promote's cached disk of
IMAGE+vm) converted to qcow2, as a cloud ships it; racker pulls it from a file into a
fresh store each round (checks it for references and truncation, converts it to raw,
reads the partition table and copies the root with debugfs, normalises, digests and
commits); the hand pipeline is seed 002/003's: qemu-img convert to raw, a read-only
loop device at the partition's offset, mount, cp -a, umount, detach.

    python bench/bench_acquire.py [--rounds 5] [--image debian-bookworm] [--only registry|tarball|disk]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from racker import images, store
from racker.sources import export


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_registry(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = home / "config.yml"
    storage = f"storage:\n  filesystem:\n    rootdirectory: {home / 'data'}\n"
    config.write_text(f"version: 0.1\nlog:\n  level: error\n{storage}http:\n  addr: 127.0.0.1:{port}\n")
    server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                return server, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("docker-registry did not start")


def by_hand(reference: str, work: Path) -> float:
    """What a person would type: skopeo copy to an OCI layout, umoci unpack it."""
    started = time.monotonic()
    layout = work / "layout"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}", f"oci:{layout}:x"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:x", str(work / "bundle")], check=True, capture_output=True)
    return time.monotonic() - started


def with_racker(reference: str, home: Path, *, offline: bool = False) -> float:
    env = {**os.environ, "RACKER_HOME": str(home)}
    argv = [sys.executable, "-m", "racker", "pull", f"docker://{reference}"]
    if offline:
        argv = ["unshare", "--net", *argv]
    started = time.monotonic()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--only", choices=("registry", "tarball", "disk"))
    args = parser.parse_args()
    image = images.pull(args.image)
    # A workdir of the store: the store's filesystem for both sides, and gc leaves it alone meanwhile.
    if args.only in (None, "registry"):
        with store.workdir("bench-acquire") as scratch:
            run(image, scratch, args.rounds)
    if args.only in (None, "tarball"):
        with store.workdir("bench-acquire") as scratch:
            run_tarball(image, scratch, args.rounds)
    if args.only in (None, "disk"):
        with store.workdir("bench-acquire") as scratch:
            run_disk(image, scratch, args.rounds)


def tarball_by_hand(url: str, work: Path) -> float:
    """curl | tar -xJ: no verification, GNU tar running xz beside it."""
    started = time.monotonic()
    curl = subprocess.Popen(["curl", "-sSf", url], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-xJ", "--numeric-owner", "-C", str(work)], stdin=curl.stdout, check=True)
    assert curl.stdout is not None
    curl.stdout.close()
    if curl.wait() != 0:
        raise SystemExit("curl failed")
    return time.monotonic() - started


def run_tarball(image: store.StoredImage, scratch: Path, rounds: int) -> None:
    www = scratch / "www"
    www.mkdir()
    export.export(image, scratch / "rootfs.tar", "rootfs-tar")
    subprocess.run(["xz", "-0", "-T0", str(scratch / "rootfs.tar")], check=True)
    tarball = www / "rootfs.tar.xz"
    os.rename(scratch / "rootfs.tar.xz", tarball)
    with open(tarball, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    (www / "SHA256SUMS").write_text(f"{digest}  rootfs.tar.xz\n")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/rootfs.tar.xz"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/SHA256SUMS", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("http.server did not start") from None
                time.sleep(0.05)
        hand, ours = against_hand(scratch, rounds, lambda work: tarball_by_hand(url, work), url)
        result = {
            "benchmark": "racker pull http:// root tarball (loopback, SHA256SUMS) vs curl | tar -xJ",
            "image": image.name,
            "tarball_bytes": tarball.stat().st_size,
            "rounds": rounds,
            **medians(hand, ours),
            "goal": {"ratio_max": 1.2},
        }
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(10)


def against_hand(scratch: Path, rounds: int, by_hand: Callable[[Path], float], reference: str) -> tuple[list[float], list[float]]:
    """(hand pipeline's seconds, racker pull's seconds) per round, alternating, each in a fresh
    directory and store; round 0 warms the page cache for both sides and is not counted."""
    hand, ours = [], []
    for round_ in range(rounds + 1):
        work, home = scratch / f"hand-{round_}", scratch / f"store-{round_}"
        work.mkdir()
        hand_s = by_hand(work)
        started = time.monotonic()
        env = {**os.environ, "RACKER_HOME": str(home)}
        subprocess.run([sys.executable, "-m", "racker", "pull", reference], check=True, env=env, stdout=subprocess.DEVNULL)
        ours_s = time.monotonic() - started
        if round_:
            hand.append(hand_s)
            ours.append(ours_s)
        shutil.rmtree(work)
        shutil.rmtree(home)
    return hand, ours


def medians(hand: list[float], ours: list[float]) -> dict:
    """The hand pipeline's and racker's median seconds, and racker's as a ratio of the hand one."""
    return {
        "by_hand_median_s": round(statistics.median(hand), 3),
        "racker_median_s": round(statistics.median(ours), 3),
        "ratio": round(statistics.median(ours) / statistics.median(hand), 3),
    }


def disk_by_hand(qcow2: Path, work: Path) -> float:
    """Seed 002/003: qemu-img convert, an offset loop device, mount, cp -a (and undo it all)."""
    started = time.monotonic()
    raw, mnt, dest = work / "disk.raw", work / "mnt", work / "rootfs"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True).stdout)
    offset = table["partitiontable"]["partitions"][0]["start"] * 512
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", "--offset", str(offset), str(raw)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True)
        try:
            subprocess.run(["cp", "-a", f"{mnt}/.", str(dest)], check=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    return time.monotonic() - started


def run_disk(image: store.StoredImage, scratch: Path, rounds: int) -> None:
    from racker import prepare, promote

    raw = promote.cached_disk(prepare.prepare(image))
    qcow2 = scratch / "cloud.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    hand, ours = against_hand(scratch, rounds, lambda work: disk_by_hand(qcow2, work), f"file:{qcow2}")
    result = {
        "benchmark": "racker pull file:…qcow2 (a promoted disk) vs qemu-img convert + offset loop device + mount + cp -a",
        "image": image.name,
        "qcow2_bytes": qcow2.stat().st_size,
        "rounds": rounds,
        **medians(hand, ours),
        "goal": {"ratio_max": 1.0},
    }
    print(json.dumps(result, indent=2))


def run(image: store.StoredImage, scratch: Path, rounds: int) -> None:
    server, registry = start_registry(scratch)
    try:
        reference = f"{registry}/library/debian:bookworm"
        export.push(image, f"docker://{reference}")
        hand, ours = [], []
        for round_ in range(rounds + 1):  # round 0 warms the page cache for both sides
            work, home = scratch / f"hand-{round_}", scratch / f"store-{round_}"
            work.mkdir()
            hand_s, ours_s = by_hand(reference, work), with_racker(reference, home)
            if round_:
                hand.append(hand_s)
                ours.append(ours_s)
            shutil.rmtree(work)
        present = [with_racker(reference, scratch / f"store-{rounds}", offline=True) for _ in range(5)]
        result = {
            "benchmark": "racker pull docker:// (loopback registry) vs skopeo copy + umoci unpack",
            "image": image.name,
            "size_bytes": image.size,
            "rounds": rounds,
            **medians(hand, ours),
            "present_pull_median_s": round(statistics.median(present), 3),
            "goal": {"ratio_max": 1.2, "present_pull_max_s": 0.2},
        }
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
