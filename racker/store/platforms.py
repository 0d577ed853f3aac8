"""Image platforms, written as docker writes them: OS/ARCH[/VARIANT] (linux/arm64, linux/arm/v7).

A registry's multi-arch index lists one image per platform; a pull takes the
host's unless told otherwise. In a store name a platform is a tag,
OS-ARCH[-VARIANT] (linux-arm64), since a name already uses / and :.
"""

from __future__ import annotations

import platform as _host
import re
from dataclasses import dataclass
from functools import cache

from racker.errors import BadReference

# Go's GOOS and GOARCH values: what image configs and indexes hold.
OSES = frozenset((
    "aix", "android", "darwin", "dragonfly", "freebsd", "illumos", "ios", "js", "linux", "netbsd", "openbsd", "plan9",
    "solaris", "wasip1", "windows",
))  # fmt: skip
ARCHITECTURES = frozenset((
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le", "ppc64", "ppc64le", "riscv64", "s390x", "wasm",
))  # fmt: skip
# Other spellings of an architecture, as containerd normalises them: (architecture, variant).
ALIASES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
}
# A variant that says nothing more than its architecture does: arm64/v8 is arm64.
DEFAULT_VARIANTS: dict[str, str] = {"arm64": "v8"}
_VARIANT = re.compile(r"^[a-z0-9]+$")
EXAMPLE = "expected OS/ARCH[/VARIANT], e.g. linux/arm64 or linux/arm/v7"


@dataclass(frozen=True, order=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @property
    def tag(self) -> str:
        """The platform in a store name: linux-arm-v7."""
        return str(self).replace("/", "-")

    def skopeo_options(self) -> list[str]:
        """skopeo's global options choosing this platform from an index."""
        options = ["--override-os", self.os, "--override-arch", self.architecture]
        return [*options, "--override-variant", self.variant] if self.variant else options


def parse(text: str) -> Platform:
    """OS/ARCH[/VARIANT] as docker takes it (--platform); BadReference says what is wrong."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadReference(f"bad platform {text!r}: {EXAMPLE}")
    return _checked(text, *parts)


def from_tag(tag: str) -> Platform:
    """The platform a store name's OS-ARCH[-VARIANT] tag says."""
    parts = tag.split("-")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadReference(f"bad platform {tag!r}: expected OS-ARCH[-VARIANT], e.g. linux-arm64 or linux-arm-v7")
    return _checked(tag, *parts)


def of_config(config: dict) -> Platform | None:
    """The platform an OCI image configuration (or an index entry's `platform`) declares, if any."""
    os_name, architecture = config.get("os"), config.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str) or not os_name or not architecture:
        return None
    variant = config.get("variant")
    return normalise(Platform(os_name, architecture, variant if isinstance(variant, str) else ""))


def normalise(platform: Platform) -> Platform:
    architecture, variant = ALIASES.get(platform.architecture, (platform.architecture, ""))
    variant = platform.variant or variant
    if DEFAULT_VARIANTS.get(architecture) == variant:
        variant = ""
    return Platform(platform.os, architecture, variant)


def _checked(text: str, os_name: str, architecture: str, variant: str = "") -> Platform:
    found = normalise(Platform(os_name, architecture, variant))
    if found.os not in OSES:
        raise BadReference(f"bad platform {text!r}: unknown OS {os_name!r} ({EXAMPLE})")
    if found.architecture not in ARCHITECTURES:
        raise BadReference(f"bad platform {text!r}: unknown architecture {architecture!r} ({EXAMPLE})")
    if found.variant and not _VARIANT.match(found.variant):
        raise BadReference(f"bad platform {text!r}: bad variant {variant!r} ({EXAMPLE})")
    return found


def of_manifest(manifest: dict) -> Platform | None:
    """The platform a stored image was made for, as its manifest records it (a docker:// pull's
    oci.platform, a bootstrap's bootstrap.platform); None if it records none (the host's)."""
    for kind in ("oci", "bootstrap"):
        recorded = (manifest.get(kind) or {}).get("platform")
        if isinstance(recorded, str) and recorded:
            try:
                return parse(recorded)
            except BadReference:
                return None
    return None


@cache
def host() -> Platform:
    """This machine's platform: what a pull gets when no --platform is given."""
    machine = _host.machine().lower()
    architecture, variant = ALIASES.get(machine, (machine, ""))
    return Platform("linux", architecture, variant)
