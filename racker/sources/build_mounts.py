"""What a Dockerfile build lends its RUN steps and the image never keeps: volumes, secrets, the host's CA.

From the catalogue entry (sources/dockerfile.py passes them to `buildah build`):

    volumes = ["cache:/cache:ro"]               # --volume HOST:CONTAINER[:OPTIONS]
    secrets = ["id=token,src=token.txt",        # --secret: `RUN --mount=type=secret,id=token`
               "id=pat,env=GITHUB_TOKEN"]       #   reads /run/secrets/token (a file, or a variable's value)
    host_ca = true                              # the host's CA bundle, read-only at CA_TARGETS

host_ca's bundle is $RACKER_BUILD_CA, else /etc/ssl/certs/ca-certificates.crt; with no
host_ca key, setting RACKER_BUILD_CA alone turns it on (a CI behind a TLS-intercepting
proxy sets it once). Relative host paths are relative to the catalogue file. Everything
is checked when the entry is read, before anything builds: one line naming the file.

Only RUN steps see these (buildah mounts them per step). Where a target did not exist,
buildah leaves an empty file or directory behind; clean() removes those from the
unpacked rootfs. Not done: SSL_CERT_FILE and friends (buildah's --env would keep them
in the image config), and a RUN step cannot replace a file mounted over
(update-ca-certificates in the build then fails with EBUSY).
Secrets enter the manifest by id, never their contents.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from racker import settings
from racker.errors import RackerError
from racker.store import imagetree
from racker.store.catalog import BadCatalogEntry, CatalogEntry

DEFAULT_CA = "/etc/ssl/certs/ca-certificates.crt"
# Where TLS clients look for the system bundle: Debian, Ubuntu, Alpine, Arch; Fedora, RHEL.
CA_TARGETS = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
SECRETS_DIR = "/run/secrets"
VOLUME_OPTIONS = frozenset({
    "ro", "rw", "z", "Z", "U", "O", "bind", "rbind", "shared", "rshared", "private", "rprivate",
    "slave", "rslave", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
})  # fmt: skip
SECRET_KEYS = ("id", "src", "env", "type")
SECRET_TYPES = {"src": "file", "env": "env"}  # buildah's type= for each way of giving the value


class BadBuildCA(RackerError):
    """RACKER_BUILD_CA (or the default bundle) names no file."""


@dataclass(frozen=True)
class Volume:
    host: Path
    target: str
    options: str = ""

    def spec(self) -> str:
        return ":".join([str(self.host), self.target, *([self.options] if self.options else [])])


@dataclass(frozen=True)
class Secret:
    id: str
    src: Path | None = None
    env: str | None = None

    def spec(self) -> str:
        return f"id={self.id},src={self.src}" if self.src else f"id={self.id},env={self.env}"


@dataclass(frozen=True)
class Mounts:
    volumes: tuple[Volume, ...] = ()
    secrets: tuple[Secret, ...] = ()
    ca: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.volumes or self.secrets or self.ca)

    def argv(self) -> list[str]:
        words = []
        for volume in self.volumes:
            words += ["--volume", volume.spec()]
        for secret in self.secrets:
            words += ["--secret", secret.spec()]
        for target in CA_TARGETS if self.ca else ():
            words += ["--volume", f"{self.ca}:{target}:ro"]
        return words

    def env(self) -> dict[str, str]:
        """The variables env= secrets read: buildah gets them, racker's tools otherwise do not."""
        return {s.env: os.environ[s.env] for s in self.secrets if s.env}

    def targets(self) -> list[str]:
        """Paths in the image where buildah may have left an empty mount point."""
        return [
            *(v.target for v in self.volumes),
            *([SECRETS_DIR] if self.secrets else []),
            *(CA_TARGETS if self.ca else ()),
        ]

    def describe(self) -> dict:
        """For the manifest: volumes as given, secrets by id only, the CA bundle's path."""
        described: dict = {}
        if self.volumes:
            described["volumes"] = [v.spec() for v in self.volumes]
        if self.secrets:
            described["secrets"] = [s.id for s in self.secrets]
        if self.ca:
            described["host_ca"] = str(self.ca)
        return described


def from_entry(entry: CatalogEntry | None) -> Mounts:
    """The entry's volumes, secrets and CA, checked: BadCatalogEntry names the file and the key."""
    options = entry.options if entry else {}
    here = entry.path.parent if entry and entry.path else Path.cwd()
    where = f"catalogue file {entry.path}" if entry else "the build"
    parsed: dict[str, list] = {"volumes": [], "secrets": []}
    for key, parse in (("volumes", _volume), ("secrets", _secret)):
        for index, spec in enumerate(options.get(key, ())):
            try:
                parsed[key].append(parse(spec, here))
            except ValueError as problem:
                raise BadCatalogEntry(f"{where}: {key}[{index}] {spec!r}: {problem}", hint=f"e.g. {key} = [{EXAMPLES[key]}]") from None
    ids = [secret.id for secret in parsed["secrets"]]
    if len(set(ids)) != len(ids):
        raise BadCatalogEntry(f"{where}: secrets: an id is given twice ({', '.join(ids)})")
    return Mounts(tuple(parsed["volumes"]), tuple(parsed["secrets"]), _ca(options.get("host_ca")))


EXAMPLES = {"volumes": '"cache:/cache:ro"', "secrets": '"id=token,src=token.txt"'}


def _volume(spec: str, here: Path) -> Volume:
    """ValueError says what is wrong with `spec`."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError("not HOST:CONTAINER[:OPTIONS]")
    host = (here / Path(parts[0]).expanduser()).absolute()
    target = parts[1]
    if not host.exists():
        raise ValueError(f"the host path {host} does not exist")
    if not PurePosixPath(target).is_absolute() or ".." in PurePosixPath(target).parts:
        raise ValueError(f"the container path {target!r} is not an absolute path")
    options = parts[2] if len(parts) == 3 else ""
    unknown = [o for o in options.split(",") if options and o not in VOLUME_OPTIONS]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(VOLUME_OPTIONS))})")
    return Volume(host, os.path.normpath(target), options)


def _secret(spec: str, here: Path) -> Secret:
    fields = dict(item.partition("=")[::2] for item in spec.split(","))
    unknown = [key for key in fields if key not in SECRET_KEYS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(SECRET_KEYS)})")
    secret_id = fields.get("id", "")
    if not secret_id or "/" in secret_id or secret_id in (".", ".."):
        raise ValueError("no id (a file name under /run/secrets)")
    if ("src" in fields) == ("env" in fields):
        raise ValueError("give exactly one of src=PATH and env=VARIABLE")
    kind = "src" if "src" in fields else "env"
    if fields.get("type", SECRET_TYPES[kind]) != SECRET_TYPES[kind]:
        raise ValueError(f"type={fields['type']} does not go with {kind}=")
    if kind == "env":
        if fields["env"] not in os.environ:
            raise ValueError(f"the variable {fields['env']} is not set")
        return Secret(secret_id, env=fields["env"])
    src = (here / Path(fields["src"]).expanduser()).absolute()
    if not src.is_file():
        raise ValueError(f"{src} is not a file")
    return Secret(secret_id, src=src)


def _ca(asked: bool | None) -> Path | None:
    """The CA bundle to lend: host_ca decides; without it, RACKER_BUILD_CA alone asks for one."""
    named = settings.BUILD_CA.get()
    if asked is False or (asked is None and not named):
        return None
    bundle = Path(named or DEFAULT_CA).absolute()
    if not bundle.is_file():
        where = f"RACKER_BUILD_CA={named}" if named else f"the host's CA bundle {DEFAULT_CA}"
        raise BadBuildCA(f"{where} is not a file", hint="set RACKER_BUILD_CA=/path/to/bundle.pem (PEM certificates)")
    return bundle


def clean(rootfs: Path, targets: list[str], since: float) -> list[str]:
    """Remove the empty mount points buildah made during the build (modified at or after
    `since`) at `targets`, then their parents while those are empty and as new.

    An empty file or directory the base image had is older, so it stays; so does
    anything reached through a symlink, which could point out of the rootfs.
    """
    removed = []
    tree = imagetree.Tree(rootfs)
    for target in targets:
        parts = PurePosixPath(target).parts[1:]
        if any(tree.is_symlink("/".join(parts[:depth])) for depth in range(1, len(parts))):
            continue
        for depth in range(len(parts), 0, -1):
            rel = "/".join(parts[:depth])
            if not _new_and_empty(tree, rel, since):
                break
            tree.rmtree(rel)  # empty: a directory or a file of no bytes
            removed.append("/" + rel)
    return removed


def _new_and_empty(tree: imagetree.Tree, rel: str, since: float) -> bool:
    try:
        info = tree.lstat(rel)
    except FileNotFoundError:
        return False
    if info.st_mtime < since:
        return False
    if stat.S_ISREG(info.st_mode):
        return info.st_size == 0
    return stat.S_ISDIR(info.st_mode) and not tree.listdir(rel)
