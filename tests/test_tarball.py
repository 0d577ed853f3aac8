"""Root tarballs over HTTPS (a loopback server with a throw-away CA) and from files: verified,
resumed, cached, and every bad download one clear line that leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import SHARED_HOME, StaticServer, passes_checks, racker
from racker import store

pytestmark = pytest.mark.slow


def _sums(directory: Path, names: dict[str, str] | None = None) -> None:
    """A SHA256SUMS for the files in `directory`; `names` overrides what it says of some."""
    lines = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("SHA256SUMS"):
            continue
        digest = (names or {}).get(path.name) or hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.name}\n")
    (directory / "SHA256SUMS").write_text("".join(lines))


def _small_tar(path: Path, *, payload: bytes) -> None:
    """A root filesystem of two files: enough for a distribution to be detected."""
    with tarfile.open(path, "w") as archive:
        for name, data in (("etc/os-release", b"ID=debian\nVERSION_ID=12\n"), ("payload", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def served(static_server: StaticServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The served tree: bookworm/ (the shared store's debian-bookworm as rootfs.tar.xz and .zst, a signed
    SHA256SUMS), small/ (a small root tarball, signed), and bad/ (what must be refused)."""
    work = tmp_path_factory.mktemp("tarballs")
    exported = racker(
        "export", "debian-bookworm", "-o", str(work / "rootfs.tar"), "--format", "rootfs-tar", env={"RACKER_HOME": str(SHARED_HOME)}
    )
    assert exported.returncode == 0, exported.stderr
    bookworm = static_server.root / "bookworm"
    bookworm.mkdir()
    subprocess.run(["xz", "-0", "-T0", "-k", work / "rootfs.tar"], check=True)
    (work / "rootfs.tar.xz").rename(bookworm / "rootfs.tar.xz")
    subprocess.run(["zstd", "-q", "-T0", work / "rootfs.tar", "-o", work / "rootfs.tar.zst"], check=True)
    (work / "rootfs.tar").unlink()
    _sums(bookworm)

    small = static_server.root / "small"
    small.mkdir()
    _small_tar(work / "small.tar", payload=os.urandom(3 << 20))
    subprocess.run(["xz", "-0", "-k", work / "small.tar"], check=True)
    (work / "small.tar.xz").rename(small / "root.tar.xz")
    subprocess.run(["lz4", "-q", work / "small.tar", work / "small-lz4"], check=True)  # no suffix: told by its magic

    gnupg = work / "gnupg"
    gnupg.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(gnupg), "--batch", "--quiet", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "racker test <test@localhost>", "ed25519", "sign", "1d"], check=True, capture_output=True)
    subprocess.run([*gpg, "--export", "-o", str(work / "keyring.gpg")], check=True)
    _sums(small)
    subprocess.run([*gpg, "--detach-sign", "-o", str(small / "SHA256SUMS.gpg"), str(small / "SHA256SUMS")], check=True)

    bad = static_server.root / "bad"
    bad.mkdir()
    (bad / "mismatch.tar.xz").write_bytes((small / "root.tar.xz").read_bytes())
    (bad / "unknown.tar.xz").write_bytes(os.urandom(1 << 16))
    whole = (small / "root.tar.xz").read_bytes()
    (bad / "truncated.tar.xz").write_bytes(whole[: len(whole) // 2])
    _small_tar(work / "bomb.tar", payload=bytes(64 << 20))  # 64 MiB of zeros: a few KiB of xz
    subprocess.run(["xz", "-k", work / "bomb.tar"], check=True)
    (work / "bomb.tar.xz").rename(bad / "bomb.tar.xz")
    _sums(bad, {"mismatch.tar.xz": "0" * 64})
    tampered = static_server.root / "tampered"
    tampered.mkdir()
    (tampered / "root.tar.xz").write_bytes(whole)
    _sums(tampered)
    subprocess.run([*gpg, "--detach-sign", "-o", str(tampered / "SHA256SUMS.gpg"), str(tampered / "SHA256SUMS")], check=True)
    with open(tampered / "SHA256SUMS", "a") as sums:
        sums.write(f"{'1' * 64}  extra\n")
    subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "all"], check=False)  # no agent outlives the fixture
    return {"zst": work / "rootfs.tar.zst", "lz4": work / "small-lz4", "keyring": work / "keyring.gpg"}


@pytest.fixture
def tls(static_server: StaticServer, private_store: dict, monkeypatch: pytest.MonkeyPatch) -> StaticServer:
    """The server, trusted through SSL_CERT_FILE, with its counters reset, and a private store."""
    monkeypatch.setenv("SSL_CERT_FILE", str(static_server.ca))
    static_server.reset()
    return static_server


def _pulled(*args: str) -> str:
    result = racker("pull", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[1]


def _nothing_left() -> None:
    assert store.images() == []
    assert [p.name for p in (store.home() / "tmp").iterdir()] == [".new"]
    downloads = store.home() / "downloads"
    assert not [p for p in downloads.rglob("*") if p.is_file()] if downloads.exists() else True


def _bookworm_digest() -> str:
    return json.loads((SHARED_HOME / "refs" / "debian-bookworm.json").read_text())["digest"]


def test_pull_by_https_verified_cached_and_it_boots(tls: StaticServer, served: dict) -> None:
    url = f"{tls.url}/bookworm/rootfs.tar.xz"
    size = (tls.root / "bookworm/rootfs.tar.xz").stat().st_size
    assert _pulled(url) == _bookworm_digest()
    assert tls.served["bookworm/rootfs.tar.xz"] == size
    assert _pulled(url) == _bookworm_digest()  # pulled again: present, nothing fetched
    assert tls.served["bookworm/rootfs.tar.xz"] == size
    passes_checks(url)


def test_a_pin_and_a_signed_list_and_a_file_of_any_compression(tls: StaticServer, served: dict) -> None:
    small = tls.root / "small/root.tar.xz"
    pin = hashlib.sha256(small.read_bytes()).hexdigest()
    digest = _pulled(f"{tls.url}/small/root.tar.xz#sha256={pin}")
    assert ("small/SHA256SUMS", None) not in tls.requests  # a pin needs no list
    assert _pulled("--keyring", str(served["keyring"]), f"{tls.url}/small/root.tar.xz") == digest
    assert ("small/SHA256SUMS.gpg", None) in tls.requests
    # Pulled again, even forced, by another URL of the same content: the digest is in the download cache.
    assert _pulled("--force", f"{tls.url}/small/root.tar.xz") == digest
    assert tls.served["small/root.tar.xz"] == small.stat().st_size
    assert _pulled(f"file:{served['lz4']}") == digest
    assert _pulled(f"file:{served['zst']}") == _bookworm_digest()
    assert store.lookup(f"file:{served['zst']}").manifest["tarball"]["compression"] == "zstd"


def test_an_interrupted_download_resumes(tls: StaticServer, served: dict) -> None:
    name = "small/root.tar.xz"
    size = (tls.root / name).stat().st_size
    cut = 100_000
    tls.drops[name] = [cut] * 3  # every connection of the first pull breaks
    failed = racker("pull", f"{tls.url}/{name}")
    assert failed.returncode == 125 and "interrupted 3 times" in failed.stderr, failed.stderr
    assert [r for n, r in tls.requests if n == name] == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    assert store.images() == [] and len(list((store.home() / "downloads/partial").glob("*[!n]"))) == 1
    tls.drops[name] = [cut]  # the next pull: one more break, then it completes
    _pulled(f"{tls.url}/{name}")
    assert [r for n, r in tls.requests if n == name][3:] == [f"bytes={3 * cut}-", f"bytes={4 * cut}-"]
    assert tls.served[name] == size  # every byte sent once
    assert list((store.home() / "downloads/partial").iterdir()) == []


@pytest.mark.parametrize(
    ("path", "said", "options", "env"),
    [
        ("bad/mismatch.tar.xz", "does not match its checksum", (), {}),
        ("tampered/root.tar.xz", "its signature does not verify", ("--keyring", "KEYRING"), {}),
        ("bad/unknown.tar.xz", "neither a tar archive nor compressed with a known method", (), {}),
        ("bad/truncated.tar.xz", "is not a readable tar archive", (), {}),
        ("bad/bomb.tar.xz", "unpacks to more than 16 MiB: refused as a decompression bomb", (), {"RACKER_EXTRACT_LIMIT": "16M"}),
        ("small/root.tar.xz", "TLS certificate is not trusted", (), {"SSL_CERT_FILE": ""}),
        ("bad/missing.tar.xz", "does not list missing.tar.xz", (), {}),
    ],
    ids=["mismatch", "bad-signature", "unknown-compression", "truncated", "bomb", "untrusted-tls", "unlisted"],
)
def test_a_bad_download_is_one_line_and_leaves_nothing(
    tls: StaticServer, served: dict, path: str, said: str, options: tuple, env: dict
) -> None:
    options = tuple(str(served["keyring"]) if o == "KEYRING" else o for o in options)
    result = racker("pull", *options, f"{tls.url}/{path}", env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("racker: error:")]
    assert result.returncode == 125 and len(errors) == 1 and said in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    _nothing_left()


def test_gc_removes_partial_and_unreferenced_downloads(tls: StaticServer) -> None:
    from racker.sources import download

    (tls.root / "gc").mkdir()
    pins = {}
    for name in ("kept", "removed", "cut"):
        _small_tar(tls.root / "gc" / f"{name}.tar", payload=os.urandom(300_000))
        pins[name] = hashlib.sha256((tls.root / "gc" / f"{name}.tar").read_bytes()).hexdigest()
    url = {name: f"{tls.url}/gc/{name}.tar#sha256={pins[name]}" for name in pins}
    _pulled(url["kept"])
    _pulled(url["removed"])
    assert racker("rmi", url["removed"]).returncode == 0  # its download is referenced by no image now
    tls.drops["gc/cut.tar"] = [100_000] * 3
    assert racker("pull", url["cut"]).returncode == 125  # interrupted: a partial download stays
    cache = download.cache_dir()
    assert len(list((cache / "partial").iterdir())) == 2  # the bytes and their validator
    # A download under way (its lock held) is left alone.
    busy = "f" * 64
    (cache / "partial" / busy).write_bytes(b"so far")
    with store.locked(download.lock_key(busy)):
        cleaned = racker("gc")
    assert cleaned.returncode == 0, cleaned.stderr
    assert sorted(p.name for p in (cache / "sha256").iterdir()) == [pins["kept"]]
    assert [p.name for p in (cache / "partial").iterdir()] == [busy]
    assert f"removed download {pins['removed'][:12]}" in cleaned.stdout and "removed partial download" in cleaned.stdout
    assert store.lookup(url["kept"]) is not None
    assert racker("gc").stdout.splitlines() == [f"removed partial download {busy[:12]}"]  # once its lock is free
