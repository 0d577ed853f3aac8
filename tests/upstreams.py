"""Upstreams on 127.0.0.1 that tests move between two refreshes: a registry behind a proxy that can
lie or hang, tarballs with their SHA256SUMS for conftest's StaticServer, and a local apt repository
whose InRelease a throw-away key signs. Shared by test_refresh (one refresh at a time) and
test_nights (three whole nights)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import lzma
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conftest import running_registry, serving
from racker import images, store

# --- a registry behind a proxy the test controls -------------------------------------------------


class RegistryProxy:
    """Forwards to a real registry; `mode`: "forward", "lie" (a by-digest manifest request gets the
    manifest of the tag `lie_with`), "hang" (no answer), "down" (503). `requests`: (method, path)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "forward"
        self.lie_with = "other"
        self.requests: list[tuple[str, str]] = []
        self.address = ""

    def blob_gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/blobs/" in path]


def _proxy_handler(state: RegistryProxy):  # type: ignore[no-untyped-def]
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

        def do_HEAD(self) -> None:
            self._forward("HEAD")

        def do_GET(self) -> None:
            self._forward("GET")

        def _forward(self, method: str) -> None:
            state.requests.append((method, self.path))
            if state.mode == "hang":
                time.sleep(8)
                self.close_connection = True
                return
            if state.mode == "down":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path = self.path
            if state.mode == "lie" and "/manifests/sha256:" in path:
                path = path.rsplit("/", 1)[0] + "/" + state.lie_with
            headers = {"Accept": ", ".join(self.headers.get_all("Accept") or [])}
            request = urllib.request.Request(f"http://{state.upstream}{path}", headers=headers, method=method)
            try:
                answer = urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as error:
                answer = error
            body = answer.read() if method == "GET" else b""
            self.send_response(answer.status)
            for key, value in answer.headers.items():
                if key.lower() in ("content-type", "docker-content-digest", "docker-distribution-api-version", "www-authenticate"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if method == "GET" else answer.headers.get("Content-Length", "0")))
            self.end_headers()
            if method == "GET":
                self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def proxied_registry(home: Path) -> Iterator[RegistryProxy]:
    """A registry storing under `home`, behind a RegistryProxy (conftest's `proxied_registry` fixture)."""
    with running_registry("127.0.0.1", home) as address:
        state = RegistryProxy(address)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(state))
        server.daemon_threads = True
        state.address = f"127.0.0.1:{server.server_address[1]}"
        with serving(server):
            yield state


def tiny_image(name: str, work: Path, payload: bytes) -> store.StoredImage:
    root = work / name
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    (root / "payload").write_bytes(payload)
    return images.import_image(name, root)


def push(image: store.StoredImage, destination: str) -> str:
    from racker.sources import export

    return export.push(image, destination)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- tarballs and their SHA256SUMS, for an HTTPS server ----------------------------------------------


def publish_tarball(directory: Path, payload: bytes, *, listed: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member, data in (("etc/os-release", b"ID=debian\nVERSION_ID=12\n"), ("payload", payload)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (directory / "root.tar.gz").write_bytes(buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    (directory / "SHA256SUMS").write_text(f"{digest}  root.tar.gz\n" if listed else f"{'0' * 64}  another.tar.gz\n")


def publish_rootfs_tarball(directory: Path, rootfs: Path, name: str = "root.tar") -> None:
    """`rootfs` as an uncompressed tarball (tar itself: a whole system in seconds) and a SHA256SUMS listing it."""
    directory.mkdir(parents=True, exist_ok=True)
    tarball = directory / name
    subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, capture_output=True)
    (directory / "SHA256SUMS").write_text(f"{_sha256(tarball)}  {name}\n")


# --- a local apt repository signed with a throw-away key --------------------------------------------


class AptRepository:
    """dists/stable/{Release,InRelease} and pool/*.deb under `root`, signed by a throw-away key.
    `requests`: the paths asked for, as its server saw them."""

    def __init__(self, root: Path, gnupg: Path) -> None:
        self.root, self.gnupg = root, gnupg
        self.keyring = gnupg / "archive.gpg"
        self.requests: list[str] = []
        self.prebuilt: list[Path] = []  # .debs built elsewhere, listed in every index published

    def gpg(self, *args: str) -> None:
        gpg = ["gpg", "--homedir", str(self.gnupg), "--batch", "--quiet", "--passphrase", ""]
        subprocess.run([*gpg, *args], check=True, capture_output=True)

    def publish(self, packages: dict[str, str]) -> None:
        """Build a .deb per NAME: VERSION with dpkg-deb, then Packages(.xz), Release and InRelease."""
        pool = self.root / "pool"
        pool.mkdir(parents=True, exist_ok=True)
        packages = {**packages, "zz-last": "1.0"}  # the image's packages are never the index's last stanza
        stanzas = []
        for name, version in sorted(packages.items()):
            tree = self.root / "build" / f"{name}-{version}"
            (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
            control = f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: racker <t@localhost>\nDescription: test\n"
            (tree / "DEBIAN/control").write_text(control)
            deb = pool / f"{name}_{version}_amd64.deb"
            subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True)
            data = deb.read_bytes()
            stanzas.append(f"{control}Filename: pool/{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n")
        for deb in self.prebuilt:
            if not (pool / deb.name).exists():
                os.link(deb, pool / deb.name)
            control = subprocess.run(["dpkg-deb", "--field", str(deb)], check=True, capture_output=True, text=True).stdout
            stanzas.append(f"{control}Filename: pool/{deb.name}\nSize: {deb.stat().st_size}\nSHA256: {_sha256(deb)}\n")
        dists = self.root / "dists/stable"
        index = dists / "main/binary-amd64/Packages"
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text("\n".join(stanzas))
        compressed = index.with_name("Packages.xz")
        compressed.write_bytes(lzma.compress(index.read_bytes()))
        listed = "".join(
            f" {hashlib.sha256(f.read_bytes()).hexdigest()} {f.stat().st_size} main/binary-amd64/{f.name}\n" for f in (index, compressed)
        )
        release = "Suite: stable\nCodename: stable\nDate: Sun, 06 Dec 2026 09:00:00 UTC\nArchitectures: amd64\nComponents: main\n"
        (dists / "Release").write_text(f"{release}SHA256:\n{listed}")
        (dists / "InRelease").unlink(missing_ok=True)
        self.gpg("--clearsign", "-o", str(dists / "InRelease"), str(dists / "Release"))

    def index_reads(self) -> list[str]:
        return [path for path in self.requests if "/Packages" in path]


@contextlib.contextmanager
def apt_repository(base: Path) -> Iterator[tuple[AptRepository, str]]:
    """An AptRepository under `base` and the URL of its HTTP server (conftest's `apt_repository` fixture)."""
    gnupg = base / "gnupg"
    gnupg.mkdir(mode=0o700)
    repo = AptRepository(base / "www", gnupg)
    repo.gpg("--quick-gen-key", "racker archive <archive@localhost>", "ed25519", "sign", "1d")
    repo.gpg("--export", "-o", str(repo.keyring))
    repo.publish({"racker-probe": "1.0", "racker-other": "2.0"})

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(repo.root), **kwargs)

        def do_GET(self) -> None:
            repo.requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)

    with serving(server):
        yield repo, f"http://127.0.0.1:{server.server_address[1]}"


# --- a small bootable system the upstreams above serve -----------------------------------------------

# Left out of the bootable copy of a catalogue image: what no boot or check reads (translations,
# documentation, the full perl), so that each upstream serves some 110 MB, not 225.
SLIM_EXCLUDES = ("usr/share/locale", "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/perl", "usr/lib/x86_64-linux-gnu/perl",
                 "usr/lib/x86_64-linux-gnu/gconv")  # fmt: skip
# What apt and dpkg keep of a system: not in a .deb, which mmdebstrap's own dpkg records.
PACKAGE_STATE = ("var/lib/dpkg", "var/lib/apt", "var/cache/apt", "etc/apt/sources.list", "etc/apt/sources.list.d")


def slim_copy(rootfs: Path, into: Path, *, without: tuple[str, ...] = ()) -> Path:
    """A copy of `rootfs` (owners, modes and links kept) without SLIM_EXCLUDES and `without`."""
    into.mkdir(parents=True)
    excluded = [f"--exclude=./{path}" for path in (*SLIM_EXCLUDES, *without)]
    reader = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), *excluded, "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "--numeric-owner", "-C", str(into), "-xf", "-"], stdin=reader.stdout, check=True)
    reader.stdout.close()  # type: ignore[union-attr]
    assert reader.wait() == 0
    return into


def record_package(rootfs: Path, name: str, version: str) -> None:
    """Say in the image's dpkg database that `name` `version` is installed (the only change between
    two nights of a registry or tarball upstream that a package manifest can show)."""
    status = rootfs / "var/lib/dpkg/status"
    stanzas = [s for s in status.read_text().split("\n\n") if s.strip() and not s.startswith(f"Package: {name}\n")]
    stanzas.append(f"Package: {name}\nStatus: install ok installed\nPriority: optional\nVersion: {version}\nArchitecture: amd64\n"
                   f"Maintainer: racker <t@localhost>\nDescription: test\n")  # fmt: skip
    status.write_text("\n\n".join(s.strip("\n") for s in stanzas) + "\n")


def system_deb(rootfs: Path, work: Path) -> Path:
    """`rootfs` (without its package state) as one Essential .deb named base-files: with it the
    local repository alone is an archive mmdebstrap bootstraps a bootable system from (racker's
    package manager check asks dpkg for base-files)."""
    tree = slim_copy(rootfs, work / "base-files", without=PACKAGE_STATE)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: base-files\nVersion: 12.4\nArchitecture: amd64\nEssential: yes\nMaintainer: racker <t@localhost>\nDescription: a system\n"
    )
    deb = work / "base-files_12.4_amd64.deb"
    subprocess.run(["dpkg-deb", "-Znone", "--build", str(tree), str(deb)], check=True, capture_output=True)  # -Znone: seconds, not minutes
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    return deb
