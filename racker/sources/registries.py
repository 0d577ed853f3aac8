"""Registry configuration read as podman reads it: containers-registries.conf(5), version 2.

Debian 12's skopeo reads /etc/containers/registries.conf but not
CONTAINERS_REGISTRIES_CONF; racker reads the files itself, in podman's
order, and hands skopeo the locations to try, one after the other:

    $CONTAINERS_REGISTRIES_CONF, else ~/.config/containers/registries.conf,
    else /etc/containers/registries.conf; then *.conf drop-ins of
    /etc/containers/registries.conf.d (not when the per-user file is used)
    and ~/.config/containers/registries.conf.d, each in name order.

For an image, the [[registry]] table with the longest matching `prefix`
decides: its mirrors first (for tags too, unless mirror-by-digest-only or a
mirror's pull-from-mirror says otherwise), then its `location`; `blocked`
refuses the pull; `insecure` allows plain HTTP for that endpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from racker.errors import BadReference

SYSTEM_FILE = Path("/etc/containers/registries.conf")
SYSTEM_DIR = Path("/etc/containers/registries.conf.d")


@dataclass(frozen=True)
class Source:
    """One place to pull an image from: a full reference (no scheme) and whether TLS may be skipped."""

    reference: str
    insecure: bool = False
    mirror: bool = False


def config_files() -> list[Path]:
    home = Path(os.path.expanduser("~"))
    user_file = home / ".config/containers/registries.conf"
    user_dir = home / ".config/containers/registries.conf.d"
    if os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        main, dirs = Path(os.environ["CONTAINERS_REGISTRIES_CONF"]), [SYSTEM_DIR, user_dir]
    elif user_file.is_file():
        main, dirs = user_file, [user_dir]
    else:
        main, dirs = SYSTEM_FILE, [SYSTEM_DIR, user_dir]
    files = [main] if main.is_file() else []
    for directory in dirs:
        if directory.is_dir():
            files += sorted(p for p in directory.iterdir() if p.suffix == ".conf" and p.is_file())
    return files


def registries() -> dict[str, dict]:
    """Every [[registry]] table by prefix, later files overriding earlier ones."""
    import tomllib

    tables: dict[str, dict] = {}
    for path in config_files():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise BadReference(f"{path}: not valid registries.conf TOML ({error})") from None
        for table in data.get("registry", []):
            prefix = table.get("prefix") or table.get("location")
            if isinstance(prefix, str) and prefix:
                tables[prefix] = table
    return tables


def _matches(prefix: str, name: str) -> bool:
    if prefix.startswith("*."):
        host = name.split("/", 1)[0]
        return host.endswith(prefix[1:])
    return name == prefix or name.startswith(prefix + "/") or name.startswith(prefix + ":") or name.startswith(prefix + "@")


def sources(target: str) -> list[Source]:
    """Where to pull `target` (host/path[:tag][@digest]) from, in order."""
    tables = registries()
    matching = [p for p in tables if _matches(p, target)]
    if not matching:
        return [Source(target)]
    prefix = max(matching, key=len)
    table = tables[prefix]
    if table.get("blocked"):
        raise BadReference(f"pulling {target} is blocked by registries.conf (prefix {prefix!r})")
    rest = target[len(prefix) :] if not prefix.startswith("*.") else target[len(target.split("/", 1)[0]) :]
    by_digest = "@sha256:" in target
    found = []
    for mirror in table.get("mirror", []):
        location = mirror.get("location")
        if not isinstance(location, str) or not location:
            continue
        rule = mirror.get("pull-from-mirror", "digest-only" if table.get("mirror-by-digest-only") else "all")
        if rule == "all" or (rule == "digest-only" and by_digest) or (rule == "tag-only" and not by_digest):
            found.append(Source(location + rest, bool(mirror.get("insecure")), mirror=True))
    location = table.get("location") or (prefix if not prefix.startswith("*.") else target.split("/", 1)[0])
    found.append(Source(location + rest, bool(table.get("insecure"))))
    return found
