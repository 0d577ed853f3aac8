"""docker-daemon:NAME[:TAG] — an image from a Docker engine, through the `docker` SDK.

Any engine that speaks Docker's API will do: dockerd, or podman's
`podman system service`. The engine is DOCKER_HOST, else /var/run/docker.sock,
else podman's /run/podman/podman.sock. A container is created (never started),
its filesystem exported as a tar stream into the safe extractor, and removed
whatever happens; the image configuration comes from `inspect`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from racker import progress
from racker.errors import BadReference, RackerError
from racker.sources import extract
from racker.store.catalog import CatalogEntry
from racker.store.refs import Reference

SOCKETS = ("/var/run/docker.sock", "/run/podman/podman.sock")
# What racker keeps of the engine's image configuration (docker inspect's Config).
CONFIG_KEYS = (
    "Entrypoint", "Cmd", "Env", "WorkingDir", "User", "ExposedPorts", "Labels", "StopSignal", "Healthcheck", "Volumes", "OnBuild",
)  # fmt: skip


class EngineUnavailable(RackerError):
    """No Docker engine answers where racker looked."""


def engine_url() -> str:
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    for path in SOCKETS:
        if os.path.exists(path):
            return f"unix://{path}"
    raise EngineUnavailable("no Docker engine: DOCKER_HOST is not set and neither " + " nor ".join(SOCKETS) + " exists")


def client():  # type: ignore[no-untyped-def]
    import docker  # the SDK loads only when an engine is used

    url = engine_url()
    try:
        engine = docker.DockerClient(base_url=url, timeout=600)
        engine.ping()
    except docker.errors.DockerException as error:
        raise EngineUnavailable(f"the Docker engine at {url} does not answer: {error}") from None
    return engine


class ChunkReader(io.RawIOBase):
    """A file object over an iterable of byte chunks (the SDK's export stream), read once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:  # type: ignore[no-untyped-def]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def image_name(ref: Reference) -> str:
    last = ref.target.rsplit("/", 1)[-1]
    return ref.target if ":" in last or "@" in last else f"{ref.target}:latest"


def engine_answers() -> bool:
    """An engine is configured or found, and answers (the Dockerfile source then builds with it)."""
    try:
        client()
    except EngineUnavailable:
        return False
    return True


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    import docker

    name = image_name(ref)
    engine = client()
    try:
        image = engine.images.get(name)
    except docker.errors.ImageNotFound:
        raise BadReference(f"the Docker engine at {engine_url()} has no image {name!r}") from None
    except docker.errors.APIError as error:
        raise BadReference(f"the Docker engine could not look up {name!r}: {error.explanation or error}") from None
    return {
        "engine": {"reference": name, "image_id": image.id, "url": engine_url()},
        "config": export_image(engine, image, name, rootfs),
    }


def export_image(engine, image, name: str, rootfs: Path) -> dict:  # type: ignore[no-untyped-def]
    """Unpack an engine's image into `rootfs` (through a container made for it); its config."""
    rootfs.mkdir()
    container = engine.containers.create(image.id, command=["/racker-never-started"], entrypoint=[])
    try:
        with progress.step(f"exporting {name} from the Docker engine"):
            extract.extract(io.BufferedReader(ChunkReader(container.export()), 1 << 20), rootfs, name=f"the export of {name}")
    finally:
        container.remove(force=True)
    return kept_config(image.attrs.get("Config") or {})


def kept_config(config: dict) -> dict:
    return {key: config[key] for key in CONFIG_KEYS if config.get(key) not in (None, "", [], {})}
