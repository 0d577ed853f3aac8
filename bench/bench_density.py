"""N machines of one image at once: racker against a bare systemd-nspawn loop, in the same run.

Each side starts N machines in parallel, waits until all run (the container's
READY=1), runs `true` in each, and stops them all. racker's side is N
`racker start` processes, then `racker exec` in each and one `racker stop
--all`; the bare side is N systemd-nspawn with the same options (each in a
cgroup of its own, as racker gives them, so that their systemds do not
fight), entered with nsenter and stopped with SIGTERM. Memory per machine is
each machine's cgroup memory.current where cgroup v2 has the memory
controller, else the proportional set size of its processes (the tmpfs that
holds a machine's writes is not in it). Prints JSON.

    python bench/bench_density.py [N] [--image debian-bookworm] [--raise-limits]

--raise-limits: `racker doctor --fix`'s values for the run, the old ones restored after.
A run at the host's own limits finds its ceiling: the machines that could not start
are counted, with the first line of each distinct error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from racker import machines, proc, store
from racker.machines import cgroups, limits, nspawn

ROOT = Path(__file__).resolve().parent.parent


def racker(*args: str) -> subprocess.Popen[str]:
    # Bytecode as an installed racker has it: compiling every module in each of N
    # processes would be measured otherwise (the sandbox sets PYTHONDONTWRITEBYTECODE).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.Popen(
        [sys.executable, "-m", "racker", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def memory_of(leader: int, nspawn_pid: int, cgroup: str | None) -> int:
    return limits.cgroup_memory(leader, cgroup) or limits.pss(limits.machine_pids(leader, nspawn_pid))


def errors_of(failed: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in failed:
        first = next((line for line in text.splitlines() if line.startswith("racker: error")), text.strip()[:200])
        first = re.sub(r"'dens-[0-9]+-[0-9]+'", "NAME", first)  # one count per kind of error
        counts[first] = counts.get(first, 0) + 1
    return counts


def figures(running: int, all_running: float, ran: list[int], exec_s: float, stop_s: float, memory: list[int]) -> dict:
    """What both sides report, in the same keys."""
    return {
        "running": running,
        "all_running_s": round(all_running, 2),
        "exec_ok": sum(1 for rc in ran if rc == 0),
        "exec_all_s": round(exec_s, 2),
        "stop_all_s": round(stop_s, 2),
        "memory_per_machine_mb": round(sum(memory) / len(memory) / 2**20, 1) if memory else None,
    }


def racker_side(image: str, n: int, timeout: float) -> dict:
    names = [f"dens-{i}-{os.getpid()}" for i in range(n)]
    started = time.monotonic()
    starts = [racker("start", image, "--name", name, "--timeout", str(timeout)) for name in names]
    outputs = [p.communicate() for p in starts]
    all_running = time.monotonic() - started
    running = [name for name, p in zip(names, starts, strict=True) if p.returncode == 0]
    failed = [err for p, (_out, err) in zip(starts, outputs, strict=True) if p.returncode != 0]
    states = [s for s in machines.all_states("nspawn") if s.name in running]
    memory = [memory_of(s.leader, s.pid, s.extra.get("cgroup")) for s in states]
    costs = limits.machine_costs((s.leader, s.pid, s.extra.get("cgroup")) for s in states)
    exec_started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        ran = list(pool.map(lambda name: racker("exec", name, "--", "true").wait(), running))
    exec_s = time.monotonic() - exec_started
    stop_started = time.monotonic()
    stopped = racker("stop", "--all")
    stopped.communicate()
    stop_s = time.monotonic() - stop_started
    return {
        **figures(len(running), all_running, ran, exec_s, stop_s, memory),
        "stop_rc": stopped.returncode,
        "per_machine": {k: round(v, 1) for k, v in costs.items() if k != "memory"},
        "failed": len(failed),
        "errors": errors_of(failed),
    }


@contextlib.contextmanager
def bare_cgroups(n: int) -> Iterator[list[Path | None]]:
    """A cgroup per bare machine (without one, their systemds share ours and fight), removed after."""
    root = cgroups.unified_root()
    if root is None or nspawn.has_machined():
        yield [None] * n
        return
    parent = root / f"racker-bench-{os.getpid()}"
    paths: list[Path | None] = [parent / f"bare-{i}" for i in range(n)]
    for path in paths:
        path.mkdir(parents=True)  # type: ignore[union-attr]
    try:
        yield paths
    finally:
        # Deepest first (each container's systemd made its own below), here and in nspawn's v1 mirror.
        for tree in (parent, *cgroups.mirrors(parent)):
            for dirpath, _dirs, _files in sorted(os.walk(tree), key=lambda entry: -entry[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


def bare_side(rootfs: Path, n: int, timeout: float) -> dict:
    children: list[subprocess.Popen[bytes]] = []
    sockets: list[socket.socket] = []
    leaders: dict[int, int] = {}
    with bare_cgroups(n) as groups:
        try:
            started = time.monotonic()
            for i, group in enumerate(groups):
                notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                name = f"bench-notify-{os.getpid()}-{i}"
                notify.bind("\0" + name)
                notify.setblocking(False)
                sockets.append(notify)
                children.append(
                    proc.start(
                        nspawn.nspawn_argv(rootfs, f"bare-{i}-{os.getpid()}"),
                        env={**nspawn.nspawn_env(), "NOTIFY_SOCKET": "@" + name},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        new_session=True,
                        cgroup_procs=str(group / "cgroup.procs") if group else None,
                    )
                )
            ready: set[int] = set()
            seen: dict[int, int] = {}
            deadline = started + timeout
            while len(ready) + sum(1 for c in children if c.poll() is not None) < n and time.monotonic() < deadline:
                for i, notify in enumerate(sockets):
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            for line in notify.recv(4096).decode().splitlines():
                                if line.startswith("X_NSPAWN_LEADER_PID="):
                                    seen[i] = int(line.split("=", 1)[1])
                                elif line == "READY=1" and i in seen:
                                    ready.add(i)
                                    leaders[i] = seen[i]
                time.sleep(0.02)
            all_running = time.monotonic() - started
            memory = [memory_of(leaders[i], children[i].pid, str(groups[i]) if groups[i] else None) for i in sorted(ready)]
            enter = ["nsenter", "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--", "true"]
            exec_started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                ran = list(pool.map(lambda pid: subprocess.run([enter[0], f"--target={pid}", *enter[1:]]).returncode, leaders.values()))
            exec_s = time.monotonic() - exec_started
            stop_started = time.monotonic()
        finally:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            for notify in sockets:
                notify.close()
        stop_s = time.monotonic() - stop_started
    for i in range(n):
        shutil.rmtree(machines.NSPAWN_PROPAGATE / f"bare-{i}-{os.getpid()}", ignore_errors=True)
    return figures(len(ready), all_running, ran, exec_s, stop_s, memory)


def leftovers(image_rootfs: Path) -> list[str]:
    """What outlived the run: machine records, run dirs, cgroups, processes booted from the image."""
    found = [f"record {s.name}" for s in machines.all_states("nspawn") if s.name.startswith("dens-")]
    found += [f"cgroup {name}" for name in cgroups.machine_names() if name.startswith("dens-")]
    root = cgroups.unified_root()
    if root is not None:
        bench = root / f"racker-bench-{os.getpid()}"
        found += [f"cgroup {tree}" for tree in (bench, *cgroups.mirrors(bench)) if tree.exists()]
    run = store.home() / "run" / "nspawn"
    found += [f"run dir {p.name}" for p in run.iterdir() if p.name.startswith("dens-")] if run.is_dir() else []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if str(image_rootfs) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(f"process {pid}")
    return found


@contextlib.contextmanager
def raised_limits(wanted: bool) -> Iterator[list[str]]:
    saved = {limit.path: limit.path.read_text() for limit in limits.LIMITS if limit.sysctl}
    try:
        yield [f"{limit.sysctl}={new}" for limit, _old, new in limits.fix()] if wanted else []
    finally:
        for path, value in saved.items():
            if path.read_text() != value:
                path.write_text(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=100)
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a machine may take to boot (default %(default)s)")
    parser.add_argument("--raise-limits", action="store_true", help="racker doctor --fix's values for the run, restored after")
    args = parser.parse_args()
    from racker import images

    image = images.pull(args.image)
    # A store of the bench's own (the image hard-linked into it): `racker stop --all` stops only its machines.
    home = store.home()
    with tempfile.TemporaryDirectory(prefix="racker-bench-density-", dir=home.parent) as private:
        os.environ["RACKER_HOME"] = private
        try:
            image = store.link_from(home, image.name)
            with raised_limits(args.raise_limits) as raised:
                instances = limits.LIMITS[0].current()
                bare = bare_side(image.rootfs, args.n, args.timeout)
                ours = racker_side(image.name, args.n, args.timeout)
            left = leftovers(image.rootfs)
            subprocess.run([sys.executable, "-m", "racker", "gc"], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
        finally:
            os.environ["RACKER_HOME"] = str(home)
    result = {
        "benchmark": f"{args.n} machines at once: racker start/exec/stop --all vs bare systemd-nspawn",
        "image": args.image,
        "n": args.n,
        "limits_raised": raised,
        "fs.inotify.max_user_instances": instances,
        "bare": bare,
        "racker": ours,
        "all_running_ratio": round(ours["all_running_s"] / bare["all_running_s"], 2) if bare["all_running_s"] else None,
        "left_after": left,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
