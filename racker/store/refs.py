"""Image references: one parser, one canonical form.

debian-bookworm                      a catalogue name
bootstrap:debian/bookworm            mmdebstrap from the distribution's archive
docker://debian:bookworm-slim        a registry image (skopeo + umoci)
docker://debian:bookworm@linux-arm64 the same, for another platform than the host's (pull --platform)
debian-bookworm@linux-arm64          a catalogue image bootstrapped for another platform (mmdebstrap --arch);
bootstrap:debian/bookworm@linux-arm64  likewise
docker-daemon:myimage:tag            exported from a Docker engine
oci:DIR[:TAG], oci-archive:FILE      an OCI image layout or archive; docker-archive:FILE (`docker save`)
containers-storage:NAME              an image podman or buildah built
dockerfile:path/to/dir[#FILE]        built with buildah, then imported; or a remote Dockerfile:
dockerfile:git+https://host/repo.git:/path/to/Dockerfile[#REF], dockerfile:https://host/path/Dockerfile
https://host/path/root.tar.xz        a cloud root tarball or disk image
file:disk.qcow2, file:vm.ova         a local disk image, OVA or Vagrant box (file:x.box#provider=libvirt: that one)
vagrant:debian/bullseye64            a Vagrant box from Vagrant Cloud (RACKER_VAGRANT_SERVER), newest version
vagrant:ORG/NAME@VERSION#provider=P  that version, that provider (libvirt or virtualbox; else libvirt first)
debian-bookworm+vm                   any of the above, prepared to boot as a VM (prepare.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from racker import redact
from racker.errors import BadReference
from racker.store import platforms
from racker.store.platforms import Platform

# The suffix of an image prepared to boot as a VM: `racker promote X` and `racker vm start X` make X+vm.
PREPARED = "+vm"
SCHEMES = (
    "bootstrap", "docker", "docker-daemon", "dockerfile", "https", "http", "file", "vagrant",
    "oci", "oci-archive", "docker-archive", "containers-storage",
)  # fmt: skip
# Local images skopeo reads: an OCI layout directory (oci:DIR[:TAG]), `docker save` and OCI archives,
# and podman's or buildah's storage.
# Where another platform's image can come from: a multi-arch index, or a bootstrap for that architecture.
PLATFORM_SCHEMES = ("docker", "bootstrap", "catalog")
LOCAL_IMAGE_SCHEMES = ("oci", "oci-archive", "docker-archive", "containers-storage")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SUITE = re.compile(r"^(debian|ubuntu)/[a-z][a-z0-9-]*$")
_VAGRANT = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?:@[\w.+-]+)?(?:#provider=[a-z0-9_-]+)?$")
_PATH = re.compile(r"^[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*$")
# docker reference grammar, simplified: [host[:port]/]path[:tag][@sha256:hex]
_DOCKER = re.compile(
    r"^(?:(?P<host>[a-zA-Z0-9.-]+(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class Reference:
    scheme: str  # "catalog" for a catalogue name, else one of SCHEMES
    target: str
    prepared: bool = False  # the image prepared from this one (NAME+vm), made here, never pulled
    # docker:// (chosen from a multi-arch index), bootstrap: and catalogue names (built for it); None is the host's
    platform: Platform | None = None
    # The target as typed where it holds a URL's secrets (`user:password@`, a token in the query),
    # kept apart so that no name, recipe or manifest made from the reference holds them: `target`
    # is the redacted form; only `fetch_target` (what a source fetches from) gives the secrets back.
    secret_target: str = field(default="", compare=False, repr=False)

    @property
    def fetch_target(self) -> str:
        """The target with its URL's credentials: for the source that fetches it, never to show or store."""
        return self.secret_target or self.target

    def __str__(self) -> str:
        if self.scheme == "catalog":
            text = self.target
        elif self.scheme in ("docker", "https", "http"):
            text = f"{self.scheme}://{self.target}"
        else:
            text = f"{self.scheme}:{self.target}"
        if self.platform is not None:
            text += f"@{self.platform.tag}"
        return text + PREPARED if self.prepared else text

    def for_platform(self, platform: Platform | None) -> Reference:
        """This reference for `platform` (None or the host's: the host's), refused where no source can build one."""
        if platform is None or platform == platforms.host():
            return replace(self, platform=None)
        if self.scheme not in PLATFORM_SCHEMES:
            raise BadReference(f"a platform can only be chosen for docker://, bootstrap: and catalogue images, not {self}")
        return replace(self, platform=platform)


def parse(text: str) -> Reference:
    """Parse what a user typed; BadReference says what is wrong with it."""
    text = text.strip()
    if text.endswith(PREPARED):
        base = text.removesuffix(PREPARED).strip()
        if base.endswith(PREPARED):
            raise BadReference(f"{text!r} is prepared twice; a prepared image ends in one {PREPARED}")
        return replace(parse(base), prepared=True)
    if not text:
        raise BadReference("empty image reference")
    head, colon, rest = text.partition(":")
    if colon and head in SCHEMES and not rest.startswith("//"):
        scheme, target = head, rest  # SCHEME:TARGET, where TARGET may be a URL (dockerfile:git+https://…)
    elif "://" in text:
        scheme, _, target = text.partition("://")
    elif _NAME.match(text):
        return Reference("catalog", text)
    elif _NAME.match(text.partition("@")[0]):
        name, platform = split_platform(text)  # debian-bookworm@linux-arm64
        return Reference("catalog", name).for_platform(platform)
    else:
        raise BadReference(f"cannot parse image reference {text!r}; expected a catalogue name or SCHEME:TARGET ({', '.join(SCHEMES)})")
    if scheme not in SCHEMES:
        raise BadReference(f"unknown scheme {scheme!r} in {text!r}; known: {', '.join(SCHEMES)}")
    if not target:
        raise BadReference(f"{text!r} names nothing after {scheme}:")
    platform = None
    if scheme in ("docker", "bootstrap"):
        target, platform = split_platform(target)
    if scheme == "bootstrap" and not _SUITE.match(target):
        raise BadReference(f"bad bootstrap reference {text!r}; expected bootstrap:debian/SUITE")
    if scheme == "vagrant" and not _VAGRANT.match(target):
        raise BadReference(f"bad Vagrant box reference {text!r}; expected vagrant:ORG/NAME[@VERSION][#provider=NAME]")
    typed = target
    if scheme in ("http", "https"):
        target = redact.url(f"{scheme}://{target}").partition("://")[2]
    elif scheme == "dockerfile" and "://" in target:
        target = redact.url(target)
    secret = typed if typed != target else ""
    if scheme == "docker":
        target = normalise_docker(target, text)
    if scheme in ("oci", "oci-archive", "docker-archive", "file"):
        target = absolute_path(target, tagged=scheme == "oci")
    return replace(Reference(scheme, target).for_platform(platform), secret_target=secret)


def split_platform(target: str) -> tuple[str, Platform | None]:
    """A docker target's trailing @OS-ARCH[-VARIANT] (a store name's platform), apart from the target.
    An @sha256:… digest is no platform."""
    rest, sep, tag = target.rpartition("@")
    if not sep or tag.startswith("sha256:"):
        return target, None
    return rest, platforms.from_tag(tag)


def absolute_path(target: str, *, tagged: bool) -> str:
    """A file or directory target made absolute, so that a stored name means one thing wherever it is typed.
    `tagged`: an OCI layout's `DIR[:TAG]`."""
    import os

    path, tag = layout_and_tag(target) if tagged else (target, "")
    return os.path.abspath(os.path.expanduser(path)) + (f":{tag}" if tag else "")


def layout_and_tag(target: str) -> tuple[str, str]:
    """An OCI layout's `DIR[:TAG]` as (DIR, TAG or ""): a tag has no '/'."""
    path, sep, tag = target.rpartition(":")
    return (path, tag) if sep and path and "/" not in tag else (target, "")


def normalise_docker(target: str, text: str) -> str:
    """Docker Hub defaults: `debian` is docker.io/library/debian:latest."""
    match = _DOCKER.match(target)
    if not match:
        raise BadReference(f"malformed docker reference {text!r}")
    host, path, tag, digest = match["host"], match["path"], match["tag"], match["digest"]
    if host is None or ("." not in host and ":" not in host and host != "localhost"):
        # The first component was part of the path, not a registry host.
        path = f"{host}/{path}" if host else path
        host = "docker.io"
        if not _PATH.match(path):
            raise BadReference(f"malformed docker reference {text!r}: repository names are lower case")
    if host == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = "latest"
    return f"{host}/{path}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
