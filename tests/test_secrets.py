"""Secrets stay secret, and work: credentials in a URL are sent as HTTP basic auth (as curl and pip
send them), registry credentials come from the auth file, and none of them shows up in anything
racker prints (with --debug too), stores (manifests, refs, the download cache) or reports.

A loopback HTTPS server of the test's own requires basic auth; a loopback registry requires
htpasswd auth. Each case plants a secret, runs racker (success and failure paths), and greps
stdout, stderr and every file under the private store for it. `plant_secrets()` runs the same
cases outside pytest for bench/hostile.py and returns (planted, found).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import StaticServer, _range_handler, free_port, make_ca, racker, serving

pytestmark = pytest.mark.slow

USER = "bar"
TOKEN = "S3cretT0ken"  # the query-string token's value
PASSWORD = "Pa55w0rdXyz"  # the good password for basic auth
WRONG = "Wr0ngPa55Qq"  # a bad one, planted in failure paths


def _small_tar_xz() -> bytes:
    """A root tarball of two files: enough for a distribution to be detected."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:xz") as archive:
        for name, data in (("etc/os-release", b"ID=debian\nVERSION_ID=12\n"), ("payload", os.urandom(4096))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@contextlib.contextmanager
def auth_server(base: Path) -> Iterator[StaticServer]:
    """HTTPS on 127.0.0.1 serving `base/www`, answering 401 unless the request carries basic auth
    USER:PASSWORD or the query parameter token=TOKEN."""
    ca, cert, key = make_ca(base / "tls")
    root = base / "www"
    root.mkdir(parents=True, exist_ok=True)
    state = StaticServer(root, "")
    parent = _range_handler(state)
    good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(parent):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if self.headers.get("Authorization") != good and query.get("token") != [TOKEN]:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="racker test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"127.0.0.1:{server.server_address[1]}"  # host:port, for URLs with userinfo
    state.ca = ca

    with serving(server):
        yield state


def _tiny_oci_layout(directory: Path) -> None:
    """An OCI layout holding one tiny image (tiny:1): a layer with an os-release."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        data = b"ID=debian\nVERSION_ID=12\n"
        info = tarfile.TarInfo("etc/os-release")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    layer_tar = raw.getvalue()
    layer = blob(gzip.compress(layer_tar, mtime=0))
    config = blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]},
            }
        ).encode()
    )
    manifest = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
            }
        ).encode()
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest,
                "annotations": {"org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@contextlib.contextmanager
def auth_registry(base: Path) -> Iterator[str]:
    """docker-registry on 127.0.0.1 requiring htpasswd auth USER:PASSWORD, holding tiny:1: yields "127.0.0.1:PORT"."""
    import bcrypt  # the registry's htpasswd is bcrypt's only

    base.mkdir(parents=True, exist_ok=True)
    (base / "htpasswd").write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt()).decode()}\n")
    port = free_port()
    config = base / "config.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n"
        f"auth:\n  htpasswd:\n    realm: racker-test\n    path: {base / 'htpasswd'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        layout = base / "layout"
        _tiny_oci_layout(layout)
        while True:
            pushed = subprocess.run(
                ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
                 f"oci:{layout}:1", f"docker://{address}/tiny:1"],
                capture_output=True, text=True,
            )  # fmt: skip
            if pushed.returncode == 0:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cannot push to the auth registry: {pushed.stderr}")
            time.sleep(0.2)
        yield address
    finally:
        server.terminate()
        server.wait(10)


@dataclass
class Case:
    """One racker command with a planted secret: what it must do, and where the secret must not be."""

    name: str
    args: list[str]
    secrets: list[str]
    succeeds: bool
    env: dict[str, str] = field(default_factory=dict)


def cases(server: StaticServer, registry: str | None, auth_files: dict[str, Path]) -> list[Case]:
    small = _small_tar_xz()
    (server.root / "small").mkdir(exist_ok=True)
    (server.root / "small" / "root.tar.xz").write_bytes(small)
    (server.root / "small" / "SHA256SUMS").write_text(f"{hashlib.sha256(small).hexdigest()}  root.tar.xz\n")
    pin = hashlib.sha256(small).hexdigest()
    host = server.url
    found = [
        Case("url userinfo, SHA256SUMS", ["pull", f"https://{USER}:{PASSWORD}@{host}/small/root.tar.xz"], [PASSWORD], True),
        Case("url userinfo, wrong password", ["pull", f"https://{USER}:{WRONG}@{host}/small/root.tar.xz"], [WRONG], False),
        Case("url userinfo, missing file", ["pull", f"https://{USER}:{PASSWORD}@{host}/small/none.tar.xz#sha256={pin}"], [PASSWORD], False),
        Case("plain http refused", ["pull", f"http://{USER}:{PASSWORD}@192.0.2.1/root.tar.xz"], [PASSWORD], False),
        Case("query token, pinned", ["pull", f"https://{host}/small/root.tar.xz?token={TOKEN}#sha256={pin}"], [TOKEN], True),
        Case("query token, refused", ["pull", f"https://{host}/small/none.tar.xz?token={TOKEN}#sha256={pin}"], [TOKEN], False),
        Case(
            "vagrant server credentials",
            ["pull", "vagrant:acme/nothing"],
            [PASSWORD],
            False,
            {"RACKER_VAGRANT_SERVER": f"https://{USER}:{PASSWORD}@{host}"},
        ),
    ]
    if registry is not None:
        found += [
            Case(
                "registry auth file",
                ["pull", f"docker://{registry}/tiny:1"],
                [PASSWORD],
                True,
                {"REGISTRY_AUTH_FILE": str(auth_files["good"])},
            ),
            Case(
                "registry auth file, wrong password",
                ["pull", "--force", f"docker://{registry}/tiny:1"],
                [WRONG],
                False,
                {"REGISTRY_AUTH_FILE": str(auth_files["bad"])},
            ),
        ]
    return found


def auth_file(path: Path, registry: str, password: str) -> Path:
    encoded = base64.b64encode(f"{USER}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": encoded}}}))
    return path


def store_hits(home: Path, secrets: list[str]) -> list[str]:
    """Files under the store (manifests, refs, the download cache's records) that hold a secret."""
    hits = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink() and "rootfs" not in path.parts and path.stat().st_size < (8 << 20):
            data = path.read_bytes()
            hits += [f"{path}: {s}" for s in secrets if s.encode() in data or base64.b64encode(s.encode()) in data]
    return hits


def run_case(case: Case, home: Path, ca: Path) -> tuple[bool, list[str]]:
    """(racker did what it should, where a secret was found)."""
    env = {"RACKER_HOME": str(home), "SSL_CERT_FILE": str(ca), **case.env}
    done = racker("--debug", *case.args, env=env)
    where = [f"{stream}: {s}" for stream, text in (("stdout", done.stdout), ("stderr", done.stderr)) for s in case.secrets if s in text]
    where += store_hits(home, case.secrets)
    ok = (done.returncode == 0) == case.succeeds
    if not ok:
        where.append(f"unexpected exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else ''}")
    return ok, where


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("secrets")
    with auth_server(base / "https") as server, auth_registry(base / "registry") as registry:
        files = {"good": auth_file(base / "good.json", registry, PASSWORD), "bad": auth_file(base / "bad.json", registry, WRONG)}
        yield server, cases(server, registry, files)


CASE_NAMES = [
    "url userinfo, SHA256SUMS",
    "url userinfo, wrong password",
    "url userinfo, missing file",
    "plain http refused",
    "query token, pinned",
    "query token, refused",
    "vagrant server credentials",
    "registry auth file",
    "registry auth file, wrong password",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_planted_secret_works_and_never_shows(planted, name: str, tmp_path: Path) -> None:
    server, all_cases = planted
    case = next(c for c in all_cases if c.name == name)
    ok, where = run_case(case, tmp_path / "store", server.ca)
    assert ok and not where, where


def test_url_credentials_are_basic_auth_not_a_host_name(planted, tmp_path: Path) -> None:
    """Today's bug: `bar:S3cretT0ken@127.0.0.1` looked up as a host name."""
    server, _ = planted
    env = {"RACKER_HOME": str(tmp_path / "store"), "SSL_CERT_FILE": str(server.ca)}
    done = racker("pull", f"https://{USER}:{WRONG}@{server.url}/small/root.tar.xz", env=env)
    assert done.returncode != 0
    assert done.stderr.splitlines()[0].endswith("the server answered 401 Unauthorized"), done.stderr
    assert f"https://{server.url}/small/" in done.stderr


def plant_secrets() -> tuple[int, int]:
    """For bench/hostile.py: (secrets planted, secrets found in racker's output or store), goal found == 0."""
    planted_count = found = 0
    with tempfile.TemporaryDirectory(prefix="racker-secrets-") as work:
        base = Path(work)
        with auth_server(base / "https") as server, auth_registry(base / "registry") as registry:
            files = {"good": auth_file(base / "good.json", registry, PASSWORD), "bad": auth_file(base / "bad.json", registry, WRONG)}
            for number, case in enumerate(cases(server, registry, files)):
                _, where = run_case(case, base / f"store-{number}", server.ca)
                planted_count += len(case.secrets)
                found += len({w.rsplit(": ", 1)[-1] for w in where if not w.startswith("unexpected")})
    return planted_count, found
