"""Clean up what a killed racker left behind: stale machines, their processes, scratch space."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from racker import machines, proc, store
from racker.machines import cgroups, named_networks, network
from racker.vm import snapshots


def collect() -> list[str]:
    """Remove every stale record and what it owns; return one line per thing removed."""
    removed: list[str] = []
    for kind in machines.KINDS:
        removed += machines.collect_stale(kind)
    removed += network.collect()  # after the records: a claim of a reaped machine is stale
    removed += named_networks.collect()  # private networks: a killed test's group among them
    removed += _orphan_rundirs()
    removed += _orphan_cgroups()
    removed += _stale_workdirs()
    removed += _unreferenced_images()
    removed += _downloads()  # after the images: a download only they referenced goes with them
    removed += _stale_disks()
    removed += snapshots.collect()  # after the disks: a snapshot of a removed disk is stale
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


def _downloads() -> list[str]:
    """Interrupted downloads nobody is resuming, and finished ones no stored image came from.

    A finished download is unreferenced until the pull that made it stores its
    image, so none is taken while a pull or build is under way (a live workdir:
    _stale_workdirs has removed the dead ones).
    """
    from racker.sources import download

    removed: list[str] = []
    cache = download.cache_dir()
    partial = cache / "partial"
    if partial.is_dir():
        for key in sorted({path.name.lstrip(".").split(".")[0] for path in partial.iterdir()}):
            with store.locked_if_free(download.lock_key(key)) as free:
                if not free:
                    continue  # being downloaded now
                for path in partial.glob(f"*{key}*"):
                    path.unlink(missing_ok=True)
                removed.append(f"removed partial download {key[:12]}")
    finished = cache / "sha256"
    tmp = store.home() / "tmp"
    busy = tmp.is_dir() and any(p.name != ".new" or any(p.iterdir()) for p in tmp.iterdir())
    if finished.is_dir() and not busy:
        with store.locked(store.SWEEP_LOCK):  # no commit names an image meanwhile
            used = _downloads_used()
            for path in sorted(finished.iterdir()):
                if path.name not in used:
                    path.unlink()
                    removed.append(f"removed download {path.name[:12]} no image came from")
    return removed


def _downloads_used() -> set[str]:
    """Every sha256 a stored image's manifest records (the downloads it came from)."""
    found: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "sha256" and isinstance(item, str):
                    found.add(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for manifest in [*store.home().glob("images/*/manifest.json"), *store.home().glob("refs/*.json")]:
        with contextlib.suppress(OSError, ValueError):
            walk(json.loads(manifest.read_text()))
    return found


def _unreferenced_images() -> list[str]:
    """Images no name links to any more (rebuilding a name leaves its old image)
    and disks promoted from them; kept while a machine or VM still uses them."""
    removed = []
    states = [s for kind in machines.KINDS for s in machines.all_states(kind)]
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
    """Run directories that no record claims (a record is made before its run directory):
    run/KIND/NAME, and an older racker's run/NAME (kept while a record of either kind has NAME)."""
    removed = []
    run = store.home() / "run"
    if run.is_dir():
        with machines.all_names_locked():
            claimed = {(kind, s.name) for kind in machines.KINDS for s in machines.all_states(kind)}
            for path in sorted(run.iterdir()):
                if path.name in machines.KINDS and path.is_dir() and not path.is_symlink():
                    orphans = [p for p in sorted(path.iterdir()) if (path.name, p.name) not in claimed]
                elif path.name not in {name for _kind, name in claimed}:
                    orphans = [path]
                else:
                    orphans = []
                for orphan in orphans:
                    store.remove_tree(orphan)
                    removed.append(f"removed {orphan}")
    return removed


def _orphan_cgroups() -> list[str]:
    """Machine cgroups (and their v1 mirrors) no record claims, with any process left in them.

    Judged by name under the registry's lock: a machine's record is claimed
    before its cgroup is made, so no cgroup of a machine being started is taken.
    """
    removed = []
    parent = cgroups.store_parent()
    if parent is None:
        return removed
    with machines.names_locked("nspawn"):
        claimed = {s.name for s in machines.all_states("nspawn")}
        for name in sorted(cgroups.machine_names() - claimed):
            if cgroups.kill(parent / name):
                removed.append(f"killed the processes left in cgroup {parent / name}")
            if cgroups.remove(parent / name):
                removed.append(f"removed cgroup {parent / name}")
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
    the unfinished rootfs, behind; they must be gone before the tree is. Each
    is signalled as the process seen here (pid and start time), never a pid's
    later owner.
    """
    prefix = str(path)
    killed = []
    boot = proc.boot_id()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        started = proc.start_time(pid)
        try:
            links = [os.readlink(f"/proc/{pid}/{link}") for link in ("root", "cwd")]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone already, or a kernel thread
        inside = any(link == prefix or link.startswith(prefix + "/") for link in links) or prefix in cmdline
        if inside and proc.kill_and_wait(pid, started, boot):
            killed.append(pid)
    return killed
