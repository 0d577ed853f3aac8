"""Chaos: kill -9 racker at a random point of its work; gc must leave nothing behind.

Each round starts one operation in a private store (seeded by hard links from
the shared one), SIGKILLs the racker process, and only it, as `kill -9` would,
at a random point of its work (timed from its start, or in half the rounds
from an event such as "nspawn started"), runs `racker gc`, then looks for
anything left: processes, mounts, loop devices, cgroups, scratch files,
records, half-written output. Then the next normal command must work and
every stored image must still match its digest. A parallel section checks
that eight pulls of one unbuilt image build it once, that four starts of one
machine name start exactly one machine, and that four processes claiming
the same names in step never both get one.

    python bench/chaos.py [--rounds 12] [--seed N] [--ops pull,run,promote,vm] [--verify quick|full] [--no-parallel]

Prints JSON; exits 1 if anything was left behind or failed. One progress line
per round on a terminal (stderr). The private store, its machines and VMs are
removed at the end, whatever happens, Ctrl-C included.

Goal (the hardening issue): 0 leftovers and 0 later failures in 50 rounds.
tests/test_chaos.py runs a few rounds with fixed kill points.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from racker import machines, proc, store  # noqa: E402
from racker.machines import cgroups  # noqa: E402

# The store the test suite and users share; chaos only reads it (and builds there what is missing).
SHARED_HOME = store.home()
IMAGE = "debian-bookworm"
PREPARED = "debian-bookworm+vm"

# A small image for the pull rounds: Essential packages only, ~15 s to bootstrap.
TINY_ENTRY = """\
description = "Debian bookworm, Essential packages only (racker's store tests)"
source = "bootstrap:debian/bookworm"
variant = "essential"
packages = []
"""


# -- the operations ------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    argv: Callable[[Lab, str], list[str]]  # (lab, machine name) -> racker arguments
    # Seconds to finish, measured on the 2-core TCG host (--calibrate): pull
    # --force tiny 9-10 s; promote to qcow2 2.3-5 s (page cache cold or warm);
    # vm start 33 s the first time (the cached disk is built, ~4 s, and KVM
    # probed), 24 s after. `run` boots in 0.4 s and then sleeps 30 s: 2.5 s
    # puts most kills in the boot and the start of the command. A kill timed
    # from the start lands uniformly between 0.1 s and 95% of this, which each
    # finished run of the operation updates to what it took.
    duration: float
    # Events of its work (see TRIGGERS) -> how many seconds after one a kill may land.
    # Half the rounds time their kill from one of these: some phases are short
    # (nspawn running before the container's leader is known: about 0.1 s), and a
    # kill timed from the start would rarely hit them.
    events: dict[str, float] = field(default_factory=dict)
    qemu: bool = False


OPS: dict[str, Op] = {
    "pull": Op("pull", lambda lab, name: ["pull", "--force", "tiny"], 9.5, {"building": 6.0}),
    "run": Op("run", lambda lab, name: ["run", "--name", name, IMAGE, "--", "sleep", "30"], 2.5, {"nspawn": 0.1, "booted": 2.0}),
    "promote": Op(
        "promote",
        lambda lab, name: ["promote", IMAGE, "--format", "qcow2", "-o", str(lab.out / "x.qcow2")],
        3.5,
        {"staging": 1.5, "writing": 1.0},
    ),
    # Not "disk": it happens in the first vm start only; a kill timed from the start covers it.
    "vm": Op("vm", lambda lab, name: ["vm", "start", IMAGE, "--name", name], 30.0, {"qemu": 20.0}, qemu=True),
}


# -- the private store ---------------------------------------------------------


@contextlib.contextmanager
def racker_home(home: Path) -> Iterator[None]:
    """RACKER_HOME set to `home` in this process while the block runs (racker reads it on every call)."""
    saved = os.environ.get("RACKER_HOME")
    os.environ["RACKER_HOME"] = str(home)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RACKER_HOME"]
        else:
            os.environ["RACKER_HOME"] = saved


def share(name: str, home: Path, *, prepared: bool = False, shared: Path = SHARED_HOME) -> store.StoredImage:
    """Put a catalogue image of the shared store into the store at `home`, by hard links.

    Built in the shared store first if missing. Safe because nothing ever
    writes a store image in place: both stores only read it.
    """
    from racker import images, prepare

    with racker_home(shared):
        image = images.pull(name)
        if prepared:
            image = prepare.prepare(image)
    with racker_home(home):
        found = store.link_from(Path(shared), image.name)
    assert found.digest == image.digest
    return found


class Lab:
    """A private store, catalogue and output directory, and the racker processes run in them.

    Everything chaos counts as this lab's refers to `root` (by path, RACKER_HOME
    or the store's cgroup) or to one of the machine names it gave out: nothing
    another racker on this host does is ever counted or killed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.home = self.root / "store"
        self.catalog = self.root / "catalog"
        self.out = self.root / "out"
        self.logs = self.root / "logs"
        for path in (self.home, self.catalog, self.out, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        (self.catalog / "tiny.toml").write_text(TINY_ENTRY)
        self.env = {
            **os.environ,
            "RACKER_HOME": str(self.home),
            "RACKER_CATALOG": str(self.catalog),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        self.env.pop("RACKER_PROGRESS", None)
        self.token = os.urandom(2).hex()
        with racker_home(self.home):
            cgroup = cgroups.store_parent()
        # The store's cgroup path below the hierarchy root, as /proc/PID/cgroup shows it.
        self.cgroup_rel = "/" + str(cgroup.relative_to(cgroups.unified_root())) if cgroup else None
        self.names: list[str] = []  # every machine and VM name given out
        self.loops_before = loop_devices()
        self._digest_fingerprints: dict[str, tuple] = {}

    def name(self, suffix: str) -> str:
        name = f"chaos-{self.token}-{suffix}"
        self.names.append(name)
        return name

    def seed(self) -> None:
        share(IMAGE, self.home)
        share(IMAGE, self.home, prepared=True)

    # -- running racker --

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "racker", *args]

    def racker(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def spawn(self, *args: str, log: str) -> tuple[subprocess.Popen[bytes], Path]:
        """racker started in the background, its output to a log file (a full pipe would stall it)."""
        path = self.logs / log
        with open(path, "wb") as handle:
            child = subprocess.Popen(self.argv(*args), env=self.env, cwd=self.root, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle)
        return child, path

    # -- what this lab has running --

    def records(self) -> list[dict]:
        """The machine and VM records in the store, as written, with the leader's start time."""
        found = []
        for kind in ("machines", "vms"):
            directory = self.home / kind
            for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    data = json.loads(path.read_text())
                    data["leader_start"] = proc.start_time(data.get("leader") or 0)
                    found.append(data)
        return found

    def processes(self, extra_records: list[dict] = ()) -> dict[int, str]:
        """This lab's processes, pid -> what it is: those whose command line, root or
        working directory is in the lab, whose environment names the lab's store, that
        sit in the store's cgroup, or that are (or enter) a machine recorded here."""
        root = str(self.root)
        names = [re.escape(n) for n in self.names]
        by_name = re.compile(rf"(?:--machine=|-name |--name ?)(?:{'|'.join(names)})\b") if names else None
        recorded = {}
        leaders = set()
        for record in extra_records:
            for pid_key, start_key in (("pid", "pid_start"), ("leader", "leader_start"), ("owner", "owner_start")):
                if record.get(pid_key):
                    recorded[record[pid_key]] = (record.get(start_key, 0), f"{pid_key} of {record.get('name')}")
            if record.get("leader"):
                leaders.add(f"--target={record['leader']}")
        found = {}
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                if not cmdline:
                    continue  # a kernel thread, or a zombie
                links = []
                for link in ("root", "cwd"):
                    with contextlib.suppress(OSError):
                        links.append(os.readlink(f"/proc/{pid}/{link}"))
                environ = b""
                with contextlib.suppress(OSError):
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                cgroups = ""
                with contextlib.suppress(OSError):
                    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            except OSError:
                continue
            why = None
            if root in cmdline:
                why = "command line in the lab"
            elif any(link == root or link.startswith(root + "/") for link in links):
                why = "root or cwd in the lab"
            elif f"RACKER_HOME={self.home}\0".encode() in environ + b"\0":
                why = "RACKER_HOME is the lab's store"
            elif self.cgroup_rel and any(line.split(":", 2)[-1].startswith(self.cgroup_rel) for line in cgroups.splitlines()):
                why = "in the store's cgroup"
            elif by_name is not None and by_name.search(cmdline):
                why = "named after a machine of the lab"
            elif any(target in cmdline.split() for target in leaders):
                why = "enters a machine of the lab"
            elif pid in recorded and proc.start_time(pid) == recorded[pid][0]:
                why = recorded[pid][1]
            if why:
                found[pid] = f"{why}: {cmdline[:160]}"
        return found

    def leftovers(self, records: list[dict] = ()) -> list[str]:
        """Everything of this lab's that should not exist when nothing runs."""
        left = [f"process {pid} ({what})" for pid, what in sorted(self.processes(records).items())]
        names = self.names
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if str(self.root) in line or any(f"/{n}" in line or f" {n} " in line for n in names):
                left.append(f"mount {line}")
        left += [
            f"loop device {dev} on {backing}"
            for dev, backing in loop_devices().items()
            if dev not in self.loops_before and str(self.root) in backing
        ]
        left += [f"cgroup {path}" for path in self.cgroups()]
        left += [f"file {path}" for path in self.stray_files()]
        return left

    def cgroups(self) -> list[Path]:
        """The store's machine cgroups, in any hierarchy (cgroup v2, or each of a hybrid host's)."""
        if not self.cgroup_rel:
            return []
        top = Path("/sys/fs/cgroup")
        found = []
        for base in [top, *(p for p in top.iterdir() if p.is_dir())]:
            path = base / self.cgroup_rel.lstrip("/")
            if path.is_dir():
                found += [p for p in path.iterdir() if p.is_dir()] or [path]
        return sorted(set(found))

    def stray_files(self) -> list[Path]:
        """Scratch, run state, records and half-written files that only a live racker may have."""
        home = self.home
        found: list[Path] = []
        tmp = home / "tmp"
        if tmp.is_dir():
            found += [p for p in tmp.iterdir() if p.name != ".new"]
            if (tmp / ".new").is_dir():
                found += list((tmp / ".new").iterdir())
        for kind in ("run/nspawn", "run/qemu", "machines", "vms"):
            if (home / kind).is_dir():
                found += list((home / kind).iterdir())
        # write_json's temp files (".NAME.XXXX") and promote's ".OUT.XXXX.partial".
        for kind in ("refs", "disks", "cache"):
            if (home / kind).is_dir():
                found += [p for p in (home / kind).iterdir() if p.name.startswith(".")]
        images = home / "images"
        if images.is_dir():
            found += [p for p in images.iterdir() if not store.digest_of(p) or not (p / "manifest.json").is_file()]
        found += [p for p in self.out.iterdir() if p.name.endswith(".partial")]
        return sorted(found)

    # -- checks --

    def bad_digests(self, *, full: bool) -> list[str]:
        """Stored images whose tree no longer matches their digest.

        Not `full`: an image whose files' stat (inode, size, mtime, mode, owner)
        is what it was when it last matched is taken as unchanged; anything
        that writes through a hard link or removes a file changes that.
        """
        bad = []
        with racker_home(self.home):
            for image in store.images():
                if not image.rootfs.is_dir():
                    bad.append(f"{image.name}: no rootfs in {image.path}")
                    continue
                fingerprint = _stat_fingerprint(image.rootfs)
                if not full and self._digest_fingerprints.get(image.digest) == fingerprint:
                    continue
                digest = store.tree_digest(image.rootfs)
                if digest != image.digest:
                    bad.append(f"{image.name}: tree digest {digest[:19]} is not its digest {image.digest[:19]}")
                else:
                    self._digest_fingerprints[image.digest] = fingerprint
        return bad

    # -- tidying up --

    def stop_all(self) -> list[str]:
        """Stop what runs legitimately (a finished start), then gc; returns what was done."""
        done = []
        for verb, ps, stop in ((("ps",), "ps", ("stop",)), (("vm", "ps"), "vm ps", ("vm", "stop"))):
            listed = self.racker(*verb, "--json", timeout=120)
            with contextlib.suppress(json.JSONDecodeError):
                for entry in json.loads(listed.stdout or "[]"):
                    self.racker(*stop, entry["name"], timeout=120)
                    done.append(f"{ps}: stopped {entry['name']}")
        return done

    def reset(self) -> list[str]:
        """After a round's checks: kill this lab's processes, gc, and remove what is still left,
        so that the next round starts clean and nothing is counted twice."""
        done = self.stop_all()
        for pid, what in self.processes(self.records()).items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                done.append(f"killed {pid} ({what})")
        time.sleep(0.2 if done else 0)
        self.racker("gc", timeout=300)
        for path in self.cgroups():
            cgroups.remove(path)
            done.append(f"removed {path}")
        for path in self.stray_files():
            with contextlib.suppress(OSError):
                store.remove_tree(path)
                done.append(f"removed {path}")
        return done

    def close(self, *, remove: bool = True) -> None:
        """Stop every machine and VM of the lab, gc, kill what is left of it, delete it all."""
        with contextlib.suppress(Exception):
            self.stop_all()
        for _attempt in range(3):
            left = self.processes(self.records())
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not left:
                break
            time.sleep(0.5)
        with contextlib.suppress(Exception):
            self.racker("gc", timeout=300)
        for path in self.cgroups():
            cgroups.remove(path)
        if remove:
            store.remove_tree(self.root)


def loop_devices() -> dict[str, str]:
    """Loop device -> its backing file (what `losetup -a` lists)."""
    found = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            found[backing.parent.parent.name] = backing.read_text().strip()
    return found


def _stat_fingerprint(root: Path) -> tuple:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            entries.append((dirpath, name, info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode, info.st_uid, info.st_gid))
    return tuple(sorted(entries))


# -- a round -------------------------------------------------------------------


@dataclass
class Round:
    number: int
    op: str
    delay: float  # seconds after the start (or after `trigger` fired)
    trigger: str = ""
    killed_at: float = 0.0  # seconds after the start
    completed: bool = False  # it finished before the kill
    handed_over: bool = False  # killed after `start` had handed its machine over: it runs, legitimately
    rerun_seconds: float = 0.0  # --verify full: how long the operation took, run again to completion
    at_kill: str = ""  # what the store held when the kill landed
    leftovers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    gc: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    seconds: float = 0.0


# Events a deterministic kill waits for, then `delay` more seconds: (lab, machine name) -> bool.
TRIGGERS: dict[str, Callable[[Lab, str], bool]] = {
    "building": lambda lab, name: any((p / "rootfs").exists() for p in (lab.home / "tmp").glob("pull.*")),
    "staging": lambda lab, name: any((lab.home / "tmp").glob("promote.*")),
    "writing": lambda lab, name: any(lab.out.glob("*.partial")),
    "nspawn": lambda lab, name: _record(lab, "machines", name).get("pid", 0) > 0,
    "booted": lambda lab, name: "machined" in _record(lab, "machines", name).get("extra", {}),  # saved once READY=1 came
    "qemu": lambda lab, name: _record(lab, "vms", name).get("pid", 0) > 0,
    "disk": lambda lab, name: any((lab.home / "disks").glob(".*.partial")),  # vm start building the cached disk
}


def _record(lab: Lab, kind: str, name: str) -> dict:
    try:
        return json.loads((lab.home / kind / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def at_kill(lab: Lab) -> str:
    """A short picture of the store at the moment of the kill, for reproducing a round."""
    parts = []
    tmp = lab.home / "tmp"
    if tmp.is_dir():
        parts += [f"tmp/{p.name}" for p in sorted(tmp.iterdir()) if p.name != ".new"]
    for record in lab.records():
        bits = [k for k in ("pid", "leader") if record.get(k)]
        if record.get("owner") == 0:
            bits.append("detached")
        parts.append(f"{record.get('kind')} {record.get('name')}({','.join(bits)})")
    disks = lab.home / "disks"
    if disks.is_dir():
        parts += [f"disks/{p.name}" for p in sorted(disks.iterdir())]
    parts += [f"out/{p.name}" for p in sorted(lab.out.iterdir())]
    return "; ".join(parts)


def run_round(lab: Lab, number: int, op: Op, delay: float, *, trigger: str = "", verify: str = "quick", timeout: float = 300) -> Round:
    """Start `op`, SIGKILL racker `delay` seconds in (after `trigger`), gc, look for leftovers, verify."""
    result = Round(number, op.name, round(delay, 2), trigger)
    started = time.monotonic()
    name = lab.name(str(number))
    child, log = lab.spawn(*op.argv(lab, name), log=f"{number}-{op.name}.log")
    try:
        if trigger:
            fired = TRIGGERS[trigger]
            deadline = started + timeout
            while not fired(lab, name) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if child.poll() is None and time.monotonic() >= deadline:
                result.failures.append(f"{trigger} never happened in {timeout:.0f}s")
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(delay)
        result.killed_at = round(time.monotonic() - started, 2)
        if child.poll() is None:
            result.at_kill = at_kill(lab)
            os.kill(child.pid, signal.SIGKILL)  # racker only, as kill -9 would
        else:
            result.completed = True
            if child.returncode != 0:
                result.failures.append(f"{op.name} exited {child.returncode} by itself: {_tail(log)}")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    records = lab.records()  # before gc removes them: their pids must be gone after it
    result.handed_over = any(r.get("name") == name and r.get("owner") == 0 for r in records)
    if result.completed or result.handed_over:
        lab.stop_all()  # what a finished start started is the user's, not a leftover
        records = [r for r in records if r.get("name") != name]
    gc = lab.racker("gc", timeout=300)
    result.gc = [line for line in gc.stdout.splitlines() if line != "nothing to clean up"]
    if gc.returncode != 0:
        result.failures.append(f"gc exited {gc.returncode}: {_last(gc.stderr)}")
    result.leftovers = settled(lambda: lab.leftovers(records))
    verify_next(lab, op, result, verify)
    result.failures += lab.bad_digests(full=verify == "full")
    later = settled(lambda: lab.leftovers())
    result.leftovers += [f"after the next commands: {what}" for what in later if what not in result.leftovers]
    result.reset = lab.reset()
    result.seconds = round(time.monotonic() - started, 1)
    return result


def settled(look: Callable[[], list[str]], patience: float = 3.0) -> list[str]:
    """What `look` still finds after `patience` seconds (processes take a moment to exit)."""
    deadline = time.monotonic() + patience
    found = look()
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = look()
    return found


def verify_next(lab: Lab, op: Op, result: Round, verify: str) -> None:
    """The next normal commands work; with verify=full the killed operation runs again to completion."""

    def expect(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        done = lab.racker(*args, timeout=timeout)
        if done.returncode != 0:
            result.failures.append(f"`racker {' '.join(args)}` exited {done.returncode}: {_last(done.stderr)}")
        return done

    expect("run", "--name", lab.name(f"{result.number}-next"), IMAGE, "--", "true", timeout=120)
    if op.name == "pull":
        expect("pull", "tiny", timeout=900)
    if verify != "full" or op.name == "run":  # run's next command is its rerun
        return
    started = time.monotonic()
    if op.name == "pull":
        done = expect("pull", "--force", "tiny", timeout=900)
    elif op.name == "promote":
        done = expect(*op.argv(lab, ""))
        if done.returncode == 0 and not (lab.out / "x.qcow2").is_file():
            result.failures.append("promote finished but wrote no x.qcow2")
    else:
        name = lab.name(f"{result.number}-again")
        done = expect(*op.argv(lab, name), timeout=600)
    if done.returncode == 0:
        result.rerun_seconds = round(time.monotonic() - started, 1)
    if op.name == "vm":
        lab.stop_all()


def _last(text: str) -> str:
    """racker's error line and the first line of its hint, a traceback's exception, else the last two lines."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("racker: error:")]
    if errors:
        shown = lines[errors[-1] : errors[-1] + 2]
    elif any(line.startswith("Traceback") for line in lines):
        shown = ["Traceback", lines[-1]]
    else:
        shown = lines[-2:]
    return " | ".join(shown)[:300]


def _tail(path: Path) -> str:
    try:
        return _last(path.read_text(errors="replace"))
    except FileNotFoundError:
        return ""


# -- the parallel section ------------------------------------------------------


def parallel_pulls(lab: Lab, image: str = "tiny", count: int = 8) -> dict:
    """`count` pulls of one unbuilt image at once: one build, `count` successes, one digest."""
    procs = [lab.spawn("--debug", "pull", image, log=f"parallel-pull-{i}.log") for i in range(count)]
    started = time.monotonic()
    for child, _log in procs:
        child.wait(900)
    outputs = [log.read_text(errors="replace") for _child, log in procs]
    builds = sum(1 for text in outputs for line in text.splitlines() if line.startswith("racker: run: ") and "mmdebstrap" in line)
    digests = sorted({m.group(1) for text in outputs for m in re.finditer(rf"^{re.escape(image)} (sha256:[0-9a-f]+)$", text, re.MULTILINE)})
    codes = [child.returncode for child, _log in procs]
    failures = []
    if builds != 1:
        failures.append(f"{builds} mmdebstrap runs for {count} parallel pulls, not 1")
    if codes != [0] * count:
        failures.append(f"exit statuses {codes}: " + "; ".join(_last(t) for t, c in zip(outputs, codes, strict=True) if c))
    if len(digests) != 1:
        failures.append(f"{len(digests)} digests: {digests}")
    left = settled(lab.leftovers)
    return {
        "pulls": count,
        "builds": builds,
        "succeeded": codes.count(0),
        "digests": len(digests),
        "seconds": round(time.monotonic() - started, 1),
        "failures": failures,
        "leftovers": left,
    }


def parallel_starts(lab: Lab, count: int = 4) -> dict:
    """`count` starts of one machine name at once: one machine runs, the others exit 125, "already in use"."""
    name = lab.name("same")
    procs = [lab.spawn("start", IMAGE, "--name", name, log=f"parallel-start-{i}.log") for i in range(count)]
    for child, _log in procs:
        child.wait(300)
    outputs = [log.read_text(errors="replace") for _child, log in procs]
    codes = [child.returncode for child, _log in procs]
    listed = lab.racker("ps", "--json")
    running = [entry["name"] for entry in json.loads(listed.stdout or "[]")] if listed.returncode == 0 else []
    failures = []
    if sorted(codes) != [0] + [125] * (count - 1):
        odd = [f"{c}: {_last(t)}" for t, c in zip(outputs, codes, strict=True) if c not in (0, 125)]
        failures.append(f"exit statuses {codes}, not one 0 and {count - 1} times 125" + (f"; {odd}" if odd else ""))
    refused = [t for t, c in zip(outputs, codes, strict=True) if c == 125]
    unclear = [_last(t) for t in refused if not any("already in use" in line for line in t.splitlines())]
    if unclear:
        failures.append(f"{len(unclear)} refusals without an 'already in use' line: {unclear}")
    if running != [name]:
        failures.append(f"racker ps lists {running}, not just {name}")
    stop = lab.racker("stop", name, timeout=120)
    if stop.returncode != 0:
        failures.append(f"racker stop {name} exited {stop.returncode}: {_last(stop.stderr)}")
    left = settled(lab.leftovers)
    if left:
        lab.reset()
    return {"starts": count, "exit_statuses": sorted(codes), "running": running, "failures": failures, "leftovers": left}


def _claim_names(home: str, prefix: str, count: int, barrier, wins) -> None:  # type: ignore[no-untyped-def]
    os.environ["RACKER_HOME"] = home
    from racker.errors import NameTaken

    for i in range(count):
        state = machines.new_state("nspawn", f"{prefix}-{i}", IMAGE)
        barrier.wait()
        with contextlib.suppress(NameTaken):
            machines.claim(state)
            wins.put(i)
    # Stay alive until every process has tried the last name: a claimer that has
    # exited is stale, and taking its name over is then right, not a double claim.
    barrier.wait()


def parallel_claims(lab: Lab, processes: int = 4, names: int = 200) -> dict:
    """`processes` processes claim the same `names` machine names in step (what `racker start
    --name` does first): each name must go to exactly one of them. Machines are never started."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, wins = context.Barrier(processes), context.Queue()
    prefix = lab.name("claim")
    workers = [context.Process(target=_claim_names, args=(str(lab.home), prefix, names, barrier, wins)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    claimed: dict[int, int] = {}
    with contextlib.suppress(Exception):
        while True:
            i = wins.get(timeout=1)
            claimed[i] = claimed.get(i, 0) + 1
    for path in (lab.home / "machines").glob(f"{prefix}-*.json"):
        path.unlink()
    doubles = sorted(i for i, n in claimed.items() if n > 1)
    failures = []
    if doubles:
        failures.append(f"{len(doubles)} of {names} names were claimed by two processes at once, e.g. {prefix}-{doubles[0]}")
    if len(claimed) != names:
        failures.append(f"{names - len(claimed)} of {names} names were claimed by nobody")
    return {"processes": processes, "names": names, "claimed_twice": len(doubles), "failures": failures}


# -- the whole run -------------------------------------------------------------


def plan_rounds(rounds: int, ops: list[str], rng: random.Random) -> list[tuple[str, str, float]]:
    """Each op equally often, in a shuffled order: (op, event the kill is timed from or "" for
    the start, where in the span the kill lands from 0 to 1)."""
    picked = [ops[i % len(ops)] for i in range(rounds)]
    rng.shuffle(picked)
    plan = []
    for op in picked:
        events = sorted(OPS[op].events)
        event = rng.choice(events) if events and rng.random() < 0.5 else ""
        plan.append((op, event, rng.random()))
    return plan


def kill_delay(op: Op, event: str, fraction: float, duration: float) -> float:
    """Seconds from the start (or from `event`) to the kill."""
    if event:
        return fraction * op.events[event]
    return 0.1 + fraction * max(0.95 * duration - 0.1, 0.0)


def summary(results: list[Round], parallel: dict, args: argparse.Namespace, seconds: float) -> dict:
    leftovers = [
        {
            "round": r.number,
            "op": r.op,
            "after": r.trigger or "start",
            "kill_delay": r.delay,
            "killed_at": r.killed_at,
            "at_kill": r.at_kill,
            "what": what,
        }
        for r in results
        for what in r.leftovers
    ]
    failures = [
        {"round": r.number, "op": r.op, "after": r.trigger or "start", "kill_delay": r.delay, "what": what}
        for r in results
        for what in r.failures
    ]
    for section, outcome in parallel.items():
        failures += [{"parallel": section, "what": what} for what in outcome.get("failures", [])]
        leftovers += [{"parallel": section, "what": what} for what in outcome.get("leftovers", [])]
    by_op: dict[str, list[float]] = {}
    for r in results:
        by_op.setdefault(r.op, []).append(r.seconds)
    return {
        "benchmark": "kill -9 racker at random points; gc must leave nothing and the next command must work",
        "seed": args.seed,
        "verify": args.verify,
        "rounds": len(results),
        "ops": {op: len(times) for op, times in sorted(by_op.items())},
        "round_seconds_median": {op: round(statistics.median(times), 1) for op, times in sorted(by_op.items())},
        "completed_before_kill": sum(r.completed for r in results),
        "leftovers": leftovers,
        "failures": failures,
        "parallel": parallel,
        "details": [
            {
                "round": r.number,
                "op": r.op,
                "after": r.trigger or "start",
                "kill_delay": r.delay,
                "killed_at": r.killed_at,
                "completed": r.completed,
                "handed_over": r.handed_over,
                "at_kill": r.at_kill,
                "gc": r.gc,
                "reset": r.reset,
                "rerun_seconds": r.rerun_seconds,
                "seconds": r.seconds,
            }
            for r in results
        ],
        "seconds": round(seconds, 1),
        "goal": {"rounds": 50, "leftovers": 0, "failures": 0},
    }


def calibrate(lab: Lab) -> dict[str, float]:
    """Each operation once to completion, timed (run: to a booted machine running `true`)."""
    times = {}
    for op in OPS.values():
        args = op.argv(lab, lab.name(f"calibrate-{op.name}"))
        if op.name == "run":
            args = [*args[: args.index("--")], "--", "true"]
        started = time.monotonic()
        done = lab.racker(*args)
        times[op.name] = round(time.monotonic() - started, 1)
        if done.returncode != 0:
            times[op.name + " failed"] = _last(done.stderr)
        lab.stop_all()
    return times


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rounds_given", nargs="?", type=int, metavar="ROUNDS", help="how many rounds (default 12)")
    parser.add_argument("--rounds", type=int, default=12, help="the same as ROUNDS")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed in the result)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    parser.add_argument("--verify", choices=["quick", "full"], default="quick", help="full: run the killed operation again to completion")
    parser.add_argument("--no-parallel", action="store_true", help="skip the parallel pulls and starts")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory (logs, store) for inspection; nothing keeps running")
    parser.add_argument("--calibrate", action="store_true", help="only time each operation to completion (for the kill ranges)")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        parser.error(f"--ops: unknown {unknown}; known: {', '.join(OPS)}")
    if args.seed is None:
        args.seed = random.randrange(2**31)
    rng = random.Random(args.seed)
    # SIGINT explicitly: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    tty = sys.stderr.isatty()
    started = time.monotonic()
    results: list[Round] = []
    parallel: dict = {}
    final: list[str] = []
    lab = Lab(Path(tempfile.mkdtemp(prefix="racker-chaos-", dir="/var/tmp")))
    interrupted = False
    try:
        lab.seed()
        if args.calibrate:
            print(json.dumps(calibrate(lab), indent=2))
            return 0
        if not args.no_parallel:
            parallel["pulls"] = parallel_pulls(lab)
            parallel["starts"] = parallel_starts(lab)
            parallel["claims"] = parallel_claims(lab)
            if tty:
                print(f"parallel: {json.dumps({k: v['failures'] or 'ok' for k, v in parallel.items()})}", file=sys.stderr, flush=True)
        plan = plan_rounds(args.rounds_given or args.rounds, ops, rng)
        durations = {name: op.duration for name, op in OPS.items()}
        for number, (op, event, fraction) in enumerate(plan, 1):
            delay = kill_delay(OPS[op], event, fraction, durations[op])
            result = run_round(lab, number, OPS[op], delay, trigger=event, verify=args.verify)
            results.append(result)
            if result.completed and not result.failures and not event:
                durations[op] = result.killed_at  # it finished sooner than thought
            if result.rerun_seconds:
                durations[op] = result.rerun_seconds
            if tty:
                state = "finished first" if result.completed else f"killed at {result.killed_at:.1f}s" + (f" ({event})" if event else "")
                print(
                    f"round {number}/{len(plan)} {op:8} {state:18} {len(result.leftovers)} left, {len(result.failures)} failed"
                    f" ({result.seconds:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        final = lab.bad_digests(full=True)
    except KeyboardInterrupt:
        interrupted = True
        print("chaos: interrupted; cleaning up", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lab.close(remove=not args.keep)
        if args.keep:
            print(f"chaos: kept {lab.root}", file=sys.stderr)
    report = summary(results, parallel, args, time.monotonic() - started)
    report["failures"] += [{"final digest check": True, "what": what} for what in final]
    print(json.dumps(report, indent=2))
    if interrupted:
        return 130
    return 1 if report["leftovers"] or report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
