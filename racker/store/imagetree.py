"""Paths inside an image's root tree, opened from inside: the image's links never lead out.

racker works on images from strangers as root. An image may hold `var/lib/apt/lists`
as a link to `/root/.ssh`, or `etc -> ../../../..`; pathlib on the host follows
such links and reads, writes or deletes host files. Every host-side operation on
an image tree goes through a Tree instead: a path is resolved as the image itself
would resolve it with the tree as its `/` (absolute links start at the tree's
root, `..` stops there), with openat2(2)'s RESOLVE_IN_ROOT where the kernel has
it, else a component-by-component walk with O_PATH|O_NOFOLLOW.

Reads follow links (inside the tree); writes, unlinks, removals, chmod and chown
act on the last component itself and never through a link there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

# openat2(2): x86_64's syscall number; struct open_how {u64 flags, mode, resolve}.
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
MAX_LINKS = 40  # as the kernel's own limit on links in one lookup


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE  # O_TMPFILE holds O_DIRECTORY's bit
    how = struct.pack("QQQ", flags, mode if creates else 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    for _attempt in range(16):  # EAGAIN: a rename elsewhere raced the lookup; the kernel asks to retry
        fd = _libc().syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), how, len(how))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EINTR):
            raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


@functools.cache
def has_openat2() -> bool:
    """Whether this kernel (and its seccomp filter) lets racker use openat2 with RESOLVE_IN_ROOT."""
    if os.uname().machine != "x86_64":
        return False
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(_openat2(root, ".", os.O_PATH | os.O_DIRECTORY))
    except OSError:  # ENOSYS before Linux 5.6, EPERM under a seccomp filter that does not know it
        return False
    finally:
        os.close(root)
    return True


def _parts(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p not in ("", ".")]


class Tree:
    """An image's root directory; every method takes a path relative to it (a leading / is the tree's root)."""

    def __init__(self, root: Path | str, *, use_openat2: bool | None = None) -> None:
        self.root = Path(root)
        self._openat2 = has_openat2() if use_openat2 is None else use_openat2

    def __repr__(self) -> str:
        return f"Tree({str(self.root)!r})"

    # -- resolving ---------------------------------------------------------

    def _root_fd(self) -> int:
        return os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """A file descriptor for `rel`, links followed inside the tree (the caller closes it).

        O_NOFOLLOW in `flags` leaves a link as the last component unfollowed (ELOOP)."""
        flags |= os.O_CLOEXEC
        root = self._root_fd()
        try:
            if self._openat2:
                return _openat2(root, "/".join(_parts(rel)) or ".", flags, mode)
            return self._walk_open(root, rel, flags, mode)
        finally:
            os.close(root)

    def _walk_open(self, root: int, rel: str, flags: int, mode: int) -> int:
        """openat2's RESOLVE_IN_ROOT, by hand: one component at a time, each opened O_PATH|O_NOFOLLOW;
        a link's target is walked from the root (absolute) or from where it sits, `..` stops at the root."""
        stack = [os.dup(root)]  # the directories walked into; `..` pops, never past the root
        todo = _parts(rel)
        links = 0
        try:
            if not todo:
                return os.open(".", flags, mode, dir_fd=stack[-1])
            while todo:
                name = todo.pop(0)
                if name == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    if not todo:
                        return os.open(".", flags, mode, dir_fd=stack[-1])
                    continue
                last = not todo
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                except FileNotFoundError:
                    if last and flags & os.O_CREAT:
                        return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
                    raise
                info = os.fstat(fd)
                if stat.S_ISLNK(info.st_mode) and not (last and flags & os.O_NOFOLLOW):
                    os.close(fd)
                    if flags & os.O_CREAT and flags & os.O_EXCL and last:
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), rel)
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                    target = os.readlink(name, dir_fd=stack[-1])
                    if target.startswith("/"):
                        for extra in stack[1:]:
                            os.close(extra)
                        del stack[1:]
                    todo = _parts(target) + todo
                    if not todo:  # a link to the root itself
                        return os.open(".", flags, mode, dir_fd=stack[-1])
                    continue
                if last:
                    os.close(fd)
                    return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
                if not stat.S_ISDIR(info.st_mode):
                    os.close(fd)
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
                stack.append(fd)
            raise AssertionError("unreachable")
        finally:
            for fd in stack:
                os.close(fd)

    @contextlib.contextmanager
    def _fd(self, rel: str, flags: int = os.O_PATH) -> Iterator[int]:
        fd = self.open(rel, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """The directory holding `rel` (resolved inside) and the last component's name."""
        parts = _parts(rel)
        if not parts or parts[-1] == "..":
            raise IsADirectoryError(errno.EISDIR, "not a name inside the tree", rel)
        with self._fd("/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY) as fd:
            try:
                yield fd, parts[-1]
            except OSError as error:
                if error.filename == parts[-1]:  # an *at call names the last component only
                    error.filename = "/".join(parts)
                raise

    # -- reading -------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        with self._fd(rel, os.O_RDONLY | os.O_NONBLOCK) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # never a device, FIFO or socket of the image's
                raise OSError(errno.EINVAL, "not a regular file", rel)
            os.set_blocking(fd, True)
            with os.fdopen(os.dup(fd), "rb") as handle:
                return handle.read()

    def read_text(self, rel: str, errors: str = "strict") -> str:
        return self.read_bytes(rel).decode("utf-8", errors)

    def stat(self, rel: str) -> os.stat_result:
        with self._fd(rel) as fd:
            return os.fstat(fd)

    def lstat(self, rel: str) -> os.stat_result:
        with self._parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def _mode(self, rel: str, follow: bool = True) -> int | None:
        try:
            return (self.stat(rel) if follow else self.lstat(rel)).st_mode
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                return None
            raise

    def exists(self, rel: str) -> bool:
        return self._mode(rel) is not None

    def lexists(self, rel: str) -> bool:
        return self._mode(rel, follow=False) is not None

    def is_file(self, rel: str) -> bool:
        mode = self._mode(rel)
        return mode is not None and stat.S_ISREG(mode)

    def is_dir(self, rel: str) -> bool:
        mode = self._mode(rel)
        return mode is not None and stat.S_ISDIR(mode)

    def is_symlink(self, rel: str) -> bool:
        mode = self._mode(rel, follow=False)
        return mode is not None and stat.S_ISLNK(mode)

    def readlink(self, rel: str) -> str:
        with self._parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def resolve(self, rel: str) -> str:
        """Where `rel` leads, links followed inside the tree: a path relative to the root."""
        with self._fd(rel) as fd:
            where = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return where.relative_to(self.root.resolve()).as_posix()

    def listdir(self, rel: str = "") -> list[str]:
        """The names in a directory (sorted); [] when it is missing or not a directory."""
        try:
            with self._fd(rel, os.O_RDONLY | os.O_DIRECTORY) as fd:
                return sorted(os.listdir(fd))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (fnmatch wildcards in any component; no `**`), sorted."""
        found = [""]
        for part in _parts(pattern):
            step = []
            for base in found:
                names = self.listdir(base) if any(c in part for c in "*?[") else [part]
                for name in names:
                    if fnmatch.fnmatchcase(name, part):  # as pathlib: `*` matches dot files too
                        rel = f"{base}/{name}" if base else name
                        if self.lexists(rel):
                            step.append(rel)
            found = step
        return sorted(found)

    def walk_files(self, rel: str) -> Iterator[str]:
        """Every non-directory under `rel`, links not followed (relative paths)."""
        for name in self.listdir(rel):
            child = f"{rel}/{name}"
            if self.is_dir(child) and not self.is_symlink(child):
                yield from self.walk_files(child)
            else:
                yield child

    @contextlib.contextmanager
    def path_for_tool(self, rel: str) -> Iterator[Path]:
        """A path an external tool can open that is `rel` as resolved inside the tree: this
        process's descriptor of it, under /proc (a child's own /proc/self would not have it)."""
        with self._fd(rel, os.O_RDONLY) as fd:
            yield Path(f"/proc/{os.getpid()}/fd/{fd}")

    # -- writing -------------------------------------------------------------

    def mkdir(self, rel: str, mode: int = 0o755, *, parents: bool = True) -> None:
        """Make the directory (and, with parents, those above it) inside the tree; fine if it is there."""
        parts = _parts(rel)
        for i in range(0 if parents else len(parts) - 1, len(parts)):
            sub = "/".join(parts[: i + 1])
            if self.is_dir(sub):
                continue
            with self._parent(sub) as (fd, name):
                try:
                    os.mkdir(name, mode if i == len(parts) - 1 else 0o755, dir_fd=fd)
                except FileExistsError:
                    if not self.is_dir(sub):
                        raise

    def write_bytes(self, rel: str, data: bytes, mode: int = 0o644, *, parents: bool = True) -> None:
        """Put a new file at `rel`: written under a fresh name beside it, then renamed over.

        What was there (a link, or a hard link to the store) is never opened for writing."""
        if parents:
            self.mkdir(os.path.dirname(rel.strip("/")))
        with self._parent(rel) as (fd, name):
            for attempt in range(100):
                tmp = f".{name}.{os.getpid()}.{attempt}.new"
                try:
                    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(errno.EEXIST, "no free temporary name", rel)
            try:
                with os.fdopen(out, "wb") as handle:
                    handle.write(data)
                    os.fchmod(handle.fileno(), mode)
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=fd)
                raise

    def write_text(self, rel: str, text: str, mode: int = 0o644, *, parents: bool = True) -> None:
        self.write_bytes(rel, text.encode(), mode, parents=parents)

    def symlink(self, target: str, rel: str, *, replace: bool = False) -> None:
        """A link at `rel` to `target` (which is the image's business: it is never followed here)."""
        with self._parent(rel) as (fd, name):
            if replace:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
            os.symlink(target, name, dir_fd=fd)

    def unlink(self, rel: str, *, missing_ok: bool = False) -> None:
        """Remove a file or a link (the link itself, never what it points at)."""
        try:
            with self._parent(rel) as (fd, name):
                os.unlink(name, dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            if not missing_ok:
                raise

    def rmtree(self, rel: str) -> None:
        """Remove `rel` and everything under it, links never followed; nothing if it is missing."""
        try:
            with self._parent(rel) as (fd, name):
                _remove_at(fd, name)
        except (FileNotFoundError, NotADirectoryError):
            pass

    def _nofollow_fd(self, rel: str) -> contextlib.AbstractContextManager[int]:
        """The last component itself, opened for chmod/chown: a regular file or a directory, never a link."""
        with self._parent(rel) as (fd, name):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise OSError(errno.EINVAL, "not a file or a directory", rel)
            handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        return _closing(handle)

    def chmod(self, rel: str, mode: int) -> None:
        with self._nofollow_fd(rel) as fd:
            os.fchmod(fd, mode)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        with self._parent(rel) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        with self._nofollow_fd(rel) as fd:
            os.utime(fd, ns=ns)


@contextlib.contextmanager
def refused(error: Callable[[str], Exception], what: str) -> Iterator[None]:
    """An OSError from working on an image's tree (a link where a directory must be, a name
    that is a directory) as `error`: one line saying what could not be done, and to which path."""
    try:
        yield
    except OSError as failed:
        where = f" /{str(failed.filename).lstrip('/')}" if failed.filename else ""
        raise error(f"{what}: the image's{where} cannot be used: {failed.strerror or failed}") from None


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _remove_at(dir_fd: int, name: str) -> None:
    """Unlink `name` in `dir_fd`, or, if it is a directory, empty it through its own descriptor first."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except IsADirectoryError:
        pass
    except PermissionError:  # EPERM: unlink(2) of a directory
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            _remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
