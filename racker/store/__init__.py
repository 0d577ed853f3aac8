"""The content-addressed image store: locks, atomic writes, refs.

Layout under RACKER_HOME (default /var/lib/racker):
  images/<digest>/rootfs/        the root filesystem, never modified after import
  images/<digest>/manifest.json  what it is and where it came from, and the packages it holds
  refs/<name>.json               a name pointing at a digest, with its recipe key
  locks/<key>.lock               one flock per thing being built
  tmp/                           work in progress, renamed into place when complete
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from racker import files, proc, settings
from racker.errors import StoreError
from racker.store import packages


def home() -> Path:
    return settings.HOME.value()


def _dir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def parse_time(text: str) -> dt.datetime | None:
    """A time as now() writes it (one without a zone is UTC); None for anything else."""
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _lock_path(key: str, store_home: Path | None = None) -> Path:
    # Private: anyone who may open a lock file may flock it, and hold racker up forever.
    return private_dir((store_home or home()) / "locks") / f"{_safe(key)}.lock"


def narrow_umask() -> None:
    """Make nothing racker writes from here on writable by other users, whatever umask it was
    started with: the store is shared read-only, and what is root's alone is made so explicitly
    (private_dir, copy_private, proc.PRIVATE). Called where racker is entered (CLI, plugin)."""
    os.umask(os.umask(0o022) | 0o022)


def private_dir(path: Path) -> Path:
    """A directory only root may enter: made 0700 (mkdir's mode, which a umask can only
    narrow), or closed to group and others where an older racker left it open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o700)
    return path


def copy_private(source: Path, target: Path) -> None:
    """Copy a file to a new file that is 0600 from the start (a private key never has a moment
    with other modes). An existing target is replaced."""
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
        shutil.copyfileobj(data, out, 1 << 20)


@contextlib.contextmanager
def locked(key: str, *, shared: bool = False, store_home: Path | None = None) -> Iterator[None]:
    """A lock across processes, released when the holder exits, even by kill -9.

    Exclusive unless `shared`: any number of shared holders, or one exclusive.
    `store_home`: another store's lock (default: this store's).
    """
    with open(_lock_path(key, store_home), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked_if_free(key: str) -> Iterator[bool]:
    """`key`'s exclusive lock if nobody holds it; yields whether it was taken."""
    with open(_lock_path(key), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, data: object) -> None:
    """Write a JSON file atomically: a temp file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _safe(name: str) -> str:
    return urllib.parse.quote(name, safe="-_.")


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory inside the store (same filesystem, so renames are atomic).

    Removed on the way out, whatever happens; `gc` removes any that a kill -9 left.
    The directory itself is flocked while its owner lives, and it appears in
    tmp/ only once locked: it is made in tmp/.new under a name that says who
    made it (stale_workdir() reads it), locked, then renamed into tmp/.
    """
    me = os.getpid()
    new = Path(tempfile.mkdtemp(dir=_dir("tmp/.new"), prefix=f"{me}.{proc.start_time(me)}.{proc.boot_id()}.{prefix}."))
    fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = new.parent.parent / new.name.split(".", 3)[3]
        os.rename(new, path)
        try:
            yield path
        finally:
            remove_outputs(path)
            remove_tree(path)
    except BaseException:
        remove_tree(new)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def stale_workdir(path: Path) -> Iterator[bool]:
    """Hold `path`'s workdir lock if its owner is gone; yields whether it was taken.

    In tmp/.new, where a workdir is not locked yet, the owner is the process
    its name records (pid, start time, boot id).
    """
    if path.parent.name == ".new":
        pid, started, boot, _rest = [*path.name.split(".", 3), "", "", ""][:4]
        if pid.isdigit() and started.isdigit() and proc.alive(int(pid), int(started), boot):
            yield False
            return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


OUTPUTS = ".outputs"  # in a workdir: files outside the store it is writing, one path a line


def record_output(work: Path, path: Path) -> None:
    """Note, before it is made, a file `work`'s owner writes outside the store
    (a promote's OUT.partial), so that gc can remove it if the owner is killed."""
    with open(work / OUTPUTS, "a") as handle:
        handle.write(f"{path.absolute()}\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def output_file(work: Path, path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (recorded in the workdir `work`, so gc finds it if we are
    killed), renamed onto `path` when the block succeeds and removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        partial = path.with_name(f".{path.name}.{os.urandom(4).hex()}.partial")
        record_output(work, partial)  # before it exists: a kill at any point leaves nothing gc cannot find
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            break
        except FileExistsError:
            continue
    try:
        yield partial
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def remove_outputs(work: Path) -> list[Path]:
    """Remove the unfinished outputs a workdir recorded; only `.partial` files, never anything else."""
    removed = []
    try:
        lines = (work / OUTPUTS).read_text().splitlines()
    except FileNotFoundError:
        return removed
    for line in lines:
        path = Path(line)
        if path.is_absolute() and path.name.endswith(".partial") and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """Delete a tree even where read-only directories would stop rmtree."""

    def make_writable(func, target, _exc):  # type: ignore[no-untyped-def]
        parent = os.path.dirname(target)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR)
        func(target)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=make_writable)


def tree_digest(root: Path) -> str:
    """sha256 over every path, its type, mode, owner, and content or link target."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            digest.update(f"{rel}\0{info.st_mode:o}\0{info.st_uid}:{info.st_gid}\0".encode())
            if stat.S_ISREG(info.st_mode):
                with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as handle:  # never a link's target
                    digest.update(hashlib.file_digest(handle, "sha256").digest())
            elif stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                digest.update(f"{info.st_rdev}".encode())
            digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(os.path.join(dirpath, name))
                total += info.st_blocks * 512
    return total


@dataclass
class StoredImage:
    """An image in the store, as `racker images` lists it."""

    name: str
    digest: str
    source: str
    created: str
    size: int
    recipe: str = ""
    manifest: dict = field(default_factory=dict)
    # Fixed when found, so the image stays where it was even if RACKER_HOME changes.
    path: Path = field(default=Path(), compare=False)

    def __post_init__(self) -> None:
        if self.path == Path():
            self.path = image_dir(self.digest)

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def short_digest(self) -> str:
        return self.digest.split(":", 1)[-1][:12]

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "digest": self.digest,
            "source": self.source,
            "created": self.created,
            "size": self.size,
        }


def image_dir(digest: str) -> Path:
    return home() / "images" / digest.replace(":", "-")


def ref_path(name: str) -> Path:
    return home() / "refs" / f"{_safe(name)}.json"


def lookup(name: str) -> StoredImage | None:
    """The image a name points at, or None if the name or its image is missing."""
    try:
        ref = json.loads(ref_path(name).read_text())
    except FileNotFoundError:
        return None
    directory = image_dir(ref["digest"])
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        return None
    # What this name was made as (its config, source, prepare record): the image
    # directory's manifest is only that of the first name to commit the content.
    manifest = ref.get("manifest", manifest)
    return StoredImage(
        name=name,
        digest=ref["digest"],
        source=ref.get("source", ""),
        created=ref.get("created", ""),
        size=manifest.get("size", 0),
        recipe=ref.get("recipe", ""),
        manifest=manifest,
        path=directory,
    )


def images() -> list[StoredImage]:
    found = []
    refs = home() / "refs"
    if refs.is_dir():
        for path in sorted(refs.glob("*.json")):
            image = lookup(urllib.parse.unquote(path.stem))
            if image is not None:
                found.append(image)
    return found


def commit(name: str, rootfs: Path, *, source: str, recipe: str, manifest: dict) -> StoredImage:
    """Move a finished rootfs into the store under its digest and point `name` at it.

    `rootfs` must be inside a store workdir. The caller holds the lock for `name`.
    """
    digest = tree_digest(rootfs)
    size = tree_size(rootfs)
    target = image_dir(digest)
    created = now()
    # What its own package databases list, read now (a manifest handed down, e.g. by prepare, lists the image it came from).
    named = dict(manifest, digest=digest, size=size, source=source, created=created, packages=packages.read(rootfs))
    with locked(SWEEP_LOCK, shared=True):
        if not target.exists():
            staging = rootfs.parent / "image"
            staging.mkdir()
            os.rename(rootfs, staging / "rootfs")
            write_json(staging / "manifest.json", named)
            _dir("images")
            _into_place(staging, target)
        write_json(ref_path(name), {"digest": digest, "source": source, "recipe": recipe, "created": created, "manifest": named})
    image = lookup(name)
    assert image is not None
    return image


def name_image(name: str, image: StoredImage, *, source: str, recipe: str, manifest: dict) -> StoredImage:
    """Point `name` at an image already in the store (no copy): what commit() does
    once the rootfs is in place. The caller holds the lock for `name`."""
    created = now()
    named = dict(manifest, digest=image.digest, size=image.size, source=source, created=created)
    # The content's packages, never those of a manifest handed down.
    named["packages"] = image.manifest["packages"] if "packages" in image.manifest else packages.read(image.rootfs)
    with locked(SWEEP_LOCK, shared=True):
        if not image.rootfs.is_dir():
            raise StoreError(f"image {image.name} ({image.digest[:19]}) is gone from the store", hint="pull or prepare it again")
        write_json(ref_path(name), {"digest": image.digest, "source": source, "recipe": recipe, "created": created, "manifest": named})
    found = lookup(name)
    assert found is not None
    return found


def mark_checked(name: str, upstream: dict) -> StoredImage:
    """Record that `name`'s upstream was asked again and had not moved (`upstream`: state, checked,
    reached): only its ref changes, never the image. The caller holds the lock for `name`."""
    with locked(SWEEP_LOCK, shared=True):
        path = ref_path(name)
        ref = json.loads(path.read_text())
        named = ref.get("manifest") or json.loads((image_dir(ref["digest"]) / "manifest.json").read_text())
        ref["manifest"] = dict(named, upstream=upstream)
        write_json(path, ref)
    image = lookup(name)
    if image is None:
        raise StoreError(f"image {name!r} is gone from the store", hint=f"run: racker pull {name}")
    return image


def remove(name: str) -> StoredImage:
    """Drop a name; drop its image too when no other name points at it.

    Under the sweep lock, so that an image a copy is reading (reading()) or a
    commit is naming stays until they are done.
    """
    with locked(SWEEP_LOCK):
        image = lookup(name)
        if image is None:
            raise StoreError(f"no image named {name!r} in the store", hint="see `racker images`")
        ref_path(name).unlink()
        if not any(other.digest == image.digest for other in images()):
            drop_image(image.path)
    return image


# Held shared while a commit links a name to an image or while an image is
# copied out (reading()); exclusive while gc removes images no name links to,
# so it never takes one a commit is about to name or a copy is reading.
SWEEP_LOCK = "store-sweep"
_DIGEST_NAME = re.compile(r"^sha256-[0-9a-f]{64}")


@contextlib.contextmanager
def reading(image: StoredImage) -> Iterator[Path]:
    """The image's rootfs, which gc leaves alone until the block ends (copy it out in there).

    A name can be rebuilt while its old image is being copied; gc would then
    remove an image no name links to from under the copy.
    """
    with locked(SWEEP_LOCK, shared=True):
        if not image.rootfs.is_dir():
            raise StoreError(f"image {image.name} ({image.digest[:19]}) is gone from the store", hint="pull or prepare it again")
        yield image.rootfs


def drop_image(path: Path) -> None:
    """Delete an image directory and the disks promoted from it (promote.cached_disk).

    The caller holds SWEEP_LOCK exclusively. The image is first renamed into a
    locked workdir, so that a crash mid-delete never leaves a half image under
    its digest, and gc can finish the job.
    """
    disks = home() / "disks"
    if disks.is_dir():
        for disk in disks.glob(f"{path.name}-*"):
            disk.unlink()
    with workdir("rmi") as doomed:
        os.rename(path, doomed / "image")


def digest_of(path: Path) -> str | None:
    """The digest an image directory or a cached disk is named after, if it is."""
    match = _DIGEST_NAME.match(path.name)
    return match.group().replace("-", ":", 1) if match else None


def link_from(other_home: Path, name: str) -> StoredImage:
    """Put the image `name` of the store at `other_home` into this one, by hard links:
    no copy, no rebuild. Safe because a store image is never written in place."""
    ref = json.loads((other_home / "refs" / ref_path(name).name).read_text())
    source = other_home / "images" / image_dir(ref["digest"]).name
    target = image_dir(ref["digest"])
    # Both stores' gc wait: the other's while its image is read (as reading() does),
    # this one's until the name links the new image (as commit() does).
    with locked(SWEEP_LOCK, shared=True, store_home=other_home), locked(SWEEP_LOCK, shared=True):
        _link_image(source, target)
        write_json(ref_path(name), ref)
    image = lookup(name)
    if image is None:
        raise StoreError(f"image {name!r} did not arrive from {other_home}")
    return image


def _link_image(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise StoreError(f"{source} is gone from its store")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with workdir("link") as work:
            # Not systemd-nspawn's lock files beside a rootfs: they come and go while a
            # machine of the image boots, and cp fails on one gone between listing and linking.
            members = [str(p) for p in source.iterdir() if not (p.name.startswith(".#") and p.name.endswith(".lck"))]
            staging = work / "image"
            staging.mkdir()
            st = source.stat()
            os.chown(staging, st.st_uid, st.st_gid)
            os.chmod(staging, st.st_mode & 0o7777)
            if members:
                # cp -al keeps directories' owners and modes (a rootfs has directories of other users).
                proc.run(["cp", "-al", *members, str(staging)], timeout=600)
            _into_place(staging, target)


def _into_place(staging: Path, target: Path) -> None:
    """Rename a finished image directory onto its digest's path; fine if another
    process put the same content there first (ours then goes with its workdir)."""
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
            raise


def unreferenced(keep: set[str]) -> Iterator[Path]:
    """Image directories and cached disks whose digest no name links to and `keep` lacks.

    The caller holds SWEEP_LOCK exclusively.
    """
    linked = {image.digest for image in images()} | keep
    for kind in ("images", "disks"):
        directory = home() / kind
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                digest = digest_of(path)
                if digest and digest not in linked:
                    yield path
