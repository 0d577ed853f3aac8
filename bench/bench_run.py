"""racker run IMAGE -- true, against a bare systemd-nspawn boot of the same rootfs.

Both sides boot with the same options, wait for readiness the same way (the
container's READY=1 over a notify socket), run `true` through nsenter and
shut down with SIGTERM. Rounds alternate so that both see the same machine
state. Prints the medians and their ratio as JSON.

    python bench/bench_run.py [--rounds 9] [--image debian-bookworm]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from racker import images, proc
from racker.machines import nspawn


def bare_nspawn(rootfs: str) -> float:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        notify_path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            argv = nspawn.nspawn_argv(rootfs, f"bench-{os.getpid()}")  # the same options racker uses
            child = subprocess.Popen(
                argv,
                env={**proc.BASE_ENV, **nspawn.nspawn_env(), "NOTIFY_SOCKET": notify_path},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            leader = 0
            notify.settimeout(60)
            while True:
                for line in notify.recv(4096).decode().splitlines():
                    if line.startswith("X_NSPAWN_LEADER_PID="):
                        leader = int(line.split("=", 1)[1])
                    elif line == "READY=1" and leader:
                        break
                else:
                    continue
                break
        subprocess.run(
            ["nsenter", f"--target={leader}", "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--", "true"], check=True
        )
        child.terminate()
        child.wait()
    return time.monotonic() - started


def racker_run(image: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "racker", "run", image, "--", "true"], check=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--image", default="debian-bookworm")
    args = parser.parse_args()
    image = images.pull(args.image)
    racker_run(args.image)  # warm the page cache for both sides
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_nspawn(str(image.rootfs)))
        ours.append(racker_run(args.image))
    result = {
        "benchmark": "racker run IMAGE -- true vs bare systemd-nspawn --boot",
        "image": args.image,
        "rounds": args.rounds,
        "bare_nspawn_median_s": round(statistics.median(bare), 3),
        "racker_run_median_s": round(statistics.median(ours), 3),
        "ratio": round(statistics.median(ours) / statistics.median(bare), 3),
        "goal": {"ratio_max": 1.3, "racker_run_max_s": 1.0},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
