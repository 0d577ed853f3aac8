"""Clean up what a killed racker left behind: stale machines, their processes, scratch space."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from racker import machines, nspawn, store


def _kill(pid: int, started: int) -> bool:
    if not machines.alive(pid, started):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while machines.alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def collect() -> list[str]:
    """Remove every stale record and what it owns; return one line per thing removed."""
    removed: list[str] = []
    for kind in ("nspawn", "qemu"):
        for state in machines.all_states(kind):
            if not machines.is_stale(state):
                continue
            # The leader first: killing a pid namespace's init takes the whole machine down.
            if state.leader and _kill(state.leader, machines.start_time(state.leader)):
                removed.append(f"killed {kind} machine {state.name} (pid {state.leader})")
            if state.pid and _kill(state.pid, state.pid_start):
                removed.append(f"killed {kind} process of {state.name} (pid {state.pid})")
            cgroup = state.extra.get("cgroup")
            if cgroup and os.path.isdir(cgroup):
                nspawn.remove_cgroup(cgroup)
                removed.append(f"removed cgroup {cgroup}")
            if state.rundir and os.path.isdir(state.rundir):
                store.remove_tree(Path(state.rundir))
                removed.append(f"removed {state.rundir}")
            machines.release(state)
            removed.append(f"removed stale {kind} record {state.name}")
    removed += _orphan_rundirs()
    removed += _orphan_cgroups()
    removed += _stale_workdirs()
    removed += _unreferenced_images()
    removed += _stale_disks()
    return removed


def _stale_disks() -> list[str]:
    """Cached disks an older racker promoted (rebuilt under a new name since),
    and what killed promotes left half-written; kept while a VM boots them."""
    from racker import promote

    removed: list[str] = []
    directory = store.home() / "disks"
    if not directory.is_dir():
        return removed
    booted = {s.extra.get("disk") for s in machines.all_states("qemu")}
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".partial"):
            # ".<disk name>.<random>.partial", written under the disk's build lock.
            name = path.name[1:].rsplit(".", 2)[0]
            with store.locked_if_free(promote.disk_lock(name)) as free:
                if free and path.exists():
                    path.unlink()
                    removed.append(f"removed unfinished disk {path.name}")
        elif promote.is_stale_cached_disk(path) and str(path) not in booted:
            path.unlink()
            removed.append(f"removed disk {path.name} of an older racker")
    return removed


def _unreferenced_images() -> list[str]:
    """Images no name links to any more (rebuilding a name leaves its old image)
    and disks promoted from them; kept while a machine or VM still uses them."""
    removed = []
    states = [s for kind in ("nspawn", "qemu") for s in machines.all_states(kind)]
    in_use = {s.digest for s in states if s.digest}
    for state in states:
        # A VM started from a cached disk's path has no image digest; the disk's name has it.
        digest = store.digest_of(Path(state.extra.get("disk", "")))
        if digest:
            in_use.add(digest)
    with store.locked(store.SWEEP_LOCK):
        for path in list(store.unreferenced(in_use)):
            if not path.exists():
                continue  # a disk that went with its image
            if path.is_dir():
                store.drop_image(path)
                removed.append(f"removed unreferenced image {path.name[:19]}")
            else:
                path.unlink()
                removed.append(f"removed disk {path.name} of a removed image")
    return removed


def _orphan_rundirs() -> list[str]:
    """Run directories that no record claims."""
    removed = []
    run = store.home() / "run"
    if run.is_dir():
        claimed = {s.rundir for kind in ("nspawn", "qemu") for s in machines.all_states(kind)}
        for path in run.iterdir():
            if str(path) not in claimed:
                store.remove_tree(path)
                removed.append(f"removed {path}")
    return removed


def _orphan_cgroups() -> list[str]:
    """Machine cgroups that no record claims (only empty ones can go)."""
    removed = []
    parent = nspawn.store_cgroup()
    if parent is not None and parent.is_dir():
        claimed = {s.extra.get("cgroup") for s in machines.all_states("nspawn")}
        for path in parent.iterdir():
            if path.is_dir() and str(path) not in claimed:
                nspawn.remove_cgroup(str(path))
                if not path.exists():
                    removed.append(f"removed cgroup {path}")
    return removed


def _stale_workdirs() -> list[str]:
    """Scratch directories whose owner is gone (their lock is no longer held), and
    the unfinished outputs (OUT.partial) they recorded outside the store."""
    removed = []
    tmp = store.home() / "tmp"
    if not tmp.is_dir():
        return removed
    candidates = [p for p in sorted(tmp.iterdir()) if p.name != ".new"]
    if (tmp / ".new").is_dir():
        candidates += sorted((tmp / ".new").iterdir())  # killed before it was ready
    for path in candidates:
        if path.name.endswith(".lock") and path.is_file():
            path.unlink(missing_ok=True)  # an older racker's lock file
            continue
        with store.stale_workdir(path) as stale:
            if not stale:
                continue  # still in use
            for pid in _kill_processes_inside(path):
                removed.append(f"killed process {pid} still working in {path}")
            for output in store.remove_outputs(path):
                removed.append(f"removed unfinished output {output}")
            store.remove_tree(path)
        removed.append(f"removed unfinished {path}")
    return removed


def _kill_processes_inside(path: Path) -> list[int]:
    """SIGKILL every process whose root, working directory or command line is inside `path`.

    A killed pull leaves mmdebstrap, and the apt and dpkg it runs chrooted in
    the unfinished rootfs, behind; they must be gone before the tree is.
    """
    prefix = str(path)
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            links = [os.readlink(f"/proc/{pid}/{link}") for link in ("root", "cwd")]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone already, or a kernel thread
        inside = any(link == prefix or link.startswith(prefix + "/") for link in links) or prefix in cmdline
        if inside and _kill(pid, machines.start_time(pid)):
            killed.append(pid)
    return killed
