"""docker://[host[:port]/]name[:tag|@digest] — an image from a registry, with skopeo and umoci.

    registry ──skopeo copy──▶ an OCI layout in the workdir, whose blobs are the store's
             (oci-blobs/, shared by every image: a layer is downloaded and kept once)
             ──umoci unpack──▶ the root filesystem (layers applied in order, whiteouts honoured)

skopeo verifies every blob against its digest as it downloads it, and the
manifest against a pinned @digest. The manifest's digest and the image
configuration (Entrypoint, Cmd, Env, …) go into the store's manifest.

Registries answer over HTTPS; plain HTTP (or a certificate not verified) only
for a registry on loopback, with RACKER_INSECURE_REGISTRIES=host[:port],…, or
for the one pull asked for with --insecure (sources.insecure_pull()).

A multi-arch index resolves to the host's platform, or to the reference's
(`racker pull --platform linux/arm64` pulls docker://…@linux-arm64): skopeo's
--override-os/--override-arch/--override-variant choose it. The platform the
image's config declares is recorded as oci.platform; a platform the index lacks
is one error naming those it has.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

from racker import proc, progress, settings, store, untrusted
from racker.errors import BadArchive, BadReference, ToolFailed
from racker.sources import insecure, registries, seen_upstream
from racker.store import platforms, refs
from racker.store.catalog import CatalogEntry
from racker.store.platforms import Platform
from racker.store.refs import Reference


def registry_host(ref: Reference) -> str:
    return ref.target.split("/", 1)[0]


def is_loopback(host: str) -> bool:
    """A registry on this machine: localhost or a loopback address, with any port."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def tls_verify(host: str) -> bool:
    """Whether `host` must answer HTTPS with a verified certificate (a pull asked with --insecure: no)."""
    listed = settings.INSECURE_REGISTRIES.get() or set()
    return not (insecure() or is_loopback(host) or host in listed)


def auth_options() -> list[str]:
    """The credentials file podman and docker would use, if there is one."""
    candidates = [
        os.environ.get("REGISTRY_AUTH_FILE", ""),
        os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/run/user/0"), "containers/auth.json"),
        os.path.join(os.environ.get("DOCKER_CONFIG", os.path.expanduser("~/.docker")), "config.json"),
    ]
    for path in candidates:
        if path and os.path.isfile(path):
            return ["--authfile", path]
    return []


def shared_layout(work: Path) -> Path:
    """An empty OCI layout in `work` whose blobs directory is the store's shared one."""
    blobs = store.home() / "oci-blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layout = work / "layout"
    (layout / "blobs").mkdir(parents=True)
    (layout / "blobs" / "sha256").symlink_to(blobs)
    return layout


def read_layout(layout: Path, tag: str) -> tuple[str, dict]:
    """(manifest digest, OCI image configuration) of `tag` in a layout."""
    index = untrusted.load_json(layout / "index.json", name=f"{layout}/index.json")
    for descriptor in index.get("manifests", []):
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = untrusted.load_json(_blob(layout, descriptor["digest"]), name=f"the manifest {descriptor['digest']}")
            config = untrusted.load_json(_blob(layout, manifest["config"]["digest"]), name="the image configuration")
            return descriptor["digest"], config
    raise BadReference(f"{tag!r} is not in the OCI layout {layout}")


def _blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
        raise BadReference(f"unexpected digest {digest!r} in an OCI layout")
    return layout / "blobs" / "sha256" / hexdigest


def copy_argv(source: str, layout: Path, tag: str, *, verify: bool = True, platform: Platform | None = None) -> list[str]:
    return [
        "skopeo", *(platform.skopeo_options() if platform else []),
        "copy", "--quiet", *auth_options(), f"--src-tls-verify={str(verify).lower()}", source, f"oci:{layout}:{tag}",
    ]  # fmt: skip


def index_platforms(source: str, verify: bool) -> list[Platform]:
    """The platforms a multi-arch index lists (none for a single image, or if it cannot be read)."""
    argv = ["skopeo", "inspect", "--raw", *auth_options(), f"--tls-verify={str(verify).lower()}", source]
    result = proc.run(argv, timeout=300, check=False)
    try:
        index = untrusted.load_json(result.stdout, name=f"{source}'s index") if result.succeeded else {}
    except BadArchive:
        return []
    found = (platforms.of_config(m.get("platform") or {}) for m in index.get("manifests", []) if isinstance(m, dict))
    return sorted({p for p in found if p is not None})


def sources(ref: Reference) -> list[tuple[str, bool]]:
    """(skopeo source, verify TLS) to try in order: a registry's mirrors then itself, or the local image."""
    if ref.scheme != "docker":
        return [(f"{ref.scheme}:{ref.target}", True)]
    return [
        (f"docker://{s.reference}", tls_verify(s.reference.split("/", 1)[0]) and not s.insecure) for s in registries.sources(ref.target)
    ]


def local_path(ref: Reference) -> Path | None:
    """The file or directory a local image reference names (an OCI layout's, without its :TAG)."""
    if ref.scheme in ("oci-archive", "docker-archive"):
        return Path(ref.target)
    if ref.scheme == "oci":
        return Path(refs.layout_and_tag(ref.target)[0])
    return None


def recipe(ref: Reference) -> str:
    """What the stored image of `ref` depends on: for an archive or a layout, the file as it is now."""
    path = local_path(ref)
    if path is not None and path.exists():
        info = (path / "index.json" if path.is_dir() else path).stat()
        return f"{ref} {info.st_size} {info.st_mtime_ns} {info.st_ino}"
    return str(ref)


def unpack(layout: Path, tag: str, rootfs: Path) -> None:
    """umoci unpack into a bundle beside `rootfs`, then the bundle's rootfs becomes `rootfs`."""
    bundle = rootfs.parent / "bundle"
    with progress.step("unpacking the layers"):
        proc.run(["umoci", "unpack", "--keep-dirlinks", "--image", f"{layout}:{tag}", str(bundle)], timeout=1800)
    os.rename(bundle / "rootfs", rootfs)
    store.remove_tree(bundle)


# What skopeo says when a registry did not answer at all (not: answered wrong).
_UNREACHABLE = (
    "connection refused", "i/o timeout", "no such host", "timeout", "deadline exceeded", "connection reset", "eof",
    "service unavailable", "bad gateway", "gateway timeout", "internal server error", "too many requests",
)  # fmt: skip


def without_tag(target: str) -> str:
    """host/path of host/path:tag (a port's colon stays)."""
    head, _, last = target.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def pinned(source: str, digest: str) -> str:
    """A docker:// source by `digest` instead of its tag: skopeo then refuses a manifest of other content."""
    if "@" in source:
        return source
    return "docker://" + without_tag(source.removeprefix("docker://")) + "@" + digest


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """The digest of the manifest (or index) the tag names now: one request, `skopeo inspect --raw`,
    through registries.conf's mirrors and the credentials a pull uses, in the order a pull tries them."""
    if ref.scheme != "docker":
        return None  # a local layout or archive: its recipe (the file as it is now) decides
    if "@sha256:" in ref.target:
        return "sha256:" + ref.target.rsplit("@sha256:", 1)[1]  # pinned: never moves
    from racker.errors import ToolTimeout, UpstreamError, UpstreamUnreachable
    from racker.sources import upstream_timeout

    wait = upstream_timeout()
    failures, bad = [], []
    tried = sources(ref)
    for source, verify in tried:
        said = f"{source}: " if len(tried) > 1 else ""  # which of a registry's mirrors said it
        argv = ["skopeo", "--command-timeout", f"{int(wait)}s", "inspect", "--raw", *auth_options()]
        argv += [f"--tls-verify={str(verify).lower()}", source]
        try:
            raw = proc.run(argv, timeout=wait + 10).stdout_bytes
        except ToolTimeout:
            failures.append(f"{said}no answer in {int(wait)} s")
            continue
        except ToolFailed as failed:
            reason = _skopeo_reason(failed.stderr)
            if reason.startswith("Error parsing image name") and '": ' in reason:
                reason = reason.split('": ', 1)[1]  # skopeo's wrapping of any failure to reach the registry
            (failures if any(m in reason.lower() for m in _UNREACHABLE) else bad).append(f"{said}{reason}")
            continue
        try:
            untrusted.load_json(raw, name=f"{said}its manifest")
        except BadArchive:
            bad.append(f"{said}its manifest is not JSON")
            continue
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    if bad:
        raise UpstreamError("; ".join(bad + failures))
    raise UpstreamUnreachable("; ".join(failures))


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    layout = shared_layout(rootfs.parent)
    tag = "pull"
    failures = []
    seen = seen_upstream()
    for source, verify in sources(ref):
        # By the digest the upstream named when asked (refresh, or a first pull): exactly that, or skopeo's refusal.
        copied = pinned(source, seen) if ref.scheme == "docker" and seen and seen.startswith("sha256:") else source
        with progress.step(f"copying {copied} with skopeo"):
            try:
                proc.run(copy_argv(copied, layout, tag, verify=verify, platform=ref.platform), timeout=3600)
                break
            except ToolFailed as failed:
                failures.append(f"{copied}: {_failure(copied, verify, ref.platform, failed.stderr)}")
    else:
        raise BadReference(f"cannot pull {ref}: " + "; ".join(failures))
    digest, config = read_layout(layout, tag)
    got = platforms.of_config(config)
    if ref.platform is not None and not _serves(got, ref.platform):
        # A single image, not an index: skopeo copies it whatever its platform.
        raise BadReference(f"cannot pull {ref}: {source} is a {got or 'platform-less'} image, not {ref.platform}")
    unpack(layout, tag, rootfs)
    return {
        "oci": {
            "reference": str(ref),
            "pulled_from": source.removeprefix("docker://"),
            "manifest_digest": digest,
            "architecture": config.get("architecture", ""),
            "platform": str(got or ""),
        },
        "config": config.get("config") or {},
    }


def _serves(got: Platform | None, wanted: Platform) -> bool:
    """Whether an image of platform `got` is the one asked for; a config without a variant serves any."""
    return got is not None and (got.os, got.architecture) == (wanted.os, wanted.architecture) and got.variant in ("", wanted.variant)


# What skopeo says when a registry needs --insecure, and the line racker says instead.
_NEEDS_INSECURE = {
    "server gave HTTP response to HTTPS client": "{host} answers plain HTTP, not HTTPS",
    "x509: ": "{host}'s TLS certificate is not trusted",
    "tls: failed to verify certificate": "{host}'s TLS certificate is not trusted",
}
_NO_PLATFORM = ("no image found in manifest list", "no image found in image index")


def _failure(source: str, verify: bool, platform: Platform | None, stderr: str) -> str:
    """Why skopeo could not copy `source`, in one line that says what to do."""
    reason = _skopeo_reason(stderr)
    if any(marker in reason for marker in _NO_PLATFORM):
        wanted = platform or platforms.host()
        listed = ", ".join(str(p) for p in index_platforms(source, verify)) or "other platforms"
        return f"no {wanted} image in its index, which has {listed} (choose one with --platform)"
    host = source.removeprefix("docker://").split("/", 1)[0]
    for marker, said in _NEEDS_INSECURE.items():
        if verify and marker in reason:
            return said.format(host=host) + " (if you trust it, pull with --insecure)"
    return reason


def _skopeo_reason(stderr: str) -> str:
    """skopeo's last line, without its 'time=… level=fatal msg=' wrapping."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "skopeo failed"
    if 'msg="' in last:
        last = last.split('msg="', 1)[1].rstrip('"')
    return last.replace('\\"', '"')
