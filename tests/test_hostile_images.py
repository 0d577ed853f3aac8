"""Hostile images: links at every path racker reads, writes or deletes, pointing at a host sentinel.

Each image is the shared prepared debian-bookworm, copied by hard links into a store
workdir, with paths replaced by links (a link replaces a name: no shared file is ever
written) and committed as an image of its own. Every operation racker runs on images
then runs on it; the sentinel (names, modes, contents) must never change, and each
operation succeeds inside the image or fails with one line.

`vm start` is left out: a QEMU boot under TCG costs a minute per image, and it reads
the disk promote built (whose building is covered here), not the image tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import racker, tree_checksum
from racker import proc, store

pytestmark = [pytest.mark.slow, pytest.mark.root]

# Every path the host-side code reaches into an image at (from prepare, promote and its
# overlay, profiles, app, vagrant, distros, facts and export), and what it is: a "dir"
# link stands for a directory, a "file" link for a file.
LEAVES: dict[str, str] = {
    "var/lib/apt/lists": "dir",  # prepare.remove_leftovers globs and unlinks in it
    "var/cache/apt": "dir",
    "var/log/apt": "dir",
    "var/cache/debconf": "dir",
    "etc/ssh": "dir",  # host keys globbed and unlinked; sshd_config read by the profiles
    "etc/machine-id": "file",  # unlinked, written, chmodded
    "var/lib/dbus/machine-id": "file",
    "var/lib/cloud": "dir",  # removed as a tree
    "etc/hostname": "file",
    "etc/resolv.conf": "file",  # saved and restored around the package install
    "usr/sbin/policy-rc.d": "file",
    "etc/systemd/system-generators": "dir",
    "etc/cloud/cloud.cfg.d": "dir",  # written; read for the datasource list
    "etc/initramfs-tools/conf.d": "dir",
    "etc/passwd": "file",  # vagrant reads and rewrites the account files
    "etc/group": "file",
    "etc/shadow": "file",
    "etc/gshadow": "file",
    "etc/sudoers.d": "dir",
    "etc/fstab": "file",
    "etc/hosts": "file",
    "etc/default/locale": "file",
    "etc/systemd/network": "dir",
    "etc/apt/sources.list.d": "dir",
    "root": "dir",  # the profiles read people's homes
    "home": "dir",  # --vagrant-user makes home/vagrant
}
TOPS: dict[str, str] = {
    "etc": "dir",  # everything under /etc at once
    "boot": "dir",  # the kernel and initramfs promote reads
    "var/log": "dir",
    "etc/os-release": "file",  # distros.detect
    "lib/modules": "dir",  # the kernel's modules, read for the drivers check
    "etc/systemd/system": "dir",  # units enabled, --app's unit
    "var": "dir",
}
STYLES = ("absolute", "relative", "dotdot")


@dataclass(frozen=True)
class Hostile:
    name: str
    links: tuple[str, ...]
    style: str


CORPUS = [Hostile(f"hostile-leaves-{style}", tuple(LEAVES), style) for style in STYLES] + [
    Hostile(f"hostile-{path.replace('/', '-')}-{style}", (path,), style) for path in TOPS for style in ("absolute", "dotdot")
]
# What racker runs on each image: (label, racker arguments; {out} is a scratch file).
OPERATIONS = {
    "promote-raw": ["promote", "{image}", "--no-prepare", "--format", "raw", "-o", "{out}.raw"],
    "promote-gcp-vagrant-app": ["promote", "{image}", "--no-prepare", "--profile", "gcp", "--vagrant-user", "--app", "-o", "{out}.tar.gz"],
    "promote-firecracker": ["promote", "{image}", "--no-prepare", "--format", "firecracker", "-o", "{out}.ext4"],
    "export-rootfs-tar": ["export", "{image}", "--format", "rootfs-tar", "-o", "{out}.tar"],
}
# The gcp profile writes the most profile files (under etc/), and its tar.gz costs some 17 s of
# gzip an image. An image whose links are all outside etc/ meets the same profile, vagrant and app
# steps with azure's fixed VHD, which is not compressed.
OUTSIDE_ETC = {
    "promote-azure-vagrant-app": ["promote", "{image}", "--no-prepare", "--profile", "azure", "--vagrant-user", "--app", "-o", "{out}.vhd"],
}
# Formats and profiles tried on the first image only: each disk build costs seconds.
MORE = {
    "promote-qcow2": ["promote", "{image}", "--no-prepare", "--format", "qcow2", "-o", "{out}.qcow2"],
    "promote-vmdk": ["promote", "{image}", "--no-prepare", "--format", "vmdk", "-o", "{out}.vmdk"],
    "promote-vhdx": ["promote", "{image}", "--no-prepare", "--format", "vhdx", "-o", "{out}.vhdx"],
    "promote-vagrant-libvirt": ["promote", "{image}", "--no-prepare", "--format", "vagrant-libvirt", "-o", "{out}.box"],
    "promote-digitalocean": ["promote", "{image}", "--no-prepare", "--profile", "digitalocean", "-o", "{out}.qcow2"],
    "promote-azure": ["promote", "{image}", "--no-prepare", "--profile", "azure", "-o", "{out}.vhd"],
    "promote-uefi": ["promote", "{image}", "--no-prepare", "--firmware", "uefi", "-o", "{out}-uefi.raw"],
}


def operations_for(hostile: Hostile, first: bool) -> dict[str, list[str]]:
    operations = dict(OPERATIONS, **(MORE if first else {}))
    if not first and not any(link == "etc" or link.startswith("etc/") for link in hostile.links):
        del operations["promote-gcp-vagrant-app"]
        operations.update(OUTSIDE_ETC)
    return operations


def make_sentinel(base: Path) -> Path:
    """The host directory the links point at: keys, account files, a directory of each kind."""
    host = base / "sentinel"
    for directory in ("", ".ssh", "dir", "dir/sub"):
        (host / directory).mkdir(parents=True, exist_ok=True)
        (host / directory).chmod(0o755)
    files = {
        ".ssh/id_ed25519": "SENTINEL PRIVATE KEY\n",
        ".ssh/authorized_keys": "ssh-ed25519 SENTINEL\n",
        "passwd": "root:x:0:0:SENTINEL::\n",
    }
    files |= {f"dir/{name}": f"SENTINEL {name}\n" for name in ("x_y", "ssh_host_ed25519_key", "machine-id", "a.cfg", "b.network", "x.bin")}
    files |= {"dir/sub/keep_me": "SENTINEL\n", "file": "SENTINEL FILE\n"}
    for rel, text in files.items():
        (host / rel).write_text(text)
        (host / rel).chmod(0o600)
    return host


def link_target(rel: str, kind: str, style: str, sentinel: Path) -> str:
    """Where the hostile link at `rel` points: the sentinel, absolutely, relatively, or up a long `..` chain."""
    target = sentinel / ("dir" if kind == "dir" else "file")
    if rel == "root" or rel == "home" or rel.endswith("ssh") or rel == "etc":
        target = sentinel / ".ssh" if rel.endswith("ssh") else sentinel
    if rel.endswith(("passwd", "shadow", "group")):
        target = sentinel / "passwd"
    if style == "absolute":
        return str(target)
    up = "../" * rel.count("/")
    if style == "relative":  # from the image's root: one `..` per level, then the host's path
        return up + "../" * 12 + str(target).lstrip("/")
    return up + "../../.." + "/.." * 30 + str(target)  # a chain far past any root


def plant(tree: Path, hostile: Hostile, sentinel: Path) -> None:
    """Replace each of the hostile paths in a hard-link copy by its link (the copy's links
    are removed, never the shared files), and give the tree the sentinel's paths too."""
    for rel in hostile.links:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            store.remove_tree(path)  # the copy's links only: the shared files stay
        elif path.is_symlink() or path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(link_target(rel, (LEAVES | TOPS)[rel], hostile.style, sentinel))
    # The sentinel's paths inside the image too: the links resolve there when read from
    # inside, so each operation goes on; read from the host, they reach the sentinel.
    inside = tree / str(sentinel).lstrip("/")
    for path in sorted(sentinel.rglob("*")):
        copy = inside / path.relative_to(sentinel)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.mkdir() if path.is_dir() else copy.write_text("inside\n")


def build(hostile: Hostile, prepared: store.StoredImage, sentinel: Path) -> store.StoredImage:
    """The prepared image with the hostile links in place, committed under its own name."""
    with store.locked(f"image-{hostile.name}"), store.workdir("hostile") as work:
        tree = work / "rootfs"
        proc.run(["cp", "-al", str(prepared.rootfs), str(tree)], timeout=600)
        plant(tree, hostile, sentinel)
        config = {"config": {"Cmd": ["/bin/sleep", "infinity"], "Env": ["PATH=/usr/bin:/bin"]}}
        manifest = dict(prepared.manifest, name=hostile.name, **config)
        for key in ("digest", "size", "created", "source"):
            manifest.pop(key, None)
        return store.commit(hostile.name, tree, source=f"hostile:{hostile.name}", recipe="hostile", manifest=manifest)


def one_line_or_success(result: subprocess.CompletedProcess[str]) -> str | None:
    """None when the operation went as racker promises (success, or one error line); else what went wrong."""
    if result.returncode == 0:
        return None
    if "Traceback" in result.stderr or result.returncode not in (1, 2, 125):
        return f"exit {result.returncode}: {result.stderr[-1500:]}"
    return None


# prepare's host-side steps on one tree, as the CLI would run them (errors as the CLI shows
# them): the file writes before the package install, the resolv.conf save and restore around
# it, then configure(). Run by STEPS_SERVER in a forked process of its own per tree.
STEPS = """\
distro = distros.detect(root)
# The package manager (inside the container, from the network) is the prepare tests' business.
prepare.in_container = lambda *a, **k: types.SimpleNamespace(succeeded=False)
prepare._install(root, distro, prepare.packages_for(distro))
prepare.configure(root)
"""
# Imports racker once, then for each tree named on stdin forks a child that runs STEPS on it: a
# fresh process per tree, as `python -c` would be, without a Python start and racker's import
# each time (66 trees in the first case). Answers a JSON line per tree: the exit code and stderr.
STEPS_SERVER = """\
import json, os, sys, traceback, types
from pathlib import Path
from racker import prepare
from racker.store import distros
from racker.errors import RackerError
for line in sys.stdin:
    root = Path(line.rstrip("\\n"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 0
        try:
            exec(STEPS)
        except RackerError as err:
            print(err, file=sys.stderr)
            code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read, encoding="utf-8", errors="replace") as said:
        stderr = said.read()
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "stderr": stderr}), flush=True)
"""


class PrepareSteps:
    """The STEPS_SERVER child: run(tree) is the CompletedProcess of prepare's steps on `tree`."""

    def __enter__(self) -> PrepareSteps:
        self.server = subprocess.Popen(
            [sys.executable, "-c", f"STEPS = {STEPS!r}\n{STEPS_SERVER}"],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def run(self, tree: Path) -> subprocess.CompletedProcess[str]:
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(f"{tree}\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        if not answer:
            return subprocess.CompletedProcess(["prepare steps", str(tree)], -1, "", "the prepare steps' process died")
        said = json.loads(answer)
        return subprocess.CompletedProcess(["prepare steps", str(tree)], said["returncode"], "", said["stderr"])

    def __exit__(self, *exc: object) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        try:
            self.server.wait(60)
        finally:
            self.server.kill()
            self.server.wait()


def prepare_steps(
    steps: PrepareSteps, source: Path, hostile: Hostile | None = None, sentinel: Path | None = None
) -> tuple[str | None, bool]:
    """prepare's host-side steps on a copy of the image's tree (with `hostile`'s links planted)."""
    with store.workdir("hostile-prepare") as work:
        tree = work / "rootfs"
        proc.run(["cp", "-al", str(source), str(tree)], timeout=600)
        if hostile is not None and sentinel is not None:
            plant(tree, hostile, sentinel)
        result = steps.run(tree)
    return one_line_or_success(result), result.returncode == 0


def run_corpus(share_image, tmp_path: Path, corpus: list[Hostile] = CORPUS, more: bool = True, start: int = 0) -> dict:  # type: ignore[no-untyped-def]
    """Build each hostile image and run every operation on it; what each did to the sentinel.

    First prepare's steps on trees with one link each (a tree with many fails at its first
    refused write, before the deletions the issue found), then the corpus's images, each
    through promote in several formats and profiles, export and `racker check`."""
    sentinel = make_sentinel(tmp_path)
    prepared = share_image("debian-bookworm", prepared=True)
    found: dict = {"images": 0, "tried": 0, "succeeded": 0, "changed": [], "misbehaved": []}
    before = [tree_checksum(sentinel)]

    def record(name: str, label: str, problem: str | None, succeeded: bool) -> None:
        found["tried"] += 1
        found["succeeded"] += succeeded
        if problem:
            found["misbehaved"].append(f"{name} {label}: {problem}")
        if tree_checksum(sentinel) != before[0]:
            found["changed"].append(f"{name} {label}")
            store.remove_tree(sentinel)
            make_sentinel(tmp_path)
            before[0] = tree_checksum(sentinel)

    singles = [Hostile(f"one-{rel.replace('/', '-')}-{style}", (rel,), style) for rel in LEAVES | TOPS for style in ("absolute", "dotdot")]
    with PrepareSteps() as steps:
        for hostile in (singles if more else singles[:4]) if start == 0 else ():  # the prepare steps: with the first image
            found["images"] += 1
            record(hostile.name, "prepare", *prepare_steps(steps, prepared.rootfs, hostile, sentinel))
        out = tmp_path / "out"
        for index, hostile in enumerate(corpus, start):  # start: where `corpus` begins in CORPUS
            found["images"] += 1
            image = build(hostile, prepared, sentinel)
            record(hostile.name, "prepare", *prepare_steps(steps, image.rootfs))
            operations = operations_for(hostile, first=more and index == 0)
            if index < 3:
                operations["check"] = ["check", "{image}", "--results", "{out}.jsonl"]
            for label, argv in operations.items():
                result = racker(*[a.format(image=image.name, out=out) for a in argv], timeout=900)
                for leftover in tmp_path.glob("out*"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
                record(hostile.name, label, one_line_or_success(result), result.returncode == 0)
    return found


# One test per hostile image, so that xdist's workers share the corpus (about 40 s an image);
# the first carries prepare's steps on trees with one link each, and the extra formats.
@pytest.mark.parametrize("index", range(len(CORPUS)), ids=[hostile.name for hostile in CORPUS])
def test_hostile_images_never_reach_the_host(share_image, tmp_path: Path, index: int) -> None:  # type: ignore[no-untyped-def]
    found = run_corpus(share_image, tmp_path, CORPUS[index : index + 1], start=index)
    print(
        f"hostile images {found['images']}, operations tried {found['tried']} ({found['succeeded']} succeeded, "
        f"the others refused in one line), sentinel changes {len(found['changed'])}"
    )
    assert not found["changed"], "sentinel changed by: " + ", ".join(found["changed"]) + "\n" + "\n".join(found["misbehaved"])
    assert not found["misbehaved"], "\n".join(found["misbehaved"])
