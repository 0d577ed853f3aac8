"""Export: a stored image back out, as what `docker load`, `podman load` and `docker import` take,
or pushed to a registry.

    image ──tar──▶ one-layer OCI layout (config from the manifest) ──skopeo──▶ oci-archive, docker-archive, docker://
    image ──tar──▶ rootfs-tar (for `docker import`)

The layer is the root filesystem as GNU tar writes it (numeric owners, file
capabilities kept, names sorted), so the same image always exports the same
layer, and pulling it back gives the same filesystem digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from racker import proc, progress, store
from racker.errors import BadReference

FORMATS = ("oci-archive", "docker-archive", "rootfs-tar")
LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def write_layer(rootfs: Path, output: Path) -> None:
    """The root filesystem as one tar: what a layer holds and what `docker import` takes.

    A store image's files never change, but hard-linking them (another promote
    staging the same image) changes their ctime, which GNU tar reports as
    "file changed as we read it" with exit status 1: expected here, and quiet.
    """
    with open(output, "wb") as handle:
        proc.run(
            [
                "tar", "--create", "--format=posix", "--numeric-owner", "--sort=name",
                "--xattrs", "--xattrs-include=security.capability", "--warning=no-file-changed",
                "--pax-option=delete=atime,delete=ctime", "--directory", str(rootfs), ".",
            ],
            stdout=handle,
            ok_codes=(0, 1),
            timeout=1800,
        )  # fmt: skip


def _blob(layout: Path, data: bytes | None = None, path: Path | None = None) -> dict:
    """Put content into the layout's blobs (by digest); its descriptor fields."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if path is not None:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = path.stat().st_size
        os.replace(path, blobs / digest)
    else:
        assert data is not None
        digest = hashlib.sha256(data).hexdigest()
        size = len(data)
        (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": size}


def write_layout(image: store.StoredImage, layout: Path, tag: str, work: Path) -> str:
    """A one-layer OCI image layout of `image` at `layout`, tagged `tag`; the manifest's digest."""
    layer_file = work / "layer.tar"
    with progress.step("writing the layer"), store.reading(image) as rootfs:
        write_layer(rootfs, layer_file)
    layer = _blob(layout, path=layer_file)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": image.created,
        "config": image_config(image),
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
        "history": [{"created": image.created, "created_by": f"racker export {image.name}"}],
    }
    config_descriptor = _blob(layout, data=_canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **config_descriptor},
        "layers": [{"mediaType": LAYER, **layer}],
    }
    manifest_descriptor = _blob(layout, data=_canonical(manifest))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": MANIFEST, **manifest_descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}},
        ],
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_bytes(_canonical(index))
    return manifest_descriptor["digest"]


def image_config(image: store.StoredImage) -> dict:
    """The OCI `config` object (Entrypoint, Cmd, Env, …) the image came with, if any."""
    config = image.manifest.get("config")
    return config if isinstance(config, dict) else {}


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def export(image: store.StoredImage, output: Path, fmt: str) -> Path:
    """Write `image` to `output` in `fmt`; the file appears complete or not at all."""
    if fmt not in FORMATS:
        raise BadReference(f"unknown export format {fmt!r}", hint="one of: " + ", ".join(FORMATS))
    output = output.absolute()
    with progress.step(f"exporting {image.name} as {fmt}"), store.workdir("export") as work, store.output_file(work, output) as partial:
        if fmt == "rootfs-tar":
            with store.reading(image) as rootfs:
                write_layer(rootfs, partial)
            return output
        layout = work / "layout"
        write_layout(image, layout, "latest", work)
        partial.unlink()  # skopeo makes the file itself
        destination = f"{fmt}:{partial}" + (f":{_docker_tag(image)}" if fmt == "docker-archive" else "")
        proc.run(["skopeo", "copy", "--quiet", f"oci:{layout}:latest", destination], timeout=1800)
    return output


def push(image: store.StoredImage, destination: str, *, tls_verify: bool = True) -> str:
    """Push `image` to a registry (`docker://host/name:tag`); the pushed manifest's digest."""
    from racker.sources import oci
    from racker.store import refs

    ref = refs.parse(destination)
    if ref.scheme != "docker":
        raise BadReference(f"cannot push to {destination!r}: racker pushes to docker://HOST/NAME[:TAG]")
    with progress.step(f"pushing {image.name} to {ref}"), store.workdir("push") as work:
        layout = work / "layout"
        write_layout(image, layout, "latest", work)
        digestfile = work / "digest"
        verify = tls_verify and oci.tls_verify(oci.registry_host(ref))
        proc.run(
            ["skopeo", "copy", "--quiet", f"--dest-tls-verify={str(verify).lower()}", "--digestfile", str(digestfile),
             f"oci:{layout}:latest", str(ref)],
            timeout=3600,
        )  # fmt: skip
        return digestfile.read_text().strip()


def _docker_tag(image: store.StoredImage) -> str:
    """A `name:tag` that `docker load` shows: docker's grammar, from the store name."""
    import re

    name = re.sub(r"[^a-z0-9._-]+", "-", image.name.lower()).strip("-._") or "image"
    return f"racker/{name}:latest"
