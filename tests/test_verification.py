"""A download says what its verification proves: a SHA256SUMS from the file's own server is integrity,
not authenticity (one line on the terminal, and the manifest's `verified`); a pin or a signature is
more. With --insecure, integrity alone is refused. A loopback HTTPS server of the test's own."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import StaticServer, in_store, racker
from racker import store

pytestmark = pytest.mark.slow

INTEGRITY = "integrity (SHA256SUMS from the same server)"


@pytest.fixture(scope="module")
def served(static_server: StaticServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """v/root.tar.xz with a SHA256SUMS signed by a throw-away key: {"digest", "keyring", "url"}."""
    work = tmp_path_factory.mktemp("verification")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:xz") as archive:
        for name, data in (("etc/os-release", b"ID=debian\nVERSION_ID=12\n"), ("payload", os.urandom(4096))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    directory = static_server.root / "v"
    directory.mkdir()
    (directory / "root.tar.xz").write_bytes(raw.getvalue())
    digest = hashlib.sha256(raw.getvalue()).hexdigest()
    (directory / "SHA256SUMS").write_text(f"{digest}  root.tar.xz\n")
    gnupg = work / "gnupg"
    gnupg.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(gnupg), "--batch", "--quiet", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "racker test <test@localhost>", "ed25519", "sign", "1d"], check=True, capture_output=True)
    subprocess.run([*gpg, "--export", "-o", str(work / "keyring.gpg")], check=True)
    subprocess.run([*gpg, "--detach-sign", "-o", str(directory / "SHA256SUMS.gpg"), str(directory / "SHA256SUMS")], check=True)
    return {"digest": digest, "keyring": str(work / "keyring.gpg"), "url": f"{static_server.url}/v/root.tar.xz"}


def pull(static_server: StaticServer, home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """`racker pull ARGS` into the store at HOME: (the run, the tarball's manifest fields or {})."""
    done = racker("pull", *args, env={"RACKER_HOME": str(home), "SSL_CERT_FILE": str(static_server.ca)})
    with in_store(home):
        image = store.lookup(args[-1])
    return done, (image.manifest.get("tarball", {}) if image else {})


def test_a_sums_only_download_is_integrity_and_says_so_once(static_server, served, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RACKER_HOME", raising=False)
    done, fields = pull(static_server, tmp_path / "store", served["url"])
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "integrity only" in line]
    assert len(said) == 1, done.stderr
    assert fields["verified"] == INTEGRITY and fields["verified_by"] == "SHA256SUMS"


@pytest.mark.parametrize("insecure", [False, True], ids=["secure", "insecure"])
def test_a_pin_or_a_signature_is_more_than_integrity(static_server, served, tmp_path: Path, monkeypatch, insecure: bool) -> None:
    monkeypatch.delenv("RACKER_HOME", raising=False)
    flag = ["--insecure"] if insecure else []
    done, fields = pull(static_server, tmp_path / "pinned", *flag, f"{served['url']}#sha256={served['digest']}")
    assert done.returncode == 0, done.stderr
    assert fields["verified"] == "pinned sha256" and "integrity only" not in done.stderr
    done, fields = pull(static_server, tmp_path / "signed", *flag, "--keyring", served["keyring"], served["url"])
    assert done.returncode == 0, done.stderr
    assert fields["verified"] == "signed (keyring)" and "integrity only" not in done.stderr


def test_insecure_refuses_integrity_alone(static_server, served, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RACKER_HOME", raising=False)
    done, fields = pull(static_server, tmp_path / "store", "--insecure", served["url"])
    assert done.returncode != 0 and not fields
    first, *rest = done.stderr.splitlines()
    assert first.endswith("with --insecure, a SHA256SUMS from the same server proves nothing"), done.stderr
    assert len(rest) == 1 and "#sha256=" in rest[0] and "--keyring" in rest[0]
