"""Fixtures shared by racker's own tests."""

from __future__ import annotations

import contextlib
import os
import socketserver
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from racker import settings

# The store racker's tests share (catalogue images built once, kept between runs): a
# store of the tests' own, never a user's /var/lib/racker, so that the suite can run
# beside a user's racker. Every racker the tests start inherits it. Tests that change
# a store use a private one (private_store) instead.
SHARED_HOME = settings.TEST_HOME.value()
os.environ["RACKER_HOME"] = str(SHARED_HOME)
# racker's own boots run only the cloud-init modules its seed needs (seed.MINIMAL_MODULES):
# the images keep cloud-init's full module set; the boot speed comes from the test seed.
os.environ["RACKER_SEED_MODULES"] = "minimal"

ROOT = Path(__file__).resolve().parent
CATALOG_IMAGES = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie"]

# A small image for tests of the store itself: Essential packages only, ~10 s to build.
TINY_ENTRY = """\
description = "Debian bookworm, Essential packages only (racker's store tests)"
source = "bootstrap:debian/bookworm"
variant = "essential"
packages = []
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, leave out the tests that lower a host-wide limit: another worker's
    boot in that moment would fail. README's test command runs them alone afterwards."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    hostwide = [item for item in items if item.get_closest_marker("hostwide")]
    if hostwide:
        config.hook.pytest_deselected(items=hostwide)
        items[:] = [item for item in items if not item.get_closest_marker("hostwide")]


def racker(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the racker command line for real, in a separate process: this checkout's racker,
    whatever the current directory (the venv's editable install may be another checkout)."""
    return subprocess.run(
        [sys.executable, "-m", "racker", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def racker_here(*args: str) -> subprocess.CompletedProcess[str]:
    """racker's command line run in this process, in the environment the test set: as racker()
    returns it, without starting a Python per case. For many cases of one error path; a test of
    the real command (racker()) stays beside them."""
    import contextlib
    import io

    from racker import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(["racker", *args], code, out.getvalue(), err.getvalue())


def pulled(reference: str):  # type: ignore[no-untyped-def]
    """`racker pull REFERENCE` through the CLI, which must succeed: the stored image."""
    from racker import store

    result = racker("pull", reference)
    assert result.returncode == 0, result.stderr
    image = store.lookup(reference)
    assert image is not None
    return image


def passes_checks(reference: str, env: dict[str, str] | None = None) -> list[dict]:
    """`racker check REFERENCE`: the image boots under nspawn and passes every one of
    racker.checks (a skip is not a pass, but for the full-boot checks, which need a VM).
    Returns the test records."""
    import tempfile

    from racker.report.results import read_tests

    with tempfile.TemporaryDirectory(prefix="racker-test-check-") as tmp:
        results = Path(tmp) / "results.jsonl"
        done = racker("check", reference, "--results", str(results), env=env)
        records = read_tests(results) if results.exists() else []
    container = [r for r in records if "test_vm.py" not in r["nodeid"]]
    failed = {r["check"]: f"{r['outcome']}: {r['message']}" for r in container if r["outcome"] != "pass"}
    failed.update({r["check"]: f"{r['outcome']}: {r['message']}" for r in records if r not in container and r["outcome"] != "skip"})
    assert done.returncode == 0 and container and not failed, f"{failed or 'no results'}\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
    assert {r["image"] for r in records} == {reference}
    return records


@pytest.fixture
def private_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A store of its own and a catalogue holding the `tiny` image, for tests that change the store."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "tiny.toml").write_text(TINY_ENTRY)
    env = {"RACKER_HOME": str(tmp_path / "store"), "RACKER_CATALOG": str(catalog)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def share_image(private_store: dict[str, str]):
    """share_image(name, prepared=False, kernel=...) -> StoredImage: a catalogue image (prepared:
    with the cloud kernel, or `kernel`), built in the shared store if missing, put into the
    private store by hard links (no rebuild).

    Safe because nothing ever writes a store image in place: both stores only read it.
    """
    from racker import images, prepare, store

    def share(name: str, *, prepared: bool = False, kernel: str = prepare.CLOUD_KERNEL) -> store.StoredImage:
        private = os.environ["RACKER_HOME"]
        os.environ["RACKER_HOME"] = str(SHARED_HOME)
        try:
            image = images.pull(name)
            if prepared:
                image = prepare.prepare(image, kernel=kernel)
        finally:
            os.environ["RACKER_HOME"] = private
        found = store.link_from(SHARED_HOME, image.name)
        assert found.digest == image.digest
        return found

    return share


def loop_devices(*roots: Path | str) -> list[str]:
    """The host's loop devices whose backing files lie under `roots`, as "DEVICE FILE" lines.

    A leak check compares these before and after, never all of `losetup -a`: another
    worker's loop devices come and go meanwhile (a race that turned tests red at -n 4)."""
    listed = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    prefixes = [str(Path(root).resolve()) + "/" for root in roots]
    return sorted(line for line in listed.splitlines() if any(p in line for p in prefixes))


def tree_snapshot(root: Path, skip: tuple[str, ...] = (), *, times: bool = False) -> dict[str, tuple]:
    """Every path under `root` but those under `skip` (relative to root): type and mode, owner,
    content digest or link target, and with `times` the mtime. What a test compares before and
    after (it must not change), or between a tree and its copy."""
    import hashlib
    import stat

    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            info = os.lstat(path)
            content = ""
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    content = hashlib.file_digest(handle, "sha256").hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            found[rel] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid, content, *((info.st_mtime_ns,) if times else ()))
    return found


def tree_checksum(top: Path) -> str:
    """Names, kinds, modes, owners, times, link targets and contents of everything under `top`:
    a sentinel tree's fingerprint, which anything racker wrongly did to it changes."""
    import hashlib
    import stat

    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            info = path.lstat()
            digest.update(f"{path.relative_to(top)}\0{info.st_mode:o}\0{info.st_uid}:{info.st_gid}\0{info.st_mtime_ns}\0".encode())
            if stat.S_ISREG(info.st_mode):
                digest.update(path.read_bytes())
            elif stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(path).encode())
    return digest.hexdigest()


# -- VMs that only hang, and what a VM leaves behind ------------------------------

# 16-bit real mode: print "racker-hang" on COM1, then halt forever: a disk QEMU boots at once and that never answers.
# xor ax,ax; mov ds,ax; cld; mov dx,0x3f8; mov si,msg; mov cx,12; lodsb; out dx,al; loop; cli; hlt; jmp $-1
_HANG_CODE = bytes.fromhex("31c08ed8fc" "baf803" "be1e7c" "b90c00" "acee" "e2fc" "faf4ebfd")  # fmt: skip
HANG_SECTOR = (_HANG_CODE + bytes(0x1E - len(_HANG_CODE)) + b"racker-hang\n").ljust(446, b"\0") + bytes(64) + b"\x55\xaa"


def write_hang_disk(path: Path) -> Path:
    """A 1 MiB raw disk that boots to HANG_SECTOR's message and hangs."""
    path.write_bytes(HANG_SECTOR + bytes(1024 * 1024 - 512))
    return path


@pytest.fixture
def hang_disk(tmp_path: Path) -> Path:
    return write_hang_disk(tmp_path / "hang.raw")


def qemu_pids(name: str) -> set[int]:
    """The QEMU processes of the VM called `name` (QEMU runs with -name NAME,…).

    Only this VM's: tests on other xdist workers run VMs of their own meanwhile.
    """
    found = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name {name},"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def assert_vm_gone(name: str) -> None:
    """Nothing of the VM called `name` is left: no registry record, no run directory, no QEMU (given 10 s to exit)."""
    from racker import machines

    assert machines.load("qemu", name) is None, "registry record left"
    assert not machines.run_dir("qemu", name).exists(), "run directory (overlay, seed, sockets) left"
    deadline = time.monotonic() + 10
    while qemu_pids(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not qemu_pids(name), "a QEMU process was left running"


# -- the run's one real first boot of debian-bookworm's VM disk, shared ------------------


def bookworm_vm_disk() -> Path:
    """debian-bookworm's +vm disk (prepared, promoted), built once in the shared store."""
    from racker import images, prepare, promote

    with in_store(SHARED_HOME):
        return promote.cached_disk(prepare.prepare(images.pull("debian-bookworm")))


@contextlib.contextmanager
def in_store(home: Path) -> Iterator[None]:
    """RACKER_HOME is `home` inside the block, and what it was again after."""
    was = os.environ.get("RACKER_HOME")
    os.environ["RACKER_HOME"] = str(home)
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("RACKER_HOME")
        else:
            os.environ["RACKER_HOME"] = was


@contextlib.contextmanager
def started_at_once(vms: list) -> Iterator[list[float]]:  # type: ignore[type-arg]
    """Start the VMs together, one thread each; yields their start-to-ready seconds, stops them after.

    The threads live until the VMs are stopped: QEMU and the SSH master die with
    the thread that started them (PR_SET_PDEATHSIG is per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    def start(vm) -> float:  # type: ignore[no-untyped-def]
        vm.start()
        return vm.boot_seconds

    pool = ThreadPoolExecutor(len(vms))
    try:
        yield list(pool.map(start, vms))
    finally:
        for vm in vms:
            vm.stop()
        pool.shutdown()


def _first_boot(home: Path) -> dict:
    """Two warm VMs of debian-bookworm's disk started at once in an empty store: one boots
    cold and saves the disk's snapshot, the other waits on the key's lock and restores it.
    What test_vm_warm asserts about that boot, as plain data; both VMs are stopped."""
    from racker.vm import snapshots
    from racker.vm.qemu import VM

    disk = bookworm_vm_disk()
    with in_store(home):
        first = [VM(disk, warm=True) for _ in range(2)]
        with started_at_once(first) as seconds:
            identity = ["cat", "/etc/machine-id", "/etc/ssh/ssh_host_ed25519_key.pub"]
            facts = {
                "disk": str(disk),
                "home": str(home),
                "seconds": seconds,
                "restored_from": [vm.restored_from for vm in first],
                "saved": [s.id for s in snapshots.all_snapshots()],
                # After the save the cold VM runs on, on a new connection.
                "identities": [vm.check_output(identity) for vm in first],
                "names": [vm.name for vm in first],
                "hostnames": [vm.hostname for vm in first],
            }
    return facts


@pytest.fixture(scope="session")
def first_boot(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """This run's one real first boot of debian-bookworm's VM disk and the snapshot it saved
    (see _first_boot), for every test that needs a warm VM of that disk (warm_store).

    One per run, however many xdist workers: it is made in the run's temporary directory
    (the workers' basetemps' parent), by the first worker that asks, under a lock there; the
    others wait and read what it wrote. Never kept between runs: tests/test_vm_warm.py is
    about this cold boot and its save, so every run has one."""
    import json

    from racker import store

    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "first-boot"
    directory.mkdir(exist_ok=True)
    record = directory / "facts.json"
    with store.locked("first-boot", store_home=directory):
        if not record.exists():
            try:
                facts = _first_boot(directory / "store")
            except Exception as error:  # told to the other workers, which would only fail again, later
                record.write_text(json.dumps({"failed": f"{type(error).__name__}: {error}"}))
                raise
            record.write_text(json.dumps(facts))
    facts = json.loads(record.read_text())
    if "failed" in facts:
        pytest.fail(f"the run's first boot of debian-bookworm failed (on another worker): {facts['failed']}")
    assert len(facts["saved"]) == 1, f"the first boot saved no snapshot, or more than one: {facts}"
    return facts


def warm_store(home: Path, first_boot: dict):  # type: ignore[no-untyped-def]
    """The run's snapshot of debian-bookworm's disk (first_boot), hard-linked into the store
    at `home`, where a warm VM of that disk restores it: the snapshot, as read there.

    Linked, not copied: nothing writes a snapshot's files (a restore's overlay is a new file
    backed by the frozen one). Copied only where the two stores are on different filesystems."""
    import errno
    import shutil

    from racker import store
    from racker.vm import snapshots

    (snapshot_id,) = first_boot["saved"]
    source = Path(first_boot["home"]) / "snapshots" / snapshot_id
    target = store.private_dir(home / "snapshots") / snapshot_id
    target.mkdir(mode=0o700)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            shutil.copy2(path, target / path.name)
    found = snapshots.read(target)
    assert found is not None, f"{source} is not a snapshot"
    return found


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_registry(address: str, home: Path, *, deletable: bool = False) -> Iterator[str]:
    """Debian's docker-registry on ADDRESS and a free port, plain HTTP, storing under HOME: yields "ADDRESS:PORT"."""
    import time
    import urllib.request

    port = free_port()
    config = home / "config.yml"
    delete = "  delete:\n    enabled: true\n" if deletable else ""
    config.write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {home / 'data'}\n"
        f"{delete}http:\n  addr: {address}:{port}\n"
    )
    server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}:{port}/v2/", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {server.stderr.read().decode()}") from None  # type: ignore[union-attr]
                time.sleep(0.05)
        yield f"{address}:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real registry (Debian's docker-registry) on a free 127.0.0.1 port: yields "127.0.0.1:PORT"."""
    with running_registry("127.0.0.1", tmp_path_factory.mktemp("registry"), deletable=True) as address:
        yield address


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """podman's Docker-compatible API on a unix socket, with a storage of its own: yields DOCKER_HOST."""
    import tempfile
    import time

    home = tmp_path_factory.mktemp("podman")
    socket_path = home / "podman.sock"
    runroot = tempfile.mkdtemp(prefix="podman-", dir="/tmp")  # podman refuses a runroot over 50 characters
    # runc, not crun: crun refuses hosts with the hybrid cgroup layout (this one) to run a build's RUN steps.
    argv = ["podman", "--root", str(home / "root"), "--runroot", runroot, "--storage-driver", "vfs", "--runtime", "runc"]
    server = subprocess.Popen([*argv, "system", "service", "--time=0", f"unix://{socket_path}"], stderr=subprocess.PIPE)
    url = f"unix://{socket_path}"
    try:
        import docker

        deadline = time.monotonic() + 30
        while True:
            try:
                docker.DockerClient(base_url=url).ping()
                break
            except docker.errors.DockerException:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"podman system service did not start: {server.stderr.read().decode()}") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)
        subprocess.run([*argv, "system", "reset", "--force"], capture_output=True)
        subprocess.run(["rm", "-rf", runroot], check=False)


@pytest.fixture(scope="session")
def seeded_registry(registry: str) -> dict[str, str]:
    """The registry holding the shared store's debian-bookworm as library/debian:bookworm (and :copy),
    pushed by racker: {"host", "digest" (the filesystem's), "manifest" (the pushed manifest's)}."""
    from racker import images
    from racker.sources import export

    home = os.environ.get("RACKER_HOME")
    os.environ["RACKER_HOME"] = str(SHARED_HOME)
    try:
        image = images.pull("debian-bookworm")
        manifest = export.push(image, f"docker://{registry}/library/debian:bookworm")
        export.push(image, f"docker://{registry}/library/debian:copy")
    finally:
        if home is None:
            os.environ.pop("RACKER_HOME")
        else:
            os.environ["RACKER_HOME"] = home
    return {"host": registry, "digest": image.digest, "manifest": manifest}


@pytest.fixture(scope="session")
def hub_mirror(seeded_registry: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A registries.conf making the loopback registry docker.io's mirror, as a CI behind a mirror has:
    the environment that makes `docker://debian:bookworm` and `FROM debian:bookworm` work offline."""
    conf = tmp_path_factory.mktemp("containers") / "registries.conf"
    conf.write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{seeded_registry["host"]}"\ninsecure = true\n'
    )
    return {"CONTAINERS_REGISTRIES_CONF": str(conf)}


class StaticServer:
    """Files under `root` over HTTP(S) on 127.0.0.1, with Range (and If-Range) as real servers have them.

    `served[name]`: body bytes sent per file; `requests`: (path, Range header) per GET;
    `drops[name] = [N, …]`: the next answers for `name` send N bytes of their body, then the connection drops;
    `hang`: names whose requests get no answer for HANG seconds (a server that times out).
    """

    HANG = 10.0

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.served: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drops: dict[str, list[int]] = {}
        self.hang: set[str] = set()
        self.ca: Path = Path()  # the CA that signed its certificate (https only)

    def reset(self) -> None:
        self.served.clear()
        self.requests.clear()
        self.drops.clear()
        self.hang.clear()


def _range_handler(state: StaticServer):  # type: ignore[no-untyped-def]
    import socket
    import urllib.parse
    from email.utils import formatdate
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

        def do_GET(self) -> None:
            name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            path = state.root / name
            state.requests.append((name, self.headers.get("Range")))
            if name in state.hang:
                import time

                time.sleep(state.HANG)
                self.close_connection = True
                return
            if ".." in name.split("/") or not path.is_file():
                self.send_error(404)
                return
            info = path.stat()
            size, etag = info.st_size, f'"{info.st_size:x}-{info.st_mtime_ns:x}"'
            start = 0
            asked = self.headers.get("Range", "")
            if asked.startswith("bytes=") and asked.endswith("-") and self.headers.get("If-Range", etag) == etag:
                start = int(asked.removeprefix("bytes=").rstrip("-"))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", formatdate(info.st_mtime, usegmt=True))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            drops = state.drops.get(name) or []
            budget = drops.pop(0) if drops else size
            position = start
            with open(path, "rb") as handle:
                handle.seek(start)
                while budget > 0 and (chunk := handle.read(min(1 << 16, budget))):
                    self.wfile.write(chunk)
                    budget -= len(chunk)
                    position += len(chunk)
                    state.served[name] = state.served.get(name, 0) + len(chunk)
            if position < size:  # a dropped connection: no more bytes, no clean end
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate it signs for 127.0.0.1 and localhost: (ca.pem, server.pem, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl = ["openssl", "req", *ec]
    subprocess.run([*openssl, "-x509", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=racker test CA",
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*openssl, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                    "-days", "2", "-extfile", extensions], check=True, capture_output=True)  # fmt: skip
    return ca, cert, key


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    """A test's server answering from a thread of its own until the block ends, then shut and closed."""
    import threading

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def static_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """An HTTPS server on 127.0.0.1 with Range support, serving `.root` (empty at first), whose certificate
    a throw-away CA signed: yields a StaticServer; `.ca` is the CA to trust (SSL_CERT_FILE)."""
    import ssl
    from http.server import ThreadingHTTPServer

    base = tmp_path_factory.mktemp("static")
    ca, cert, key = make_ca(base / "tls")
    root = base / "www"
    root.mkdir()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    state = StaticServer(root, "")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _range_handler(state))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    state.ca = ca

    with serving(server):
        yield state


# Upstreams a test moves between two refreshes (tests/upstreams.py: importable once a test module
# under tests/ is collected, as every test that takes these is).


@pytest.fixture(scope="module")
def proxied_registry(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real registry behind a proxy the test controls (upstreams.RegistryProxy)."""
    import upstreams

    with upstreams.proxied_registry(tmp_path_factory.mktemp("refresh-registry")) as state:
        yield state


@pytest.fixture(scope="module")
def apt_repository(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(upstreams.AptRepository, its URL): a local apt repository signed with a throw-away key."""
    import upstreams

    with upstreams.apt_repository(tmp_path_factory.mktemp("apt")) as served:
        yield served
