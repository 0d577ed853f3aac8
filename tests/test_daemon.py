"""docker-daemon: images from a Docker engine (podman's Docker API here), through the docker SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, passes_checks, racker
from racker import store
from racker.sources import export

pytestmark = pytest.mark.slow

CONFIG = {
    "Entrypoint": ["/usr/bin/python3", "-m", "http.server"],
    "Cmd": ["8080"],
    "Env": ["GREETING=hello world", "PATH=/usr/bin:/bin"],
    "WorkingDir": "/srv",
    "User": "nobody",
    "StopSignal": "SIGINT",
}


def _engine(url: str):  # type: ignore[no-untyped-def]
    import docker

    return docker.DockerClient(base_url=url)


@pytest.fixture
def loaded(docker_engine: str, share_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """debian-bookworm with an image config, loaded into the engine from racker's docker-archive."""
    base = share_image("debian-bookworm")
    with store.workdir("test") as work:
        subprocess.run(["cp", "-al", str(base.rootfs), str(work / "rootfs")], check=True)
        image = store.commit("svc", work / "rootfs", source="test:", recipe="1", manifest={"config": CONFIG})
    archive = tmp_path / "svc.tar"
    export.export(image, archive, "docker-archive")
    with open(archive, "rb") as handle:
        _engine(docker_engine).images.load(handle.read())
    monkeypatch.setenv("DOCKER_HOST", docker_engine)
    store.remove("svc")
    return {"digest": image.digest, "name": "racker/svc:latest"}


def _containers(url: str) -> list:
    return _engine(url).containers.list(all=True)


def test_an_engine_image_is_pulled_with_its_config_and_passes_the_checks(loaded: dict, docker_engine: str, private_store: dict) -> None:
    pulled = racker("pull", f"docker-daemon:{loaded['name']}")
    assert pulled.returncode == 0, pulled.stderr
    name, digest = pulled.stdout.split()
    assert digest == loaded["digest"], "the engine's export must give back the very filesystem"
    image = store.lookup(name)
    assert image is not None
    assert {k: image.manifest["config"].get(k) for k in CONFIG} == CONFIG, image.manifest
    assert _containers(docker_engine) == [], "the container made for the export must be gone"
    passes_checks(name)


def test_a_missing_image_is_one_line_and_stores_nothing(docker_engine: str, private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine)
    result = racker("pull", "docker-daemon:no/such:image")
    assert result.returncode == 125 and result.stderr.strip() == (
        f"racker: error: the Docker engine at {docker_engine} has no image 'no/such:image'"
    )
    assert store.images() == []


def test_an_engine_that_does_not_answer_is_one_line(private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    result = racker("pull", "docker-daemon:debian")
    assert result.returncode == 125 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "does not answer" in result.stderr and "Traceback" not in result.stderr
    assert store.images() == []


def test_an_interrupted_export_leaves_no_container_and_nothing_stored(loaded: dict, docker_engine: str, private_store: dict) -> None:
    pull = subprocess.Popen(
        [sys.executable, "-m", "racker", "pull", f"docker-daemon:{loaded['name']}"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not _containers(docker_engine):
        assert pull.poll() is None and time.monotonic() < deadline, "the export never started"
        time.sleep(0.01)
    pull.send_signal(signal.SIGTERM)
    _out, err = pull.communicate(timeout=60)
    assert pull.returncode == 128 + signal.SIGTERM, err
    assert _containers(docker_engine) == []
    assert [i.name for i in store.images()] == ["debian-bookworm"], "only what the test put there"
    tmp = store.home() / "tmp"
    assert [p.name for p in tmp.iterdir()] == [".new"] and os.listdir(tmp / ".new") == []
    assert [i["name"] for i in json.loads(racker("images", "--json").stdout)] == ["debian-bookworm"]
