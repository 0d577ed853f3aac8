"""dockerfile:DIR[#FILE] — an image built from a Dockerfile, then acquired like any other.

The Dockerfile may be remote (sources/remote_context.py makes it local first):
dockerfile:git+https://host/repo.git:/path/to/Dockerfile[#REF] or dockerfile:https://host/path/Dockerfile.

Built through the docker SDK when a Docker engine answers (sources/daemon.py
finds it), otherwise with buildah, which needs no daemon:

    buildah build --isolation chroot --format docker  (storage: the store's buildah/, so base
        images are pulled once; registries.conf as podman reads it, CONTAINERS_REGISTRIES_CONF passed on)
    buildah push ──▶ an OCI layout sharing the store's blobs ──umoci unpack──▶ the rootfs
    buildah inspect ──▶ the image config, HEALTHCHECK and STOPSIGNAL included

The catalogue entry may give `build_args` (a table) and `target` (a stage), and
`volumes`, `secrets` and `host_ca` for the RUN steps (sources/build_mounts.py). The
Docker SDK's build API has none of those three, so asking for one builds with
buildah even where an engine answers.
A failed build is one line, with the build's last lines of output below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from racker import proc, progress, store
from racker.errors import BadReference, RackerError, ToolMissing
from racker.sources import build_mounts, daemon, insecure, oci, remote_context
from racker.sources.build_mounts import Mounts
from racker.store.catalog import CatalogEntry
from racker.store.refs import Reference

TAIL_LINES = 15
PASSED_OVER = "the Docker engine's build API takes no volumes, secrets or CA"


class BuildFailed(RackerError):
    """The Dockerfile did not build; carries the build's last lines of output."""


def context_and_file(target: str) -> tuple[Path, Path]:
    """(build context, Dockerfile) from `DIR[#FILE]`, FILE relative to DIR."""
    directory, _, name = target.partition("#")
    context = Path(directory).expanduser().absolute()
    if not context.is_dir():
        raise BadReference(f"dockerfile:{target}: {context} is not a directory", hint="dockerfile:DIR, or dockerfile:DIR#FILE")
    dockerfile = (context / (name or "Dockerfile")).absolute()
    if not dockerfile.is_file():
        raise BadReference(f"dockerfile:{target}: no Dockerfile at {dockerfile}")
    return context, dockerfile


def recipe(ref: Reference) -> str:
    """A local build depends on its Dockerfile and every file of its context as they are now
    (path, type, size, mode, mtime), so editing either builds again, as `docker build` would.
    A remote one on its reference only: `racker pull --force` rebuilds a moving branch."""
    if remote_context.scheme_of(ref.target):
        return str(ref)
    try:
        context, dockerfile = context_and_file(ref.target)
    except BadReference:
        return str(ref)  # acquire() says what is wrong
    digest = hashlib.sha256(dockerfile.read_bytes())
    for top, dirs, files in os.walk(context):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(top, d))]):
            path = os.path.join(top, name)
            info = os.lstat(path)
            entry = f"{os.path.relpath(path, context)}\0{info.st_mode:o}\0{info.st_size}\0{info.st_mtime_ns}\n"
            digest.update(entry.encode(errors="surrogateescape"))
    return f"{ref} context:{digest.hexdigest()[:16]}"


def base_images(dockerfile: Path) -> list[str]:
    """The registry images a Dockerfile's FROM lines name (not its own stages, scratch, or a $ARG)."""
    stages: set[str] = set()
    found: list[str] = []
    for line in dockerfile.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) < 2 or words[0].upper() != "FROM":
            continue
        words = [w for w in words[1:] if not w.startswith("--")]
        if not words:
            continue
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        if image.lower() in stages or image == "scratch" or "$" in image:
            continue
        found.append(image)
    return sorted(set(found))


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """The digests its base images' tags name now (the context itself is in the recipe, as before)."""
    if remote_context.scheme_of(ref.target):
        return None  # fetched at build time: `racker pull --force` rebuilds a moving branch
    try:
        _context, dockerfile = context_and_file(ref.target)
    except BadReference:
        return None
    from racker.store import refs

    states = [f"{base}={oci.upstream_state(refs.parse('docker://' + base))}" for base in base_images(dockerfile)]
    return " ".join(states) or None


def build_options(entry: CatalogEntry | None) -> tuple[dict[str, str], str | None]:
    options = entry.options if entry else {}
    return dict(options.get("build_args", {})), options.get("target")


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    mounts = build_mounts.from_entry(entry)  # checked before anything is fetched or built
    if remote_context.scheme_of(ref.target):
        # Fetched into the pull's workdir, so removed with it; the manifest says where from, not the temp paths.
        local = remote_context.fetch(ref.fetch_target, rootfs.parent / "remote")
        context, dockerfile, origin = local.context, local.dockerfile, local.fields
    else:
        context, dockerfile = context_and_file(ref.target)
        origin = {"context": str(context), "dockerfile": str(dockerfile)}
    build_args, stage = build_options(entry)
    built = {**origin, "build_args": build_args, "target": stage, **mounts.describe()}
    if daemon.engine_answers():
        if not mounts:
            config = _with_engine(context, dockerfile, build_args, stage, rootfs)
            return {"build": dict(built, builder="docker engine"), "config": config}
        built["builder_why"] = PASSED_OVER
        try:
            proc.require("buildah")
        except ToolMissing as error:
            raise BuildFailed(
                f"{dockerfile}: volumes, secrets and host_ca need buildah, which is not installed",
                hint=PASSED_OVER + "; " + str(error.hint),
            ) from None
    config = _with_buildah(context, dockerfile, build_args, stage, rootfs, mounts, why=built.get("builder_why"))
    return {"build": dict(built, builder="buildah"), "config": config}


def buildah_argv(*words: str) -> list[str]:
    """buildah with the store's own storage, and the registries.conf podman would read."""
    home = store.home() / "buildah"
    argv = ["buildah", "--root", str(home / "root"), "--runroot", str(home / "run")]
    if os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        argv += ["--registries-conf", os.environ["CONTAINERS_REGISTRIES_CONF"]]
    return [*argv, *words]


def _with_buildah(
    context: Path, dockerfile: Path, build_args: dict[str, str], stage: str | None, rootfs: Path, mounts: Mounts, *, why: str | None = None
) -> dict:
    tag = f"localhost/racker-build-{os.urandom(6).hex()}"
    argv = ["build", "--isolation", "chroot", "--format", "docker", "--file", str(dockerfile), "--tag", tag, *mounts.argv()]
    if insecure():
        argv.append("--tls-verify=false")  # --insecure: the base images' registries too
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    if stage:
        argv += ["--target", stage]
    started = math.floor(time.time())  # tar keeps whole seconds: mount points made from now on are the build's
    with store.locked("buildah"), _removing_new_containers():
        with progress.step(f"building {dockerfile} with buildah" + (f" ({why})" if why else "")):
            result = proc.run(buildah_argv(*argv, str(context)), env=mounts.env(), timeout=3600, check=False)
        if result.failed:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:])
            raise BuildFailed(f"the build of {dockerfile} failed (buildah exit status {result.returncode})", hint=tail or None)
        try:
            layout = oci.shared_layout(rootfs.parent)
            proc.run(buildah_argv("push", "--quiet", tag, f"oci:{layout}:build"), timeout=1800)
            inspected = json.loads(proc.run(buildah_argv("inspect", "--type", "image", tag)).stdout)
            oci.unpack(layout, "build", rootfs)
            build_mounts.clean(rootfs, mounts.targets(), started)
        finally:
            proc.run(buildah_argv("rmi", tag), check=False, timeout=300)
    return daemon.kept_config(inspected.get("Docker", {}).get("config") or {})


def _containers() -> set[str]:
    listed = proc.run(buildah_argv("containers", "--quiet", "--notruncate"), check=False, timeout=120)
    return set(listed.stdout.split()) if listed.succeeded else set()


@contextlib.contextmanager
def _removing_new_containers() -> Iterator[None]:
    """Remove, whatever happens, the working containers (and their mounts) the build leaves:
    an interrupted or failed build leaves its stage's, and Debian 12's buildah sometimes
    one after COPY --from. Builds in one store take turns (the "buildah" lock), so every
    container that appears meanwhile is this build's."""
    before = _containers()
    try:
        yield
    finally:
        for container in sorted(_containers() - before):
            proc.run(buildah_argv("rm", container), check=False, timeout=120)


def _with_engine(context: Path, dockerfile: Path, build_args: dict[str, str], stage: str | None, rootfs: Path) -> dict:
    import docker

    engine = daemon.client()
    tag = f"localhost/racker-build-{os.urandom(6).hex()}"
    with progress.step(f"building {dockerfile} with the Docker engine"):
        try:
            image, _log = engine.images.build(
                path=str(context),
                dockerfile=str(dockerfile.relative_to(context)) if dockerfile.is_relative_to(context) else str(dockerfile),
                buildargs=build_args,
                target=stage,
                tag=tag,
                rm=True,
                forcerm=True,
            )
        except docker.errors.BuildError as error:
            tail = "\n".join(str(line.get("stream", line.get("error", ""))).rstrip() for line in error.build_log)
            raise BuildFailed(f"the build of {dockerfile} failed: {error.msg}", hint="\n".join(tail.splitlines()[-TAIL_LINES:])) from None
    try:
        return daemon.export_image(engine, image, tag, rootfs)
    finally:
        engine.images.remove(image.id, force=True)
