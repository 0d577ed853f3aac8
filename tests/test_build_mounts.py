"""dockerfile: builds with volumes, secrets and the host's CA: RUN steps see them, the image keeps none.

The base image (racker's bookworm, from the loopback docker.io mirror) has no python3 and no
ca-certificates, but apt's own HTTPS client (apt-helper, GnuTLS) verifies against
/etc/ssl/certs/ca-certificates.crt by default: the TLS client the RUN steps use.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import racker, racker_here, serving
from racker import store
from racker.store import catalog

SERVED = b"served-over-tls-to-a-run-step\n"


@pytest.fixture
def test_ca(tmp_path: Path) -> dict[str, Path]:
    """A CA of the test's own and a certificate it signed for 127.0.0.1."""
    d = tmp_path / "pki"
    d.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=racker test CA"
    )
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    )
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture
def https_server(test_ca: dict[str, Path]) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 whose certificate only the test CA vouches for: yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(SERVED)))
            self.end_headers()
            self.wfile.write(SERVED)

        def log_message(self, *args: object) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(test_ca["cert"], test_ca["key"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)

    with serving(server):
        yield server.server_address[1]


DOCKERFILE = """\
FROM debian:bookworm
# A bundle of the image's own that lacks the test CA: mounted over during RUN, kept as it is.
COPY own-bundle.crt /etc/ssl/certs/ca-certificates.crt
RUN /usr/lib/apt/apt-helper download-file https://127.0.0.1:{port}/ /tmp/fetched && mv /tmp/fetched /fetched
RUN --mount=type=secret,id=token test "$(sha256sum < /run/secrets/token | cut -d' ' -f1)" = {token_digest} && echo ok > /proof
RUN --mount=type=secret,id=pat test "$(sha256sum < /run/secrets/pat | cut -d' ' -f1)" = {pat_digest} && echo ok > /proof-env
RUN sha256sum < /data/input.txt | cut -d' ' -f1 > /volume-digest
"""


@pytest.mark.slow
def test_run_steps_see_the_host_ca_secrets_and_volumes_and_the_image_keeps_none(  # type: ignore[no-untyped-def]
    hub_mirror: dict, private_store: dict, docker_engine: str, test_ca: dict, https_server: int, tmp_path: Path, monkeypatch
) -> None:
    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    token, pat, volume_data = (f"{what}-{os.urandom(8).hex()}" for what in ("token", "pat", "volume"))
    context = tmp_path / "ctx"
    context.mkdir()
    digest = {name: hashlib.sha256(value.encode()).hexdigest() for name, value in (("token", token), ("pat", pat), ("volume", volume_data))}
    (context / "Dockerfile").write_text(DOCKERFILE.format(port=https_server, token_digest=digest["token"], pat_digest=digest["pat"]))
    own_bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    (context / "own-bundle.crt").write_bytes(own_bundle)

    # Without the host's CA the RUN step's TLS client refuses the server: one line, the build's tail, nothing stored.
    monkeypatch.delenv("RACKER_BUILD_CA", raising=False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    failed = racker("pull", f"dockerfile:{context}")
    assert failed.returncode == 125, failed.stderr
    lines = failed.stderr.splitlines()
    assert lines[0].startswith(f"racker: error: the build of {context}/Dockerfile failed"), failed.stderr
    assert "certificate" in failed.stderr.lower() and "Traceback" not in failed.stderr
    assert store.images() == []

    # With it (and a volume and two secrets), through buildah although an engine answers.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "token.txt").write_text(token)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/input.txt").write_text(volume_data)
    entry = Path(private_store["RACKER_CATALOG"]) / "mounted.toml"
    entry.write_text(
        f'source = "dockerfile:{context}"\nhost_ca = true\nvolumes = ["{tmp_path / "data"}:/data:ro"]\n'
        f'secrets = ["id=token,src={secrets_dir / "token.txt"}", "id=pat,env=RACKER_TEST_PAT"]\n'
    )
    monkeypatch.setenv("RACKER_BUILD_CA", str(test_ca["ca"]))
    monkeypatch.setenv("RACKER_TEST_PAT", pat)
    monkeypatch.setenv("DOCKER_HOST", docker_engine)
    pulled = racker("pull", "mounted")
    assert pulled.returncode == 0, pulled.stderr
    image = store.lookup("mounted")
    assert image is not None
    root = image.rootfs
    assert (root / "fetched").read_bytes() == SERVED
    assert (root / "proof").read_text() == "ok\n" and (root / "proof-env").read_text() == "ok\n"
    assert (root / "volume-digest").read_text().strip() == digest["volume"]

    build = image.manifest["build"]
    assert build["builder"] == "buildah" and "engine" in build["builder_why"]
    assert build["secrets"] == ["token", "pat"] and build["host_ca"] == str(test_ca["ca"])
    assert build["volumes"] == [f"{tmp_path / 'data'}:/data:ro"]

    # The image keeps its own bundle byte for byte, and nothing buildah mounted or made for a mount.
    assert (root / "etc/ssl/certs/ca-certificates.crt").read_bytes() == own_bundle
    for leftover in ("etc/pki", "run/secrets", "data"):
        assert not (root / leftover).exists(), f"/{leftover} was left behind by the build's mounts"
    ca_line = test_ca["ca"].read_text().splitlines()[1]  # a line of the test CA's base64
    found = subprocess.run(
        ["grep", "-rlF", "-e", token, "-e", pat, "-e", volume_data, "-e", ca_line, str(root)], capture_output=True, text=True, timeout=300
    )
    assert found.returncode == 1 and found.stdout == "", f"secret, volume or CA contents kept in the image: {found.stdout}"
    kept = json.dumps(image.manifest) + (store.home() / "refs/mounted.json").read_text()
    assert token not in kept and pat not in kept


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('volumes = ["/nonexistent/racker-dir:/data"]', "/nonexistent/racker-dir does not exist"),
        ('volumes = ["{tmp}"]', "not HOST:CONTAINER"),
        ('volumes = ["{tmp}:/data:sideways"]', "unknown option 'sideways'"),
        ('secrets = ["src={tmp}"]', "no id"),
        ('secrets = ["id=token,src=/nonexistent/racker-token"]', "/nonexistent/racker-token is not a file"),
        ('secrets = ["id=pat,env=RACKER_TEST_UNSET_VARIABLE"]', "RACKER_TEST_UNSET_VARIABLE is not set"),
        ('host_ca = "yes"', "host_ca must be true or false"),
        ("host_ca = true", "RACKER_BUILD_CA=/nonexistent/bundle.pem is not a file"),
    ],
)
def test_a_bad_volume_secret_or_ca_is_one_line_naming_the_entry(
    private_store: dict, tmp_path: Path, line: str, says: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx/Dockerfile").write_text("FROM debian:bookworm\n")
    entry = Path(private_store["RACKER_CATALOG"]) / "bad.toml"
    entry.write_text(f'source = "dockerfile:{tmp_path / "ctx"}"\n{line.format(tmp=tmp_path)}\n')
    monkeypatch.setenv("RACKER_BUILD_CA", "/nonexistent/bundle.pem")
    monkeypatch.setenv("RACKER_PATH", "/nonexistent")  # no buildah: the check comes before any build
    # The CLI in this process: test_catalog runs the real command on a bad entry.
    result = racker_here("pull", "bad")
    assert result.returncode == 125, result.stderr
    first = result.stderr.splitlines()[0]
    assert says in first and ("bad.toml" in first or "RACKER_BUILD_CA" in first), result.stderr
    assert "Traceback" not in result.stderr and store.images() == []


def test_the_recipe_changes_with_volumes_secrets_and_host_ca(private_store: dict, tmp_path: Path) -> None:
    entry = Path(private_store["RACKER_CATALOG"]) / "svc.toml"
    base = f'source = "dockerfile:{tmp_path}"\n'
    recipes = set()
    for extra in (
        "",
        "host_ca = true\n",
        'volumes = ["/srv:/srv"]\n',
        'secrets = ["id=a,src=/etc/hostname"]\n',
        'secrets = ["id=b,src=/etc/hostname"]\n',
    ):
        entry.write_text(base + extra)
        recipes.add(catalog.get("svc").recipe)
    assert len(recipes) == 5
