"""dockerfile: images built with buildah (no engine) or through a Docker engine, FROM an image
that docker.io's mirror (a loopback registry the tests start) serves."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from test_promote import HOSTILE_ENV

from conftest import passes_checks, racker
from racker import images, store

pytestmark = pytest.mark.slow

DOCKERFILE = """\
FROM debian:bookworm AS base
RUN echo built-in-stage-one > /etc/racker-built

FROM base AS runtime
# COPY --from a stage: nothing of that stage may stay behind in buildah's storage.
COPY --from=base /etc/racker-built /etc/racker-built-copy
ARG GREETING=hi
ENV GREETING=$GREETING
WORKDIR /srv
COPY index.html /srv/index.html
USER nobody
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/')"
ONBUILD RUN echo never-run-here
ENTRYPOINT ["/usr/bin/python3", "-m", "http.server"]
CMD ["8080"]

FROM runtime AS extra
RUN echo not-in-runtime > /etc/extra
"""


@pytest.fixture
def service(tmp_path: Path) -> Path:
    context = tmp_path / "svc"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "index.html").write_text("hello from the app\n")
    (context / "Failing.dockerfile").write_text("FROM debian:bookworm\nRUN echo about-to-fail && exit 3\n")
    return context


@pytest.fixture
def catalog_entry(private_store: dict, service: Path) -> str:
    """A catalogue image built from the service's Dockerfile, with a build argument and a target stage."""
    entry = Path(private_store["RACKER_CATALOG"]) / "svc.toml"
    entry.write_text(f'source = "dockerfile:{service}"\nbuild_args = {{ GREETING = "hello world" }}\ntarget = "runtime"\n')
    return "svc"


def _expect_service(name: str, *, healthcheck: bool = True) -> store.StoredImage:
    image = store.lookup(name)
    assert image is not None
    config = image.manifest["config"]
    assert config["Entrypoint"] == ["/usr/bin/python3", "-m", "http.server"] and config["Cmd"] == ["8080"]
    assert "GREETING=hello world" in config["Env"]
    assert (config["User"], config["WorkingDir"], config["StopSignal"]) == ("nobody", "/srv", "SIGINT")
    if healthcheck:
        assert config["Healthcheck"]["Test"][0] == "CMD-SHELL"
    assert (image.rootfs / "etc/racker-built").read_text() == "built-in-stage-one\n"
    assert (image.rootfs / "etc/racker-built-copy").read_text() == "built-in-stage-one\n"
    assert (image.rootfs / "srv/index.html").read_text() == "hello from the app\n"
    assert not (image.rootfs / "etc/extra").exists(), "--target stops at the runtime stage"
    return image


def test_a_multi_stage_dockerfile_builds_with_buildah_and_passes_the_checks(hub_mirror: dict, catalog_entry: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    pulled = racker("pull", catalog_entry)
    assert pulled.returncode == 0, pulled.stderr
    image = _expect_service(catalog_entry)
    assert image.manifest["build"]["builder"] == "buildah"
    passes_checks(catalog_entry)
    buildah = ["buildah", "--root", str(store.home() / "buildah/root"), "--runroot", str(store.home() / "buildah/run")]
    left = subprocess.run([*buildah, "images", "--format", "{{.Name}}"], capture_output=True, text=True, check=True).stdout
    assert "racker-build" not in left, "the built image is removed from buildah's storage once acquired"
    containers = subprocess.run([*buildah, "containers", "--quiet"], capture_output=True, text=True, check=True).stdout
    assert containers.strip() == "", f"the build's containers are removed, also COPY --from's stages: {containers}"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(store.home() / "buildah") not in mounts, "nothing of the build stays mounted"


def test_a_failing_build_shows_its_last_lines_and_stores_nothing(hub_mirror: dict, private_store: dict, service: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    result = racker("pull", f"dockerfile:{service}#Failing.dockerfile")
    assert result.returncode == 125
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"racker: error: the build of {service}/Failing.dockerfile failed"), result.stderr
    assert "about-to-fail" in result.stderr and "Traceback" not in result.stderr
    assert store.images() == []
    buildah = ["buildah", "--root", str(store.home() / "buildah/root"), "--runroot", str(store.home() / "buildah/run")]
    left = subprocess.run([*buildah, "containers", "--quiet"], capture_output=True, text=True).stdout.strip()
    assert left == "", "the failed step's working container is removed"


@pytest.mark.parametrize("target", ["/nonexistent/dir", "{service}#Nope.dockerfile"])
def test_a_missing_context_or_file_is_one_line(private_store: dict, service: Path, target: str) -> None:
    result = racker("pull", "dockerfile:" + target.format(service=service))
    assert result.returncode == 125 and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert "Traceback" not in result.stderr


def test_with_an_engine_the_engine_builds(catalog_entry: str, docker_engine: str, share_image, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import docker

    from racker.sources import export

    engine = docker.DockerClient(base_url=docker_engine)
    # The engine's own base image, as a user's engine would have it: racker's bookworm, loaded and tagged.
    archive = tmp_path / "debian.tar"
    export.export(share_image("debian-bookworm"), archive, "docker-archive")
    with open(archive, "rb") as handle:
        (base,) = engine.images.load(handle.read())
    base.tag("docker.io/library/debian", "bookworm")
    monkeypatch.setenv("DOCKER_HOST", docker_engine)
    result = racker("pull", catalog_entry)
    assert result.returncode == 0, result.stderr
    # podman's Docker API builds OCI images, which have no HEALTHCHECK (dockerd keeps it).
    image = _expect_service(catalog_entry, healthcheck=False)
    assert image.manifest["build"]["builder"] == "docker engine"
    assert not [i for i in engine.images.list() if any("racker-build" in t for t in i.tags)]
    assert engine.containers.list(all=True) == []


# A service as people write them: a user of its own, settings in ENV, content in WORKDIR,
# the program in ENTRYPOINT (a bare name, found on PATH as docker finds it) and its port in CMD.
APP_DOCKERFILE = """\
FROM debian:bookworm
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin web
ENV GREETING="hello from racker" APP_MODE=production
WORKDIR /srv/www
COPY index.html ./
USER web
EXPOSE 8080
ENTRYPOINT ["python3", "-m", "http.server"]
CMD ["8080"]
"""
# A directory whose name holds what quoting can get wrong, added to CMD as http.server's --directory.
SERVED = "/srv/www/$HOME ${HOME} $$ 100% %n \"q\" 'q' back\\slash\\ new\nline ;"

# One SSH round trip for every fact: the service's answer, and its main process's user, cwd, argv and environment.
APP_FACTS = r"""
fetch='import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8080/index.html").read().decode(), end="")'
for i in $(seq 300); do
    answer=$(python3 -c "$fetch" 2>/dev/null) && break
    sleep 0.2
done
pid=$(systemctl show -p MainPID --value racker-app)
printf 'answer=%s\n' "$answer"
echo "active=$(systemctl is-active racker-app)"
echo "user=$(ps -o user= -p "$pid")"
echo "cwd=$(readlink "/proc/$pid/cwd")"
echo "workdir_index=$(cat /srv/www/index.html)"
echo "argv=$(base64 -w0 < "/proc/$pid/cmdline")"
echo "environ=$(base64 -w0 < "/proc/$pid/environ")"
"""


@pytest.mark.qemu
def test_a_dockerfile_service_promoted_with_app_answers_in_a_vm(hub_mirror: dict, private_store: dict, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A Dockerfile's service (ENTRYPOINT, CMD, ENV, WORKDIR, USER) built by buildah, given a CMD
    argument and ENV values that quoting can get wrong, `racker promote --app` to a qcow2: in the
    VM, the service runs as the image says, with its arguments and environment exactly as given."""
    from racker.vm.qemu import VM

    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    context = tmp_path / "web"
    context.mkdir()
    (context / "Dockerfile").write_text(APP_DOCKERFILE)
    (context / "index.html").write_text("<h1>served from the image's WORKDIR</h1>\n")
    pulled = racker("pull", f"dockerfile:{context}", timeout=1800)
    assert pulled.returncode == 0, pulled.stderr
    built = images.find(f"dockerfile:{context}")
    # The built image with what a Dockerfile cannot say plainly: a CMD argument and ENV values
    # holding what quoting gets wrong, added to what the build wrote.
    with store.workdir("test-app") as work:
        rootfs = work / "rootfs"
        subprocess.run(["cp", "-al", str(built.rootfs), str(rootfs)], check=True)
        (rootfs / SERVED.lstrip("/")).mkdir(parents=True)
        (rootfs / SERVED.lstrip("/") / "index.html").write_text("hello from the app\n")
        config = dict(built.manifest["config"])
        config["Cmd"] = [*config["Cmd"], "--directory", SERVED]
        config["Env"] = [*config["Env"], *(f"{key}={value}" for key, value in HOSTILE_ENV)]
        manifest = dict(built.manifest, name="racker-test-app", config=config)
        for key in ("digest", "size", "created", "source"):
            manifest.pop(key, None)
        store.commit("racker-test-app", rootfs, source="test:app", recipe="1", manifest=manifest)
    disk = tmp_path / "web.qcow2"
    promoted = racker("promote", "racker-test-app", "--app", "--format", "qcow2", "-o", str(disk), timeout=1800)
    assert promoted.returncode == 0, promoted.stderr
    with VM(disk, image="racker-test-app") as vm:
        result = vm.run(["sh", "-c", APP_FACTS], timeout=180)
        status = vm.run(["systemctl", "status", "--no-pager", "racker-app"]).stdout
    assert result.returncode == 0, result.stderr
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    argv = base64.b64decode(facts.pop("argv", "")).decode().split("\0")
    environ = base64.b64decode(facts.pop("environ", "")).decode().split("\0")
    expected = {
        "answer": "hello from the app",  # from the --directory CMD gave, whose name came through whole
        "active": "active",
        "user": "web",  # USER: a user the Dockerfile made
        "cwd": "/srv/www",  # WORKDIR
        "workdir_index": "<h1>served from the image's WORKDIR</h1>",  # COPY ./ into WORKDIR
    }
    assert {key: facts.get(key) for key in expected} == expected, status
    assert argv == ["python3", "-m", "http.server", "8080", "--directory", SERVED, ""], argv  # ENTRYPOINT + CMD, exactly
    for entry in ("GREETING=hello from racker", "APP_MODE=production", *(f"{key}={value}" for key, value in HOSTILE_ENV)):
        assert entry in environ, (entry, [e for e in environ if e.partition("=")[0] == entry.partition("=")[0]])  # ENV, exactly


def test_ctrl_c_during_a_build_leaves_no_container_mount_or_temp_dir(
    hub_mirror: dict, private_store: dict, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import sys
    import time

    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    context = tmp_path / "slow"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM debian:bookworm\nRUN touch /started && sleep 120\n")
    buildah = ["buildah", "--root", str(store.home() / "buildah/root"), "--runroot", str(store.home() / "buildah/run")]

    def containers() -> str:
        return subprocess.run([*buildah, "containers", "--quiet"], capture_output=True, text=True).stdout.strip()

    # In a session of its own, so that Ctrl-C reaches racker and buildah alike, as a terminal's does.
    argv = [sys.executable, "-m", "racker", "pull", f"dockerfile:{context}"]
    pulling = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not containers():  # the RUN step's working container exists: the build is under way
            assert pulling.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.5)
        os.killpg(pulling.pid, signal.SIGINT)
        _, stderr = pulling.communicate(timeout=120)
    finally:
        pulling.kill()
    assert pulling.returncode != 0 and "Traceback" not in stderr, stderr
    assert containers() == "", "the interrupted build's working container is removed"
    assert str(store.home() / "buildah") not in Path("/proc/self/mountinfo").read_text()
    assert [p for p in (store.home() / "tmp").rglob("*") if p.name != ".new"] == [] and store.images() == []


def test_the_base_images_a_refresh_asks_about(tmp_path: Path) -> None:
    """Registry images only: not the file's own stages, scratch, or an image named by an ARG."""
    from racker.sources.dockerfile import base_images

    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "ARG BASE=debian:bookworm\nFROM --platform=linux/amd64 golang:1.22 AS build\nRUN true\n"
        "from build as test\nFROM $BASE\nFROM scratch\nFROM 127.0.0.1:5000/team/app@sha256:" + "0" * 64 + "\n"
        "COPY --from=build /x /x\nFROM debian:bookworm-slim\n"
    )
    assert base_images(dockerfile) == ["127.0.0.1:5000/team/app@sha256:" + "0" * 64, "debian:bookworm-slim", "golang:1.22"]
